"""Check a checkpoint before any rank reads it collectively, and say in one line what is wrong with it.

Every rank runs the same checks on the same files (no collective), so a broken checkpoint raises the same
:class:`~hiermoe_lightning.faults.errors.CheckpointError` on every rank before ``torch.distributed.checkpoint`` or a
state-dict load can fail on some ranks only (which used to print ~20 tracebacks and leave the others waiting).
"""

from __future__ import annotations

import os
import re
import zipfile
from typing import Any

import torch

from .errors import CheckpointError

__all__ = ["load_full_checkpoint", "check_sharded_checkpoint", "explain_state_dict_mismatch", "hparam_differences"]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def load_full_checkpoint(path, load=None) -> dict[str, Any]:
    """Load a one-file checkpoint with ``load(path)`` (default ``torch.load`` on the CPU) or raise a
    :class:`CheckpointError` naming ``path`` and the problem: missing, empty, truncated, not a torch file, not a
    Lightning checkpoint."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(path, "no such file or directory")
    if os.path.isdir(path):
        raise CheckpointError(path, "is a directory but not a sharded hiermoe checkpoint (no hiermoe_meta.pt inside)")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(path, "the file is empty (0 bytes)")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(4)
        if head.startswith(b"PK"):
            raise CheckpointError(path, f"truncated: the file ({size} bytes) ends before its zip directory; it was "
                                        f"not written or copied completely")
    try:
        checkpoint = load(path) if load is not None else torch.load(path, map_location="cpu", weights_only=False)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - unpicklers fail on garbage in many ways (IndexError, KeyError, ...)
        raise CheckpointError(path, f"not a readable checkpoint ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        found = sorted(checkpoint)[:5] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(path, f"not a Lightning checkpoint (no 'state_dict'; found {found})")
    return checkpoint


def check_sharded_checkpoint(path, meta_file: str) -> None:
    """A sharded checkpoint directory is complete: its metadata file loads, DCP's ``.metadata`` exists, and every
    shard file it refers to exists and is long enough. Else a :class:`CheckpointError` naming the file."""
    path = os.fspath(path)
    meta_path = os.path.join(path, meta_file)
    try:
        torch.load(meta_path, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any failure here means the same thing to the user
        raise CheckpointError(path, f"{meta_file} is unreadable ({type(e).__name__}: {_first_line(e)})") from None
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise CheckpointError(path, "missing .metadata (the torch.distributed.checkpoint index): incomplete write?")
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(path).read_metadata()
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(path, f".metadata is unreadable ({type(e).__name__}: {_first_line(e)})") from None
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if rel is not None:
            needed[rel] = max(needed.get(rel, 0), int(getattr(info, "offset", 0)) + int(getattr(info, "length", 0)))
    for rel, length in sorted(needed.items()):
        shard = os.path.join(path, rel)
        if not os.path.isfile(shard):
            raise CheckpointError(path, f"missing shard file {rel} (one rank's share of the tensors)")
        if os.path.getsize(shard) < length:
            raise CheckpointError(path, f"truncated shard file {rel} ({os.path.getsize(shard)} bytes, needs {length})")


_SIZE = re.compile(r"size mismatch for ([^:]+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) from "
                   r"checkpoint, the shape in current model is torch\.Size\(\[([^\]]*)\]\)")


def explain_state_dict_mismatch(exc: BaseException) -> str:
    """One phrase for ``load_state_dict``'s multi-line error: the first size mismatch or key problem, and a count."""
    text = str(exc)
    sizes = _SIZE.findall(text)
    if sizes:
        name, ckpt_shape, model_shape = sizes[0]
        more = f" (and {len(sizes) - 1} more)" if len(sizes) > 1 else ""
        return (f"the model does not match: {name.strip()} has shape [{ckpt_shape}] in the checkpoint but "
                f"[{model_shape}] in the model{more}")
    for label in ("Missing key(s)", "Unexpected key(s)"):
        m = re.search(label + r" in state_dict: ([^.]*)", text)
        if m:
            keys = [k.strip().strip('"') for k in m.group(1).split(",")]
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            return f"the model does not match: {label.lower()} {keys[0]}{more}"
    return f"the model does not match: {_first_line(exc)}"


def _as_read(value):
    """YAML gives lists where Python saved tuples, ints where floats were meant: compare values as a user reads them."""
    if isinstance(value, (list, tuple)):
        return [_as_read(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    return value


def hparam_differences(saved: dict, given: dict, prefix: str = "") -> list[str]:
    """``["<prefix>key=<given> (checkpoint: <saved>)", ...]`` for every key in both whose values differ (keys
    starting with ``_``, Lightning's own, are skipped)."""
    out = []
    for key in sorted(set(saved) & set(given)):
        if key.startswith("_"):
            continue
        try:
            same = _as_read(saved[key]) == _as_read(given[key])
        except Exception:  # noqa: BLE001 - incomparable objects: compare their text
            same = str(saved[key]) == str(given[key])
        if not same:
            out.append(f"{prefix}{key}={given[key]!r} (checkpoint: {saved[key]!r})")
    return out
