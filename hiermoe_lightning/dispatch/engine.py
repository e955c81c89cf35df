"""One engine runs every dispatch value: a sequence of hops, each deduplicated or not.

State on a rank during a dispatch: ``rows`` ``[R, M]`` (token copies) and *pairs* ``[P]`` (a (token, expert)
assignment: the row it lives in, its expert id and its router weight). One hop (one phase) sends each row to the
distinct next ranks of its pairs (``dedup``) or once per pair, carrying the pairs along. After the last hop every
pair's expert is local; the experts run and each rank sums, with the router weights, all outputs of a row before
it travels back. The combine walks the hops backwards and sums again at each relay, so the way back carries exactly
as many rows as the way out. Backward of each is the mirror (one autograd Function for the whole dispatch and one
for the whole combine, so every rank issues its collectives in the same order).

Each hop costs two latencies: a count exchange, then the rows and the pair metadata posted together. With
``Route.pipeline_chunks = C > 1`` a multi-hop dispatch runs as several programs (:func:`_make_chunks`): the pairs that
leave the rank in the first phase in C contiguous token chunks (halving in size), the pairs staying in the node, and
the pairs staying on the rank; dedup only ever merges copies of one row, so nothing is lost. While chunk ``c``
crosses the slow inter-node link, chunk ``c - 1`` takes the fast intra-node hop. Every program is a generator that
yields the exchange it needs next; :func:`_run_pipeline` posts them in an order fixed by the programs' structure, the
same on every rank. The rows reach the experts as one block per program (:func:`dispatch_blocks`, read with
:func:`gather_rows`), never concatenated.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .comm import Gathered, PeerGroup, SplitMismatchError, num_rows, sizes_ride_along, start_exchange
from .spec import DispatchSpec, level_key

__all__ = ["MAX_PIPELINE_CHUNKS", "validate_pipeline_chunks", "PhaseRoute", "Route", "Hop", "Chunk", "DispatchHandle",
           "TraceEvent", "pack_pairs", "unpack_pairs", "HopPlan", "HopCounts", "plan_hop_counts", "plan_hop", "dispatch",
           "dispatch_blocks", "total_rows", "gather_rows", "combine", "apply_experts"]


@dataclass(frozen=True)
class PhaseRoute:
    """How pairs leave this rank in one phase: ``peer_of_expert`` ``[E]`` (peer index per expert) and the link
    level of each peer (0 for this rank itself)."""

    phase: str
    peers: PeerGroup
    peer_of_expert: torch.Tensor
    peer_level: tuple[int, ...]


MAX_PIPELINE_CHUNKS = 64


def validate_overlap_chunks(value: object, what: str = "overlap_chunks") -> "int | str":
    """``"auto"`` (chosen per layer by the cost model: :mod:`~hiermoe_lightning.cost.overlap`) or a chunk count in
    ``1 .. MAX_PIPELINE_CHUNKS``; else a ValueError naming ``what``."""
    if value == "auto" and isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PIPELINE_CHUNKS:
        raise ValueError(f"{what} must be 'auto' or an int in 1..{MAX_PIPELINE_CHUNKS}, got {value!r}")
    return value


def validate_pipeline_chunks(value: object, what: str = "pipeline_chunks") -> int:
    """``value`` as a chunk count in ``1 .. MAX_PIPELINE_CHUNKS``; else a ValueError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PIPELINE_CHUNKS:
        raise ValueError(f"{what} must be an int in 1..{MAX_PIPELINE_CHUNKS}, got {value!r}")
    return value


@dataclass(frozen=True)
class Route:
    """A concrete dispatch on this rank for one placement. Phases whose group is only this rank are omitted."""

    spec: DispatchSpec
    phases: tuple[PhaseRoute, ...]
    num_levels: int
    verify_splits: bool = False  # check collectively that every payload's splits agree before it moves
    pipeline_chunks: int = 1  # token chunks run as a software pipeline over the hops (1: one pass)


@dataclass
class HopPlan:
    """Pure plan of one hop. Sent rows are ordered by peer; pairs too."""

    send_src_row: torch.Tensor  # [S] previous-stage row of each sent row
    send_splits: torch.Tensor  # [peers] rows to each peer
    pair_order: torch.Tensor  # [P] previous pairs in send order
    pair_splits: torch.Tensor  # [peers] pairs to each peer
    pair_local_row: torch.Tensor  # [P] (send order) row index within the block sent to the pair's peer


@dataclass
class HopCounts:
    """A hop planned up to what needs no host synchronisation: every tensor here has a size known in advance
    (``[peers]`` or ``[P]``), so on a GPU nothing waits for the device. :meth:`finish` takes the number of rows sent
    (known on the host once the hop's counts are, the hop's one synchronisation) and gives the :class:`HopPlan`."""

    send_splits: torch.Tensor  # [peers] rows to each peer
    pair_splits: torch.Tensor  # [peers] pairs to each peer
    pair_order: torch.Tensor  # [P] previous pairs in send order (by peer, stable)
    pair_local_row: torch.Tensor  # [P] (send order) row index within the block sent to the pair's peer
    sorted_key: torch.Tensor  # [P] keys peer * n + source, ascending
    key_index: torch.Tensor  # [P] (key order) index of each key among the distinct keys
    key_base: int  # n
    source_row: torch.Tensor | None  # [P] without dedup: each pair's row (the key's source is the pair); else None

    def send_counts(self) -> torch.Tensor:
        """``[peers, 2]`` rows and pairs this rank sends each peer: what the hop's count exchange announces."""
        return torch.stack([self.send_splits, self.pair_splits], dim=1)

    def finish(self, num_sent: int) -> HopPlan:
        """The plan, given ``num_sent = sum(send_splits)`` as a host int (no synchronisation of its own)."""
        distinct = self.sorted_key.new_zeros(num_sent).scatter_(0, self.key_index, self.sorted_key)
        source = distinct % self.key_base
        send_src_row = source if self.source_row is None else self.source_row[source]
        return HopPlan(send_src_row, self.send_splits, self.pair_order, self.pair_splits, self.pair_local_row)


def plan_hop_counts(pair_row: torch.Tensor, pair_peer: torch.Tensor, num_rows: int, num_peers: int,
                    dedup: bool) -> HopCounts:
    """Which rows go to which peer, without a host synchronisation. ``pair_row``/``pair_peer`` ``[P]`` int64.

    With ``dedup`` a row goes once to each distinct peer of its pairs; without, once per pair. Vectorised: one
    stable sort of the keys ``peer * n + source``; the first of each run of equal keys is a row to send. Sizes
    that depend on the data (the rows sent) are left to :meth:`HopCounts.finish`.
    """
    P = pair_row.numel()
    n = max(num_rows if dedup else P, 1)
    device = pair_row.device
    src = pair_row if dedup else torch.arange(P, device=device)
    sorted_key, by_key = torch.sort(pair_peer * n + src, stable=True)
    first = torch.ones(P, dtype=torch.bool, device=device)
    first[1:] = sorted_key[1:] != sorted_key[:-1]
    key_index = torch.cumsum(first, 0) - 1  # [P] key order
    inverse = torch.empty_like(key_index)
    inverse[by_key] = key_index  # [P] pair order: the distinct key (row to send) of each pair
    send_splits = torch.zeros(num_peers, dtype=torch.long, device=device).index_add_(
        0, torch.div(sorted_key, n, rounding_mode="floor"), first.long())
    row_offsets = torch.cumsum(send_splits, 0) - send_splits
    pair_order = torch.argsort(pair_peer, stable=True)
    sorted_peer = pair_peer[pair_order]
    pair_splits = torch.zeros(num_peers, dtype=torch.long, device=device).index_add_(
        0, pair_peer, torch.ones_like(pair_peer))
    pair_local_row = inverse[pair_order] - row_offsets[sorted_peer]
    return HopCounts(send_splits, pair_splits, pair_order, pair_local_row, sorted_key, key_index, n,
                     None if dedup else pair_row)


def plan_hop(pair_row: torch.Tensor, pair_peer: torch.Tensor, num_rows: int, num_peers: int, dedup: bool) -> HopPlan:
    """Which rows go to which peer. ``pair_row``/``pair_peer`` ``[P]`` int64.

    With ``dedup`` a row goes once to each distinct peer of its pairs; without, once per pair. Vectorised: one
    sort of ``peer * n + source`` keys (:func:`plan_hop_counts`, then :meth:`HopCounts.finish`).
    """
    counts = plan_hop_counts(pair_row, pair_peer, num_rows, num_peers, dedup)
    return counts.finish(int(counts.send_splits.sum()))


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
class Chunk:
    """One program of a dispatch: tokens ``[token_start, token_end)``, their pairs it carries, and the hops it took.

    It runs the route's phases from ``first_phase`` on (see :func:`_make_chunks`)."""

    token_start: int
    token_end: int
    pair_index: torch.Tensor | None  # [P_c] positions of its pairs in the caller's pairs (None: all of them)
    hops: list[Hop] = field(default_factory=list)
    num_rows: int = 0  # rows it delivered to this rank's experts
    num_pairs: int = 0  # pairs it delivered
    first_phase: int = 0
    at_drain: bool = False  # hop-less work the runner keeps for the pipeline's drain (see DRAIN)


@dataclass(frozen=True)
class TraceEvent:
    """One post or wait of an exchange, recorded when :attr:`DispatchHandle.trace` is a list.

    ``ranks``: the group's ranks (positions in the expert-parallel world); ``level``: the outermost link level it
    spans (1 = slowest, 0 = none); ``rows``: rows of its payloads together (counts and metadata included);
    ``start``/``end``: ``perf_counter`` seconds."""

    kind: str  # "post" or "wait"
    ranks: tuple[int, ...]
    level: int
    rows: int
    start: float
    end: float


@dataclass
class DispatchHandle:
    """The record of one forward's dispatch; the combine takes it; byte statistics come from it."""

    dispatch: str
    num_levels: int
    row_bytes: int
    chunks: list[Chunk] = field(default_factory=list)
    num_tokens: int = 0  # tokens this rank dispatched
    comm_seconds: float = 0.0  # wall time spent posting and waiting for exchanges (dispatch, combine, backwards)
    plan_seconds: float = 0.0  # wall time spent planning hops (pure bookkeeping)
    compute_seconds: float = 0.0  # overlapped layers only: expert forward + backward inside the pipeline
    trace: list[TraceEvent] | None = None  # a list to record every post and wait into (off by default: None)

    @property
    def hops(self) -> list[Hop]:
        """Every executed hop, chunk by chunk."""
        return [h for c in self.chunks for h in c.hops]

    def phase_bytes(self) -> list[dict]:
        """Per phase: payload rows/bytes this rank sent and received off-rank (dispatch direction only), summed over
        the dispatch's programs."""
        by_phase: dict[int, dict] = {}
        for chunk in self.chunks:
            for i, h in enumerate(chunk.hops, start=chunk.first_phase):
                entry = by_phase.setdefault(i, {"name": h.phase, "rows_sent": 0, "rows_recv": 0})
                entry["rows_sent"] += h.off_rank(h.send_splits)
                entry["rows_recv"] += h.off_rank(h.recv_splits)
        out = [by_phase[i] for i in sorted(by_phase)]
        for entry in out:
            entry["bytes_sent"] = entry["rows_sent"] * self.row_bytes
            entry["bytes_recv"] = entry["rows_recv"] * self.row_bytes
        return out

    def bytes_by_level(self) -> dict[str, int]:
        """``levelL`` -> payload bytes this rank sent over level-L links, dispatch plus combine.

        The combine sends back exactly the rows it received, so the combine's sends equal this rank's receives.
        """
        out = {level_key(i): 0 for i in range(1, self.num_levels + 1)}
        for h in self.hops:
            for p, (s, r) in enumerate(zip(h.send_splits, h.recv_splits)):
                lvl = h.peer_level[p]
                if lvl > 0:
                    out[level_key(lvl)] += (s + r) * self.row_bytes
        return out


# ---------------------------------------------------------------------------- the pipeline runner
@dataclass
class _Exchange:
    """What a chunk program asks for next: payloads ``(x, send_splits, recv_splits)`` exchanged on ``peers``;
    ``level`` is the outermost link level the group spans (1 = the slowest links; 0 = none); ``last``: the program
    asks for nothing after it."""

    peers: PeerGroup
    payloads: list
    level: int = 0
    last: bool = False


# Yielded by a program (as its first request) that only computes: the runner keeps it for the pipeline's drain, the
# moment when every other program has posted its last exchange and only waits for it, and runs it then, so that the
# last transfers travel while it computes (at the start, the first transfers already have the other programs' work).
DRAIN = object()


def _link_level(peer_level) -> int:
    """The outermost (slowest) link level among a group's peers; 0 when every peer is this rank."""
    return min((lvl for lvl in peer_level if lvl > 0), default=0)


def _record(handle: DispatchHandle, kind: str, request: _Exchange, start: float) -> None:
    """Append a :class:`TraceEvent` (``start`` .. now) when the handle is tracing."""
    if handle.trace is not None:
        rows = sum(num_rows(x) for x, _, _ in request.payloads)
        handle.trace.append(TraceEvent(kind, tuple(request.peers.ranks), request.level, rows, start,
                                       time.perf_counter()))


def _run_pipeline(programs: list, handle: DispatchHandle) -> list:
    """Run chunk programs (generators yielding :class:`_Exchange`, receiving the received tensors) as a pipeline.

    Whenever a program has advanced, the runner posts the exchanges programs wait for, slowest link first (lowest
    ``level``; ties in chunk order), so bulk inter-node payloads start before the local gathers of intra-node ones.
    How many exchanges may be in flight on one group is the group's transport's answer
    (:meth:`~hiermoe_lightning.dispatch.transport.Transport.max_in_flight`): on the outermost links (level 1, the
    slowest) the socket transports take every waiting exchange at once and they queue back to back, so the link
    never idles between chunks (each exchange on a group has its own tags, and messages reach a peer in the order
    posted); on faster links, and on every shared-memory group (whose buffers need it: see
    :mod:`~hiermoe_lightning.dispatch.shm`), one exchange is in flight per group, so the one that feeds the slow
    link next is not slowed by the others. The runner waits for the in-flight exchange on the fastest link first (it
    is likely done; ties in chunk order), advances that program's local work and posts again at once: a chunk's
    intra-node hop runs while the next chunk crosses the slow link. A program that yields :data:`DRAIN` is run when
    no other program has anything left to post and every exchange in flight is its program's last: the compute the
    pipeline keeps for its end. Every decision depends only on the programs' structure, never on timing, so every
    group sees its exchanges in the same order, with the same tags, on every rank. With one program this is the
    plain sequence of hops. Returns each program's return value.
    """
    results: list = [None] * len(programs)
    requests: list = [None] * len(programs)
    in_flight: list[tuple] = []  # (level, chunk, group, pending, request); one in flight per program at a time
    posted: dict[int, int] = {}  # group -> exchanges posted on it so far (their tags)
    drain: list[int] = []  # programs kept for the drain, in program order

    def advance(i: int, received) -> None:
        try:
            requests[i] = programs[i].send(received)
        except StopIteration as stop:
            requests[i] = None
            results[i] = stop.value
        if requests[i] is DRAIN:
            requests[i] = None
            drain.append(i)

    def post_ready() -> None:
        start = time.perf_counter()
        busy: dict[int, int] = {}  # group -> exchanges in flight on it
        for _, _, group, _, _ in in_flight:
            busy[id(group)] = busy.get(id(group), 0) + 1
        for level, i in sorted((r.level, i) for i, r in enumerate(requests) if r is not None):
            peers = requests[i].peers
            group = id(peers.group)
            limit = peers.transport.max_in_flight(level == 1)
            if limit is not None and busy.get(group, 0) >= limit:
                continue
            busy[group] = busy.get(group, 0) + 1
            request, requests[i] = requests[i], None
            seq = posted.get(group, 0)
            posted[group] = seq + 1
            posted_at = time.perf_counter()
            pending = start_exchange(request.payloads, peers, seq * peers.transport.tags_per_exchange)
            in_flight.append((level, i, peers.group, pending, request))
            _record(handle, "post", request, posted_at)
        handle.comm_seconds += time.perf_counter() - start

    def draining() -> bool:  # nothing left to post, and every exchange in flight ends its program
        return all(r is None for r in requests) and all(f[4].last for f in in_flight)

    for i in range(len(programs)):  # the first chunk's exchange leaves before the next chunk's local work starts
        advance(i, None)
        post_ready()
    while in_flight or drain:
        if drain and draining():
            advance(drain.pop(0), None)
            post_ready()
            continue
        pick = max(range(len(in_flight)), key=lambda k: (in_flight[k][0], -in_flight[k][1]))
        _, i, _, pending, request = in_flight.pop(pick)
        start = time.perf_counter()
        received = pending.wait()
        handle.comm_seconds += time.perf_counter() - start
        _record(handle, "wait", request, start)
        advance(i, received)
        post_ready()
    return results


def _verify_splits(peers: PeerGroup, send: list[list[int]], recv: list[list[int]], level: int = 0,
                   device: torch.device | None = None):
    """Sub-program: every rank re-announces its send splits; any disagreement with what a rank expects to receive
    raises ``SplitMismatchError`` on every rank of the group (after a flag exchange, so none waits forever)."""
    ones = [1] * peers.size
    announced_send = torch.tensor(send, dtype=torch.long, device=device).t().contiguous()  # [peers, n]
    (announced,) = yield _Exchange(peers, [(announced_send, ones, ones)], level)
    expected = torch.tensor(recv, dtype=torch.long, device=announced.device).t()
    ok = torch.equal(announced, expected)
    flags = torch.full((peers.size, 1), 0 if ok else 1, dtype=torch.long, device=device)
    (flags,) = yield _Exchange(peers, [(flags, ones, ones)], level)
    bad = int(flags.sum())
    if bad > 0:
        mine = "" if ok else f"; here (peer {peers.index}) expected {expected.t().tolist()} but peers announce " \
                             f"{announced.t().tolist()}"
        raise SplitMismatchError(f"all-to-all split sizes disagree on {bad} rank(s) of the group{mine}")


def _plan_phase(route: Route, handle: DispatchHandle, pr: PhaseRoute, rows, pair_row, pair_expert) -> HopCounts:
    """:func:`plan_hop_counts` for phase ``pr`` of ``route`` (its time counted in ``handle.plan_seconds``)."""
    start = time.perf_counter()
    plan = plan_hop_counts(pair_row, pr.peer_of_expert[pair_expert], rows.shape[0], pr.peers.size, route.spec.dedup)
    handle.plan_seconds += time.perf_counter() - start
    return plan


def _plan_first_hops(route: Route, handle: DispatchHandle, inputs: list) -> list[tuple[HopCounts, torch.Tensor]]:
    """Plan every chunk's first hop and exchange all their counts at once: ``inputs`` ``[(rows, pair_row,
    pair_expert)]`` per chunk -> ``[(counts of the plan, received counts [peers, 2])]``.

    The first hop's counts depend on nothing received, so one exchange serves every chunk: no later chunk waits
    for a count message queued behind the previous chunk's bulk payload on the slow link.
    """
    pr = route.phases[0]
    plans = [_plan_phase(route, handle, pr, rows, pair_row, pair_expert) for rows, pair_row, pair_expert in inputs]
    start = time.perf_counter()
    ones = [1] * pr.peers.size
    counts = torch.cat([p.send_counts() for p in plans], dim=1)  # [peers, 2 * chunks]
    request = _Exchange(pr.peers, [(counts, ones, ones)], _link_level(pr.peer_level))
    pending = start_exchange(request.payloads, pr.peers)
    _record(handle, "post", request, start)
    wait_start = time.perf_counter()
    (received,) = pending.wait()
    _record(handle, "wait", request, wait_start)
    handle.comm_seconds += time.perf_counter() - start
    return [(plan, received[:, 2 * c: 2 * c + 2]) for c, plan in enumerate(plans)]


def _weight_wire_dtype(dtype: torch.dtype) -> torch.dtype:
    """The float type router weights travel as: float64 stays, every narrower float goes as float32 (exact)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def pack_pairs(local_row: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The pair metadata of one hop as int32 ``[P, 3]`` (``[P, 4]`` for float64 weights): the pair's row within
    the block sent to its peer, its expert id, and the bits of its weight (float32, or float64 as two int32), so the
    weight arrives bit-exact. 12 bytes per pair, where three float64 took 24."""
    wire = weight.to(_weight_wire_dtype(weight.dtype)).contiguous()
    bits = wire.view(torch.int32).reshape(weight.shape[0], wire.element_size() // 4)
    return torch.cat([local_row.to(torch.int32).unsqueeze(1), expert.to(torch.int32).unsqueeze(1), bits], dim=1)


def unpack_pairs(meta: torch.Tensor, weight_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_pairs`: ``(local_row [P] int64, expert [P] int64, weight [P] weight_dtype)``."""
    wire = _weight_wire_dtype(weight_dtype)
    weight = meta[:, 2:].contiguous().view(wire).reshape(meta.shape[0]).to(weight_dtype)
    return meta[:, 0].long(), meta[:, 1].long(), weight


def _dispatch_program(route: Route, handle: DispatchHandle, chunk: Chunk, x, weight, pair_row, pair_expert,
                      first_hop: tuple[HopCounts, torch.Tensor] | None = None):
    """One program's dispatch over the phases from ``chunk.first_phase`` on, hop by hop: plan, exchange counts (or
    take ``first_hop``, planned and exchanged by :func:`_plan_first_hops`), then rows and pair metadata together.
    On a shared-memory group the counts ride with the rows (:func:`~hiermoe_lightning.dispatch.comm.sizes_ride_along`):
    one exchange per hop instead of two.

    Host synchronisation: one per hop, the ``[peers, 4]`` sent and received counts brought to the host together
    (the transports need split sizes as host ints; every other size here is known in advance), so on a GPU the
    planning, the packing and the unpacking never wait for the device."""
    rows = x
    for i, pr in enumerate(route.phases[chunk.first_phase:]):
        level = _link_level(pr.peer_level)
        ones = [1] * pr.peers.size
        if i == 0 and first_hop is not None:
            planned, counts = first_hop
        else:
            planned = _plan_phase(route, handle, pr, rows, pair_row, pair_expert)
            counts = None
        send_counts = planned.send_counts()  # [peers, 2]
        if counts is None and sizes_ride_along(pr.peers, rows):  # shared memory: the counts come with the rows
            send_splits, pair_send = (list(c) for c in zip(*send_counts.tolist()))
            plan = planned.finish(sum(send_splits))
            sent, meta = _hop_payloads(plan, rows, pair_expert, weight)
            new_rows, meta, counts = yield _Exchange(pr.peers, [(sent, send_splits, None), (meta, pair_send, None)],
                                                     level)
            recv_splits, pair_recv = (list(c) for c in zip(*counts.tolist()))
        else:
            if counts is None:
                (counts,) = yield _Exchange(pr.peers, [(send_counts, ones, ones)], level)
            # the hop's one host synchronisation: what this rank sends and receives, per peer
            send_splits, pair_send, recv_splits, pair_recv = (
                list(c) for c in zip(*torch.cat([send_counts, counts.to(send_counts.device)], dim=1).tolist()))
            plan = planned.finish(sum(send_splits))
            if route.verify_splits:
                yield from _verify_splits(pr.peers, [send_splits, pair_send], [recv_splits, pair_recv], level,
                                          send_counts.device)
            sent, meta = _hop_payloads(plan, rows, pair_expert, weight)
            new_rows, meta = yield _Exchange(pr.peers, [(sent, send_splits, recv_splits), (meta, pair_send, pair_recv)],
                                             level)
        received = counts.to(pair_row.device)
        recv_offsets = torch.cumsum(received[:, 0], 0) - received[:, 0]
        src_peer = torch.repeat_interleave(torch.arange(pr.peers.size, device=pair_row.device), received[:, 1],
                                           output_size=sum(pair_recv))
        chunk.hops.append(Hop(pr.phase, pr.peers, pr.peer_level, plan.send_src_row, send_splits, recv_splits,
                              plan.pair_order, pair_send, pair_recv, rows.shape[0], pair_row.numel()))
        rows = new_rows
        local_row, pair_expert, weight = unpack_pairs(meta, weight.dtype)
        pair_row = local_row + recv_offsets[src_peer]
    chunk.num_rows, chunk.num_pairs = rows.shape[0], pair_row.numel()
    return rows, weight, pair_row, pair_expert


def _hop_payloads(plan: HopPlan, rows, pair_expert, weight) -> tuple[Gathered, torch.Tensor]:
    """The rows a hop sends (gathered by the exchange itself) and its pair metadata, which rides with them: (row
    within the block sent to that peer, expert id, weight bits) per pair, in send order."""
    meta = pack_pairs(plan.pair_local_row, pair_expert[plan.pair_order], weight[plan.pair_order])
    return Gathered(rows, plan.send_src_row), meta


def _sum_copies(h: Hop, received: torch.Tensor) -> torch.Tensor:
    """Rows received back over hop ``h`` ``[S, M]`` -> ``[num_prev_rows, M]`` fp32: the copies of each row summed
    where the hop sent them from (a relay's step on the way back to the tokens)."""
    return received.new_zeros(h.num_prev_rows, received.shape[1], dtype=torch.float32).index_add_(
        0, h.send_src_row, received.float())


def _dispatch_backward_program(chunk: Chunk, grad_rows, grad_weight, x_dtype, grad_x: torch.Tensor):
    """Mirror of the dispatch: row grads summed over a row's copies at every hop (the first hop's straight into the
    shared fp32 ``grad_x`` ``[T, M]``), weight grads back to their pairs. A program without hops: its rows are
    its tokens."""
    if not chunk.hops:
        grad_x[chunk.token_start:chunk.token_end] += grad_rows
    for h in reversed(chunk.hops):
        payloads = [(grad_rows, h.recv_splits, h.send_splits)]
        if grad_weight is not None:
            payloads.append((grad_weight, h.pair_recv_splits, h.pair_send_splits))
        received = yield _Exchange(h.peers, payloads, _link_level(h.peer_level), last=h is chunk.hops[0])
        if h is chunk.hops[0]:
            grad_x.index_add_(0, h.send_src_row + chunk.token_start, received[0].float())
        else:
            grad_rows = _sum_copies(h, received[0]).to(x_dtype)
        if grad_weight is not None:
            grad_weight = received[1].new_empty(h.num_prev_pairs)
            grad_weight[h.pair_order] = received[1]
    return grad_weight


def _combine_program(chunk: Chunk, y, out_dtype, out: torch.Tensor):
    """Rows back along the hops; every relay sums the copies of a row (fp32) before passing it on, and the token's
    rank sums them into the shared fp32 ``out`` ``[T, M]`` (a program without hops: its rows are its tokens)."""
    if not chunk.hops:  # rounded to out_dtype like every row that travels
        out[chunk.token_start:chunk.token_end] += y.to(out_dtype)
        return
    for h in reversed(chunk.hops):
        (back,) = yield _Exchange(h.peers, [(y.to(out_dtype), h.recv_splits, h.send_splits)],
                                  _link_level(h.peer_level), last=h is chunk.hops[0])
        if h is chunk.hops[0]:
            out.index_add_(0, h.send_src_row + chunk.token_start, back.float())
        else:
            y = _sum_copies(h, back)


def _combine_backward_program(chunk: Chunk, grad):
    """Mirror of the combine: a token's gradient copied out to every copy of its row, hop by hop."""
    for h in chunk.hops:
        (grad,) = yield _Exchange(h.peers, [(Gathered(grad, h.send_src_row), h.send_splits, h.recv_splits)],
                                  _link_level(h.peer_level))
    return grad


def chunk_bounds(num_tokens: int, num_chunks: int) -> list[int]:
    """Token boundaries ``[0, ..., num_tokens]`` of ``num_chunks`` contiguous chunks, each half the size of the one
    before (2/3 + 1/3, 4/7 + 2/7 + 1/7, ...).

    A pipeline over a slow hop and a fast one is exposed at its ends: in the dispatch the last chunk's intra-node
    relay runs after everything has crossed the slow link, in the combine the first chunk's relay runs before anything
    crosses it. The combine and the dispatch's backward take the chunks in reverse order, so the smallest chunk sits
    at both ends, while each chunk's relay still hides behind the next one's transfer (the fast hop being at least
    twice as fast).
    """
    total = (1 << num_chunks) - 1
    ends, acc = [0], 0
    for c in range(num_chunks):
        acc += 1 << (num_chunks - 1 - c)
        ends.append(acc * num_tokens // total)
    return ends


def _make_chunks(route: Route, num_tokens: int, pair_row: torch.Tensor, pair_expert: torch.Tensor) -> list[Chunk]:
    """The programs of one dispatch (the same number and kinds on every rank, whatever its tokens).

    A one-hop route, or any route with ``route.pipeline_chunks == 1``, is one program with every pair (the fewest
    exchanges: best when every link is about as fast). Otherwise the pairs are split by the first phase: those that
    leave this rank there (their tokens' copies cross the slowest link first) form ``route.pipeline_chunks`` programs
    over contiguous token ranges (:func:`chunk_bounds`; some empty when there are fewer tokens) running every phase;
    those that stay but whose experts are on other ranks form one more program that runs the later phases from the
    start, so their intra-node traffic need not wait behind the inter-node hop; those whose experts are on this rank
    form a last program with no hop at all (its rows are the input itself: no copy either way). Dedup only merges
    copies of one row, and a row that stays in a phase never shares a copy with one that leaves, so the split moves
    exactly the bytes of one pass.
    """
    if len(route.phases) == 1 or route.pipeline_chunks == 1:
        return [Chunk(0, num_tokens, None)]
    first = route.phases[0]
    leaves = first.peer_of_expert[pair_expert] != first.peers.index
    here = torch.ones_like(leaves)
    for pr in route.phases:
        here &= pr.peer_of_expert[pair_expert] == pr.peers.index
    moving = torch.nonzero(leaves).squeeze(1)
    staying, local = torch.nonzero(~leaves & ~here).squeeze(1), torch.nonzero(here).squeeze(1)
    C = route.pipeline_chunks
    bounds = chunk_bounds(num_tokens, C)
    chunk_of_pair = torch.bucketize(pair_row[moving], torch.tensor(bounds[1:-1], device=pair_row.device), right=True)
    order = moving[torch.argsort(chunk_of_pair, stable=True)]
    sizes = torch.bincount(chunk_of_pair, minlength=C).tolist()
    chunks = [Chunk(bounds[c], bounds[c + 1], idx) for c, idx in enumerate(order.split(sizes))]
    return chunks + [Chunk(0, num_tokens, staying, first_phase=1),
                     Chunk(0, num_tokens, local, first_phase=len(route.phases))]


def _run_towards_tokens(programs: list, handle: DispatchHandle) -> list:
    """:func:`_run_pipeline` for the combine and the dispatch's backward (rows travel back to their tokens, the slow
    hop last): the pipeline chunks in reverse order, smallest first (:func:`chunk_bounds`), then the other programs;
    results in the programs' order."""
    chunks = handle.chunks
    order = [i for i in reversed(range(len(chunks))) if chunks[i].first_phase == 0]
    order += [i for i in range(len(chunks)) if chunks[i].first_phase != 0]
    results = _run_pipeline([programs[i] for i in order], handle)
    out: list = [None] * len(programs)
    for i, r in zip(order, results):
        out[i] = r
    return out


def _pick(t: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    return t if index is None else t[index]


def chunk_inputs(route: Route, handle: DispatchHandle, x, pair_weight, pair_row, pair_expert) -> list[tuple]:
    """Per program of ``handle.chunks``: ``((rows, weight, pair_row, pair_expert), first_hop)``, its slice of the
    input (pair rows relative to its first token) and its first hop planned with its counts exchanged, or None.
    Programs starting on a socket group share one first-hop count exchange (:func:`_plan_first_hops`); on shared
    memory the counts ride with the rows and none is needed."""
    inputs = [(x[c.token_start:c.token_end], _pick(pair_weight, c.pair_index),
               _pick(pair_row, c.pair_index) - c.token_start, _pick(pair_expert, c.pair_index))
              for c in handle.chunks]
    first = [c.first_phase == 0 and not sizes_ride_along(route.phases[0].peers, x) for c in handle.chunks]
    planned = iter(_plan_first_hops(route, handle, [(rows, row, expert) for (rows, _, row, expert), f
                                                    in zip(inputs, first) if f]) if any(first) else [])
    return [(args, next(planned) if f else None) for args, f in zip(inputs, first)]


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class _Dispatch(torch.autograd.Function):
    """Outputs ``(weight, pair_row, pair_expert, *row_blocks)``: one block of rows per program, never concatenated
    (``pair_row`` indexes their concatenation; :func:`gather_rows` reads it)."""

    @staticmethod
    def forward(ctx, x, pair_weight, pair_row, pair_expert, route: Route, handle: DispatchHandle):
        handle.num_tokens = x.shape[0]
        if not route.phases:  # nothing travels; outputs must not alias inputs in an autograd Function
            handle.chunks = [Chunk(0, x.shape[0], None, [], x.shape[0], pair_row.numel())]
            ctx.handle = handle
            ctx.mark_non_differentiable(pair_row, pair_expert)
            return pair_weight.view_as(pair_weight), pair_row.view_as(pair_row), pair_expert.view_as(pair_expert), \
                x.view_as(x)
        handle.chunks = _make_chunks(route, x.shape[0], pair_row, pair_expert)
        programs = [_dispatch_program(route, handle, c, *args, first_hop)
                    for c, (args, first_hop) in zip(handle.chunks, chunk_inputs(route, handle, x, pair_weight,
                                                                                pair_row, pair_expert))]
        outs = _run_pipeline(programs, handle)
        row_offset = 0
        pair_rows = []
        for c, out in zip(handle.chunks, outs):
            pair_rows.append(out[2] + row_offset)
            row_offset += c.num_rows
        weight, pair_row, pair_expert = _cat([o[1] for o in outs]), _cat(pair_rows), _cat([o[3] for o in outs])
        ctx.handle = handle
        ctx.x_dtype, ctx.num_pairs = x.dtype, pair_weight.shape[0]
        ctx.mark_non_differentiable(pair_row, pair_expert)
        return (weight, pair_row, pair_expert, *[o[0] for o in outs])

    @staticmethod
    def backward(ctx, grad_weight, _grad_pair_row, _grad_pair_expert, *grad_blocks):
        handle: DispatchHandle = ctx.handle
        if not handle.hops:
            return grad_blocks[0], grad_weight, None, None, None, None
        grad_x = grad_blocks[0].new_zeros(handle.num_tokens, grad_blocks[0].shape[1], dtype=torch.float32)
        weight_parts = (grad_weight.split([c.num_pairs for c in handle.chunks]) if grad_weight is not None
                        else [None] * len(handle.chunks))
        programs = [_dispatch_backward_program(c, g, w, ctx.x_dtype, grad_x)
                    for c, g, w in zip(handle.chunks, grad_blocks, weight_parts)]
        outs = _run_towards_tokens(programs, handle)
        grad_x = grad_x.to(ctx.x_dtype)
        if grad_weight is None:
            return grad_x, None, None, None, None, None
        if len(handle.chunks) == 1:
            grad_pair_weight = outs[0]
        else:
            grad_pair_weight = outs[0].new_empty(ctx.num_pairs)
            for c, out in zip(handle.chunks, outs):
                grad_pair_weight[c.pair_index] = out
        return grad_x, grad_pair_weight, None, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, handle: DispatchHandle, out_dtype: torch.dtype):
        ctx.handle, ctx.out_dtype = handle, out_dtype
        if not handle.hops:
            return y.to(out_dtype) if y.dtype != out_dtype else y.clone()
        out = y.new_zeros(handle.num_tokens, y.shape[1], dtype=torch.float32)
        parts = y.split([c.num_rows for c in handle.chunks])
        _run_towards_tokens([_combine_program(c, p, out_dtype, out) for c, p in zip(handle.chunks, parts)], handle)
        return out.to(out_dtype)

    @staticmethod
    def backward(ctx, grad):
        handle: DispatchHandle = ctx.handle
        grad = grad.to(ctx.out_dtype)
        if not handle.hops:
            return grad.to(torch.float32), None, None
        programs = [_combine_backward_program(c, grad[c.token_start:c.token_end]) for c in handle.chunks]
        outs = _run_pipeline(programs, handle)
        return _cat(outs).to(torch.float32), None, None


def dispatch_blocks(x, pair_weight, pair_row, pair_expert, route: Route, handle: DispatchHandle):
    """``x`` ``[T, M]``, pairs ``[P]`` -> ``(row_blocks, weight [P'], pair_row [P'], pair_expert [P'])`` on the
    experts' ranks: the rows as one ``[R_i, M]`` block per program of the dispatch, ``pair_row`` indexing their
    concatenation (read it with :func:`gather_rows`; concatenating would copy every row once more). ``handle`` is
    filled in for ``combine``."""
    weight, pair_row, pair_expert, *blocks = _Dispatch.apply(x, pair_weight, pair_row, pair_expert, route, handle)
    return tuple(blocks), weight, pair_row, pair_expert


def dispatch(x, pair_weight, pair_row, pair_expert, route: Route, handle: DispatchHandle):
    """:func:`dispatch_blocks` with the rows concatenated: ``(rows [R, M], weight [P'], pair_row [P'],
    pair_expert [P'])``."""
    blocks, weight, pair_row, pair_expert = dispatch_blocks(x, pair_weight, pair_row, pair_expert, route, handle)
    return _cat(list(blocks)), weight, pair_row, pair_expert


def total_rows(rows) -> int:
    """Rows of a tensor ``[R, M]`` or of the blocks :func:`dispatch_blocks` returns (their concatenation's ``R``)."""
    return rows.shape[0] if isinstance(rows, torch.Tensor) else sum(b.shape[0] for b in rows)


def gather_rows(rows, index: torch.Tensor) -> torch.Tensor:
    """``rows[index]`` where ``rows`` is a tensor ``[R, M]`` or blocks whose concatenation it would be, without
    concatenating. Every block stays connected to the result in autograd (even when none of its rows is read), so
    the dispatch's backward runs on every rank."""
    if isinstance(rows, torch.Tensor):
        return rows[index]
    if len(rows) == 1:
        return rows[0][index]
    sizes = [b.shape[0] for b in rows]
    ends = torch.tensor(sizes, device=index.device).cumsum(0)
    block_of = torch.bucketize(index, ends, right=True)
    out = rows[0].new_empty((index.numel(), *rows[0].shape[1:]))
    start = 0
    for b, block in enumerate(rows):
        sel = torch.nonzero(block_of == b).squeeze(1)
        out[sel] = block[index[sel] - start]
        start += sizes[b]
    return out


def combine(y: torch.Tensor, handle: DispatchHandle, out_dtype: torch.dtype) -> torch.Tensor:
    """``y`` ``[R, M]`` fp32 (weighted expert outputs summed per row) -> ``[T, M]`` in ``out_dtype`` on the token's rank."""
    return _Combine.apply(y, handle, out_dtype)


def apply_experts(experts, rows, pair_row, pair_slot, pair_weight, one_pair_per_row: bool = False) -> torch.Tensor:
    """Run each pair's expert on its row and sum the weighted outputs per row.

    ``rows`` ``[R, M]`` (or its blocks, as :func:`dispatch_blocks` returns them), pairs ``[P]`` -> ``[R, M]`` fp32.
    Loops over local expert slots only. With ``one_pair_per_row`` (dispatches without dedup deliver exactly one pair
    per row) the sum is a permutation and the zero-filled accumulator is skipped.
    """
    order = torch.argsort(pair_slot, stable=True)
    rows_per_slot = torch.bincount(pair_slot, minlength=experts.num_slots).tolist()
    src_row = pair_row[order]
    out = experts(gather_rows(rows, src_row), rows_per_slot, scale=pair_weight[order]).float()
    num_rows = total_rows(rows)
    if one_pair_per_row and src_row.numel() == num_rows:
        inverse = torch.empty_like(src_row)
        inverse[src_row] = torch.arange(src_row.numel(), device=src_row.device)
        return out[inverse]
    return out.new_zeros(num_rows, out.shape[1]).index_add(0, src_row, out)
