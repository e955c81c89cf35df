"""The :class:`TokenDispatcher` seam: how a :class:`~hiermoe_lightning.layer.MoELayer` gets its tokens to the
experts and the results back, without knowing how.

A layer's forward is ``router -> layout -> dispatch -> experts -> combine``::

    layout = dispatcher.layout(expert_ids [T, K], weights [T, K])   # pairs; pure, no communication
    expert_input, handle = dispatcher.dispatch(x [T, M], layout)       # rows on the experts' ranks
    y = experts(expert_input)                                          # [R, M] fp32, summed per row
    out = dispatcher.combine(y, handle, x.dtype)                       # [T, M] on the tokens' rank

``handle`` is whatever the dispatcher needs to run the combine (and, through autograd, both backwards, which are the
mirror); the layer keeps it as ``last_handle`` and otherwise never looks inside. The hop engine
(:class:`HopDispatcher`: ``flat``, ``2dh``, ``hd1``, ``hd<d>``, ``auto``) is one implementation. A fused or
external dispatcher (DeepEP, an NVSHMEM kernel, an overlap scheduler) implements the same three calls and is
installed with :meth:`~hiermoe_lightning.layer.MoELayer.use_dispatcher`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from .engine import DispatchHandle, Route, combine, dispatch_blocks
from .spec import DispatchSpec

if TYPE_CHECKING:
    from ..layer import MoELayer
    from ..parallel import ExpertParallel

__all__ = ["TokenLayout", "ExpertInput", "TokenDispatcher", "HopDispatcher", "token_layout"]

_LOCAL_ROUTE = Route(DispatchSpec("local", (), False), (), 1)


@dataclass(frozen=True)
class TokenLayout:
    """A layer's routing on this rank, as (token, expert) pairs (dropped pairs removed).

    ``expert_ids``/``weights`` ``[T, K]`` (``-1`` = dropped) as the router gave them; ``pair_row``,
    ``pair_expert``, ``pair_weight`` ``[P]``: each pair's token, expert and router weight, token-major."""

    expert_ids: torch.Tensor
    weights: torch.Tensor
    pair_row: torch.Tensor
    pair_expert: torch.Tensor
    pair_weight: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.expert_ids.shape[0]


def token_layout(expert_ids: torch.Tensor, weights: torch.Tensor, has_drops: bool) -> TokenLayout:
    """``[T, K]`` routing -> :class:`TokenLayout`; with ``has_drops`` the pairs with id ``-1`` are removed (a host
    synchronisation on a GPU: their number depends on the data)."""
    T, K = expert_ids.shape
    pair_row = torch.arange(T, device=expert_ids.device).repeat_interleave(K)
    pair_expert, pair_weight = expert_ids.reshape(-1), weights.reshape(-1)
    if has_drops:
        kept = pair_expert >= 0
        pair_row, pair_expert, pair_weight = pair_row[kept], pair_expert[kept], pair_weight[kept]
    return TokenLayout(expert_ids, weights, pair_row, pair_expert, pair_weight)


@dataclass(frozen=True)
class ExpertInput:
    """What reaches this rank's experts: ``rows`` as one or more blocks ``[R_i, M]`` (read them with
    :func:`~hiermoe_lightning.dispatch.engine.gather_rows`; their concatenation is ``[R, M]``), and the pairs
    ``[P']`` served here: ``pair_row`` indexes the concatenated rows, ``pair_expert`` is a global expert id.
    ``one_pair_per_row``: every row serves exactly one pair (no dedup), so the per-row sum is a permutation."""

    rows: tuple[torch.Tensor, ...]
    pair_row: torch.Tensor
    pair_expert: torch.Tensor
    pair_weight: torch.Tensor
    one_pair_per_row: bool = False


@runtime_checkable
class TokenDispatcher(Protocol):
    """Moves a layer's tokens to its experts and back; see the module doc for the three calls and their shapes.

    ``name`` is the concrete dispatch in use (logged and checkpointed with the layer). The combine must return
    ``[T, M]`` in ``out_dtype`` and be differentiable (its backward and the dispatch's backward are the mirror).
    Collectives, if any, must be issued in the same order on every rank of a group."""

    name: str

    def layout(self, expert_ids: torch.Tensor, weights: torch.Tensor) -> TokenLayout: ...

    def dispatch(self, x: torch.Tensor, layout: TokenLayout) -> tuple[ExpertInput, Any]: ...

    def combine(self, y: torch.Tensor, handle: Any, out_dtype: torch.dtype) -> torch.Tensor: ...


class HopDispatcher:
    """The hop engine as a :class:`TokenDispatcher` for one layer: every ``dispatch`` value, a sequence of
    (deduplicated) hops over the process groups of :class:`~hiermoe_lightning.parallel.ExpertParallel`.

    Unsharded (``expert_parallel`` None) it is the single-process reference: no hop, the rows are the input.
    With ``dispatch="auto"`` it re-chooses the layer's ``hd<d>`` from the live routing of every rank at the first
    forward and every ``auto_interval`` training forwards (collective: every rank chooses alike).

    State it owns, and the layer exposes as properties (checkpointed by the callback): ``name`` (the concrete
    dispatch, or ``"auto"`` before the first forward), ``auto_calls`` and ``auto_predictions``."""

    def __init__(self, layer: "MoELayer", expert_parallel: "ExpertParallel | None" = None):
        self.layer, self.expert_parallel = layer, expert_parallel
        self.name = "local" if expert_parallel is None else expert_parallel.dispatch
        self.auto_calls = 0  # training forwards seen by dispatch="auto"
        self.auto_predictions: dict[str, float] = {}  # hd<d> -> predicted ms at the last auto choice
        # overlap: the chunk count in use (overlap_chunks="auto": chosen by the cost model, 1 until then)
        chunks = 1 if expert_parallel is None else expert_parallel.overlap_chunks
        self.overlap_in_use = 1 if chunks == "auto" else chunks
        self.overlap_calls = 0  # training forwards seen by overlap_chunks="auto"

    def layout(self, expert_ids: torch.Tensor, weights: torch.Tensor) -> TokenLayout:
        return token_layout(expert_ids, weights, self.layer.capacity_factor is not None)

    def dispatch(self, x: torch.Tensor, layout: TokenLayout) -> tuple[ExpertInput, DispatchHandle]:
        ep = self.expert_parallel
        if ep is None:
            route = _LOCAL_ROUTE
        else:
            self._choose_when_due(layout.expert_ids)
            route = ep.route(self.name, self.layer.placement, x.device)
        handle = DispatchHandle(route.spec.name, route.num_levels, x.shape[-1] * x.element_size())
        rows, weight, pair_row, pair_expert = dispatch_blocks(x, layout.pair_weight, layout.pair_row,
                                                              layout.pair_expert, route, handle)
        one_pair_per_row = bool(route.phases) and not route.spec.dedup
        return ExpertInput(rows, pair_row, pair_expert, weight, one_pair_per_row), handle

    def combine(self, y: torch.Tensor, handle: DispatchHandle, out_dtype: torch.dtype) -> torch.Tensor:
        return combine(y, handle, out_dtype)

    @property
    def overlaps(self) -> bool:
        """Whether :meth:`dispatch_experts_combine` runs this layer (sharded, ``overlap_chunks`` > 1 or ``"auto"``)."""
        chunks = None if self.expert_parallel is None else self.expert_parallel.overlap_chunks
        return chunks == "auto" or (chunks is not None and chunks > 1)

    def dispatch_experts_combine(self, x: torch.Tensor, layout: TokenLayout, expert_fn, params,
                                 out_dtype: torch.dtype, side_fn=None,
                                 side_params=()) -> tuple[torch.Tensor, DispatchHandle]:
        """The optional fourth call of a dispatcher that overlaps: dispatch, ``expert_fn`` and combine as one
        pipeline (:func:`~hiermoe_lightning.dispatch.overlap.dispatch_experts_combine`), ``side_fn(x)`` (the
        shared experts) computed while the first rows travel and added: ``x`` ``[T, M]`` -> ``([T, M] in out_dtype,
        handle)``. A route with no phase (every expert here) falls back to the plain calls."""
        from .overlap import dispatch_experts_combine

        self._choose_when_due(layout.expert_ids)
        self._choose_chunks_when_due(layout.expert_ids)
        ep = self.expert_parallel
        route = ep.route(self.name, self.layer.placement, x.device)
        handle = DispatchHandle(route.spec.name, route.num_levels, x.shape[-1] * x.element_size())
        if not route.phases:  # nothing travels: nothing to overlap
            rows, weight, pair_row, pair_expert = dispatch_blocks(x, layout.pair_weight, layout.pair_row,
                                                                  layout.pair_expert, route, handle)
            out = self.combine(expert_fn(rows, pair_row, pair_expert, weight, False, list(params)), handle, out_dtype)
            return (out if side_fn is None else out + side_fn(x, list(side_params))), handle
        out = dispatch_experts_combine(x, layout.pair_weight, layout.pair_row, layout.pair_expert, route, handle,
                                       expert_fn, params, out_dtype, self.overlap_in_use, side_fn, side_params)
        return out, handle

    def _choose_chunks_when_due(self, expert_ids: torch.Tensor) -> None:
        """With ``overlap_chunks="auto"``: choose the chunk count at the second training forward (the first one's
        expert compute is measured by then) and every ``auto_interval`` training forwards after (collective)."""
        ep = self.expert_parallel
        if ep.overlap_chunks != "auto" or not self.layer.training:
            return
        self.overlap_calls += 1
        calls = self.overlap_calls
        last = self.layer.last_handle
        if (calls == 2 or (calls > 2 and (calls - 2) % ep.auto_interval == 0)) and last is not None:
            self.overlap_in_use = ep.choose_overlap(self.layer, expert_ids, self.name, 1e3 * last.compute_seconds)

    def _choose_when_due(self, expert_ids: torch.Tensor) -> None:
        """With ``auto``: re-choose the depth at the first forward and every ``auto_interval`` training forwards."""
        ep = self.expert_parallel
        if ep.dispatch != "auto":
            return
        training = self.layer.training
        due = self.name == "auto" or (training and self.auto_calls % ep.auto_interval == 0)
        if training:
            self.auto_calls += 1
        if due:
            self.name = ep.choose_dispatch(self.layer, expert_ids)
