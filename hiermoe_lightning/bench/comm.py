"""``hiermoe bench comm``: wall time and bytes of dispatch+combine for every dispatch (contract: "`hiermoe bench comm`").

Spawns ``world_size`` gloo ranks on this machine (one spawn for all dispatches). On each rank: its slice
``[T, K]`` of the routing, ``x = randn [T, hidden]``, random pair weights; for each dispatch a route from
``ExpertParallel(topology, dispatch="flat").build_route(name, Placement.contiguous(E, G))`` (``auto`` = the ``hd<d>``
that :func:`~hiermoe_lightning.cost.model.predict` chooses for this routing and link costs), then ``warmup + iters``
rounds of dispatch + identity experts + combine:

* the dispatch and the combine are timed in two ``perf_counter`` windows, each after a ``dist.barrier()``; the stand-in
  expert step between them (an ``index_add`` over the rows) is not communication and is outside both windows;
* time of an iteration = the slowest rank's dispatch time + the slowest rank's combine time (each all_reduce MAX);
  ``median_ms`` / ``p90_ms`` over the timed iterations (what the cost model predicts); ``dispatch_ms`` /
  ``combine_ms`` their medians; ``iteration_ms`` = median of the slowest rank's whole iteration (dispatch + expert
  step + combine, barrier to end); ``plan_ms`` / ``comm_ms`` = medians of the slowest rank's
  ``handle.plan_seconds`` / ``handle.comm_seconds`` per iteration (planning hops / inside collectives);
* ``bytes_by_level`` = ``handle.bytes_by_level()`` summed over ranks (all_reduce SUM) of one iteration;
* ``predicted_ms`` = 2 x the cost model's one-way time (we time dispatch AND combine; see ``predicted_note``), with
  ``--pipeline-chunks C`` passed to the model as ``pipeline_chunks`` and to ``ExpertParallel``.

``--emulate-inter-mbit N`` (root only; see :mod:`hiermoe_lightning.bench.netem`) runs the ranks of each top-level group
(``world_size / sizes[0]`` consecutive ranks: one "node") in a network namespace of their own, every node linked to a
hub bridge by a link of N Mbit/s each way (``--emulate-latency-ms`` adds a delay on each shaped hop). The report then
holds ``emulation``, ``lower_bound_ms`` (the level-1 lower-bound bytes of the busiest node link, each way, at N Mbit/s,
see ``LOWER_BOUND_NOTE``), and per dispatch ``wire_ms`` (the same for that dispatch's own level-1 bytes) and
``vs_lower_bound`` (``median_ms / lower_bound_ms``).

The identity experts compute ``y[row] = sum over the row's pairs of weight * row`` (fp32 ``index_add``), so the
combine must return ``x * (sum of the token's weights)``; ``max_abs_err`` reports the largest deviation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from ..cli.flags import int_flag
from ..cli.main import CLIError
from ..cost.link_costs import LinkCosts
from ..cost.model import predict
from ..cost.traffic import check_expert_ids, dispatch_rows, lower_bound_level1_bytes
from ..dispatch.engine import (DispatchHandle, combine, dispatch_blocks, gather_rows, total_rows,
                               validate_pipeline_chunks)
from ..dispatch.spec import level_key, parse_dispatch, parse_level_key, validate_dispatch
from ..parallel import ExpertParallel
from ..placement.placement import Placement
from ..testing.launch import Deadline, run_ranks
from ..topology import Topology
from ..traces import ALLOWED_ROUTINGS, parse_routing
from .netem import EmulatedNetwork, EmulationUnavailable

__all__ = ["add_arguments", "run", "main", "format_report", "parse_dispatch_list", "DTYPES",
           "EMULATION_EXIT_STATUS", "PREDICTED_NOTE", "LOWER_BOUND_NOTE", "node_link_bytes"]

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
DTYPE_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2}
DEFAULT_DISPATCH = "flat,2dh,hd1,hd2,auto"
DEFAULT_TOP_K = 4
DEFAULT_TOKENS_PER_RANK = 2048
EMULATION_EXIT_STATUS = 3


def emulation_line(report: dict) -> str:
    """The report header's line for an emulated network (``report["emulation"]``), or "" without one."""
    em = report.get("emulation")
    if not em:
        return ""
    return (f"\nemulated network: {em['num_nodes']} nodes x {em['ranks_per_node']} ranks, node links "
            f"{em['inter_mbit']} Mbit/s each way, latency {em['latency_ms']:g} ms per shaped hop")


@contextlib.contextmanager
def emulated_network(inter_mbit: "int | None", num_nodes: int, latency_ms: float = 0.0
                     ) -> "Iterator[EmulatedNetwork | None]":
    """``--emulate-inter-mbit`` for the benches that start ranks: ``num_nodes`` emulated nodes with ``inter_mbit``
    Mbit/s links for the duration of the block (None without emulation), always cleaned up; a machine that cannot
    emulate is a :class:`CLIError` with exit status :data:`EMULATION_EXIT_STATUS`."""
    if inter_mbit is None:
        yield None
        return
    try:
        net = EmulatedNetwork(num_nodes, inter_mbit, latency_ms=float(latency_ms or 0.0))
        net.setup()
    except EmulationUnavailable as e:
        raise CLIError(f"--emulate-inter-mbit: network emulation is not available: {e}",
                       EMULATION_EXIT_STATUS) from None
    try:
        yield net
    finally:
        net.cleanup()
PREDICTED_NOTE = ("predicted_ms = 2 x the cost model's one-way time (cost.model.predict with these link costs and "
                  "pipeline_chunks): median_ms = the slowest rank's dispatch window + the slowest rank's combine "
                  "window (each after a barrier; the stand-in expert step between them is not timed), which move "
                  "the same rows each way; iteration_ms includes the expert step")
LOWER_BOUND_NOTE = (
    "lower_bound_ms = the busiest node link's level-1 lower-bound bytes in one direction / the emulated rate "
    "(inter_mbit Mbit/s per node link and direction). A node's outbound link carries its tokens' dispatch rows to "
    "other nodes plus the combine rows it returns for other nodes' tokens (inbound: the reverse), one row per distinct "
    "(token, other top-level group) each way, so per node bytes = row_bytes x (rows out + rows in) of the dispatch; "
    "the max over nodes is taken. Payload only: Ethernet/IP/TCP headers (~4-5% at MTU 1500) and gloo framing are not "
    "counted. wire_ms = the same for the dispatch's own level-1 bytes.")


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``bench comm`` flags to ``p`` (defaults: the contract's example)."""
    p.add_argument("--topology", default="2x2", help="level sizes, outermost first (default 2x2)")
    p.add_argument("--num-experts", type=int, default=16, help="number of experts E (default 16)")
    p.add_argument("--top-k", type=int, default=None,
                   help=f"experts per token K (default {DEFAULT_TOP_K}; a trace fixes it)")
    p.add_argument("--hidden-size", type=int, default=1024, help="hidden size M of a token row (default 1024)")
    p.add_argument("--tokens-per-rank", type=int, default=None,
                   help=f"tokens routed by each rank (default {DEFAULT_TOKENS_PER_RANK}; a trace fixes it)")
    p.add_argument("--dtype", default="fp32", help="payload dtype: fp32 or bf16 (default fp32)")
    p.add_argument("--routing", default="uniform", help=f"{ALLOWED_ROUTINGS} (default uniform)")
    p.add_argument("--seed", type=int, default=0, help="seed of the routing, inputs and weights (default 0)")
    p.add_argument("--dispatch", default=DEFAULT_DISPATCH,
                   help=f"comma-separated dispatch values to time (default {DEFAULT_DISPATCH})")
    p.add_argument("--iters", type=int, default=20, help="timed iterations per dispatch (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations before them (default 3)")
    p.add_argument("--link-costs", default="paper-a6000",
                   help="preset name (paper-a6000) or a YAML file, for predicted_ms and auto (default paper-a6000)")
    p.add_argument("--emulate-inter-mbit", type=int, default=None, metavar="N",
                   help="run each top-level group of ranks in its own network namespace, node links limited to "
                        "N Mbit/s each way (needs root; exit status 3 otherwise)")
    p.add_argument("--emulate-latency-ms", type=float, default=0.0, metavar="L",
                   help="with --emulate-inter-mbit: add L ms of delay on every shaped hop (needs sch_netem; "
                        "default 0)")
    p.add_argument("--pipeline-chunks", type=int, default=1, metavar="C",
                   help="split each dispatch's tokens into C chunks run as a software pipeline over the hops "
                        "(ExpertParallel(pipeline_chunks=C)); the prediction models the same pipeline (default 1)")
    p.add_argument("--no-shared-memory", dest="shared_memory", action="store_false",
                   help="ranks of one node exchange through the process group's loopback sockets instead of shared "
                        "memory (ExpertParallel(shared_memory=False)), for an A/B")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (gloo; default) or cuda: one GPU per rank, payloads and collectives on the GPU (NCCL)")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds for the whole command; when they pass, every rank is stopped and the command "
                        "exits with status 124 (default 900)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


# ---------------------------------------------------------------------------- validation (parent, before spawning)
_int = int_flag  # shared validator (cli/flags.py)


def parse_dispatch_list(text: object, num_levels: int) -> list[str]:
    """``"flat, hd2,auto"`` -> ``["flat", "hd2", "auto"]`` (duplicates dropped); every name checked for the topology."""
    if not isinstance(text, str):
        raise TypeError(f"--dispatch must be a comma-separated string, got {text!r}")
    names = [n.strip() for n in text.split(",")]
    if not any(names) or any(not n for n in names):
        raise ValueError(f"--dispatch {text!r} has an empty entry; give comma-separated values such as "
                         f"{DEFAULT_DISPATCH!r}")
    for name in names:
        try:
            validate_dispatch(name, num_levels)
        except (TypeError, ValueError) as e:
            raise type(e)(f"--dispatch: {e}") from None
    return list(dict.fromkeys(names))


def _resolve(args: argparse.Namespace):
    """Validate every flag; return (topology, link_costs, ids [G, T, K], names)."""
    from ..cli import plan as plan_cmd

    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype {args.dtype!r} is not valid; allowed: {', '.join(DTYPES)}")
    try:
        routing = parse_routing(args.routing)
    except (TypeError, ValueError) as e:
        raise type(e)(f"--routing: {e}") from None
    if routing.kind != "trace":  # bench comm's own defaults (plan's differ)
        if args.top_k is None:
            args.top_k = DEFAULT_TOP_K
        if args.tokens_per_rank is None:
            args.tokens_per_rank = DEFAULT_TOKENS_PER_RANK
    # topology, experts, hidden size, seed, link costs (every phase of the topology), routing or trace
    topology, link_costs, _, ids = plan_cmd._resolve_inputs(args)
    _int(args.iters, "--iters", 1)
    _int(args.warmup, "--warmup", 0)
    args.pipeline_chunks = getattr(args, "pipeline_chunks", 1)
    args.shared_memory = getattr(args, "shared_memory", True)
    args.device = getattr(args, "device", "cpu")
    validate_pipeline_chunks(args.pipeline_chunks, "--pipeline-chunks")
    if isinstance(args.timeout, bool) or not isinstance(args.timeout, (int, float)) or not args.timeout > 0:
        raise ValueError(f"--timeout must be a number of seconds > 0, got {args.timeout!r}")
    if args.emulate_inter_mbit is not None:
        _int(args.emulate_inter_mbit, "--emulate-inter-mbit", 1)
    lat = args.emulate_latency_ms = getattr(args, "emulate_latency_ms", 0.0)
    if isinstance(lat, bool) or not isinstance(lat, (int, float)) or not 0 <= lat <= 10_000:
        raise ValueError(f"--emulate-latency-ms must be a number of milliseconds in 0 .. 10000, got {lat!r}")
    if lat > 0 and args.emulate_inter_mbit is None:
        raise ValueError("--emulate-latency-ms needs --emulate-inter-mbit")
    names = parse_dispatch_list(args.dispatch, topology.num_levels)
    return topology, link_costs, ids, names


# ---------------------------------------------------------------------------- ranks
@dataclass(frozen=True)
class _RankConfig:
    """What the launcher hands every rank: the validated flags, the routing and the resolved ``auto``."""

    topology: Topology
    ids: torch.Tensor  # int [G, T, K] expert of each (rank, token, slot); -1 = dropped pair
    hidden_size: int
    dtype: str  # a key of DTYPES
    num_experts: int
    seed: int
    link_costs: LinkCosts
    names: tuple[str, ...]  # dispatch values to time, "auto" included
    chosen: str  # the hd<d> that "auto" resolves to
    warmup: int
    iters: int
    pipeline_chunks: int
    shared_memory: bool
    device: str = "cpu"  # "cuda": one GPU per rank, NCCL


@dataclass(frozen=True)
class _Measured:
    """One dispatch as a rank measured it (already all-reduced: every rank holds the same values).

    Per timed iteration (seconds, the slowest rank): ``dispatch``, ``combine``, ``iteration`` windows and the
    handle's ``comm`` / ``plan`` seconds; ``bytes_by_level`` summed over ranks; ``max_abs_err`` over ranks.
    """

    dispatch: list[float]
    combine: list[float]
    iteration: list[float]
    comm: list[float]
    plan: list[float]
    bytes_by_level: dict[str, int]
    max_abs_err: float


def _rank_fn(rank: int, world: int, cfg: _RankConfig) -> dict[str, _Measured]:
    topology, ids_all, M = cfg.topology, cfg.ids, cfg.hidden_size
    dtype, D = DTYPES[cfg.dtype], topology.num_levels
    ep = ExpertParallel(topology, dispatch="flat", link_costs=cfg.link_costs, pipeline_chunks=cfg.pipeline_chunks,
                        shared_memory=cfg.shared_memory)
    placement = Placement.contiguous(cfg.num_experts, world)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)

    device = torch.device("cuda", torch.cuda.current_device()) if cfg.device == "cuda" else torch.device("cpu")
    ids = ids_all[rank]  # [T, K]
    T, K = ids.shape
    x = torch.randn(T, M, generator=gen).to(dtype)
    w = torch.rand(T, K, generator=gen)
    valid = ids.reshape(-1) >= 0  # -1 in a trace = dropped pair: it travels nowhere
    pair_row = torch.arange(T).repeat_interleave(K)[valid].to(device)
    pair_expert = ids.reshape(-1)[valid].to(device)
    pair_weight = w.reshape(-1)[valid].to(device)
    expected = (x.float() * (w * (ids >= 0)).sum(1, keepdim=True)).to(device)
    x = x.to(device)

    def barrier():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()
    row_bytes = M * DTYPE_BYTES[cfg.dtype]

    out: dict[str, _Measured] = {}
    n = cfg.warmup + cfg.iters
    for name in cfg.names:
        concrete = cfg.chosen if name == "auto" else name
        route = ep.route(concrete, placement, device)
        disp, comb, iters, comms, plans = [], [], [], [], []
        handle = None
        back = None
        for _ in range(n):
            handle = DispatchHandle(concrete, D, row_bytes)
            with torch.no_grad():
                barrier()
                start = time.perf_counter()
                rows, pw, prow, _pexp = dispatch_blocks(x, pair_weight, pair_row, pair_expert, route, handle)
                if device.type == "cuda":  # the dispatch's last collective may still be running on its stream
                    torch.cuda.synchronize(device)
                t_disp = time.perf_counter() - start
                y = torch.zeros(total_rows(rows), M, dtype=torch.float32, device=device).index_add_(
                    0, prow, gather_rows(rows, prow).float() * pw[:, None])  # stand-in experts: not timed
                barrier()
                start_comb = time.perf_counter()
                back = combine(y, handle, dtype)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                end = time.perf_counter()
            disp.append(t_disp)
            comb.append(end - start_comb)
            iters.append(end - start)
            comms.append(handle.comm_seconds)
            plans.append(handle.plan_seconds)
        stats = torch.tensor([disp, comb, iters, comms, plans], dtype=torch.float64)[:, cfg.warmup:].contiguous()
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)  # per iteration: the slowest rank
        by_level = handle.bytes_by_level()
        level_names = [level_key(i) for i in range(1, D + 1)]
        nbytes = torch.tensor([by_level[k] for k in level_names], dtype=torch.int64)
        dist.all_reduce(nbytes, op=dist.ReduceOp.SUM)
        err = torch.tensor([float((back.float() - expected).abs().max()) if T else 0.0], dtype=torch.float64)
        dist.all_reduce(err, op=dist.ReduceOp.MAX)
        out[name] = _Measured(
            dispatch=stats[0].tolist(), combine=stats[1].tolist(), iteration=stats[2].tolist(),
            comm=stats[3].tolist(), plan=stats[4].tolist(),
            bytes_by_level={k: int(v) for k, v in zip(level_names, nbytes.tolist())},
            max_abs_err=float(err),
        )
    dist.barrier()
    return out


def _p90(values: list[float]) -> float:
    """90th percentile, linear interpolation between order statistics."""
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    pos = 0.9 * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def node_link_bytes(topology: Topology, rows: torch.Tensor, row_bytes: int) -> torch.Tensor:
    """Per top-level group ("node"): level-1 bytes its link carries in each direction over dispatch + combine.

    ``rows`` ``[G, G]``: dispatch rows rank ``a`` sends to rank ``b`` (all phases summed). A node's outbound link
    carries its dispatch rows to other nodes and the combine rows going back to other nodes' tokens (= the dispatch
    rows it received); the inbound link the reverse, i.e. the same total. Returns int64 ``[sizes[0]]``.
    """
    U = topology.sizes[0]
    node = topology.group_index(1)
    m = torch.zeros(U, U, dtype=torch.long)
    m.index_put_((node[:, None].expand_as(rows), node[None, :].expand_as(rows)), rows.to(torch.long), accumulate=True)
    m.fill_diagonal_(0)
    return (m.sum(1) + m.sum(0)) * int(row_bytes)


def _lower_bound_node_bytes(topology: Topology, placement: Placement, ids: torch.Tensor,
                            row_bytes: int) -> torch.Tensor:
    """:func:`node_link_bytes` of the lower bound: one row per distinct (token, other node) each way."""
    ids = check_expert_ids(topology, placement, ids)
    G, T, K = ids.shape
    U = topology.sizes[0]
    expert_node = torch.cat([topology.group_index(1)[placement.expert_to_rank], torch.tensor([U])])[ids]  # [G,T,K]
    hit = torch.zeros(G, T, U + 1, dtype=torch.bool)
    hit.scatter_(2, expert_node, True)  # column U collects dropped pairs (-1)
    hits = hit[..., :U].sum(1)  # [G, U] tokens of source s hitting node u
    rows = torch.zeros(G, G, dtype=torch.long)
    first = torch.arange(U) * (G // U)  # one rank per node stands for it (only node sums matter)
    rows[:, first] = hits
    return node_link_bytes(topology, rows, row_bytes)


def _ms_at(num_bytes: int, mbit: float) -> float:
    return float(num_bytes) * 8.0 / (mbit * 1e6) * 1e3


def run(args: argparse.Namespace) -> dict:
    """Validate, spawn the ranks, time every dispatch; return the report (contract keys first).

    ``--timeout`` bounds the whole command from here on (:class:`~hiermoe_lightning.testing.launch.Deadline`)."""
    topology, link_costs, ids, names = _resolve(args)
    deadline = Deadline(float(args.timeout), "--timeout")
    G, T, K = ids.shape
    E, M = args.num_experts, args.hidden_size
    row_bytes = M * DTYPE_BYTES[args.dtype]
    placement = Placement.contiguous(E, G)
    concrete = [n for n in names if n != "auto"]
    pred = predict(topology, placement, ids, M, DTYPE_BYTES[args.dtype], link_costs, dispatches=concrete or None,
                   pipeline_chunks=args.pipeline_chunks)
    chosen = pred.chosen
    one_way = {n: pred.dispatch[n].predicted_ms for n in concrete}
    if "auto" in names:
        one_way["auto"] = pred.chosen_ms

    cfg = _RankConfig(topology=topology, ids=ids, hidden_size=M, dtype=args.dtype, num_experts=E, seed=args.seed,
                      link_costs=link_costs, names=tuple(names), chosen=chosen, warmup=args.warmup, iters=args.iters,
                      pipeline_chunks=args.pipeline_chunks, shared_memory=args.shared_memory, device=args.device)
    launch = dict(timeout=deadline, pg_timeout=min(float(args.timeout), 300.0))
    if args.device == "cuda":
        launch.update(backend="nccl", start_method="spawn")
    if args.emulate_inter_mbit is None:
        per_rank = run_ranks(_rank_fn, G, cfg, **launch)
    else:
        num_nodes = topology.sizes[0]
        try:
            with EmulatedNetwork(num_nodes, args.emulate_inter_mbit, latency_ms=float(args.emulate_latency_ms)) as net:
                per_rank = run_ranks(_rank_fn, G, cfg, netns=net, ranks_per_node=G // num_nodes, **launch)
        except EmulationUnavailable as e:
            raise CLIError(f"--emulate-inter-mbit: {e}", EMULATION_EXIT_STATUS) from None
    measured = per_rank[0]  # every rank holds the same all-reduced numbers

    results = {}
    for name in names:
        m = measured[name]
        times = [d + c for d, c in zip(m.dispatch, m.combine)]
        entry = {
            "median_ms": statistics.median(times) * 1e3,
            "p90_ms": _p90(times) * 1e3,
            "predicted_ms": 2.0 * one_way[name],
            "bytes_by_level": m.bytes_by_level,
            "plan_ms": statistics.median(m.plan) * 1e3,
            "comm_ms": statistics.median(m.comm) * 1e3,
            "predicted_one_way_ms": one_way[name],
            "dispatch_ms": statistics.median(m.dispatch) * 1e3,
            "combine_ms": statistics.median(m.combine) * 1e3,
            "iteration_ms": statistics.median(m.iteration) * 1e3,
            "max_abs_err": m.max_abs_err,
        }
        if entry["median_ms"] > 0:
            entry["predicted_vs_measured"] = entry["predicted_ms"] / entry["median_ms"]
        if name == "auto":
            entry["resolved"] = chosen
        results[name] = entry
    lower_bound = {"bytes_by_level": {level_key(1): lower_bound_level1_bytes(topology, placement, ids, row_bytes)}}
    emulation = {}
    if args.emulate_inter_mbit is not None:
        mbit = float(args.emulate_inter_mbit)
        lb_node = int(_lower_bound_node_bytes(topology, placement, ids, row_bytes).max())
        lb_ms = _ms_at(lb_node, mbit)
        specs = {n: parse_dispatch(chosen if n == "auto" else n, topology.num_levels) for n in names}
        rows = dispatch_rows(topology, placement, ids, list({s.name: s for s in specs.values()}.values()))
        for name, spec in specs.items():
            total = sum(p.rows for p in rows[spec.name])
            busiest = int(node_link_bytes(topology, total, row_bytes).max())
            entry = results[name]
            entry["wire_ms"] = _ms_at(busiest, mbit)
            entry["busiest_node_level1_bytes"] = busiest
            entry["vs_lower_bound"] = entry["median_ms"] / lb_ms if lb_ms > 0 else None
        lower_bound["busiest_node_level1_bytes"] = lb_node
        emulation = {
            "emulation": {"inter_mbit": args.emulate_inter_mbit, "latency_ms": float(args.emulate_latency_ms),
                          "num_nodes": topology.sizes[0], "ranks_per_node": G // topology.sizes[0],
                          "link": "each node's namespace <-> hub bridge, tbf rate limit on both directions"},
            "lower_bound_ms": lb_ms,
            "lower_bound_note": LOWER_BOUND_NOTE,
        }
    return {
        "topology": str(topology),
        "world_size": G,
        "num_experts": E,
        "top_k": K,
        "hidden_size": M,
        "tokens_per_rank": T,
        "dtype": args.dtype,
        "routing": str(parse_routing(args.routing)),
        "results": results,
        "chosen": chosen,
        "lower_bound": lower_bound,
        **emulation,
        "bytes_per_elem": DTYPE_BYTES[args.dtype],
        "seed": args.seed,
        "iters": args.iters,
        "warmup": args.warmup,
        "pipeline_chunks": args.pipeline_chunks,
        "shared_memory": args.shared_memory,
        "device": args.device,
        "link_costs": link_costs.name,
        "predicted_note": PREDICTED_NOTE,
    }


def format_report(report: dict) -> str:
    """An aligned table: times, speedup over flat, planning share, bytes per level in MiB, lower bound."""
    mib = float(1 << 20)
    head = (f"topology {report['topology']} ({report['world_size']} ranks, gloo on this machine), "
            f"{report['num_experts']} experts, top-{report['top_k']}, hidden {report['hidden_size']} {report['dtype']}, "
            f"{report['tokens_per_rank']} tokens/rank, routing {report['routing']} (seed {report['seed']}), "
            f"{report['iters']} iters after {report['warmup']} warmup"
            + (f", {report['pipeline_chunks']} pipeline chunks" if report.get("pipeline_chunks", 1) != 1 else "")
            + ("" if report.get("shared_memory", True) else ", no shared memory")
            + "; times are the slowest rank's dispatch + the slowest rank's combine (expert step not timed)")
    results = report["results"]
    levels = sorted({k for r in results.values() for k in r["bytes_by_level"]}, key=parse_level_key)
    flat_ms = results["flat"]["median_ms"] if "flat" in results else None
    emulated = "emulation" in report
    cols = ["dispatch", "median ms", "p90 ms", "vs flat", "predicted ms", "pred/meas", "plan ms", "plan %", "comm ms",
            *[f"L{parse_level_key(lv)} MiB" for lv in levels], *(["wire ms", "vs bound"] if emulated else [])]
    rows = [cols]
    for name, r in results.items():
        label = f"{name} ({r['resolved']})" if "resolved" in r else name
        share = r["plan_ms"] / r["median_ms"] if r["median_ms"] > 0 else 0.0
        rows.append([
            label, f"{r['median_ms']:.2f}", f"{r['p90_ms']:.2f}",
            f"{flat_ms / r['median_ms']:.2f}x" if flat_ms and r["median_ms"] > 0 else "",
            f"{r['predicted_ms']:.3f}", f"{r['predicted_ms'] / r['median_ms']:.2f}" if r["median_ms"] > 0 else "",
            f"{r['plan_ms']:.2f}", f"{100 * share:.1f}%", f"{r['comm_ms']:.2f}",
            *[f"{r['bytes_by_level'].get(lv, 0) / mib:.2f}" for lv in levels],
            *([f"{r['wire_ms']:.1f}", f"{r['vs_lower_bound']:.2f}x" if r["vs_lower_bound"] else ""]
              if emulated else []),
        ])
    widths = [max(len(row[c]) for row in rows) for c in range(len(cols))]
    lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lb = report["lower_bound"]["bytes_by_level"][level_key(1)]
    if emulated:
        head += emulation_line(report)
    extra = ([f"level-1 lower-bound time (busiest node link, payload only): {report['lower_bound_ms']:.1f} ms; "
              "wire ms = a dispatch's own busiest-link level-1 bytes at that rate"] if emulated else [])
    return "\n".join([
        head, "", *lines, "",
        f"chosen by the cost model ({report['link_costs']}): {report['chosen']}",
        f"level-1 lower bound (dispatch+combine): {lb / mib:.2f} MiB",
        *extra,
        "predicted ms = 2 x the model's one-way time (dispatch + combine); pred/meas = predicted ms / median ms",
    ])


def main(args: argparse.Namespace) -> int:
    report = run(args)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
