"""Expert state keyed by global expert id, never by slot: portable checkpoints and resharding on load.

A *full* state dict is exactly the unsharded model's: every ``...experts.w_*`` tensor is ``[E, ...]`` in expert-id
order, so it loads into a plain single-process model. The same holds for optimizer state (Adam moments, SGD
momentum) of expert parameters. Each MoELayer's placement travels in ``hiermoe`` metadata so a resume on the same
world size keeps it; on another world size the contiguous placement is used.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .dense_sharding import distribute_like, full_tensor
from .layer import MoELayer
from .placement import Placement

__all__ = ["expert_parameter_names", "gather_full", "full_state_dict", "local_state_dict", "full_optimizer_state",
           "local_optimizer_state", "placement_metadata", "restore_placements", "EXPERT_PARAMS"]

EXPERT_PARAMS = ("w_gate", "w_up", "w_down")


def moe_layers(module: nn.Module) -> dict[str, MoELayer]:
    return {name: m for name, m in module.named_modules() if isinstance(m, MoELayer)}


def expert_parameter_names(module: nn.Module) -> dict[str, tuple[MoELayer, str]]:
    """``"layers.0.moe.experts.w_gate"`` -> (layer, ``"w_gate"``) for every sharded expert tensor of ``module``."""
    out = {}
    for name, layer in moe_layers(module).items():
        prefix = f"{name}." if name else ""
        for p in EXPERT_PARAMS:
            out[f"{prefix}experts.{p}"] = (layer, p)
    return out


def gather_full(local: torch.Tensor, layer: MoELayer) -> torch.Tensor:
    """This rank's slots ``[S, ...]`` -> every expert ``[E, ...]`` in expert-id order (collective over the layer's
    expert-parallel world; the identity on an unsharded layer)."""
    ep = layer.expert_parallel
    if ep is None:
        return local.detach().clone()
    peers = ep.peer_group("a2a")
    parts = [torch.empty_like(local) for _ in range(ep.world_size)]
    dist.all_gather(parts, local.detach().contiguous(), group=peers.group)
    stacked = torch.stack(parts)  # [G, S, ...]
    pl = layer.placement
    return stacked[pl.expert_to_rank, pl.expert_to_slot].clone()


def local_slice(full: torch.Tensor, layer: MoELayer) -> torch.Tensor:
    """Every expert ``[E, ...]`` -> this rank's slots ``[S, ...]`` under the layer's placement."""
    if full.shape[0] != layer.num_experts:
        raise ValueError(
            f"checkpoint holds {full.shape[0]} experts for a layer with num_experts={layer.num_experts}"
        )
    return full[layer.local_expert_ids()].clone()


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with expert tensors gathered to ``[E, ...]`` and FSDP-sharded dense tensors gathered
    whole (collective when sharded): exactly the unsharded model's state dict."""
    state = {name: full_tensor(t) for name, t in module.state_dict().items()}
    for name, (layer, p) in expert_parameter_names(module).items():
        if name in state:
            state[name] = gather_full(state[name], layer)
    return state


def local_state_dict(module: nn.Module, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``full_state_dict`` for this rank: expert tensors sliced by the current placements, dense
    tensors sharded like the module's own where FSDP shards them (no communication)."""
    state = dict(full)
    for name, (layer, _) in expert_parameter_names(module).items():
        if name in state:
            state[name] = local_slice(state[name], layer)
    current = module.state_dict()
    for name, value in state.items():
        if name in current and isinstance(value, torch.Tensor):
            state[name] = distribute_like(value, current[name])
    return state


def _param_index(optimizer: torch.optim.Optimizer) -> dict[int, int]:
    """id(param) -> its index in ``optimizer.state_dict()`` (the order of param_groups)."""
    out, i = {}, 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            out[id(p)] = i
            i += 1
    return out


def _expert_param_slots(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, MoELayer]:
    index = _param_index(optimizer)
    out = {}
    for layer in moe_layers(module).values():
        for p in layer.experts.slot_parameters():
            if id(p) in index:
                out[index[id(p)]] = layer
    return out


def _map_expert_state(state: dict, slots: dict[int, MoELayer], fn, dense_fn=None) -> dict:
    """``state`` with ``fn(value, layer)`` applied to every expert moment and ``dense_fn(value, index)`` (when given)
    to every other tensor."""
    new = {"param_groups": state["param_groups"], "state": {}}
    for idx, entry in state["state"].items():
        layer = slots.get(int(idx))
        if layer is None:
            new["state"][idx] = entry if dense_fn is None else {
                k: dense_fn(v, int(idx)) if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
            continue
        new["state"][idx] = {
            k: fn(v, layer) if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] in (layer.experts.num_slots, layer.num_experts) else v
            for k, v in entry.items()
        }
    return new


def full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with expert-parameter moments gathered to ``[E, ...]`` (collective when sharded).

    Every rank must call it with the same optimizer structure; the state of a not-yet-stepped parameter is absent on
    all ranks alike (the optimizer sees the same parameters everywhere).
    """
    state = optimizer.state_dict()
    return _map_expert_state(state, _expert_param_slots(module, optimizer), gather_full,
                             lambda value, _: full_tensor(value))


def local_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, full: dict) -> dict:
    """Slice a full optimizer state for this rank (inverse of ``full_optimizer_state``): expert moments by the
    placements, the moments of FSDP-sharded parameters sharded like them."""
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def dense(value: torch.Tensor, index: int) -> torch.Tensor:
        like = params[index] if index < len(params) else None
        return distribute_like(value, like) if like is not None and value.shape == like.shape else value

    return _map_expert_state(full, _expert_param_slots(module, optimizer), local_slice, dense)


def placement_metadata(module: nn.Module) -> dict:
    return {name: {"expert_to_rank": l.placement.expert_to_rank.clone(), "expert_to_slot": l.placement.expert_to_slot.clone(),
                   "world_size": l.placement.world_size, "num_experts": l.num_experts}
            for name, l in moe_layers(module).items()}


def restore_placements(module: nn.Module, meta: dict | None) -> None:
    """Use each layer's saved placement when it fits the current expert-parallel world; else keep the contiguous one.

    Validates expert counts first so that a mismatched checkpoint fails before anything changes.
    """
    layers = moe_layers(module)
    meta = meta or {}
    for name, m in meta.items():
        if name in layers and int(m["num_experts"]) != layers[name].num_experts:
            raise ValueError(
                f"checkpoint layer {name!r} has num_experts={int(m['num_experts'])}, the model has "
                f"{layers[name].num_experts}"
            )
    for name, layer in layers.items():
        m = meta.get(name)
        ep = layer.expert_parallel
        if ep is None:
            continue
        if m is not None and int(m["world_size"]) == ep.world_size:
            layer.set_placement(Placement(m["expert_to_rank"].long(), m["expert_to_slot"].long(), ep.world_size))
        else:
            layer.set_placement(Placement.contiguous(layer.num_experts, ep.world_size))
