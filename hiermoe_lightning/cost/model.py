"""Predicted all-to-all time of every dispatch and the choice of ``d*`` (pure; see ``docs/cost-model.md``).

For each phase, ``ms = alpha + beta * n`` with that phase's (alpha, beta) from :class:`LinkCosts`, keyed by the phase
name itself (``a2a``, ``inter<i>``, ``intra<i>``). By default ``n`` is the real unequal all_to_all_v load:
:func:`~hiermoe_lightning.cost.traffic.max_rank_bytes` (busiest rank, max of sent and received, diagonal excluded).
With ``padded=True`` it is the HierMoE paper's padded all-to-all: ``n = peers * max_pair_rows * row_bytes`` where
``peers`` is the size of the phase's process group (a padded all_to_all holds one equal chunk per group member) and
``max_pair_rows`` the most rows any rank sends to any other rank in that phase.

Calibrated link costs add what a hop of the engine does besides the payload (all 0 in presets, so a preset's
numbers are the plain lines above). One way is half the round trip (dispatch hop + its combine mirror)::

    ms_p = sync_p / 2 + alpha_p + X_p + L_p,    X_p = beta_p * n_p + F_p   (or max(beta_p * n_p, F_p), see below)

``sync_p`` the count exchange before the dispatch's payload (once per round trip); ``n_p``
(:func:`phase_load_bytes`) the busiest load with the pair metadata of the dispatch (``pair_bytes`` per pair, one way
half of it), counted as ``LinkCosts.duplex`` / ``level1_link`` say; ``L_p`` and ``F_p`` (:func:`hop_local`) the local
copies plus the first touch of fresh buffers written outside the exchange, and the first touch of the receive buffers,
which adds to the exchange on rank links and hides behind it (``max``) on phases that cross a shared node link.
``predict(..., pipeline_chunks=C)`` prices the engine's software pipeline (:func:`pipeline_ms`). Derivations in
``docs/cost-model.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import comb
from typing import Sequence

import torch

from ..dispatch.spec import DispatchSpec, Phase, dispatch_names, parse_dispatch, phase_groups
from ..placement.placement import Placement
from ..topology import Topology
from .link_costs import LinkCosts
from .traffic import (
    PhaseTraffic,
    bytes_by_level,
    dispatch_rows,
    max_pair_rows,
    max_rank_bytes,
)

__all__ = [
    "PhasePrediction",
    "DispatchPrediction",
    "Prediction",
    "predict",
    "phase_predictions",
    "phase_load_bytes",
    "hop_local",
    "pipeline_ms",
    "choose_hd",
    "duplication_rate",
    "expected_duplication_rate",
]


@dataclass(frozen=True)
class PhasePrediction:
    """One phase: real ``max_rank_bytes``, the ``n`` used for the cost (``cost_bytes``) and its one-way ``ms``.

    ``ms = sync_ms + alpha + beta * cost_bytes + local_ms`` (``sync_ms``/``local_ms`` 0 unless the link costs carry
    them; ``local_ms`` of :func:`hop_local`, whose ``copy_bytes`` / ``fresh_bytes`` are kept); ``chunk_ms`` is the same hop for one of ``C`` pipeline chunks (``= ms`` without a pipeline); ``skipped``:
    the phase's groups hold one rank each, so the engine never runs it (0 ms).
    """

    name: str
    max_rank_bytes: int
    ms: float
    cost_bytes: int
    sync_ms: float = 0.0
    local_ms: float = 0.0
    copy_bytes: int = 0
    fresh_bytes: int = 0
    chunk_ms: float | None = None
    skipped: bool = False

    def to_json_dict(self, padded: bool = False) -> dict:
        out = {"name": self.name, "max_rank_bytes": self.max_rank_bytes, "ms": self.ms}
        if padded:
            out["padded_bytes"] = self.cost_bytes
        if self.sync_ms or self.local_ms or (not padded and self.cost_bytes != self.max_rank_bytes):
            out.update({"cost_bytes": self.cost_bytes, "sync_ms": self.sync_ms, "local_ms": self.local_ms,
                        "copy_bytes": self.copy_bytes, "fresh_bytes": self.fresh_bytes})
        return out


@dataclass(frozen=True)
class DispatchPrediction:
    """A dispatch's phases, predicted time and dispatch+combine bytes per link level (``level1 .. levelD``).

    ``predicted_ms``: the sum of the phases' ``ms``; with ``pipeline_chunks = C > 1`` the pipelined time
    :func:`pipeline_ms` of the hops' ``chunk_ms``.
    """

    name: str
    phases: tuple[PhasePrediction, ...]
    bytes_by_level: dict[str, int] = field(default_factory=dict)
    pipeline_chunks: int = 1

    @property
    def predicted_ms(self) -> float:
        active = [p for p in self.phases if not p.skipped]
        if self.pipeline_chunks == 1 or len(active) < 2:  # the engine pipelines multi-hop routes only
            return sum(p.ms for p in self.phases)
        return pipeline_ms([p.ms if p.chunk_ms is None else p.chunk_ms for p in active], self.pipeline_chunks)

    def to_json_dict(self, padded: bool = False) -> dict:
        out = {"predicted_ms": self.predicted_ms, "phases": [p.to_json_dict(padded) for p in self.phases]}
        if self.pipeline_chunks != 1:
            out["pipeline_chunks"] = self.pipeline_chunks
        return out


@dataclass(frozen=True)
class Prediction:
    """``dispatch``: name -> :class:`DispatchPrediction` (in ``dispatch_names`` order); ``chosen``: fastest ``hd<d>``."""

    dispatch: dict[str, DispatchPrediction]
    chosen: str
    chosen_ms: float
    padded: bool = False

    def to_json_dict(self) -> dict:
        """The contract's ``dispatch`` object: ``{name: {"predicted_ms": .., "phases": [{name, max_rank_bytes, ms}]}}``.

        With ``padded`` each phase also has ``padded_bytes`` (the ``n`` its ``ms`` used).
        """
        return {name: d.to_json_dict(self.padded) for name, d in self.dispatch.items()}


def _check_rows(rows: torch.Tensor, what: str = "rows") -> torch.Tensor:
    if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or rows.shape[0] != rows.shape[1]:
        raise ValueError(f"{what} must be a square [G, G] tensor, got {getattr(rows, 'shape', rows)!r}")
    return rows.to(torch.float64)


def phase_load_bytes(topology: Topology, rows: torch.Tensor, row_bytes: float, pairs: torch.Tensor | None = None,
                     pair_bytes: float = 0.0, duplex: str = "full", level1_link: str = "rank") -> float:
    """The ``n`` a phase's line is priced with: the load of its busiest resource, in bytes.

    ``rows`` (and ``pairs``) ``[G, G]``: payload rows (pairs) rank ``a`` sends to rank ``c`` in the phase; the
    diagonal stays on its rank and never counts. The bytes ``a -> c`` are ``B[a, c] = rows * row_bytes + pairs *
    pair_bytes`` (the pair metadata rides in the same exchange as the rows).

    * A rank's load (``duplex="full"``: each direction has its own link, ``max(sent, received)``; ``"half"``: both
      directions use one resource, e.g. the CPU copying loopback TCP, ``sent + received``).
    * ``level1_link="rank"`` (default): ``n = max over ranks`` of that load, over all of ``B``. With the defaults
      this is :func:`~hiermoe_lightning.cost.traffic.max_rank_bytes`.
    * ``level1_link="node"``: every top-level group (node) has one full-duplex link that its ``r = G / n_1`` ranks
      share (one NIC per node; the emulated network's tbf link). Bytes between nodes are counted per node link and
      direction, divided by ``r`` (so a balanced phase gives the same ``n`` as per rank); bytes inside a node per rank
      as above: ``n = max(max_u max(out_u, in_u) / r, max_a load_a(bytes inside a's node))``.
    """
    B = _check_rows(rows) * float(row_bytes)
    if pairs is not None and pair_bytes:
        B = B + _check_rows(pairs, "pairs") * float(pair_bytes)
    B = B.clone()
    B.fill_diagonal_(0)

    def rank_load(m: torch.Tensor) -> float:
        sent, recv = m.sum(dim=1), m.sum(dim=0)
        load = sent + recv if duplex == "half" else torch.maximum(sent, recv)
        return float(load.max()) if load.numel() else 0.0

    if duplex not in ("full", "half"):
        raise ValueError(f"duplex must be 'full' or 'half', got {duplex!r}")
    if level1_link == "rank":
        return rank_load(B)
    if level1_link != "node":
        raise ValueError(f"level1_link must be 'rank' or 'node', got {level1_link!r}")
    node = topology.group_index(1)
    same = node[:, None] == node[None, :]
    inside = torch.where(same, B, torch.zeros_like(B))
    across = B - inside
    U = topology.sizes[0]
    r = topology.world_size // U
    out_u = torch.zeros(U, dtype=torch.float64).index_add_(0, node, across.sum(dim=1))
    in_u = torch.zeros(U, dtype=torch.float64).index_add_(0, node, across.sum(dim=0))
    link = float(torch.maximum(out_u, in_u).max()) / r
    return max(link, rank_load(inside))


def hop_local(rows: torch.Tensor, held_rows: torch.Tensor, row_bytes: float, link_costs: LinkCosts,
              accum_row_bytes: float | None = None, chunks: int = 1,
              gather_in_transport: bool = False) -> tuple[float, float, float, float]:
    """The local work of one hop on its busiest rank, one way (half the round trip):
    ``(ms, copy_bytes, fresh_bytes, receive_fault_ms)``.

    ``rows`` ``[G, G]`` the hop's rows (diagonal included), ``held_rows`` ``[G]`` the rows each rank holds before it;
    ``accum_row_bytes`` the bytes of an fp32 accumulator row (default ``row_bytes``); ``chunks``: the hop of one of
    ``C`` equal pipeline chunks. Round trip, rank ``a`` sends ``S_a = sum_c rows[a, c]`` rows (own block included),
    receives ``R_a = sum_c rows[c, a]`` and held ``H_a``:

    * copies: the dispatch gathers the ``S_a`` rows it sends into a fresh buffer, the combine ``index_add``s the
      ``S_a`` returning rows into a zero-filled fp32 accumulator: ``2 * S_a * row_bytes / C`` bytes copied, so one
      way ``copy_a = S_a * row_bytes / C``;
    * fresh memory: every buffer the hop allocates that is at least ``fault_threshold`` bytes is mapped fresh on
      every allocation (glibc's mmap threshold) and pays ``fault_beta`` per byte on first touch. Two are written
      before or after an exchange (the gather ``S_a`` and the accumulator ``H_a``), two while it runs (the receive
      buffers: ``R_a`` in the dispatch, ``S_a`` in the combine); each ``/ C``, one way half of the sum.

    With ``gather_in_transport`` (a shared-memory phase) the dispatch gathers straight into the transport's
    long-lived buffers, a copy its payload line already holds: only the combine's accumulator remains
    (``copy_a = S_a * row_bytes / (2 C)``, no fresh gather buffer).

    ``ms = max_a (copy_beta * copy_a + fault_beta * fresh_a(gather, accumulator))`` with that rank's
    ``copy_bytes`` and ``fresh_bytes`` (all four buffers); ``receive_fault_ms = max_a fault_beta *
    fresh_a(receive buffers)``, which :func:`phase_predictions` adds to the exchange or hides behind it.
    """
    lc = link_costs
    R2 = _check_rows(rows)
    S, R = R2.sum(dim=1), R2.sum(dim=0)
    H = held_rows.to(torch.float64).reshape(-1)
    if H.shape != S.shape:
        raise ValueError(f"held_rows has {H.numel()} entries, rows is [{S.numel()}, {S.numel()}]")
    if S.numel() == 0:
        return 0.0, 0.0, 0.0, 0.0
    b = float(row_bytes)
    acc_b = b if accum_row_bytes is None else float(accum_row_bytes)
    C = float(chunks)

    def fresh(*buffers: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(S)
        for buf in buffers:
            out = out + torch.where(buf >= lc.fault_threshold, buf, torch.zeros_like(buf))
        return out / 2

    gather = torch.zeros_like(S) if gather_in_transport else S * b / C
    copy = (gather + S * b / C) / 2
    local_fresh = fresh(gather, H * acc_b / C) if lc.fault_beta else torch.zeros_like(S)
    recv_fresh = fresh(R * b / C, S * b / C) if lc.fault_beta else torch.zeros_like(S)
    ms = lc.copy_beta * copy + lc.fault_beta * local_fresh
    a = int(torch.argmax(ms + lc.fault_beta * recv_fresh))
    return float(ms.max()), float(copy[a]), float(local_fresh[a] + recv_fresh[a]), float((lc.fault_beta * recv_fresh).max())


def pipeline_ms(hop_ms: Sequence[float], chunks: int) -> float:
    """One-way time of ``chunks`` equal chunks run as a software pipeline over hops of ``hop_ms`` each (per chunk).

    At step ``s = 0 .. C + H - 2`` chunk ``c`` runs hop ``s - c`` (when ``0 <= s - c < H``); hops of one step run
    concurrently (different process groups and links) and the step ends with its slowest hop::

        t = sum_s max { hop_ms[h] : max(0, s - C + 1) <= h <= min(H - 1, s) }

    With one chunk it is ``sum(hop_ms)``; with one hop ``C * hop_ms[0]``.
    """
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"pipeline chunks must be an int >= 1, got {chunks!r}")
    hops = [float(t) for t in hop_ms]
    H = len(hops)
    if H == 0:
        return 0.0
    if chunks == 1:
        return sum(hops)
    return sum(max(hops[max(0, s - chunks + 1): min(H - 1, s) + 1]) for s in range(chunks + H - 1))


def phase_predictions(
    topology: Topology,
    phases: Sequence[PhaseTraffic],
    row_bytes: int,
    link_costs: LinkCosts,
    padded: bool = False,
    pairs: Sequence[PhaseTraffic] | None = None,
    tokens_per_rank: int | None = None,
    pipeline_chunks: int = 1,
    accum_row_bytes: int | None = None,
) -> tuple[PhasePrediction, ...]:
    """Cost each phase of one dispatch (rows ``[G, G]`` per phase) with ``link_costs[phase.name]``.

    A phase whose groups each hold a single rank moves nothing and the dispatcher skips it, so it costs 0 ms.
    ``pairs``: the pair matrices of the same phases (needed when ``link_costs.pair_bytes > 0``); ``tokens_per_rank``:
    the rows each rank holds before the first hop (needed when ``copy_beta`` or ``fault_beta`` > 0); ``pipeline_chunks``:
    ``chunk_ms`` of each phase is the hop for ``1 / C`` of the bytes and buffers (with the whole sync share and
    alpha); ``accum_row_bytes``: bytes of one fp32 accumulator row of the combine (default ``row_bytes``).
    One-way ``ms`` per phase as in the module docstring.
    """
    lc = link_costs
    if lc.pair_bytes and pairs is None:
        raise ValueError("link costs with pair_bytes > 0 need the pair matrices of the phases (pairs=...)")
    local = bool(lc.copy_beta or lc.fault_beta)
    if local and tokens_per_rank is None:
        raise ValueError("link costs with copy_beta or fault_beta > 0 need tokens_per_rank (rows held before hop 1)")
    C = int(pipeline_chunks)
    out = []
    held = None if tokens_per_rank is None else torch.full((topology.world_size,), float(tokens_per_rank))
    for i, p in enumerate(phases):
        cost = lc[p.name]  # ValueError naming the phase when missing
        real = max_rank_bytes(p.rows, row_bytes)
        if len(phase_groups(topology, p.name)[0]) == 1:
            out.append(PhasePrediction(p.name, real, 0.0, 0, skipped=True))
            continue
        if padded:
            peers = len(phase_groups(topology, p.name)[0])
            n = float(peers * max_pair_rows(p.rows) * int(row_bytes))
        elif lc.pair_bytes or lc.duplex != "full" or lc.level1_link != "rank":
            n = phase_load_bytes(topology, p.rows, row_bytes, duplex=lc.duplex, level1_link=lc.level1_link)
            if lc.pair_bytes:  # the metadata rides with the dispatch's rows only: one way is the mean of both ways
                n = (n + phase_load_bytes(topology, p.rows, row_bytes, pairs[i].rows, lc.pair_bytes, lc.duplex,
                                          lc.level1_link)) / 2
        else:
            n = float(real)
        # with node links a phase that crosses level 1 waits on the link; the receive buffers fill (and fault) as
        # the bytes arrive, so their first touch hides behind the exchange instead of adding to it
        hide = lc.level1_link == "node" and Phase.parse(p.name).kind != "intra"
        # one count exchange per hop per round trip (the dispatch's): half of it one way; none on shared memory,
        # where the counts ride with the rows
        sync = 0.0 if cost.shared_memory else cost.sync_ms / 2

        def hop_ms(c: int) -> tuple[float, float, float]:
            loc, cp, fr, recv = (hop_local(p.rows, held, row_bytes, lc, accum_row_bytes, c, cost.shared_memory)
                                 if local else (0, 0, 0, 0))
            wire = cost.beta * n / c
            exchange = max(wire, recv) if hide else wire + recv
            return sync + cost.alpha + exchange + loc, cp, fr

        ms, copy, fresh = hop_ms(1)
        local_ms = ms - sync - cost.ms(n)
        chunk = ms if C == 1 else hop_ms(C)[0]
        out.append(PhasePrediction(p.name, real, ms, int(round(n)), sync, local_ms, int(round(copy)),
                                   int(round(fresh)), chunk))
        if held is not None:
            held = p.rows.to(torch.float64).sum(dim=0)  # rows each rank holds after this hop (own block included)
    return tuple(out)


def choose_hd(times_ms: dict[str, float], num_levels: int) -> str:
    """The fastest ``hd<d>`` (d = 1..D) in ``times_ms``; ties go to the smaller ``d``."""
    best, best_ms = None, float("inf")
    for d in range(1, num_levels + 1):
        name = f"hd{d}"
        if name in times_ms and times_ms[name] < best_ms:
            best, best_ms = name, times_ms[name]
    if best is None:
        raise ValueError(f"no hd<d> dispatch (d = 1..{num_levels}) to choose from")
    return best


def predict(
    topology: Topology,
    placement: Placement,
    expert_ids: torch.Tensor,
    hidden_size: int,
    bytes_per_elem: int,
    link_costs: "LinkCosts | str",
    dispatches: Sequence[str] | None = None,
    padded: bool = False,
    pipeline_chunks: int = 1,
) -> Prediction:
    """Predict every dispatch's all-to-all time for a routing ``expert_ids`` (int ``[G, T, K]``, ``-1`` = dropped).

    ``dispatches`` defaults to ``dispatch_names(D)`` (flat, 2dh, hd1..hdD); ``auto`` may be listed and repeats the
    chosen ``hd<d>``. ``chosen`` is always taken over all of hd1..hdD, so the link costs must cover their phases (a
    missing one raises ``ValueError`` naming it). Counting is ``O(G * T * (K + G))``, once for all dispatches.

    ``pipeline_chunks = C``: the engine's software pipeline (``ExpertParallel(pipeline_chunks=C)``): each
    dispatch's time is :func:`pipeline_ms` of its hops for ``1 / C`` of the bytes (each with its whole sync share and
    alpha); ``chosen`` is taken on these times.
    """
    topology = Topology.parse(topology)
    link_costs = LinkCosts.resolve(link_costs)
    for value, what in ((hidden_size, "hidden_size"), (bytes_per_elem, "bytes_per_elem")):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{what} must be an int, got {value!r}")
        if value <= 0:
            raise ValueError(f"{what} must be >= 1, got {value}")
    if isinstance(pipeline_chunks, bool) or not isinstance(pipeline_chunks, int) or pipeline_chunks < 1:
        raise ValueError(f"pipeline_chunks must be an int >= 1, got {pipeline_chunks!r}")
    D = topology.num_levels
    names = list(dispatch_names(D)) if dispatches is None else list(dispatches)
    hd_names = [f"hd{d}" for d in range(1, D + 1)]
    specs = {n: parse_dispatch(n, D) for n in dict.fromkeys(names + hd_names) if n != "auto"}
    for spec in specs.values():  # fail on a missing phase before counting anything
        link_costs.require(spec.phases)
    row_bytes = hidden_size * bytes_per_elem
    rows = dispatch_rows(topology, placement, expert_ids, list(specs.values()))  # validates expert_ids
    pairs: dict[str, list[PhaseTraffic]] = {n: rows[n] for n in specs if not specs[n].dedup}
    if link_costs.pair_bytes:
        # the pairs of a dedup dispatch follow the same path as the rows of its no-dedup twin (one row per pair)
        twins = {n: DispatchSpec(f"{n}#pairs", s.phases, False) for n, s in specs.items() if s.dedup}
        counted = dispatch_rows(topology, placement, expert_ids, list(twins.values())) if twins else {}
        pairs.update({n: counted[t.name] for n, t in twins.items()})
    T = int(expert_ids.shape[1])
    preds = {
        n: DispatchPrediction(
            n,
            phase_predictions(topology, rows[n], row_bytes, link_costs, padded, pairs.get(n), T, pipeline_chunks,
                              hidden_size * 4),
            bytes_by_level(topology, rows[n], row_bytes),
            pipeline_chunks,
        )
        for n in specs
    }
    chosen = choose_hd({n: preds[n].predicted_ms for n in hd_names}, D)
    preds["auto"] = DispatchPrediction("auto", preds[chosen].phases, preds[chosen].bytes_by_level, pipeline_chunks)
    return Prediction({n: preds[n] for n in names}, chosen, preds[chosen].predicted_ms, padded)


def duplication_rate(expert_ids: torch.Tensor, num_experts: int, num_groups: int) -> float:
    """Share of flat-dispatch rows that are duplicates when experts form ``num_groups`` contiguous groups.

    ``expert_ids``: int ``[..., K]`` (one row per token; ``-1`` = dropped). Definition (the one that reproduces the
    HierMoE paper's "measured duplication rate" table for uniform routing, E = 128, to within 1.6 percentage points;
    the largest gap is R = 8, K = 6: 25.5% vs 27%)::

        1 - #distinct (token, group) pairs / #(token, expert) pairs

    i.e. the share of the flat dispatch's rows that a per-group deduplicated dispatch would not send. Group of
    expert ``e`` = ``e // (num_experts / num_groups)``.
    """
    if num_groups <= 0 or num_experts % num_groups != 0:
        raise ValueError(f"num_groups ({num_groups}) must divide num_experts ({num_experts})")
    ids = expert_ids.reshape(-1, expert_ids.shape[-1]).to(torch.long)
    valid = ids >= 0
    pairs = int(valid.sum())
    if pairs == 0:
        return 0.0
    group = torch.where(valid, ids // (num_experts // num_groups), torch.full_like(ids, num_groups)).sort(dim=1).values
    first = torch.ones_like(group, dtype=torch.bool)
    first[:, 1:] = group[:, 1:] != group[:, :-1]
    distinct = int((first & (group != num_groups)).sum())
    return 1.0 - distinct / pairs


def expected_duplication_rate(num_experts: int, num_groups: int, top_k: int) -> float:
    """:func:`duplication_rate` in expectation under uniform routing: ``1 - R * (1 - C(E-m, K) / C(E, K)) / K``.

    A token hits a group of ``m = E / R`` experts with probability ``1 - C(E-m, K) / C(E, K)``, so it reaches
    ``R`` times that many distinct groups on average, out of ``K`` rows.
    """
    if num_groups <= 0 or num_experts % num_groups != 0:
        raise ValueError(f"num_groups ({num_groups}) must divide num_experts ({num_experts})")
    m = num_experts // num_groups
    hit = 1.0 - comb(num_experts - m, top_k) / comb(num_experts, top_k)
    return 1.0 - num_groups * hit / top_k
