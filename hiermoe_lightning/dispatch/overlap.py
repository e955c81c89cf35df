"""Dispatch, experts and combine as one pipeline: a chunk's experts compute while other chunks' rows travel.

Without overlap a layer runs ``dispatch -> experts -> combine`` one after the other, and the experts wait for the
whole dispatch. Here the pairs are split into programs as the hop engine splits them (:mod:`.engine`), but each
program runs its dispatch hops, *then its experts*, then its combine hops, and the hop engine's runner
(:func:`~.engine._run_pipeline`) drives them all: while one program's rows are on the wire (gloo's own threads, or
the transport's), the main thread computes the experts of another. Programs, in order:

* ``C`` chunks of equal token ranges of the pairs that leave this rank in the first phase (the traffic to hide);
* with more than one phase, the pairs that stay in the node in the first phase but not on this rank (they start at
  the second phase);
* the pairs whose experts are on this rank, no hop at all, as two programs by token halves: the first runs its
  experts while the first chunks' rows are in flight (the pipeline's fill), the second is kept for the drain
  (:data:`~.engine.DRAIN`), while the last chunks' rows come home; forward and backward alike;
* optionally a *side* computation that needs no communication (a layer's shared experts): it runs while the first
  chunks' rows are in flight too, and its output is added to the layer's.

The backward is the mirror, with the same overlap: each program receives its output gradient (the combine's
backward), runs its experts' backward (``torch.autograd.grad`` on the graph its forward kept), and sends the row and
weight gradients home (the dispatch's backward). The expert parameters are inputs of the autograd Function, so their
gradients reach ``.grad`` (and its hooks) once, summed over the programs. Inside, the experts compute with detached
aliases of the parameters (handed to ``expert_fn``), never the parameters themselves: the inner
``torch.autograd.grad`` would otherwise fire the parameters' gradient hooks a second time (a hook that scales a
gradient would scale it twice).

Exactness: every pair meets the same expert, with the same weight, and every row's outputs are summed before they
travel, exactly as in the sequential path; only the order of floating-point sums over programs differs. Every rank
runs the same programs in the same order whatever its tokens (empty chunks included), so collectives match.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

from .engine import (DRAIN, Chunk, DispatchHandle, Route, _combine_backward_program, _combine_program,
                     _dispatch_backward_program, _dispatch_program, _run_pipeline, chunk_inputs)

__all__ = ["ExpertFn", "SideFn", "even_bounds", "make_overlap_chunks", "dispatch_experts_combine"]

# (rows [R, M], pair_row [P], pair_expert [P], pair_weight [P], one_pair_per_row, params) -> y [R, M] fp32, computed
# with ``params`` (aliases of the parameters the caller passed, in its order) in place of the module's own
ExpertFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool, list], torch.Tensor]


def even_bounds(num_tokens: int, num_chunks: int) -> list[int]:
    """Token boundaries ``[0, ..., num_tokens]`` of ``num_chunks`` contiguous chunks of (nearly) equal size: a
    chunk's compute should hide the next one's transfer, so neither may dwarf the other."""
    return [c * num_tokens // num_chunks for c in range(num_chunks + 1)]


def make_overlap_chunks(route: Route, num_tokens: int, pair_row: torch.Tensor, pair_expert: torch.Tensor,
                        num_chunks: int) -> list[Chunk]:
    """The programs of an overlapped layer (the same number and kinds on every rank): ``num_chunks`` equal token
    ranges of the pairs leaving this rank in the first phase, then (more than one phase) the pairs staying in the
    first phase but not on this rank, then the pairs served on this rank (no hop) in two token halves, the second
    kept for the pipeline's drain. ``pair_row``/``pair_expert`` ``[P]``."""
    first = route.phases[0]
    here = torch.ones_like(pair_row, dtype=torch.bool)
    for pr in route.phases:
        here &= pr.peer_of_expert[pair_expert] == pr.peers.index
    leaves = first.peer_of_expert[pair_expert] != first.peers.index
    moving = torch.nonzero(leaves).squeeze(1)
    bounds = even_bounds(num_tokens, num_chunks)
    chunk_of_pair = torch.bucketize(pair_row[moving], torch.tensor(bounds[1:-1], device=pair_row.device), right=True)
    order = moving[torch.argsort(chunk_of_pair, stable=True)]
    sizes = torch.bincount(chunk_of_pair, minlength=num_chunks).tolist()
    chunks = [Chunk(bounds[c], bounds[c + 1], idx) for c, idx in enumerate(order.split(sizes))]
    if len(route.phases) > 1:
        chunks.append(Chunk(0, num_tokens, torch.nonzero(~leaves & ~here).squeeze(1), first_phase=1))
    half = num_tokens // 2
    local = torch.nonzero(here).squeeze(1)
    late = pair_row[local] >= half
    chunks.append(Chunk(0, half, local[~late], first_phase=len(route.phases)))
    chunks.append(Chunk(half, num_tokens, local[late], first_phase=len(route.phases), at_drain=True))
    return chunks


# (x [T, M], params) -> [T, M]: work of the layer that needs no communication (shared experts), run inside the
# pipeline with ``params`` (aliases of the side parameters) in place of the module's own
SideFn = Callable[[torch.Tensor, list], torch.Tensor]


class _Saved:
    """What one program's forward keeps for its backward: the leaves its experts read and their output graph."""

    __slots__ = ("rows", "weight", "y")

    def __init__(self, rows: torch.Tensor, weight: torch.Tensor, y: torch.Tensor):
        self.rows, self.weight, self.y = rows, weight, y


def _aliases(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Detached tensors sharing the parameters' storage, requiring grad where they do: what the pipeline's inner
    graphs are built on (the parameters' own hooks then fire once, when the Function returns their gradients)."""
    return [p.detach().requires_grad_(p.requires_grad) for p in params]


def _forward_program(route: Route, handle: DispatchHandle, chunk: Chunk, inputs, first_hop, expert_fn: ExpertFn,
                     out_dtype: torch.dtype, out: torch.Tensor, weight_grad: bool, params: list, keep_graph: bool):
    """Dispatch hops, then this program's experts (keeping their graph when a backward will follow), then its
    combine hops into ``out``. A program kept for the drain waits for it first."""
    if chunk.at_drain:
        yield DRAIN
    rows, weight, pair_row, pair_expert = yield from _dispatch_program(route, handle, chunk, *inputs, first_hop)
    start = time.perf_counter()
    with torch.set_grad_enabled(keep_graph):
        rows = rows.detach().requires_grad_(True)
        weight = weight.detach().requires_grad_(weight_grad)
        y = expert_fn(rows, pair_row, pair_expert, weight, bool(chunk.hops) and not route.spec.dedup, params)
    handle.compute_seconds += time.perf_counter() - start
    yield from _combine_program(chunk, y.detach(), out_dtype, out)
    return _Saved(rows, weight, y)


def _backward_program(chunk: Chunk, saved: _Saved, grad_out: torch.Tensor, params: Sequence[torch.Tensor],
                      param_grads: list, grad_x: torch.Tensor, x_dtype: torch.dtype, handle: DispatchHandle):
    """The output gradient to this program's rows (the combine's backward), its experts' backward, then the row and
    weight gradients home (the dispatch's backward). Returns the gradient of its pairs' weights (or None). A program
    kept for the drain waits for it first, as in the forward."""
    if chunk.at_drain:
        yield DRAIN
    grad_y = yield from _combine_backward_program(chunk, grad_out[chunk.token_start:chunk.token_end])
    start = time.perf_counter()
    trained = [i for i, p in enumerate(params) if p.requires_grad]
    wants = [saved.rows] + ([saved.weight] if saved.weight.requires_grad else []) + [params[i] for i in trained]
    grads = torch.autograd.grad(saved.y, wants, grad_y.float(), allow_unused=True)
    handle.compute_seconds += time.perf_counter() - start
    grad_rows = grads[0] if grads[0] is not None else torch.zeros_like(saved.rows)
    grad_weight = None
    if saved.weight.requires_grad:
        grad_weight = grads[1] if grads[1] is not None else torch.zeros_like(saved.weight)
    _add_grads(param_grads, trained, grads[len(wants) - len(trained):])
    saved.y = None  # the graph is spent
    return (yield from _dispatch_backward_program(chunk, grad_rows, grad_weight, x_dtype, grad_x))


def _side_program(x: torch.Tensor, side_fn: SideFn, out: torch.Tensor, handle: DispatchHandle, params: list,
                  keep_graph: bool):
    """The side computation: no exchange, its output added to ``out``; keeps its graph for the backward."""
    start = time.perf_counter()
    with torch.set_grad_enabled(keep_graph):
        leaf = x.detach().requires_grad_(True)
        y = side_fn(leaf, params)
    out += y.detach().float()
    handle.compute_seconds += time.perf_counter() - start
    return _Saved(leaf, leaf, y)
    yield  # a generator like every program (it never yields)


def _side_backward_program(saved: _Saved, grad_out: torch.Tensor, params: Sequence[torch.Tensor], param_grads: list,
                           grad_x: torch.Tensor, handle: DispatchHandle):
    start = time.perf_counter()
    trained = [i for i, p in enumerate(params) if p.requires_grad]
    grads = torch.autograd.grad(saved.y, [saved.rows, *(params[i] for i in trained)], grad_out.to(saved.y.dtype),
                                allow_unused=True)
    handle.compute_seconds += time.perf_counter() - start
    if grads[0] is not None:
        grad_x += grads[0].float()
    _add_grads(param_grads, trained, grads[1:])
    saved.y = None
    return None
    yield


def _add_grads(total: list, indices: list[int], grads) -> None:
    """``total[indices[j]] += grads[j]`` (None: nothing yet / no gradient)."""
    for i, g in zip(indices, grads):
        if g is not None:
            total[i] = g if total[i] is None else total[i] + g


class _DispatchExpertsCombine(torch.autograd.Function):
    """``(x [T, M], pair_weight [P], pair_row [P], pair_expert [P], ..., *params, *side_params)`` -> ``out [T, M]``."""

    @staticmethod
    def forward(ctx, x, pair_weight, pair_row, pair_expert, route: Route, handle: DispatchHandle,
                expert_fn: ExpertFn, out_dtype: torch.dtype, num_chunks: int, side_fn: SideFn | None,
                keep_graph: bool, num_params: int, *params):
        handle.num_tokens = x.shape[0]
        handle.chunks = make_overlap_chunks(route, x.shape[0], pair_row, pair_expert, num_chunks)
        out = x.new_zeros(x.shape[0], x.shape[1], dtype=torch.float32)
        weight_grad = ctx.needs_input_grad[1]
        aliases = _aliases(params[:num_params])
        side_aliases = _aliases(params[num_params:])
        programs = [_forward_program(route, handle, c, args, first_hop, expert_fn, out_dtype, out, weight_grad,
                                     aliases, keep_graph)
                    for c, (args, first_hop) in zip(handle.chunks, chunk_inputs(route, handle, x, pair_weight,
                                                                                pair_row, pair_expert))]
        if side_fn is not None:  # after the programs whose first rows leave the rank: it runs while they travel
            leaving = sum(c.first_phase == 0 for c in handle.chunks)
            programs.insert(leaving, _side_program(x, side_fn, out, handle, side_aliases, keep_graph))
        saved = _run_pipeline(programs, handle)
        ctx.side = saved.pop(leaving) if side_fn is not None else None
        ctx.saved = saved
        ctx.handle, ctx.x_dtype, ctx.out_dtype = handle, x.dtype, out_dtype
        ctx.params, ctx.side_params = aliases, side_aliases
        ctx.num_pairs = pair_weight.shape[0]
        return out.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        handle: DispatchHandle = ctx.handle
        grad_out = grad_out.to(ctx.out_dtype)
        grad_x = grad_out.new_zeros(handle.num_tokens, grad_out.shape[1], dtype=torch.float32)
        param_grads: list = [None] * len(ctx.params)
        side_grads: list = [None] * len(ctx.side_params)
        programs = [_backward_program(c, s, grad_out, ctx.params, param_grads, grad_x, ctx.x_dtype, handle)
                    for c, s in zip(handle.chunks, ctx.saved)]
        if ctx.side is not None:  # the side's backward runs while the first gradients travel
            leaving = sum(c.first_phase == 0 for c in handle.chunks)
            programs.insert(leaving, _side_backward_program(ctx.side, grad_out, ctx.side_params, side_grads, grad_x,
                                                            handle))
        outs = _run_pipeline(programs, handle)
        if ctx.side is not None:
            outs.pop(leaving)
        ctx.saved = ctx.side = None
        grad_pair_weight = None
        if ctx.needs_input_grad[1]:
            grad_pair_weight = grad_x.new_zeros(ctx.num_pairs, dtype=outs[0].dtype if outs else torch.float32)
            for c, g in zip(handle.chunks, outs):
                grad_pair_weight[c.pair_index] = g
        return (grad_x.to(ctx.x_dtype), grad_pair_weight, None, None, None, None, None, None, None, None, None, None,
                *param_grads, *side_grads)


def dispatch_experts_combine(x: torch.Tensor, pair_weight: torch.Tensor, pair_row: torch.Tensor,
                             pair_expert: torch.Tensor, route: Route, handle: DispatchHandle, expert_fn: ExpertFn,
                             params: Sequence[torch.Tensor], out_dtype: torch.dtype, num_chunks: int,
                             side_fn: SideFn | None = None, side_params: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """The whole routed part of a layer, overlapped: ``x`` ``[T, M]`` and its pairs ``[P]`` -> ``[T, M]`` in
    ``out_dtype``, equal to ``combine(experts(dispatch(x)))`` (plus ``side_fn(x)`` when given). ``expert_fn``
    computes the weighted expert outputs of one program's rows (:data:`ExpertFn`), ``params`` are the tensors it
    reads that need gradients (the experts' weights), ``side_params`` those ``side_fn`` reads. ``route`` must have
    at least one phase (a layer alone on its rank has nothing to overlap)."""
    if not route.phases:
        raise ValueError("dispatch_experts_combine needs a route with at least one phase")
    # inference (no_grad, eval): no inner graphs to keep, nothing saved
    keep_graph = torch.is_grad_enabled()
    return _DispatchExpertsCombine.apply(x, pair_weight, pair_row, pair_expert, route, handle, expert_fn, out_dtype,
                                         num_chunks, side_fn, keep_graph, len(params), *params, *side_params)
