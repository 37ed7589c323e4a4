"""A character-level text corpus as a Lightning data module.

By default the corpus is the Python standard library's own top-level ``*.py``
files (about 4.7 MB of text in about 166 distinct characters), present on every
machine that runs Python, so this data module needs no download; any text files
of the user's can take their place.
"""

from __future__ import annotations

import math
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from curvlightning.core.probes import mix_seed

__all__ = ["CharTextDataModule", "CharWindows", "RandomWindowSampler", "stdlib_dir"]


def stdlib_dir() -> Path:
    """The folder of the running interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


class CharWindows(Dataset):
    """Windows of ``seq_len`` characters and their next characters.

    Window ``i`` starts at ``i * stride`` in ``tokens`` and is the pair
    ``(x[t : t + L], x[t + 1 : t + L + 1])`` with ``t = i * stride`` and
    ``L = seq_len``: the targets are the inputs shifted left by one character.
    A window reads ``L + 1`` tokens, so ``len(tokens) - L`` windows fit at
    stride 1 and ``(len(tokens) - L - 1) // stride + 1`` in general.

    Args:
        tokens: Character ids of one split, shape ``(n,)``, ``n > seq_len``.
        seq_len: Characters per window.
        stride: Distance between the starts of consecutive windows.
        offset: Position of ``tokens[0]`` in the whole corpus (for bookkeeping).
    """

    def __init__(self, tokens: Tensor, seq_len: int, stride: int, offset: int = 0):
        if len(tokens) <= seq_len:
            raise ValueError(
                f"a split of {len(tokens)} characters holds no window of "
                f"seq_len + 1 = {seq_len + 1}: pass a shorter `seq_len`"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.stride = stride
        self.offset = offset

    def __len__(self) -> int:
        return (len(self.tokens) - self.seq_len - 1) // self.stride + 1

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        """Inputs and targets of window ``index``, each of shape ``(seq_len,)``."""
        start = self.start(index) - self.offset
        chunk = self.tokens[start : start + self.seq_len + 1]
        return chunk[:-1], chunk[1:]

    def start(self, index: int) -> int:
        """Position in the whole corpus of the first input of window ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range for {len(self)} windows")
        return self.offset + index * self.stride


class RandomWindowSampler(Sampler[int]):
    """Draws window indices uniformly at random, with replacement.

    The indices of an epoch are a function of ``(seed, epoch)`` only, so every
    rank of a distributed run draws the same list (Lightning then hands each
    rank its share of it) and a resumed run draws what the interrupted one
    would have. Lightning calls :meth:`set_epoch` at the start of every epoch.

    Args:
        num_windows: Number of windows to draw from (indices ``0 .. n - 1``).
        num_samples: Indices per epoch.
        seed: Seed of the draws.
    """

    def __init__(self, num_windows: int, num_samples: int, seed: int = 0) -> None:
        self.num_windows = num_windows
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the draws of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, "windows"))
        draws = torch.randint(self.num_windows, (self.num_samples,), generator=gen)
        return iter(draws.tolist())


class CharTextDataModule(LightningDataModule):
    r"""Next-character prediction on text files, split by position.

    The files are read in sorted path order (``encoding``, universal newlines),
    each followed by a newline when it lacks one, and concatenated; the first
    ``max_chars`` characters form the corpus of ``n`` characters. The
    vocabulary is the sorted list of its distinct characters (sorted by code
    point, so it depends on the text only) and a character's id is its index.

    The first ``n_train = n - ceil(val_fraction * n)`` characters are the
    training split and the rest the validation split: contiguous, so no
    character of one split appears in a window of the other. A training batch
    holds windows at uniformly random starts in the training split
    (:class:`RandomWindowSampler`, ``n_train // seq_len`` windows an epoch, so
    an epoch reads about as many characters as the split holds); validation
    windows tile the validation split at stride ``seq_len``, in a fixed order.
    A batch is a pair of ``int64`` tensors ``(inputs, targets)`` of shape
    ``(batch_size, seq_len)`` with ``targets[:, t] = inputs[:, t + 1]``.

    The vocabulary is saved in the checkpoint (:meth:`state_dict`); resuming on
    a corpus with another vocabulary raises an error instead of feeding the
    model ids that mean other characters.

    Args:
        paths: A text file, a folder, or a list of them; None for the standard
            library's top-level ``*.py`` files (see :func:`stdlib_dir`).
        glob: Pattern of the files taken from a folder (``"**/*.txt"`` also
            searches subfolders).
        seq_len: Characters per window.
        batch_size: Windows per batch.
        val_fraction: Fraction of the corpus held out for validation, in (0, 1).
        max_chars: Keep only the first ``max_chars`` characters (keeps setup and
            epochs short); None keeps everything.
        seed: Seed of the training windows.
        num_workers: Worker processes for each data loader.
        encoding: Text encoding of the files.

    Raises:
        ValueError: If an argument is out of its range, or a folder holds no file
            matching ``glob``.
        FileNotFoundError: If a path does not exist.

    Example:
        >>> data = CharTextDataModule(max_chars=100_000)
        >>> data.setup("fit")
        >>> x, y = next(iter(data.train_dataloader()))
        >>> x.shape, bool((x[:, 1:] == y[:, :-1]).all())
        (torch.Size([32, 128]), True)
    """

    def __init__(
        self,
        paths: str | list[str] | None = None,
        glob: str = "*.py",
        seq_len: int = 128,
        batch_size: int = 32,
        val_fraction: float = 0.05,
        max_chars: int | None = 2_000_000,
        seed: int = 0,
        num_workers: int = 0,
        encoding: str = "utf-8",
    ) -> None:
        super().__init__()
        _check_args(seq_len, batch_size, val_fraction, max_chars, num_workers)
        self.save_hyperparameters()
        self.files = _resolve_files(paths, glob)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.max_chars = max_chars
        self.seed = seed
        self.num_workers = num_workers
        self.encoding = encoding
        self.tokens: Tensor | None = None
        self.train_set: CharWindows | None = None
        self.val_set: CharWindows | None = None
        self._vocab: str | None = None

    @property
    def vocab(self) -> str:
        """The distinct characters of the corpus, sorted; id ``i`` is ``vocab[i]``."""
        if self._vocab is None:
            raise RuntimeError(
                "CharTextDataModule has no vocabulary yet: call `setup()` first "
                "(the Trainer does this for you)."
            )
        return self._vocab

    @property
    def vocab_size(self) -> int:
        """Number of distinct characters, the model's number of classes."""
        return len(self.vocab)

    @property
    def num_train_chars(self) -> int:
        """Characters in the training split (positions ``0 .. n_train - 1``)."""
        return len(self._require(self.train_set).tokens)

    def encode(self, text: str) -> Tensor:
        """Ids of shape ``(len(text),)`` of the characters of ``text``.

        Raises:
            ValueError: If ``text`` holds a character outside the vocabulary.
        """
        codes = _code_points(text)
        table = _code_points(self.vocab)
        ids = np.searchsorted(table, codes)
        bad = (ids >= len(table)) | (table[np.minimum(ids, len(table) - 1)] != codes)
        if bad.any():
            char = text[int(np.argmax(bad))]
            raise ValueError(
                f"character {char!r} of `text` is not in the vocabulary of "
                f"{len(table)} characters: encode only text made of `vocab`"
            )
        return torch.as_tensor(ids, dtype=torch.int64)

    def decode(self, ids: Tensor) -> str:
        """The text of a 1-d tensor of character ids."""
        vocab = self.vocab
        return "".join(vocab[i] for i in ids.tolist())

    def setup(self, stage: str | None = None) -> None:
        """Read, encode and split the corpus once; later calls do nothing.

        Args:
            stage: Lightning's stage name; every stage gets both splits.

        Raises:
            ValueError: If a split is shorter than ``seq_len + 1`` characters or
                a file cannot be decoded with ``encoding``.
        """
        if self.tokens is not None:
            return
        text = _read_corpus(self.files, self.encoding, self.max_chars)
        num_val = math.ceil(self.val_fraction * len(text))
        _check_length(len(text), len(text) - num_val, num_val, self.seq_len)
        vocab = "".join(sorted(set(text)))
        self._check_vocab(vocab)
        self._vocab = vocab
        self.tokens = self.encode(text)
        split = len(text) - num_val
        self.train_set = CharWindows(self.tokens[:split], self.seq_len, 1, 0)
        self.val_set = CharWindows(
            self.tokens[split:], self.seq_len, self.seq_len, split
        )

    def train_dataloader(self) -> DataLoader:
        """Batches of windows at random starts, fixed by ``seed`` and the epoch."""
        train_set = self._require(self.train_set)
        per_epoch = max(len(train_set.tokens) // self.seq_len, 1)
        sampler = RandomWindowSampler(len(train_set), per_epoch, self.seed)
        return self._loader(train_set, sampler)

    def val_dataloader(self) -> DataLoader:
        """Batches of the validation windows, in order."""
        return self._loader(self._require(self.val_set), None)

    def state_dict(self) -> dict[str, Any]:
        """The vocabulary, saved in Lightning checkpoints."""
        return {"vocab": self._vocab}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the vocabulary of a checkpoint.

        Raises:
            ValueError: If the corpus, already read, has another vocabulary.
        """
        vocab = state_dict.get("vocab")
        if vocab is None:
            return
        self._check_vocab(vocab)
        self._vocab = vocab

    def _check_vocab(self, vocab: str) -> None:
        if self._vocab is not None and vocab != self._vocab:
            raise ValueError(
                f"the checkpoint's vocabulary ({len(vocab)} characters) differs "
                f"from the corpus' ({len(self._vocab)} characters): the model's "
                "ids would mean other characters. Resume with the same `paths`, "
                "`glob` and `max_chars` as the run that wrote the checkpoint."
            )

    def _loader(self, dataset: CharWindows, sampler: Sampler | None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            shuffle=False,
            drop_last=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    @staticmethod
    def _require(dataset: CharWindows | None) -> CharWindows:
        if dataset is None:
            raise RuntimeError(
                "CharTextDataModule has no data yet: call `setup()` before asking "
                "for a data loader (the Trainer does this for you)."
            )
        return dataset


def _code_points(text: str) -> np.ndarray:
    """The Unicode code points of ``text``, shape ``(len(text),)``."""
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def _resolve_files(paths: str | list[str] | None, glob: str) -> list[Path]:
    """The files of the corpus, in sorted order within each entry of ``paths``."""
    if paths is None:
        return _folder_files(stdlib_dir(), glob)
    entries = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not entries:
        raise ValueError(
            "`paths` is an empty list: pass a text file or folder, or paths=None "
            "for the standard library's source files."
        )
    files: list[Path] = []
    for entry in entries:
        path = Path(entry).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"`paths` entry {str(entry)!r} does not exist: pass an existing "
                "text file or folder, or paths=None for the standard library's "
                "source files."
            )
        files += _folder_files(path, glob) if path.is_dir() else [path]
    return files


def _folder_files(folder: Path, glob: str) -> list[Path]:
    files = sorted(p for p in folder.glob(glob) if p.is_file())
    if not files:
        raise ValueError(
            f"folder {str(folder)!r} holds no file matching `glob`={glob!r}: pass "
            "a pattern that matches its text files, e.g. glob='**/*.txt'."
        )
    return files


def _read_corpus(files: list[Path], encoding: str, max_chars: int | None) -> str:
    """Concatenate the files, each ending in a newline, up to ``max_chars``."""
    parts: list[str] = []
    total = 0
    for path in files:
        try:
            text = path.read_text(encoding=encoding)
        except UnicodeDecodeError as err:
            raise ValueError(
                f"file {str(path)!r} is not valid {encoding} text ({err.reason} at "
                f"byte {err.start}): pass its `encoding`, or leave it out of `paths`."
            ) from err
        if text and not text.endswith("\n"):
            text += "\n"
        parts.append(text)
        total += len(text)
        if max_chars is not None and total >= max_chars:
            break
    corpus = "".join(parts)
    return corpus if max_chars is None else corpus[:max_chars]


def _check_length(num_chars: int, num_train: int, num_val: int, seq_len: int) -> None:
    if min(num_train, num_val) < seq_len + 1:
        raise ValueError(
            f"the corpus has {num_chars} characters, split into {num_train} for "
            f"training and {num_val} for validation, but each split needs at "
            f"least seq_len + 1 = {seq_len + 1}: pass more text, a larger "
            "`max_chars`, a smaller `seq_len`, or another `val_fraction`."
        )


def _check_args(
    seq_len: int,
    batch_size: int,
    val_fraction: float,
    max_chars: int | None,
    num_workers: int,
) -> None:
    """Raise a ValueError naming the first argument out of its range."""
    for name, value, example in (
        ("seq_len", seq_len, "seq_len=128"),
        ("batch_size", batch_size, "batch_size=32"),
    ):
        if not _is_int(value) or value < 1:
            raise ValueError(
                f"`{name}` must be a positive integer: got {value!r}. "
                f"Pass e.g. {example}."
            )
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(
            f"`val_fraction` must be in (0, 1): got {val_fraction!r}. "
            "Pass e.g. val_fraction=0.05 to hold out the last 5% of the text."
        )
    if max_chars is not None and (not _is_int(max_chars) or max_chars < 2):
        raise ValueError(
            f"`max_chars` must be an integer of at least 2 or None: got "
            f"{max_chars!r}. Pass None to keep the whole corpus."
        )
    if not _is_int(num_workers) or num_workers < 0:
        raise ValueError(
            f"`num_workers` must be a non-negative integer: got {num_workers!r}. "
            "Pass num_workers=0 to load in the main process."
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
