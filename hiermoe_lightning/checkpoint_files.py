"""What ``--ckpt_path last`` resumes from: the newest *complete* checkpoint.

Lightning resolves ``ckpt_path="last"`` to the newest ``last*.ckpt`` (by modification time) in each
``ModelCheckpoint``'s directory, and ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` only together with a
regular checkpoint. So ``last.ckpt`` lags:

* at the end of training: ``ModelCheckpoint.on_train_end`` writes ``last.ckpt`` only when nothing was saved during
  the fit, so with ``val_check_interval=60`` and ``max_steps=120`` (``configs/demo.yaml``) the steps after the last
  save are in no checkpoint, and ``last.ckpt`` is up to one interval behind the weights the fit ended with;
* when a job dies between the regular checkpoint and ``last.ckpt`` (they are written one after the other), or when
  another ``ModelCheckpoint`` (e.g. ``every_n_train_steps``) writes newer step checkpoints that are not "last";
* and a file that was being written when the job died (not written atomically) still counts as the newest.

Here "last" means: among every checkpoint in the directories of the trainer's ``ModelCheckpoint`` callbacks, the
newest by modification time whose write completed. A full checkpoint is a ``*.ckpt`` file whose zip end record is
in place (a truncated file has none); a sharded one is a ``*.ckpt`` directory holding both its metadata file and
``torch.distributed.checkpoint``'s ``.metadata`` (both written last). Hidden names (``.``-prefixed) and names that do
not end in ``.ckpt`` (temporary names of atomic writes) are never chosen.

Use :class:`ResumableCheckpoint` in place of ``ModelCheckpoint`` (``configs/demo.yaml`` does), or call
:func:`use_newest_for_last` on a trainer before ``fit`` to give its plain ``ModelCheckpoint`` callbacks the same
rule; :func:`resolve_last` gives the path itself.
"""

from __future__ import annotations

import os
import types
from typing import Iterable, Optional

from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

__all__ = ["ResumableCheckpoint", "checkpoint_dirs", "complete_checkpoints", "is_complete_checkpoint",
           "newest_checkpoint", "resolve_last", "use_newest_for_last"]

SUFFIX = ".ckpt"
_EOCD = b"PK\x05\x06"  # zip end-of-central-directory record: the last thing torch.save writes
_EOCD_SIZE = 22


def _zip_complete(path: str) -> bool:
    """Whether the file at ``path`` ends with a zip end record (``torch.save``'s format): a file cut short does not."""
    try:
        size = os.path.getsize(path)
        if size < _EOCD_SIZE:
            return False
        with open(path, "rb") as f:
            f.seek(max(0, size - _EOCD_SIZE - 0xFFFF))
            tail = f.read()
    except OSError:
        return False
    pos = tail.rfind(_EOCD)
    if pos < 0 or pos + _EOCD_SIZE > len(tail):
        return False
    comment = int.from_bytes(tail[pos + 20:pos + 22], "little")
    return pos + _EOCD_SIZE + comment == len(tail)


def _sharded_files(path: str) -> tuple[str, str]:
    from .checkpoint_sharded import META_FILE

    return os.path.join(path, META_FILE), os.path.join(path, ".metadata")


def is_complete_checkpoint(path) -> bool:
    """A ``*.ckpt`` file whose zip end record is in place, or a ``*.ckpt`` directory holding a complete metadata file
    and DCP's ``.metadata``. Hidden names and other suffixes (temporary names) are not checkpoints."""
    path = os.fspath(path)
    name = os.path.basename(os.path.normpath(path))
    if name.startswith(".") or not name.endswith(SUFFIX):
        return False
    if os.path.isdir(path):
        meta, dcp_meta = _sharded_files(path)
        return os.path.isfile(dcp_meta) and _zip_complete(meta)
    return os.path.isfile(path) and _zip_complete(path)


def _written_at(path: str) -> int:
    """When the checkpoint was completed (ns): a file's mtime; a directory's newest metadata file."""
    if os.path.isdir(path):
        return max(os.stat(p).st_mtime_ns for p in (path, *_sharded_files(path)))
    return os.stat(path).st_mtime_ns


def complete_checkpoints(directory) -> list[str]:
    """The complete checkpoints directly inside ``directory``, oldest first (ties by name)."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if is_complete_checkpoint(path):
            try:
                found.append((_written_at(path), name, path))
            except OSError:  # removed meanwhile (ModelCheckpoint keeps only its top k)
                continue
    return [path for _, _, path in sorted(found)]


def newest_checkpoint(directories: Iterable) -> Optional[str]:
    """The newest complete checkpoint in any of ``directories`` (None if there is none)."""
    best = None
    for directory in dict.fromkeys(os.path.normpath(os.fspath(d)) for d in directories if d):
        for path in complete_checkpoints(directory)[-1:]:
            key = (_written_at(path), os.path.basename(path))
            if best is None or key > best[0]:
                best = (key, path)
    return best[1] if best else None


def _callback_dir(callback: ModelCheckpoint, trainer) -> Optional[str]:
    """The directory a ModelCheckpoint writes to (resolved the way Lightning resolves it before setup)."""
    if callback.dirpath:
        return os.fspath(callback.dirpath)
    resolve = getattr(callback, "_ModelCheckpoint__resolve_ckpt_dir", None)
    return os.fspath(resolve(trainer)) if resolve is not None else None


def checkpoint_dirs(trainer) -> list[str]:
    """Where a fit of ``trainer`` writes checkpoints: each ModelCheckpoint's directory, and
    ``<default_root_dir>/checkpoints`` (where a preemption writes without a ModelCheckpoint)."""
    dirs = [_callback_dir(cb, trainer) for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
    dirs.append(os.path.join(trainer.default_root_dir, "checkpoints"))
    return [d for d in dirs if d]


def resolve_last(trainer) -> Optional[str]:
    """``ckpt_path="last"`` for ``trainer``: the newest complete checkpoint in :func:`checkpoint_dirs` (None: none)."""
    return newest_checkpoint(checkpoint_dirs(trainer))


def _find_newest(self: ModelCheckpoint, trainer) -> set[str]:
    """``ModelCheckpoint._find_last_checkpoints`` (what Lightning's ``ckpt_path="last"`` asks each callback for,
    then takes the newest by mtime): the newest complete checkpoint of the callback's directory, whatever its name."""
    directory = _callback_dir(self, trainer)
    newest = newest_checkpoint([directory]) if directory else None
    return {os.path.normpath(newest)} if newest else set()


def use_newest_for_last(trainer) -> None:
    """Make ``trainer.fit(ckpt_path="last")`` resume from the newest complete checkpoint of the trainer's
    ModelCheckpoint directories (not the newest ``last*.ckpt``). Call it before ``fit`` resolves the path (the CLI's
    ``before_fit``, a launcher's ``launch``); idempotent, per callback instance."""
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and not isinstance(cb, ResumableCheckpoint):
            cb._find_last_checkpoints = types.MethodType(_find_newest, cb)


class ResumableCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last`` is always the newest complete checkpoint.

    * ``ckpt_path="last"`` (``--ckpt_path last``) resolves to the newest complete checkpoint in its directory, a
      preemption's ``last.ckpt`` and every step checkpoint included (see the module docstring);
    * with ``save_last=True``, the step that reaches ``max_steps`` writes ``last.ckpt`` when it is in no checkpoint
      yet (``ModelCheckpoint`` writes one at the end only when it saved nothing during the whole fit). It is written
      at that step's ``on_train_batch_end``, like a step checkpoint, so a fit resumed from it with a larger
      ``max_steps`` continues mid-epoch (Lightning counts the epoch as finished by ``on_train_end``); a validation
      due at that step still writes its own checkpoint, and ``last.ckpt`` again. Other ends of training (early
      stopping) write it at ``on_train_end``.

    Arguments are ``ModelCheckpoint``'s.
    """

    _final_step_saved: int = -1

    def _find_last_checkpoints(self, trainer) -> set[str]:
        return _find_newest(self, trainer)

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if (self.save_last is True and 0 < trainer.max_steps <= trainer.global_step
                and not self._should_skip_saving_checkpoint(trainer)):
            before = self._last_global_step_saved
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self._final_step_saved = trainer.global_step
            self._last_global_step_saved = before  # a validation at this step still saves (top-k, then last)

    @override
    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        if (self.save_last is True and self._final_step_saved != trainer.global_step
                and not self._should_skip_saving_checkpoint(trainer)):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
