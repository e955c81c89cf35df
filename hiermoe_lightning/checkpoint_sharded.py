"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP): each rank writes only its own experts.

Layout of a checkpoint directory: DCP files holding one tensor per (parameter or optimizer moment, expert id) plus
the dense tensors (written once), and ``hiermoe_meta.pt`` (rank 0: the trainer state, optimizer param groups,
placements and the structure of the optimizer state). Keys use the global expert id, never the slot, so a checkpoint
written on G ranks loads on any other world size: each rank reads the experts its new placement gives it.
"""

from __future__ import annotations

import os
import shutil

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from .checkpoint import expert_parameter_names
from .dense_sharding import empty_like_sharded

__all__ = ["META_FILE", "is_sharded_checkpoint", "sharded_tensors", "save_sharded", "load_sharded_model",
           "load_sharded_optimizer", "optimizer_structure"]

META_FILE = "hiermoe_meta.pt"


def is_sharded_checkpoint(path) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, META_FILE))


def _param_names(module: nn.Module, optimizer) -> list[str]:
    """Fully qualified names of the optimizer's parameters in state_dict index order."""
    by_id = {id(p): n for n, p in module.named_parameters()}
    return [by_id[id(p)] for g in optimizer.param_groups for p in g["params"]]


def sharded_tensors(module: nn.Module, optimizers, write_experts: bool = True) -> dict[str, torch.Tensor]:
    """This rank's share: dense tensors (replicated) and, per expert id, its slices of expert tensors (none when
    ``write_experts`` is False: another replica writes them)."""
    experts = expert_parameter_names(module)
    out = {}
    for name, t in module.state_dict().items():
        if name in experts:
            if not write_experts:
                continue
            layer, _ = experts[name]
            for slot, e in enumerate(layer.local_expert_ids().tolist()):
                out[f"model/{name}/expert{e}"] = t[slot]
        else:
            out[f"model/{name}"] = t
    for i, opt in enumerate(optimizers):
        inner = getattr(opt, "_optimizer", opt)
        for name, p in zip(_param_names(module, inner), (p for g in inner.param_groups for p in g["params"])):
            for key, value in inner.state.get(p, {}).items():
                if not isinstance(value, torch.Tensor):
                    continue
                if name in experts and value.dim() > 0:
                    if not write_experts:
                        continue
                    layer, _ = experts[name]
                    for slot, e in enumerate(layer.local_expert_ids().tolist()):
                        out[f"optim{i}/{name}/{key}/expert{e}"] = value[slot]
                else:
                    out[f"optim{i}/{name}/{key}"] = value
    return out


def optimizer_structure(module: nn.Module, optimizers) -> list[dict]:
    """Per optimizer: param groups and, per parameter name, which state keys exist (with full shapes), for loading."""
    experts = expert_parameter_names(module)
    out = []
    for opt in optimizers:
        inner = getattr(opt, "_optimizer", opt)
        keys = {}
        for name, p in zip(_param_names(module, inner), (p for g in inner.param_groups for p in g["params"])):
            state = inner.state.get(p, {})
            keys[name] = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""),
                              "expert": name in experts and v.dim() > 0}
                          for k, v in state.items() if isinstance(v, torch.Tensor)}
        out.append({"param_groups": inner.state_dict()["param_groups"], "keys": keys})
    return out


def save_sharded(path, module: nn.Module, optimizers, meta: dict, is_rank_zero: bool, barrier,
                 write_experts: bool = True) -> None:
    """Collective: every rank writes its share with DCP; rank 0 writes the metadata file. Atomic: the shares go to
    ``<path>.partial`` and rank 0 renames it to ``path`` only once every rank has written (``barrier(name)`` is the
    strategy's barrier), so a job that dies while saving never leaves a half checkpoint under the final name. With
    replicas only the first one passes ``write_experts``: each expert is written once."""
    path = os.fspath(path)
    partial = path.rstrip(os.sep) + ".partial"
    if is_rank_zero:
        shutil.rmtree(partial, ignore_errors=True)  # left by a save that died
        os.makedirs(partial)
    barrier("hiermoe_sharded_save_start")
    dcp.save(sharded_tensors(module, optimizers, write_experts), checkpoint_id=partial)
    if is_rank_zero:
        torch.save(meta, os.path.join(partial, META_FILE))
    barrier("hiermoe_sharded_save_written")
    if is_rank_zero:
        old = path.rstrip(os.sep) + ".old"
        if os.path.exists(path):
            _remove(old)
            os.replace(path, old)
        os.replace(partial, path)
        _remove(old)
    barrier("hiermoe_sharded_save_done")


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)


def load_meta(path) -> dict:
    return torch.load(os.path.join(path, META_FILE), weights_only=True, map_location="cpu")


def load_sharded_model(path, module: nn.Module, strict: bool = True) -> None:
    """Fill ``module`` (already sharded, placements already restored) from a sharded checkpoint (collective)."""
    experts = expert_parameter_names(module)
    current = module.state_dict()
    template = {}
    for name, t in current.items():
        if name in experts:
            layer, _ = experts[name]
            for slot, e in enumerate(layer.local_expert_ids().tolist()):
                template[f"model/{name}/expert{e}"] = torch.empty_like(t[slot])
        else:
            template[f"model/{name}"] = torch.empty_like(t)
    dcp.load(template, checkpoint_id=path)
    state = {}
    for name, t in current.items():
        if name in experts:
            layer, _ = experts[name]
            state[name] = torch.stack([template[f"model/{name}/expert{e}"] for e in layer.local_expert_ids().tolist()])
        else:
            state[name] = template[f"model/{name}"]
    module.load_state_dict(state, strict=strict)


def load_sharded_optimizer(path, module: nn.Module, optimizers, structure: list[dict]) -> None:
    """Rebuild each optimizer's state for this rank's experts from a sharded checkpoint (collective)."""
    experts = expert_parameter_names(module)
    template, plan = {}, []
    for i, (opt, struct) in enumerate(zip(optimizers, structure)):
        inner = getattr(opt, "_optimizer", opt)
        params = [p for g in inner.param_groups for p in g["params"]]
        for idx, name in enumerate(_param_names(module, inner)):
            for key, info in struct["keys"].get(name, {}).items():
                dtype = getattr(torch, info["dtype"])
                if info["expert"]:
                    layer, _ = experts[name]
                    for e in layer.local_expert_ids().tolist():
                        template[f"optim{i}/{name}/{key}/expert{e}"] = torch.empty(info["shape"][1:], dtype=dtype)
                else:  # sharded like its parameter under FSDP (DCP reshards whatever wrote it)
                    template[f"optim{i}/{name}/{key}"] = empty_like_sharded(info["shape"], dtype, params[idx])
                plan.append((i, idx, name, key, info["expert"]))
    if template:
        dcp.load(template, checkpoint_id=path)
    states = [dict() for _ in optimizers]
    for i, idx, name, key, is_expert in plan:
        if is_expert:
            layer, _ = experts[name]
            value = torch.stack([template[f"optim{i}/{name}/{key}/expert{e}"] for e in layer.local_expert_ids().tolist()])
        else:
            value = template[f"optim{i}/{name}/{key}"]
        states[i].setdefault(idx, {})[key] = value
    for opt, struct, state in zip(optimizers, structure, states):
        inner = getattr(opt, "_optimizer", opt)
        inner.load_state_dict({"state": state, "param_groups": struct["param_groups"]})
