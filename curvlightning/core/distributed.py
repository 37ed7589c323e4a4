"""One small interface over "no process group" and ``torch.distributed``.

Estimates are reduced explicitly, never by differentiating through a distributed
wrapper. Means over ranks are weighted by each rank's sample count ``n_r``:
``mean = sum_r n_r x_r / sum_r n_r``, which is the full-batch value for any quantity
that is a mean over samples (the loss, its gradient and its Hessian).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Reducer", "SingleProcess", "TorchDistributed", "default_reducer"]


class Reducer:
    """Collective operations used by the estimators.

    Subclasses implement :meth:`all_reduce_sum` and :meth:`all_gather_scalar`.
    """

    rank: int = 0
    world_size: int = 1

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """The elementwise sum of ``tensor`` over ranks (a new tensor)."""
        raise NotImplementedError

    def all_gather_scalar(self, value: float) -> list[float]:
        """The value of every rank, in rank order."""
        raise NotImplementedError

    def weighted_mean(self, tensor: Tensor, weight: float) -> Tensor:
        """``sum_r w_r x_r / sum_r w_r`` with this rank's weight ``w_r``."""
        total = self.all_reduce_sum(torch.as_tensor(float(weight), dtype=tensor.dtype))
        return self.all_reduce_sum(tensor * weight) / total

    def offset_and_total(self, count: int) -> tuple[int, int]:
        """This rank's offset in the global batch and the global batch size."""
        counts = [int(c) for c in self.all_gather_scalar(float(count))]
        return sum(counts[: self.rank]), sum(counts)

    def all_true(self, flag: bool) -> bool:
        """True when ``flag`` holds on every rank (a decision all ranks share)."""
        failures = self.all_reduce_sum(torch.tensor(0.0 if flag else 1.0))
        return bool(failures.item() == 0)


class SingleProcess(Reducer):
    """The reducer of a run without a process group."""

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Return a copy of ``tensor``."""
        return tensor.clone()

    def all_gather_scalar(self, value: float) -> list[float]:
        """Return ``[value]``."""
        return [value]


@dataclass
class TorchDistributed(Reducer):
    """A reducer over a ``torch.distributed`` process group.

    Args:
        group: The process group; ``None`` means the default group.
    """

    group: dist.ProcessGroup | None = None

    def __post_init__(self) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "TorchDistributed needs an initialised process group: call "
                "torch.distributed.init_process_group first, or use SingleProcess"
            )
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum over ranks; the input is left untouched."""
        out = tensor.detach().clone()
        if dist.get_backend(self.group) == "gloo" and out.device.type != "cpu":
            reduced = out.cpu()
            dist.all_reduce(reduced, group=self.group)
            return reduced.to(out.device)
        dist.all_reduce(out, group=self.group)
        return out

    def all_gather_scalar(self, value: float) -> list[float]:
        """Gather one float from each rank."""
        out = [None] * self.world_size
        dist.all_gather_object(out, float(value), group=self.group)
        return [float(v) for v in out]


def default_reducer() -> Reducer:
    """``TorchDistributed`` on the default group when one is up, else single."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchDistributed()
    return SingleProcess()
