"""Run a function on several gloo ranks on CPU, from inside a test.

:func:`run_on_ranks` starts ``world_size`` processes with the ``spawn`` start method,
joins them into one ``torch.distributed`` process group (gloo, over the loopback
interface, on a free port), calls ``fn(rank, world_size, *args)`` on each and returns
the results in rank order. A rank that raises fails the test with its rank and its
traceback; a rank that does not finish in time (a collective that one rank never
enters) fails it with the rank's name, and every process is ended.

``fn`` and its arguments must be picklable: define ``fn`` at module level.

:func:`terminate_on_timeout` guards code that starts and joins its own ranks
(Lightning's ``ddp_spawn``) the same way: past the timeout the ranks still running
are terminated and named.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import queue
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["RankFailure", "free_port", "run_on_ranks", "terminate_on_timeout"]

_STARTUP_S = 120.0
_POLL_S = 0.1
_DRAIN_S = 2.0
_READY, _DONE, _FAILED = "ready", "done", "failed"


class RankFailure(AssertionError):
    """A rank raised, died or did not finish in time.

    Attributes:
        ranks: The ranks that failed, in rank order.
    """

    def __init__(self, message: str, ranks: list[int]) -> None:
        super().__init__(message)
        self.ranks = ranks


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_on_ranks(
    fn: Callable[..., Any],
    *args: Any,
    world_size: int = 2,
    timeout: float = 120.0,
) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks.

    Args:
        fn: A module-level function; its return value must be picklable.
        *args: Passed to ``fn`` after the rank and the world size.
        world_size: The number R of ranks.
        timeout: Seconds, counted from the moment every rank has joined the
            process group, after which a rank that has not returned counts as
            hung. Starting the processes and joining may take up to 120 s more.

    Returns:
        The R return values, in rank order.

    Raises:
        RankFailure: Naming the rank that raised (with its traceback), exited
            without a result, or hung.
    """
    ctx = mp.get_context("spawn")
    messages = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, world_size, port, timeout, fn, args, messages),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    try:
        out = _Collector(procs, messages, timeout).run()
    except BaseException:
        _end(procs, grace=0.0)
        raise
    _end(procs, grace=10.0)
    return out


def _worker(
    rank: int,
    world_size: int,
    port: int,
    timeout: float,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    messages: Any,
) -> None:
    """One rank: join the group, report ready, run ``fn``, send its pickled result."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=_STARTUP_S + timeout),
        )
        messages.put((rank, _READY, None))
        messages.put((rank, _DONE, pickle.dumps(fn(rank, world_size, *args))))
    except BaseException:
        messages.put((rank, _FAILED, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class _Collector:
    """The parent's view of the ranks: who joined, who returned what."""

    def __init__(self, procs: list[Any], messages: Any, timeout: float) -> None:
        self.procs = procs
        self.messages = messages
        self.timeout = timeout
        self.ready: set[int] = set()
        self.done: dict[int, Any] = {}
        self.deadline = time.monotonic() + _STARTUP_S

    @property
    def world_size(self) -> int:
        return len(self.procs)

    def run(self) -> list[Any]:
        """Wait for every rank's result; raise on the first failure or hang."""
        while len(self.done) < self.world_size:
            try:
                message = self.messages.get(timeout=_POLL_S)
            except queue.Empty:
                self._check_exits()
                self._check_deadline()
                continue
            self._receive(*message)
        return [self.done[r] for r in range(self.world_size)]

    def _receive(self, rank: int, kind: str, payload: Any) -> None:
        if kind == _FAILED:
            raise RankFailure(
                f"rank {rank} of {self.world_size} raised:\n{payload}", [rank]
            )
        if kind == _DONE:
            self.done[rank] = pickle.loads(payload)
            return
        self.ready.add(rank)
        if len(self.ready) == self.world_size:
            self.deadline = time.monotonic() + self.timeout

    def _check_deadline(self) -> None:
        if time.monotonic() <= self.deadline:
            return
        joined = len(self.ready) == self.world_size
        pending = self.done if joined else self.ready
        missing = [r for r in range(self.world_size) if r not in pending]
        what = (
            f"did not finish within {self.timeout:g} s after all ranks joined "
            "(a collective that another rank never entered?)"
            if joined
            else f"did not join the process group within {_STARTUP_S:g} s"
        )
        raise RankFailure(
            f"rank(s) {missing} of {self.world_size} {what}; rank(s) "
            f"{sorted(self.done)} finished",
            missing,
        )

    def _check_exits(self) -> None:
        """Raise if a rank exited without sending its result."""
        for rank, proc in enumerate(self.procs):
            if rank in self.done or proc.exitcode is None:
                continue
            try:
                message = self.messages.get(timeout=_DRAIN_S)
            except queue.Empty:
                raise RankFailure(
                    f"rank {rank} of {self.world_size} exited with code "
                    f"{proc.exitcode} without a result (killed, or crashed in "
                    "native code)",
                    [rank],
                ) from None
            self._receive(*message)
            return


def _end(procs: list[Any], grace: float) -> None:
    """Join the ranks; terminate, then kill, those still running after ``grace``."""
    for proc in procs:
        proc.join(timeout=grace)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=5.0)
        if proc.is_alive():
            proc.kill()
            proc.join()


@contextlib.contextmanager
def terminate_on_timeout(
    timeout: float, processes: Callable[[], list[Any]]
) -> Iterator[None]:
    """Fail a block that waits on spawned ranks if it runs past ``timeout``.

    For code that starts and joins its own rank processes (Lightning's
    ``ddp_spawn``): when the block has not finished after ``timeout`` seconds, the
    ranks still alive are terminated, which makes the block's join fail, and the
    block raises :class:`RankFailure` naming them.

    Args:
        timeout: Seconds the block may take.
        processes: Returns the rank processes, in rank order (an empty list
            before they start).

    Raises:
        RankFailure: Naming the ranks that were still running at the timeout.
    """
    hung: list[int] = []

    def terminate() -> None:
        for rank, proc in enumerate(processes()):
            if proc.is_alive():
                hung.append(rank)
                proc.terminate()

    timer = threading.Timer(timeout, terminate)
    timer.daemon = True
    timer.start()
    try:
        yield
    except BaseException as err:
        if hung:
            raise RankFailure(
                f"rank(s) {hung} still running after {timeout:g} s were terminated",
                hung,
            ) from err
        raise
    finally:
        timer.cancel()
    if hung:
        raise RankFailure(
            f"rank(s) {hung} still running after {timeout:g} s were terminated", hung
        )
