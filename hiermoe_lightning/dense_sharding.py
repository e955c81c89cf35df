"""``dense_sharding="fsdp"``: the non-expert parameters, their gradients and optimizer state sharded with FSDP2.

The experts are expert-parallel already (each rank holds its own, :class:`~hiermoe_lightning.parallel.ExpertParallel`);
everything else -- attention, norms, embeddings, routers, shared experts -- is what DDP would replicate on every rank.
:func:`shard_dense_` hands it to ``torch.distributed.fsdp.fully_shard`` over all ranks instead, with the expert
parameters as ``ignored_params``, so each rank keeps ``1 / world_size`` of the dense parameters, gradients and Adam
moments at rest and gathers a block's parameters only while the block runs (torchtitan's and Lightning
``ModelParallelStrategy``'s convention: one FSDP unit per transformer block, then the root).

Units: every element of the outermost ``nn.ModuleList``s (a model's blocks), then the LightningModule itself for
what is left (embeddings, final norm, head). The root keeps its parameters gathered from its forward to the end of
the backward (``reshard_after_forward=False``, as torchtitan does for the root): a ``training_step`` may use them
after calling ``forward`` (e.g. a loss term on the head) and the backward needs them at once anyway.

The gradients FSDP reduce-scatters are means over all ranks, exactly DDP's; the experts' are the strategy's
(:mod:`.replicas`). The helpers :func:`full_tensor` and :func:`distribute_like` convert between the sharded
``DTensor`` values and the full tensors portable checkpoints hold.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

__all__ = ["DENSE_SHARDING", "check_dense_sharding", "distribute_like", "empty_like_sharded", "full_tensor",
           "fsdp_units",
           "is_sharded_tensor", "local_tensor", "shard_dense_"]

DENSE_SHARDING = ("ddp", "fsdp")


def check_dense_sharding(value) -> str:
    if not isinstance(value, str) or value not in DENSE_SHARDING:
        raise ValueError(f"dense_sharding must be 'ddp' (replicated dense parameters) or 'fsdp' (sharded with FSDP2 "
                         f"over all ranks), got {value!r}")
    return value


def fsdp_units(module: nn.Module, skip: tuple[type, ...] = ()) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every element of the outermost ``nn.ModuleList``s of ``module`` that holds parameters,
    not counting modules of the types in ``skip`` (MoE layers: their dense parts go with their block) or inside
    them. In model order; nested ModuleLists inside a chosen unit are part of it."""
    units: list[tuple[str, nn.Module]] = []
    taken: list[str] = []
    for name, m in module.named_modules():
        if not isinstance(m, nn.ModuleList) or isinstance(m, skip):
            continue
        if any(name == t or name.startswith(t + ".") for t in taken):
            continue
        if any(isinstance(parent, skip) for parent in _parents(module, name)):
            continue
        for i, child in enumerate(m):
            if isinstance(child, skip) or not any(True for _ in child.parameters()):
                continue
            child_name = f"{name}.{i}" if name else str(i)
            units.append((child_name, child))
            taken.append(child_name)
    return units


def _parents(root: nn.Module, name: str) -> list[nn.Module]:
    out, m = [], root
    for part in name.split(".")[:-1] if name else []:
        m = getattr(m, part)
        out.append(m)
    return out


def shard_dense_(module: nn.Module, mesh, expert_params: Iterable[nn.Parameter], *, skip: tuple[type, ...] = (),
                 reshard_after_forward: bool = True) -> list[str]:
    """In place: ``fully_shard`` every :func:`fsdp_units` block (``reshard_after_forward`` as given: True frees a
    block's gathered parameters after its forward and gathers them again for its backward) and then ``module``
    itself (``reshard_after_forward=False``), over ``mesh`` (a 1-D DeviceMesh of all ranks), never touching
    ``expert_params``. Every rank must hold the same dense values first (the strategy broadcasts rank 0's).
    Returns the names of the units, root last (``""``)."""
    from torch.distributed.fsdp import fully_shard

    ignored = set(expert_params)
    names = []
    for name, unit in fsdp_units(module, skip):
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward,
                    ignored_params={p for p in unit.parameters() if p in ignored} or None)
        names.append(name)
    fully_shard(module, mesh=mesh, reshard_after_forward=False, ignored_params=ignored or None)
    names.append("")
    return names


def is_sharded_tensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (a view sharing its storage, so in-place changes reach ``t``); ``t`` itself when it
    is a plain tensor."""
    return t.to_local() if is_sharded_tensor(t) else t


def full_tensor(t):
    """The full value of a sharded ``DTensor`` (collective over its mesh: every rank must call it, in the same order);
    anything else unchanged."""
    return t.full_tensor() if is_sharded_tensor(t) else t


def distribute_like(full: torch.Tensor, like) -> torch.Tensor:
    """``full`` (the same full value on every rank) as a tensor sharded like ``like`` (a DTensor: each rank takes its
    own part, no communication); ``full`` itself when ``like`` is not sharded."""
    if not is_sharded_tensor(like) or is_sharded_tensor(full):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def empty_like_sharded(shape, dtype: torch.dtype, like) -> torch.Tensor:
    """An uninitialised tensor of the full ``shape``: sharded like ``like`` when that is a DTensor of this shape (only
    this rank's part is allocated, e.g. a template DCP loads an optimizer moment into), else a plain one."""
    if is_sharded_tensor(like) and tuple(shape) == tuple(like.shape):
        from torch.distributed.tensor import empty

        return empty(tuple(shape), dtype=dtype, device_mesh=like.device_mesh, placements=like.placements)
    return torch.empty(tuple(shape), dtype=dtype)
