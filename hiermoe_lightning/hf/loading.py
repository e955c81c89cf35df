"""A pretrained Hugging Face checkpoint (a local directory of safetensors) into a converted model, each rank reading
only the dense tensors and its own experts.

The model is the HF model built from its config on the meta device and converted there (``convert_`` builds meta
``MoELayer``s), then optionally sharded (``ExpertParallel.shard_`` or ``HierMoEStrategy``). :func:`load_pretrained_`
then fills it: every dense parameter and buffer whole, and of each MoE block only the experts its slots hold
(``layer.local_expert_ids()``, in slot order): rows of the fused ``experts.gate_up_proj`` ``[E, 2F, M]`` /
``experts.down_proj`` ``[E, M, F]`` through ``safe_open(...).get_slice`` (one read per run of consecutive ids), or
the per-expert keys ``experts.{e}.gate_proj.weight`` ... that ``save_pretrained`` writes. The family adapters know
the block's key names (:meth:`FamilyAdapter.load_checkpoint_ <hiermoe_lightning.hf.FamilyAdapter.load_checkpoint_>`).
Nothing reads a whole file: one tensor (or a few experts' rows) at a time.

A directory holds ``model.safetensors.index.json`` (``weight_map``: key -> file) or a single ``model.safetensors``.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import torch
from safetensors import safe_open
from torch import nn

from .block import HFMoEBlock
from .families import family

__all__ = ["load_pretrained_", "build_meta_model", "SafetensorsCheckpoint", "PARTS"]

INDEX_FILE, SINGLE_FILE = "model.safetensors.index.json", "model.safetensors"
PARTS = ("all", "dense", "moe")


class SafetensorsCheckpoint:
    """The tensors of a Hugging Face directory, read one at a time (files opened lazily; :meth:`close` unmaps them,
    which :meth:`expert_rows` does after every read so that the file pages read do not add up in resident memory).

    ``bytes_read`` counts what was read; ``reads`` lists ``(key, rows)`` of every read (``rows`` None: the whole
    tensor, else the ``(start, stop)`` rows of a slice)."""

    def __init__(self, directory: str):
        directory = os.fspath(directory)
        index, single = os.path.join(directory, INDEX_FILE), os.path.join(directory, SINGLE_FILE)
        self.directory = directory
        self._handles: dict[str, object] = {}
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a safetensors index (a JSON object with a 'weight_map'): {e}") from None
            self._file_of = {k: os.path.join(directory, v) for k, v in weight_map.items()}
        elif os.path.isfile(single):
            self._file_of = {k: single for k in self._open(single).keys()}
        else:
            raise ValueError(f"pretrained directory {directory!r} has neither {INDEX_FILE} nor {SINGLE_FILE} "
                             f"(a Hugging Face model saved with safetensors)")
        self.bytes_read = 0
        self.reads: list[tuple[str, tuple[int, int] | None]] = []

    def _open(self, path: str):
        handle = self._handles.get(path)
        if handle is None:
            if not os.path.isfile(path):
                raise ValueError(f"{path}: a file the checkpoint's index names is missing")
            handle = self._handles[path] = safe_open(path, framework="pt", device="cpu")
        return handle

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "SafetensorsCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def keys(self) -> list[str]:
        return list(self._file_of)

    def _handle(self, key: str):
        path = self._file_of.get(key)
        if path is None:
            raise KeyError(key)
        return self._open(path)

    def tensor(self, key: str) -> torch.Tensor:
        """The whole tensor ``key`` (``ValueError`` naming the key and the directory when it is missing)."""
        if key not in self._file_of:
            raise ValueError(f"pretrained directory {self.directory!r} has no tensor {key!r}")
        value = self._handle(key).get_tensor(key)
        self.bytes_read += value.numel() * value.element_size()
        self.reads.append((key, None))
        return value

    def rows(self, key: str, ids: Iterable[int]) -> torch.Tensor:
        """Rows ``ids`` (in that order) of tensor ``key`` along its first dimension, read as slices of consecutive
        rows (``get_slice``), never the whole tensor."""
        ids = [int(i) for i in ids]
        sl = self._handle(key).get_slice(key)
        runs, parts = [], []
        for i in ids:
            if runs and i == runs[-1][1]:
                runs[-1][1] += 1
            else:
                runs.append([i, i + 1])
        for start, stop in runs:
            part = sl[start:stop]
            self.bytes_read += part.numel() * part.element_size()
            self.reads.append((key, (start, stop)))
            parts.append(part)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def expert_rows(self, fused_key: str, ids: list[int], per_expert: list[str]) -> torch.Tensor:
        """Experts ``ids`` of a fused expert tensor: rows of ``fused_key`` when the checkpoint holds it, else each
        expert's ``per_expert`` keys (templates with ``{e}``) concatenated along dim 0, stacked."""
        try:
            if fused_key in self._file_of:
                return self.rows(fused_key, ids)
            missing = [t.format(e=ids[0]) for t in per_expert if t.format(e=ids[0]) not in self._file_of]
            if missing:
                raise ValueError(f"pretrained directory {self.directory!r} has neither {fused_key!r} nor "
                                 f"{', '.join(repr(m) for m in missing)}")
            return torch.stack([torch.cat([self.tensor(t.format(e=e)) for t in per_expert]) for e in ids])
        finally:  # unmap the files: the pages just read (copied out) leave this process's resident memory
            self.close()

    def block_prefix(self, prefix: str, alternatives: tuple[str, ...], probe: str) -> str:
        """The name the checkpoint gives the block at ``prefix``: ``prefix`` itself, or ``prefix`` with its last
        component replaced by one of ``alternatives`` (an older attribute name), whichever holds ``probe``."""
        if f"{prefix}.{probe}" in self._file_of:
            return prefix
        parent = prefix.rpartition(".")[0]
        for name in alternatives:
            other = f"{parent}.{name}" if parent else name
            if f"{other}.{probe}" in self._file_of:
                return other
        return prefix


def build_meta_model(directory: str, *, convert: bool = True):
    """The HF causal LM of ``directory``'s config, built on the meta device (nothing allocated) in the config's
    dtype (as ``from_pretrained`` gives it), eval mode, and (``convert``) converted
    (:func:`~hiermoe_lightning.hf.convert_`: its MoE blocks meta ``MoELayer``s)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .convert import convert_

    config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if convert:
        convert_(model)
    try:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(directory)
    except (OSError, ValueError):
        pass
    return model.eval()


def _default_device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        if not t.is_meta:
            return t.device
    return torch.device("cpu")


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, attr = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr


@torch.no_grad()
def load_pretrained_(model: nn.Module, directory: str, *, parts: str = "all",
                     device: "torch.device | str | None" = None) -> dict:
    """Fill converted HF ``model`` from the safetensors of ``directory``; returns what was read.

    ``model``: :func:`build_meta_model`'s (or any HF model converted by ``convert_``), unsharded or sharded
    (``ExpertParallel.shard_``, ``HierMoEStrategy``). Tensors on meta get storage on ``device`` (None: where the
    model's real tensors are, else the CPU); real ones are copied into in place (the optimizer's Parameters stay
    valid). ``parts``: ``"dense"`` (everything outside the MoE blocks; they may stay on meta), ``"moe"`` (the MoE
    blocks: an unsharded meta layer is materialised with all its experts, a sharded one holds its own), or
    ``"all"``.

    Reads the dense tensors whole and, per MoE block, only the experts its slots hold. Tied parameters (an
    ``lm_head`` tied to ``embed_tokens``) are loaded once, from whichever of their names the checkpoint holds, and
    stay tied. Non-persistent buffers left on meta (rotary ``inv_freq``) are computed by the HF model's own
    ``_init_weights``. A parameter or persistent buffer the checkpoint lacks: ``ValueError`` naming it and the
    directory. Returns ``{"bytes": bytes read, "dense": keys read, "experts": {block: expert ids}}``."""
    if parts not in PARTS:
        raise ValueError(f"parts must be one of {PARTS}, got {parts!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_pretrained_ takes an nn.Module (a converted HF model), got {type(model).__name__}")
    device = _default_device(model) if device is None else torch.device(device)
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, HFMoEBlock)}
    inside = lambda name: any(name.startswith(b + ".") for b in blocks)  # noqa: E731
    report = {"bytes": 0, "dense": [], "experts": {}}
    with SafetensorsCheckpoint(directory) as ckpt:
        if parts in ("all", "dense"):
            report["dense"] = _load_dense_(model, ckpt, device, inside)
            ckpt.close()
        if parts in ("all", "moe"):
            for name, block in blocks.items():
                moe = block.moe
                if moe.is_meta:  # unsharded (shard_ materialises a sharded one): all experts, no values drawn
                    was, moe.skip_expert_init = moe.skip_expert_init, True
                    try:
                        moe.materialize_(device)
                    finally:
                        moe.skip_expert_init = was
                family(block.family).load_checkpoint_(moe, ckpt, name)
                report["experts"][name] = [int(e) for e in moe.local_expert_ids().tolist()]
        report["bytes"] = ckpt.bytes_read
    return report


def _load_dense_(model: nn.Module, ckpt: SafetensorsCheckpoint, device: torch.device, inside) -> list[str]:
    # parameters by identity (tied ones share one Parameter: HF's tie), then persistent buffers
    groups: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if not inside(name):
            groups.setdefault(id(p), []).append(name)
            tensors[id(p)] = p
    non_persistent = []
    for name, b in model.named_buffers(remove_duplicate=False):
        if inside(name):
            continue
        owner, attr = _owner(model, name)
        if attr in owner._non_persistent_buffers_set:
            non_persistent.append((name, owner, attr))
        else:
            groups.setdefault(id(b), []).append(name)
            tensors[id(b)] = b
    missing = [names for names in groups.values() if not any(n in ckpt for n in names)]
    if missing:
        shown = ", ".join(n[0] for n in missing[:6]) + (" ..." if len(missing) > 6 else "")
        raise ValueError(f"pretrained directory {ckpt.directory!r} lacks {len(missing)} tensor(s) the model has: "
                         f"{shown}")
    read = []
    for key, names in groups.items():
        source = next(n for n in names if n in ckpt)
        value, old = ckpt.tensor(source), tensors[key]
        if tuple(value.shape) != tuple(old.shape):
            raise ValueError(f"{source}: shape {list(value.shape)} in {ckpt.directory!r} does not fit the model's "
                             f"{list(old.shape)}")
        read.append(source)
        if not old.is_meta:
            old.copy_(value)
            continue
        new = value.to(device=device, dtype=old.dtype).contiguous()
        if isinstance(old, nn.Parameter):
            new = nn.Parameter(new, requires_grad=old.requires_grad)
        for name in names:  # every alias of a tied tensor gets the same new tensor
            owner, attr = _owner(model, name)
            (owner._parameters if isinstance(old, nn.Parameter) else owner._buffers)[attr] = new
    owners = []
    for name, owner, attr in non_persistent:
        b = owner._buffers[attr]
        if b is not None and b.is_meta:
            owner._buffers[attr] = torch.empty_like(b, device=device)
            if owner not in owners:
                owners.append(owner)
    init = getattr(model, "_init_weights", None)
    for owner in owners:  # HF computes non-persistent buffers (rotary inv_freq) in its _init_weights
        if init is None or any(p.is_meta for p in owner.parameters(recurse=False)):
            raise ValueError(f"cannot compute the non-persistent buffers of {type(owner).__name__} on meta "
                             f"(no _init_weights on {type(model).__name__})")
        with torch.device(device):  # the values are computed on the default device (meta inside init_module)
            init(owner)
    return read
