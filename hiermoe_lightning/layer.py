"""MoELayer = router + dispatcher + experts (+ optional shared experts).

Unsharded, the layer holds every expert and is the exact single-process reference. ``ExpertParallel.shard_`` keeps
only this rank's experts and routes rows with the chosen dispatch; the function computed does not change.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import torch
from torch import nn

from .dispatch.engine import DispatchHandle, Route, apply_experts, combine, dispatch_blocks
from .dispatch.spec import DispatchSpec
from .experts import ExpertBank, SwiGLU
from .placement import Placement
from .routing import Router

if TYPE_CHECKING:
    from .parallel import ExpertParallel

__all__ = ["MoELayer", "DROP_POLICIES"]

DROP_POLICIES = ("probs", "position")
_LOCAL_ROUTE = Route(DispatchSpec("local", (), False), (), 1)


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


class MoELayer(nn.Module):
    """A token-choice MoE feed-forward layer; input ``[..., hidden_size]`` -> output of the same shape.

    Built with the same arguments on every rank it has identical weights everywhere (each expert is initialised from
    its own seed). Dropless by default; ``capacity_factor`` caps each expert at ``ceil(cf * T * K / E)`` pairs of the
    local batch and ``drop_policy`` picks which pairs stay (``"probs"``: highest router weight; ``"position"``:
    earliest tokens). ``aux_loss`` holds the last forward's load-balancing loss; add it to your loss yourself.
    """

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        num_experts: int,
        top_k: int,
        *,
        seed: int = 0,
        score_func: str = "softmax",
        norm_topk_prob: bool = True,
        num_expert_groups: int = 1,
        topk_groups: int | None = None,
        aux_loss_coef: float = 1e-3,
        bias_update_rate: float = 0.0,
        num_shared_experts: int = 0,
        shared_ffn_hidden_size: int | None = None,
        capacity_factor: float | None = None,
        drop_policy: str = "probs",
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("ffn_hidden_size", ffn_hidden_size),
                            ("num_experts", num_experts), ("top_k", top_k)):
            _check_positive_int(name, value)
        if top_k > num_experts:
            raise ValueError(f"top_k must be in 1..num_experts ({num_experts}), got {top_k}")
        if isinstance(num_shared_experts, bool) or not isinstance(num_shared_experts, int) or num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be an int >= 0, got {num_shared_experts!r}")
        if capacity_factor is not None and (isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float))
                                            or not math.isfinite(capacity_factor) or capacity_factor <= 0):
            raise ValueError(f"capacity_factor must be None (dropless) or a number > 0, got {capacity_factor!r}")
        if drop_policy not in DROP_POLICIES:
            raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {drop_policy!r}")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.hidden_size, self.ffn_hidden_size = hidden_size, ffn_hidden_size
        self.num_experts, self.top_k, self.seed = num_experts, top_k, seed
        self.capacity_factor, self.drop_policy = capacity_factor, drop_policy
        self.router = Router(hidden_size, num_experts, top_k, score_func=score_func, norm_topk_prob=norm_topk_prob,
                             num_expert_groups=num_expert_groups, topk_groups=topk_groups,
                             aux_loss_coef=aux_loss_coef, bias_update_rate=bias_update_rate, seed=seed)
        self.experts = ExpertBank(range(num_experts), hidden_size, ffn_hidden_size, seed=seed, dtype=dtype)
        self.shared_experts = (
            SwiGLU(hidden_size, (shared_ffn_hidden_size or ffn_hidden_size) * num_shared_experts, seed=seed, dtype=dtype)
            if num_shared_experts else None
        )
        self.placement: Placement = Placement.contiguous(num_experts, 1)
        self.expert_parallel: "ExpertParallel | None" = None
        self.dispatch: str = "local"  # the concrete dispatch in use; set by ExpertParallel
        self.auto_calls: int = 0  # training forwards seen by dispatch="auto"
        self.auto_predictions: dict[str, float] = {}  # hd<d> -> predicted ms at the last auto choice
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.last_handle: DispatchHandle | None = None
        self.last_expert_ids: torch.Tensor | None = None  # [T, K] of the last forward, -1 = dropped
        self.last_local_slots: torch.Tensor | None = None
        self.expert_timings: dict | None = None  # set to {} to time the experts in place (benchmarks)
        self.register_buffer("routed_tokens", torch.zeros(num_experts, dtype=torch.long), persistent=False)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"MoELayer input must be a tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"MoELayer input must have last dimension hidden_size={self.hidden_size}, got shape {tuple(x.shape)}")
        shape = x.shape
        x2 = x.reshape(-1, self.hidden_size)
        routed = self.router(x2)
        expert_ids, weights = routed.expert_ids, routed.weights
        if self.capacity_factor is not None:
            expert_ids, weights = self._apply_capacity(expert_ids, weights)
        self.aux_loss = routed.aux_loss
        self.last_expert_ids = expert_ids.detach()
        if self.training:
            self.routed_tokens += routed.tokens_per_expert

        T, K = expert_ids.shape
        flat_ids = expert_ids.reshape(-1)
        pair_row = torch.arange(T, device=x.device).repeat_interleave(K)
        pair_weight = weights.reshape(-1)
        if self.capacity_factor is not None:
            kept = flat_ids >= 0
            pair_row, flat_ids, pair_weight = pair_row[kept], flat_ids[kept], pair_weight[kept]

        if self.expert_parallel is not None:
            self.expert_parallel.before_dispatch(self, expert_ids)
            route = self.expert_parallel.route(self)
        else:
            route = _LOCAL_ROUTE
        handle = DispatchHandle(route.spec.name, route.num_levels, self.hidden_size * x.element_size())
        rows, pair_weight, pair_row, pair_expert = dispatch_blocks(x2, pair_weight, pair_row, flat_ids, route, handle)
        pair_slot = self.placement.expert_to_slot.to(x.device)[pair_expert]
        one_pair_per_row = bool(route.phases) and not route.spec.dedup
        start = time.perf_counter()
        y = apply_experts(self.experts, rows, pair_row, pair_slot, pair_weight, one_pair_per_row)
        if self.expert_timings is not None:
            self._time_expert_backward(y, rows, time.perf_counter() - start)
        out = combine(y, handle, x.dtype)
        self.last_handle = handle
        self.last_local_slots = pair_slot.detach()  # [P] local slot of every pair this rank's experts processed
        if self.shared_experts is not None:
            out = out + self.shared_experts(x2)
        return out.reshape(shape)

    def _time_expert_backward(self, y: torch.Tensor, rows: tuple[torch.Tensor, ...], forward_seconds: float) -> None:
        """Benchmarks only (``expert_timings`` a dict): expert forward time, and backward from y's grad to the grad of
        the first block of rows (the experts' backward is done by then)."""
        t = self.expert_timings
        t["forward"] = t.get("forward", 0.0) + forward_seconds
        rows = rows[0]
        if y.requires_grad and rows.requires_grad:
            mark = {}
            y.register_hook(lambda g: mark.__setitem__("start", time.perf_counter()))

            def stop(g):
                t["backward"] = t.get("backward", 0.0) + time.perf_counter() - mark.get("start", time.perf_counter())

            rows.register_hook(stop)

    def _apply_capacity(self, expert_ids: torch.Tensor, weights: torch.Tensor):
        """Keep at most ``ceil(cf * T * K / E)`` pairs per expert; dropped pairs get id -1 and weight 0."""
        T, K = expert_ids.shape
        capacity = math.ceil(self.capacity_factor * T * K / self.num_experts)
        flat = expert_ids.reshape(-1)
        priority = -weights.detach().reshape(-1) if self.drop_policy == "probs" else torch.arange(T * K, device=flat.device).float()
        by_priority = torch.argsort(priority, stable=True)
        order = by_priority[torch.argsort(flat[by_priority], stable=True)]
        counts = torch.bincount(flat, minlength=self.num_experts)
        starts = torch.cumsum(counts, 0) - counts
        position = torch.arange(T * K, device=flat.device) - starts[flat[order]]
        keep = torch.empty_like(flat, dtype=torch.bool)
        keep[order] = position < capacity
        keep = keep.view(T, K)
        return torch.where(keep, expert_ids, -1), weights * keep

    # ------------------------------------------------------------------ routing bias
    @torch.no_grad()
    def update_routing_bias(self, group=None) -> None:
        """Aux-loss-free balancing step from the tokens routed since the last call (summed over ``group``)."""
        counts = self.routed_tokens.clone()
        if group is not None:
            import torch.distributed as dist

            dist.all_reduce(counts, group=group)
        self.router.update_bias(counts)
        self.routed_tokens.zero_()

    def set_placement(self, placement: Placement) -> None:
        """Point the slots at other experts (the slot contents must be filled to match, e.g. by loading a state)."""
        if placement.num_experts != self.num_experts:
            raise ValueError(f"placement has {placement.num_experts} experts, the layer {self.num_experts}")
        if self.expert_parallel is not None and placement.world_size != self.expert_parallel.world_size:
            raise ValueError(f"placement is for {placement.world_size} ranks, the layer runs on {self.expert_parallel.world_size}")
        self.placement = placement

    # ------------------------------------------------------------------ facts for users and the callback
    @property
    def is_sharded(self) -> bool:
        return self.expert_parallel is not None

    def local_expert_ids(self) -> torch.Tensor:
        """``[slots]`` global expert id held in each local slot."""
        rank = self.expert_parallel.rank if self.expert_parallel is not None else 0
        return self.placement.experts_of(rank)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, ffn_hidden_size={self.ffn_hidden_size}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, dispatch={self.dispatch!r}, slots={self.experts.num_slots}")
