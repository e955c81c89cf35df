"""Byte-level language-model data: a text file (or Python's own documentation) cut into fixed windows.

The byte stream ``data [N]`` (uint8) is split into ``W = N // (seq_len + 1)`` non-overlapping windows; window ``w``
is ``data[w * (seq_len + 1) : (w + 1) * (seq_len + 1)]`` and yields ``inputs = window[:-1]``,
``targets = window[1:]`` (both ``[seq_len]`` int64). The last ``val_fraction`` of the windows are the
validation (and test) set, the rest the training set.
"""

import math
import os

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["ByteTextDataModule", "ByteWindowDataset", "default_corpus_bytes"]


def default_corpus_bytes() -> bytes:
    """The text of Python's documentation topics (``pydoc_data.topics.topics``, values in sorted-key order), utf-8.

    It ships with every CPython, so the default corpus needs no network (about 0.45 MB on Python 3.11).
    """
    from pydoc_data.topics import topics

    return "".join(topics[key] for key in sorted(topics)).encode("utf-8")


class ByteWindowDataset(Dataset):
    """``count`` windows of ``seq_len + 1`` bytes starting at window ``first`` of ``data [N]`` (uint8).

    ``dataset[i]`` -> ``(inputs [seq_len], targets [seq_len])`` int64, targets = inputs shifted by one byte.
    """

    def __init__(self, data: torch.Tensor, seq_len: int, first: int, count: int):
        if first < 0 or count < 0 or (first + count) * (seq_len + 1) > data.numel():
            raise ValueError(f"windows {first}..{first + count} do not fit in {data.numel()} bytes")
        self.data, self.seq_len, self.first, self.count = data, seq_len, first, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -self.count <= index < self.count:
            raise IndexError(f"window index {index} out of range for {self.count} windows")
        start = (self.first + index % self.count) * (self.seq_len + 1)
        window = self.data[start : start + self.seq_len + 1].long()
        return window[:-1], window[1:]


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")


class ByteTextDataModule(pl.LightningDataModule):
    """Byte-level text windows for next-byte prediction (vocabulary 256).

    Args:
        path: a text file (read as raw bytes); ``None`` = Python's documentation topics (offline).
        seq_len: tokens per sample; windows are ``seq_len + 1`` bytes.
        batch_size: samples per batch (per process under DDP).
        val_fraction: share of the windows, taken from the end, used for validation and test; in ``[0, 0.5)``.
        shuffle: shuffle the training windows (with a generator seeded by ``seed``, so deterministic).
        seed: seed of the training DataLoader's generator.
        num_workers: DataLoader workers.
        max_train_samples: keep only the first N training windows.

    The text is read at construction, so every bad input fails at once (on every rank) with a ``ValueError`` or
    ``TypeError`` naming the parameter.
    """

    def __init__(
        self,
        path: str | None = None,
        seq_len: int = 128,
        batch_size: int = 8,
        val_fraction: float = 0.05,
        shuffle: bool = False,
        seed: int = 0,
        num_workers: int = 0,
        max_train_samples: int | None = None,
    ):
        super().__init__()
        _check_int("seq_len", seq_len, 1)
        _check_int("batch_size", batch_size, 1)
        _check_int("num_workers", num_workers, 0)
        _check_int("seed", seed, 0)
        if max_train_samples is not None:
            _check_int("max_train_samples", max_train_samples, 1)
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)):
            raise TypeError(f"val_fraction must be a number in [0, 0.5), got {val_fraction!r}")
        if not 0 <= val_fraction < 0.5:
            raise ValueError(f"val_fraction must be in [0, 0.5), got {val_fraction}")
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str path or None, got {type(path).__name__} ({path!r})")
        self.save_hyperparameters()
        self.path, self.seq_len, self.batch_size = path, seq_len, batch_size
        self.val_fraction, self.shuffle, self.seed = float(val_fraction), shuffle, seed
        self.num_workers, self.max_train_samples = num_workers, max_train_samples

        self.data = self._read(path)  # [N] uint8
        num_windows = self.data.numel() // (seq_len + 1)
        num_val = math.ceil(num_windows * self.val_fraction)
        num_train = num_windows - num_val
        if max_train_samples is not None:
            num_train = min(num_train, max_train_samples)
        if num_train < batch_size:
            source = "max_train_samples" if max_train_samples is not None and max_train_samples < batch_size else "path"
            raise ValueError(
                f"{source}: the text ({path or 'default corpus'}, {self.data.numel()} bytes) gives {num_train} training "
                f"windows of seq_len + 1 = {seq_len + 1} bytes, fewer than one batch (batch_size={batch_size}); "
                f"use a longer text or a smaller seq_len / batch_size"
            )
        self.train_dataset = ByteWindowDataset(self.data, seq_len, 0, num_train)
        self.val_dataset = ByteWindowDataset(self.data, seq_len, num_windows - num_val, num_val)

    @staticmethod
    def _read(path: "str | os.PathLike | None") -> torch.Tensor:
        if path is None:
            raw = default_corpus_bytes()
        else:
            if not os.path.isfile(path):
                raise ValueError(f"path: no such file {os.fspath(path)!r}")
            with open(path, "rb") as f:
                raw = f.read()
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.zeros(0, dtype=torch.uint8)

    @property
    def num_train_samples(self) -> int:
        """Training windows (samples); one epoch is ``num_train_samples // batch_size`` batches (drop_last)."""
        return len(self.train_dataset)

    @property
    def num_val_samples(self) -> int:
        return len(self.val_dataset)

    @property
    def tokens_per_batch(self) -> int:
        """``batch_size * seq_len`` predicted tokens per batch (per process)."""
        return self.batch_size * self.seq_len

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_dataset, batch_size=self.batch_size, shuffle=self.shuffle, drop_last=True,
            generator=torch.Generator().manual_seed(self.seed), num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
