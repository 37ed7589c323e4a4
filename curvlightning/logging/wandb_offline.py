"""Read back the run file that wandb writes in offline mode.

With ``WANDB_MODE=offline``, wandb writes every record of a run to
``wandb/offline-run-<time>-<id>/run-<id>.wandb`` and nothing else that holds the
logged values (no summary file). wandb ships no reader for that file, so this module
decodes it:

- a 7-byte file header: the identifier ``b":W&B"``, the magic number ``0xBEE1``
  (little-endian ``uint16``) and a version byte (0);
- then the LevelDB log layout: the file is cut into 32 KiB blocks, counted from the
  first byte of the file (the first block holds the file header and 32 KiB - 7 bytes
  of records). A block holds fragments, each with a 7-byte header (CRC-32 as
  little-endian ``uint32``, payload length as ``uint16``, fragment type as ``uint8``:
  1 full, 2 first, 3 middle, 4 last). A block tail shorter than a fragment header is
  padding. The checksum is the zlib CRC-32 of the type byte followed by the payload;
- each assembled payload is a serialized ``wandb.proto.wandb_internal_pb2.Record``.

Logged values live in history records, one per ``run.log`` step, as items with a key
path (``nested_key``, or ``key``) and a JSON-encoded value. A ``wandb.Histogram``
logged under ``"name"`` becomes the items ``name/_type`` (``"histogram"``),
``name/bins`` (the bin edges) and ``name/values`` (the counts).

Example:
    >>> from curvlightning.logging.wandb_offline import find_run_files, read_history
    >>> rows = read_history(find_run_files("wandb")[-1])  # doctest: +SKIP
    >>> [row["loss"] for row in rows if "loss" in row]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import struct
import warnings
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from wandb.proto.wandb_internal_pb2 import HistoryRecord, Record

__all__ = [
    "BLOCK_SIZE",
    "HistogramRow",
    "WandbRunFileError",
    "find_run_files",
    "histogram_keys",
    "read_histograms",
    "read_history",
    "read_records",
]

BLOCK_SIZE = 32 * 1024
_FILE_HEADER = struct.Struct("<4sHB")
_FILE_IDENT = b":W&B"
_FILE_MAGIC = 0xBEE1
_FILE_VERSION = 0
_FRAGMENT_HEADER = struct.Struct("<IHB")
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
_CUT = -1  # marks where a file ends inside a fragment


class WandbRunFileError(ValueError):
    """A file is not a wandb run file, or its records are damaged."""


class HistogramRow(NamedTuple):
    """One logged ``wandb.Histogram``.

    Attributes:
        step: The value of the step key in the same history row, or ``None`` when the
            row has none.
        bins: The ``num_bins + 1`` bin edges, float64.
        values: The ``num_bins`` counts, float64.
    """

    step: int | None
    bins: np.ndarray
    values: np.ndarray


def find_run_files(root: str | Path) -> list[Path]:
    """Find every wandb run file under a folder.

    Args:
        root: A folder to search recursively, e.g. the ``save_dir`` of a
            ``WandbLogger`` or its ``wandb`` subfolder.

    Returns:
        The paths of all ``run-*.wandb`` files under ``root``, sorted (offline run
        folders are named by start time, so older runs come first).

    Raises:
        FileNotFoundError: If ``root`` is not an existing folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"root={str(root)!r} is not an existing folder; pass the folder that "
            "holds wandb's 'offline-run-*' folders or one above it."
        )
    return sorted(root.rglob("run-*.wandb"))


def read_records(path: str | Path) -> Iterator[Record]:
    """Iterate over the records of a wandb run file, in the order they were written.

    A file that ends inside a record (a run that is still writing, or a process that
    was killed) yields every complete record and then warns.

    Args:
        path: The ``run-<id>.wandb`` file.

    Yields:
        Each record, a ``wandb.proto.wandb_internal_pb2.Record``.

    Raises:
        WandbRunFileError: If the file does not start with a wandb run file header,
            or a fragment has a wrong checksum or an unknown type, or fragments come
            out of order.
    """
    from wandb.proto.wandb_internal_pb2 import Record

    for payload in _read_payloads(Path(path)):
        record = Record()
        record.ParseFromString(payload)
        yield record


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """Read the logged history of a wandb run file.

    Args:
        path: The ``run-<id>.wandb`` file.

    Returns:
        One dict per history row (one per committed ``run.log`` step), mapping each
        key to its JSON-decoded value. Nested keys are joined with ``"/"``, so a
        histogram ``"h"`` appears as ``"h/_type"``, ``"h/bins"`` and ``"h/values"``.
        Every row holds ``"_step"``, wandb's own step counter.

    Raises:
        WandbRunFileError: As :func:`read_records`.
    """
    return [
        _history_row(record.history)
        for record in read_records(path)
        if record.WhichOneof("record_type") == "history"
    ]


def histogram_keys(rows: Iterable[dict[str, Any]]) -> list[str]:
    """List the keys under which histograms were logged.

    Args:
        rows: History rows, as returned by :func:`read_history`.

    Returns:
        The sorted keys ``k`` for which some row has ``k/_type == "histogram"``.
    """
    suffix = "/_type"
    return sorted(
        {
            key[: -len(suffix)]
            for row in rows
            for key, value in row.items()
            if key.endswith(suffix) and value == "histogram"
        }
    )


def read_histograms(
    path: str | Path, key: str, *, step_key: str = "_step"
) -> list[HistogramRow]:
    """Read every histogram logged under one key.

    Args:
        path: The ``run-<id>.wandb`` file.
        key: The key the histogram was logged under, e.g. ``"grad/layer1.weight"``.
        step_key: The history key to report as the step: ``"_step"`` for wandb's
            counter, ``"trainer/global_step"`` for Lightning's.

    Returns:
        One :class:`HistogramRow` per history row that holds the histogram, in order.

    Raises:
        WandbRunFileError: As :func:`read_records`.
    """
    return [
        HistogramRow(
            step=_optional_int(row.get(step_key)),
            bins=np.asarray(row[f"{key}/bins"], dtype=np.float64),
            values=np.asarray(row[f"{key}/values"], dtype=np.float64),
        )
        for row in read_history(path)
        if row.get(f"{key}/_type") == "histogram"
    ]


def _history_row(history: HistoryRecord) -> dict[str, Any]:
    """Decode one history record into a flat dict."""
    row = {
        "/".join(item.nested_key) if item.nested_key else item.key: json.loads(
            item.value_json
        )
        for item in history.item
    }
    if "_step" not in row and history.HasField("step"):
        row["_step"] = history.step.num
    return row


def _optional_int(value: Any) -> int | None:
    """Convert a JSON step to ``int``, keeping ``None``."""
    return None if value is None else int(value)


def _read_payloads(path: Path) -> Iterator[bytes]:
    """Assemble the record payloads of a run file from its fragments."""
    parts: list[bytes] | None = None
    for offset, kind, data in _read_fragments(path):
        if kind == _CUT:
            _warn_truncated(path, f"inside an incomplete fragment at byte {offset}")
            return
        if kind in (_FULL, _FIRST) and parts is not None:
            raise _order_error(path, offset, kind, "the previous record is unfinished")
        if kind in (_MIDDLE, _LAST) and parts is None:
            raise _order_error(path, offset, kind, "no record was started")
        if kind == _FULL:
            yield data
        elif kind == _FIRST:
            parts = [data]
        elif kind == _MIDDLE:
            parts.append(data)
        else:
            yield b"".join([*parts, data])
            parts = None
    if parts is not None:
        _warn_truncated(path, "inside a record that spans blocks")


def _order_error(path: Path, offset: int, kind: int, why: str) -> WandbRunFileError:
    """Build the error for a fragment that comes out of order."""
    return WandbRunFileError(
        f"Fragment of type {kind} at byte {offset} of {str(path)!r} is out of order: "
        f"{why}. The file is damaged; read a complete copy of the run file."
    )


def _read_fragments(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """Yield ``(byte offset, type, payload)`` for every fragment of a run file."""
    with path.open("rb") as stream:
        _check_file_header(path, stream.read(_FILE_HEADER.size))
        start, block_offset = _FILE_HEADER.size, 0
        block = stream.read(BLOCK_SIZE - start)
        while block:
            yield from _block_fragments(path, block, block_offset + start)
            block_offset += BLOCK_SIZE
            start = 0
            block = stream.read(BLOCK_SIZE)


def _check_file_header(path: Path, header: bytes) -> None:
    """Raise unless ``header`` is the header of a wandb run file."""
    if len(header) < _FILE_HEADER.size:
        raise WandbRunFileError(
            f"{str(path)!r} holds {len(header)} bytes, fewer than the "
            f"{_FILE_HEADER.size}-byte header of a wandb run file; pass a "
            "'run-<id>.wandb' file from an 'offline-run-*' folder."
        )
    ident, magic, version = _FILE_HEADER.unpack(header)
    if ident != _FILE_IDENT or magic != _FILE_MAGIC:
        raise WandbRunFileError(
            f"{str(path)!r} is not a wandb run file: it starts with {header!r}, "
            f"expected {_FILE_IDENT!r} and the magic number {_FILE_MAGIC:#06x}; "
            "pass a 'run-<id>.wandb' file from an 'offline-run-*' folder."
        )
    if version != _FILE_VERSION:
        raise WandbRunFileError(
            f"{str(path)!r} is a wandb run file of format version {version}, but "
            f"this reader knows only version {_FILE_VERSION}; read it with a wandb "
            "release that matches the writer (e.g. 'wandb sync')."
        )


def _block_fragments(
    path: Path, block: bytes, offset: int
) -> Iterator[tuple[int, int, bytes]]:
    """Yield the fragments of one block that starts at byte ``offset``.

    A block that ends inside a fragment yields a last ``(offset, _CUT, b"")``.
    """
    pos, size = 0, len(block)
    while size - pos >= _FRAGMENT_HEADER.size:
        checksum, length, kind = _FRAGMENT_HEADER.unpack_from(block, pos)
        start = pos + _FRAGMENT_HEADER.size
        data = block[start : start + length]
        if len(data) < length:
            yield offset + pos, _CUT, b""
            return
        _check_fragment(path, offset + pos, checksum, kind, data)
        yield offset + pos, kind, data
        pos = start + length
    # A tail under a header's size is padding in a full block, a cut in a short one.
    is_short_block = (offset + size) % BLOCK_SIZE != 0
    if pos < size and is_short_block:
        yield offset + pos, _CUT, b""


def _check_fragment(
    path: Path, offset: int, checksum: int, kind: int, data: bytes
) -> None:
    """Raise if a fragment has an unknown type or a wrong checksum."""
    if kind not in (_FULL, _FIRST, _MIDDLE, _LAST):
        raise WandbRunFileError(
            f"Fragment at byte {offset} of {str(path)!r} has type {kind}, expected "
            "1 (full), 2 (first), 3 (middle) or 4 (last). The file is damaged or "
            "not a wandb run file; read a complete copy of the run file."
        )
    expected = zlib.crc32(data, zlib.crc32(bytes([kind])))
    if checksum != expected:
        raise WandbRunFileError(
            f"Fragment at byte {offset} of {str(path)!r} has checksum "
            f"{checksum:#010x}, but its contents give {expected:#010x}. The file is "
            "damaged; read a complete copy of the run file."
        )


def _warn_truncated(path: Path, where: str) -> None:
    """Warn that a run file ends early (a run still writing, or one killed)."""
    warnings.warn(
        f"{str(path)!r} ends {where}; the records before it were read and the "
        "incomplete one was skipped. The run may still be writing, or was stopped.",
        RuntimeWarning,
        stacklevel=4,
    )
