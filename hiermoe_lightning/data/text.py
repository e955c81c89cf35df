"""Byte-level language-model data: a text file (or Python's own documentation) cut into fixed windows.

The byte stream ``data [N]`` (uint8) is split into ``W = N // (seq_len + 1)`` non-overlapping windows; window ``w``
is ``data[w * (seq_len + 1) : (w + 1) * (seq_len + 1)]`` and yields ``inputs = window[:-1]``,
``targets = window[1:]`` (both ``[seq_len]`` int64). The last ``val_fraction`` of the windows are the
validation (and test) set, the rest the training set.

The training loader resumes at the exact sample (:class:`ResumableSampler`, :class:`ResumableDataLoader`): its order
is a pure function of ``(seed, epoch)``, each rank takes its own shard like ``DistributedSampler``, and Lightning
checkpoints its position (the batches the loop *completed* in the epoch) and restores it when a fit resumes, so a
checkpoint taken at any step continues the same sample sequence.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Iterator, Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from typing_extensions import override

from ..validation import check_bool, check_int, check_number

__all__ = ["ByteTextDataModule", "ByteWindowDataset", "ResumableDataLoader", "ResumableSampler",
           "default_corpus_bytes"]


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


_STATE_KEYS = ("epoch", "samples", "batches", "world_size", "batch_size", "dataset_len", "shuffle", "seed")


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` semantics with an order that is a pure function of ``(seed, epoch)`` and an exact
    mid-epoch resume.

    Epoch ``e``'s global order is ``randperm(len(dataset))`` drawn from a generator seeded with ``seed + e``
    (``shuffle=True``; ``range(len(dataset))`` otherwise), padded by repeating its start to a multiple of the world
    size, exactly as ``DistributedSampler(shuffle=..., seed=seed, drop_last=False)`` builds it; rank ``r`` of ``W``
    takes every ``W``-th index from ``r``. On one process that is the plain (shuffled) order. Being a
    ``DistributedSampler``, Lightning neither replaces nor wraps it (``use_distributed_sampler``), so ``shuffle=False``
    really means unshuffled under DDP too.

    ``batch_size`` is the per-rank batch of the DataLoader it feeds (with ``drop_last=True``), so a position can be
    given in batches. :meth:`state_dict` takes the batches the training loop *completed* in the current epoch and
    records the epoch and the global samples consumed (``batches * batch_size * W``); :meth:`load_state_dict` makes
    the next iteration of that epoch start right after them. On another world size or batch size the resumed epoch
    continues at the same global sample (each rank striding the rest); the rest of the run then differs from the
    uninterrupted one only by the new sharding.

    ``num_replicas`` / ``rank``: ``None`` (both) resolves them from ``torch.distributed`` when used (1 / 0 without a
    process group).
    """

    def __init__(self, dataset, batch_size: int, *, num_replicas: Optional[int] = None, rank: Optional[int] = None,
                 shuffle: bool = False, seed: int = 0):
        check_int(batch_size, "batch_size", 1)
        check_int(seed, "seed", 0)
        check_bool(shuffle, "shuffle")
        if (num_replicas is None) != (rank is None):
            raise ValueError(f"num_replicas and rank must be given together (or both None), got num_replicas="
                             f"{num_replicas!r}, rank={rank!r}")
        if num_replicas is not None:
            check_int(num_replicas, "num_replicas", 1)
            check_int(rank, "rank (below num_replicas)", 0, num_replicas - 1)
        self.dataset = dataset
        self.batch_size = batch_size
        self._world = (num_replicas, rank)
        self.shuffle, self.seed = shuffle, seed
        self.drop_last = False
        self.epoch = 0
        self._resume: Optional[tuple[int, int, int]] = None  # (epoch, global samples consumed, batches completed)
        self._iteration: Optional[tuple[int, int, int, int]] = None  # the last iteration begun: (epoch, start, base, W)

    # ------------------------------------------------------------------ the world, resolved when used
    def _resolve(self) -> tuple[int, int]:
        if self._world[0] is not None:
            return self._world  # type: ignore[return-value]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0

    @property
    def num_replicas(self) -> int:
        return self._resolve()[0]

    @property
    def rank(self) -> int:
        return self._resolve()[1]

    @property
    def num_samples(self) -> int:
        """Indices per rank and (full) epoch."""
        return math.ceil(len(self.dataset) / self.num_replicas)

    @property
    def total_size(self) -> int:
        return self.num_samples * self.num_replicas

    def __len__(self) -> int:
        return self.num_samples

    # ------------------------------------------------------------------ order
    def global_order(self, epoch: int) -> list[int]:
        """Epoch ``epoch``'s indices over all ranks (``total_size`` of them), before the per-rank striding."""
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            indices = torch.randperm(n, generator=g).tolist()
        else:
            indices = list(range(n))
        padding = self.total_size - n
        if padding > 0 and n > 0:
            indices += (indices * math.ceil(padding / n))[:padding]
        return indices

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls it before every epoch; a resume position of another epoch no longer applies."""
        self.epoch = epoch
        if self._resume is not None and self._resume[0] != epoch:
            self._resume = None

    def __iter__(self) -> Iterator[int]:
        # a generator: nothing runs (and the epoch is not read) before the first index is asked for
        world, rank = self._resolve()
        epoch, start, base = self.epoch, 0, 0
        if self._resume is not None and self._resume[0] == epoch:
            _, start, base = self._resume
        self._iteration = (epoch, start, base, world)
        rest = self.global_order(epoch)[start:]
        per_rank = len(rest) // world
        yield from rest[rank: per_rank * world: world]
        if self._resume is not None and self._resume[0] == epoch:
            self._resume = None  # that epoch is done; a next iteration starts from its beginning

    # ------------------------------------------------------------------ state
    def position(self, batches_in_epoch: int) -> tuple[int, int, int]:
        """``(epoch, global samples consumed, batches completed)`` after the loop completed ``batches_in_epoch``
        batches of the current epoch (counted from the epoch's start, resumed batches included)."""
        if self._iteration is not None and self._iteration[0] == self.epoch:
            epoch, start, base, world = self._iteration
            new = max(batches_in_epoch - base, 0)
            return epoch, start + new * self.batch_size * world, base + new
        if self._resume is not None and self._resume[0] == self.epoch:
            return self._resume  # restored, not iterated yet
        return self.epoch, 0, 0  # the epoch has not begun

    def state_dict(self, batches_in_epoch: int) -> dict:
        epoch, samples, batches = self.position(batches_in_epoch)
        world = self._iteration[3] if self._iteration is not None and self._iteration[0] == epoch else self.num_replicas
        return {"epoch": epoch, "samples": samples, "batches": batches, "world_size": world,
                "batch_size": self.batch_size, "dataset_len": len(self.dataset), "shuffle": self.shuffle,
                "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Resume at the saved position: the next iteration of the saved epoch starts after the samples consumed."""
        if not isinstance(state, dict):
            raise TypeError(f"sampler state must be a dict, got {type(state).__name__}")
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"sampler state lacks {missing} (not a ResumableSampler state?)")
        changed = [f"{k} {state[k]!r} -> {v!r}" for k, v in
                   (("dataset_len", len(self.dataset)), ("shuffle", self.shuffle), ("seed", self.seed))
                   if state[k] != v]
        if changed:
            rank_zero_warn(f"resuming the training data with other settings than the checkpoint's "
                           f"({', '.join(changed)}): it continues at sample {int(state['samples'])} of epoch "
                           f"{int(state['epoch'])}, but the sample sequence is not the uninterrupted run's")
        epoch, samples, batches = int(state["epoch"]), int(state["samples"]), int(state["batches"])
        if (self.total_size - samples) // self.num_replicas // self.batch_size <= 0:
            epoch, samples, batches = epoch + 1, 0, 0  # the epoch was complete: the next one starts afresh
        self.epoch = epoch
        self._resume = (epoch, samples, batches)
        self._iteration = None


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`ResumableSampler` (``drop_last=True``) that Lightning checkpoints.

    Lightning saves a train loader's ``state_dict()`` with every checkpoint (``FitLoop.on_save_checkpoint``) and
    hands it back to ``load_state_dict`` when a fit resumes. The position saved is the batches the loop *completed* in
    the epoch, not the batches this loader yielded (a checkpoint written in ``on_train_batch_start`` comes after the
    batch was fetched, before it ran): ``batches_done`` reports it (``ByteTextDataModule`` reads the fit loop's
    progress); without it, the batches the current iteration yielded are taken as completed (a plain loop that saves
    after each step).
    """

    def __init__(self, dataset, sampler: ResumableSampler, num_workers: int = 0,
                 batches_done: Optional[Callable[["ResumableDataLoader"], Optional[int]]] = None, **kwargs):
        if not isinstance(sampler, ResumableSampler):
            raise TypeError(f"sampler must be a ResumableSampler, got {type(sampler).__name__}")
        super().__init__(dataset, batch_size=sampler.batch_size, sampler=sampler, drop_last=True,
                         num_workers=num_workers, **kwargs)
        self.batches_done = batches_done
        self._yielded = 0  # batches the current iteration yielded

    def __iter__(self):
        iterator = super().__iter__()
        self._yielded = 0

        def counting():
            for batch in iterator:
                self._yielded += 1
                yield batch

        return counting()

    def state_dict(self) -> dict:
        done = self.batches_done(self) if self.batches_done is not None else None
        if done is None:  # the batches this iteration yielded, after those restored
            it = self.sampler._iteration
            done = (it[2] if it is not None and it[0] == self.sampler.epoch else 0) + self._yielded
        return self.sampler.state_dict(int(done))

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


class ByteTextDataModule(pl.LightningDataModule):
    """Byte-level text windows for next-byte prediction (vocabulary 256).

    Args:
        path: a text file (read as raw bytes); ``None`` = Python's documentation topics (offline).
        seq_len: tokens per sample; windows are ``seq_len + 1`` bytes.
        batch_size: samples per batch (per process under DDP).
        val_fraction: share of the windows, taken from the end, used for validation and test; in ``[0, 0.5)``.
        shuffle: shuffle the training windows: epoch ``e`` is ``randperm`` seeded with ``seed + e`` (the order of
            ``DistributedSampler(shuffle=True, seed=seed)``), so deterministic and resumable.
        seed: seed of the training order.
        num_workers: DataLoader workers.
        max_train_samples: keep only the first N training windows.

    The text is read at construction, so every bad input fails at once (on every rank) with a ``ValueError`` or
    ``TypeError`` naming the parameter.

    The training loader is a :class:`ResumableDataLoader`: under a Trainer with several processes (and
    ``use_distributed_sampler=True``, the default) each rank reads its own shard, ``DistributedSampler`` style; with
    ``use_distributed_sampler=False`` every rank reads the whole set. Lightning checkpoints its position, so a fit
    resumed from a checkpoint saved at any step (``ModelCheckpoint``, or ``trainer.save_checkpoint`` from a hook,
    ``on_train_batch_start`` included) continues with exactly the batches the uninterrupted run would have seen.
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
        check_int(seq_len, "seq_len", 1)
        check_int(batch_size, "batch_size", 1)
        check_int(num_workers, "num_workers", 0)
        check_int(seed, "seed", 0)
        if max_train_samples is not None:
            check_int(max_train_samples, "max_train_samples", 1)
        check_bool(shuffle, "shuffle")
        check_number(val_fraction, "val_fraction", low=0.0, high=0.5, high_open=True)
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

    @override
    def train_dataloader(self) -> ResumableDataLoader:
        world = rank = None  # not built by a Trainer: the torch.distributed world when iterated
        trainer = self._trainer
        if trainer is not None:
            world, rank = 1, 0
            connector = getattr(trainer, "_accelerator_connector", None)
            if trainer.world_size > 1 and getattr(connector, "use_distributed_sampler", True):
                kwargs = trainer.distributed_sampler_kwargs or {}
                world = int(kwargs.get("num_replicas", trainer.world_size))
                rank = int(kwargs.get("rank", trainer.global_rank))
        sampler = ResumableSampler(self.train_dataset, self.batch_size, num_replicas=world, rank=rank,
                                   shuffle=self.shuffle, seed=self.seed)
        return ResumableDataLoader(self.train_dataset, sampler, num_workers=self.num_workers,
                                   batches_done=self._batches_done)

    @property
    def _trainer(self):
        return getattr(self, "trainer", None)

    def _batches_done(self, loader: ResumableDataLoader) -> Optional[int]:
        """Batches the fit loop completed in its current epoch, when ``loader`` is the one it trains on (a batch
        fetched but not yet run, as in ``on_train_batch_start``, is not counted); None otherwise."""
        trainer = self._trainer
        fit_loop = getattr(trainer, "fit_loop", None)
        combined = getattr(fit_loop, "_combined_loader", None)
        if combined is None or not any(dl is loader for dl in combined.flattened):
            return None
        return int(fit_loop.epoch_loop.batch_progress.current.processed)

    @override
    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    @override
    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
