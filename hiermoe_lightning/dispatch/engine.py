"""One engine runs every dispatch value: a sequence of hops, each deduplicated or not.

State on a rank during a dispatch: ``rows`` ``[R, M]`` (token copies) and *pairs* ``[P]`` (a (token, expert)
assignment: the row it lives in, its expert id and its router weight). One hop (one phase) sends each row to the
distinct next ranks of its pairs (``dedup``) or once per pair, carrying the pairs along. After the last hop every
pair's expert is local; the experts run and each rank sums, with the router weights, all outputs of a row before
it travels back. The combine walks the hops backwards and sums again at each relay, so the way back carries exactly
as many rows as the way out. Backward of each is the mirror (one autograd Function for the whole dispatch and one
for the whole combine, so every rank issues its collectives in the same order).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .comm import PeerGroup, all_to_all_rows, check_splits, exchange_counts
from .spec import DispatchSpec

__all__ = ["PhaseRoute", "Route", "Hop", "DispatchHandle", "plan_hop", "dispatch", "combine", "apply_experts"]


@dataclass(frozen=True)
class PhaseRoute:
    """How pairs leave this rank in one phase: ``peer_of_expert`` ``[E]`` (peer index per expert) and the link
    level of each peer (0 for this rank itself)."""

    phase: str
    peers: PeerGroup
    peer_of_expert: torch.Tensor
    peer_level: tuple[int, ...]


@dataclass(frozen=True)
class Route:
    """A concrete dispatch on this rank for one placement. Phases whose group is only this rank are omitted."""

    spec: DispatchSpec
    phases: tuple[PhaseRoute, ...]
    num_levels: int
    verify_splits: bool = False  # check collectively that every payload's splits agree before it moves


@dataclass
class HopPlan:
    """Pure plan of one hop. Sent rows are ordered by peer; pairs too."""

    send_src_row: torch.Tensor  # [S] previous-stage row of each sent row
    send_splits: torch.Tensor  # [peers] rows to each peer
    pair_order: torch.Tensor  # [P] previous pairs in send order
    pair_splits: torch.Tensor  # [peers] pairs to each peer
    pair_local_row: torch.Tensor  # [P] (send order) row index within the block sent to the pair's peer


def plan_hop(pair_row: torch.Tensor, pair_peer: torch.Tensor, num_rows: int, num_peers: int, dedup: bool) -> HopPlan:
    """Which rows go to which peer. ``pair_row``/``pair_peer`` ``[P]`` int64.

    With ``dedup`` a row goes once to each distinct peer of its pairs; without, once per pair. Vectorised: one sort
    of ``peer * n + source`` keys.
    """
    P = pair_row.numel()
    n = max(num_rows if dedup else P, 1)
    src = pair_row if dedup else torch.arange(P, device=pair_row.device)
    key = pair_peer * n + src
    uniq, inverse = torch.unique(key, sorted=True, return_inverse=True)
    send_peer = uniq // n
    send_src_row = uniq % n if dedup else pair_row[uniq % n]
    send_splits = torch.bincount(send_peer, minlength=num_peers)
    row_offsets = torch.cumsum(send_splits, 0) - send_splits
    pair_order = torch.argsort(pair_peer, stable=True)
    sorted_peer = pair_peer[pair_order]
    pair_splits = torch.bincount(pair_peer, minlength=num_peers)
    pair_local_row = inverse[pair_order] - row_offsets[sorted_peer]
    return HopPlan(send_src_row, send_splits, pair_order, pair_splits, pair_local_row)


@dataclass
class Hop:
    """What one executed hop did: enough to run the combine and both backwards, and to count bytes."""

    phase: str
    peers: PeerGroup
    peer_level: tuple[int, ...]
    send_src_row: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    pair_order: torch.Tensor
    pair_send_splits: list[int]
    pair_recv_splits: list[int]
    num_prev_rows: int
    num_prev_pairs: int

    def off_rank(self, splits: list[int]) -> int:
        return sum(s for p, s in enumerate(splits) if p != self.peers.index)


@dataclass
class DispatchHandle:
    """The record of one forward's dispatch; the combine takes it; byte statistics come from it."""

    dispatch: str
    num_levels: int
    row_bytes: int
    hops: list[Hop] = field(default_factory=list)
    comm_seconds: float = 0.0  # wall time spent in collectives (dispatch, combine and both backwards)
    plan_seconds: float = 0.0  # wall time spent planning hops (pure bookkeeping)

    def phase_bytes(self) -> list[dict]:
        """Per phase: payload rows/bytes this rank sent and received off-rank (dispatch direction only)."""
        out = []
        for h in self.hops:
            sent, recv = h.off_rank(h.send_splits), h.off_rank(h.recv_splits)
            out.append({"name": h.phase, "rows_sent": sent, "rows_recv": recv,
                        "bytes_sent": sent * self.row_bytes, "bytes_recv": recv * self.row_bytes})
        return out

    def bytes_by_level(self) -> dict[str, int]:
        """``levelL`` -> payload bytes this rank sent over level-L links, dispatch plus combine.

        The combine sends back exactly the rows it received, so the combine's sends equal this rank's receives.
        """
        out = {f"level{i}": 0 for i in range(1, self.num_levels + 1)}
        for h in self.hops:
            for p, (s, r) in enumerate(zip(h.send_splits, h.recv_splits)):
                lvl = h.peer_level[p]
                if lvl > 0:
                    out[f"level{lvl}"] += (s + r) * self.row_bytes
        return out


def _timed(handle: DispatchHandle, fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    handle.comm_seconds += time.perf_counter() - start
    return out


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pair_weight, pair_row, pair_expert, route: Route, handle: DispatchHandle):
        rows, weight = x, pair_weight
        for pr in route.phases:
            start = time.perf_counter()
            plan = plan_hop(pair_row, pr.peer_of_expert[pair_expert], rows.shape[0], pr.peers.size, route.spec.dedup)
            handle.plan_seconds += time.perf_counter() - start
            counts = _timed(handle, exchange_counts, torch.stack([plan.send_splits, plan.pair_splits], dim=1), pr.peers)
            send_splits, pair_send = plan.send_splits.tolist(), plan.pair_splits.tolist()
            recv_splits, pair_recv = counts[:, 0].tolist(), counts[:, 1].tolist()
            if route.verify_splits:
                _timed(handle, check_splits, send_splits, recv_splits, pr.peers)
                _timed(handle, check_splits, pair_send, pair_recv, pr.peers)
            new_rows = _timed(handle, all_to_all_rows, rows[plan.send_src_row], send_splits, recv_splits, pr.peers)
            # pair metadata in one message: (row within the block sent to that peer, expert id, weight); float64 holds
            # the ints and an fp32 weight exactly
            meta = torch.stack(
                [plan.pair_local_row.double(), pair_expert[plan.pair_order].double(), weight[plan.pair_order].double()], 1
            )
            meta = _timed(handle, all_to_all_rows, meta, pair_send, pair_recv, pr.peers)
            recv_offsets = torch.cumsum(counts[:, 0], 0) - counts[:, 0]
            src_peer = torch.repeat_interleave(torch.arange(pr.peers.size, device=counts.device), counts[:, 1])
            handle.hops.append(Hop(pr.phase, pr.peers, pr.peer_level, plan.send_src_row, send_splits, recv_splits,
                                   plan.pair_order, pair_send, pair_recv, rows.shape[0], pair_row.numel()))
            rows = new_rows
            pair_row = meta[:, 0].long() + recv_offsets[src_peer]
            pair_expert = meta[:, 1].long()
            weight = meta[:, 2].to(pair_weight.dtype)
        ctx.handle = handle
        ctx.x_dtype, ctx.w_dtype = x.dtype, pair_weight.dtype
        ctx.mark_non_differentiable(pair_row, pair_expert)
        if not route.phases:  # outputs must not alias inputs in an autograd Function
            rows, weight = rows.view_as(rows), weight.view_as(weight)
        return rows, weight, pair_row, pair_expert

    @staticmethod
    def backward(ctx, grad_rows, grad_weight, _grad_pair_row, _grad_pair_expert):
        handle: DispatchHandle = ctx.handle
        if grad_rows is None:
            raise RuntimeError("dispatch backward got no row gradient")  # unreachable: the experts always use rows
        for h in reversed(handle.hops):
            back = _timed(handle, all_to_all_rows, grad_rows, h.recv_splits, h.send_splits, h.peers)
            grad_rows = back.new_zeros(h.num_prev_rows, back.shape[1], dtype=torch.float32).index_add_(
                0, h.send_src_row, back.float()).to(ctx.x_dtype)
            if grad_weight is not None:
                back_w = _timed(handle, all_to_all_rows, grad_weight, h.pair_recv_splits, h.pair_send_splits, h.peers)
                grad_weight = back_w.new_empty(h.num_prev_pairs)
                grad_weight[h.pair_order] = back_w
        return grad_rows, grad_weight, None, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, handle: DispatchHandle, out_dtype: torch.dtype):
        for h in reversed(handle.hops):
            back = _timed(handle, all_to_all_rows, y.to(out_dtype), h.recv_splits, h.send_splits, h.peers)
            y = back.new_zeros(h.num_prev_rows, back.shape[1], dtype=torch.float32).index_add_(0, h.send_src_row, back.float())
        ctx.handle, ctx.out_dtype, ctx.y_dtype = handle, out_dtype, y.dtype
        return y.to(out_dtype) if handle.hops or y.dtype != out_dtype else y.clone()

    @staticmethod
    def backward(ctx, grad):
        grad = grad.to(ctx.out_dtype)
        for h in ctx.handle.hops:
            grad = _timed(ctx.handle, all_to_all_rows, grad[h.send_src_row], h.send_splits, h.recv_splits, h.peers)
        return grad.to(torch.float32), None, None


def dispatch(x, pair_weight, pair_row, pair_expert, route: Route, handle: DispatchHandle):
    """``x`` ``[T, M]``, pairs ``[P]`` -> ``(rows [R, M], weight [P'], pair_row [P'], pair_expert [P'])`` on the
    experts' ranks; ``handle`` is filled in for ``combine``."""
    return _Dispatch.apply(x, pair_weight, pair_row, pair_expert, route, handle)


def combine(y: torch.Tensor, handle: DispatchHandle, out_dtype: torch.dtype) -> torch.Tensor:
    """``y`` ``[R, M]`` fp32 (weighted expert outputs summed per row) -> ``[T, M]`` in ``out_dtype`` on the token's rank."""
    return _Combine.apply(y, handle, out_dtype)


def apply_experts(experts, rows, pair_row, pair_slot, pair_weight, one_pair_per_row: bool = False) -> torch.Tensor:
    """Run each pair's expert on its row and sum the weighted outputs per row.

    ``rows`` ``[R, M]``, pairs ``[P]`` -> ``[R, M]`` fp32. Loops over local expert slots only. With
    ``one_pair_per_row`` (dispatches without dedup deliver exactly one pair per row) the sum is a permutation and the
    zero-filled accumulator is skipped.
    """
    order = torch.argsort(pair_slot, stable=True)
    rows_per_slot = torch.bincount(pair_slot, minlength=experts.num_slots).tolist()
    src_row = pair_row[order]
    out = experts(rows[src_row], rows_per_slot, scale=pair_weight[order]).float()
    if one_pair_per_row and src_row.numel() == rows.shape[0]:
        inverse = torch.empty_like(src_row)
        inverse[src_row] = torch.arange(src_row.numel(), device=src_row.device)
        return out[inverse]
    return rows.new_zeros(rows.shape[0], rows.shape[1], dtype=torch.float32).index_add(0, src_row, out)
