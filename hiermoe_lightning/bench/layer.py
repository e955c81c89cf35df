"""``hiermoe bench layer``: forward+backward of one sharded MoELayer, time split into all-to-all, expert compute and
everything else (routing, planning, permutation, bookkeeping), plus peak memory against the unsharded layer.

All-to-all = time inside collectives (``DispatchHandle.comm_seconds``, waiting for slower peers included); experts =
the expert forward plus the backward from the experts' output gradient to their input rows' gradient, timed in place
(``MoELayer.expert_timings``; that backward window also holds the gather's backward); other = the rest of the step.

``--impl hiermoe:auto,hiermoe:flat,torchtitan,deepspeed,megatron-style`` compares our layer with its peers instead
(:mod:`~hiermoe_lightning.bench.peers`): the same shape, dtype and input for each, each with its own gate and
dispatcher, one launch of ``world`` ranks per impl and repeat, interleaved (round ``r`` starts with the ``r``-th impl),
all on the same network (``--emulate-inter-mbit``: the ranks of each top-level group in a network namespace of their
own, node links rate-limited; root only, exit status 3 otherwise). Per impl: the median forward+backward step (the
slowest rank of each iteration, median over iterations and repeats), the time inside collectives, the payload bytes of
one forward over inter- and intra-node links, the speed-up over ``hiermoe:flat``, and the peer's version and exact
settings. A peer that is not installed is one ``skipped`` line; one that cannot run here (Megatron-Core needs CUDA) is
one ``error`` line with its exception. Without ``--impl`` the command does what it always did."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..cli.flags import add_timeout_and_json, int_flag, topology_flag
from ..layer import MoELayer
from ..parallel import ExpertParallel
from ..testing import Deadline, run_ranks
from ..testing.launch import RankFailure, RanksTimeout
from ..topology import Topology
from .comm import emulated_network, emulation_line
from .peers import HIERMOE, MEGATRON_STYLE, BuiltLayer, ImplSpec, LayerShape, make_impl, parse_impls, quiet_peers

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def peak_rss_mib() -> float:
    """Peak resident memory of this process (VmHWM), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _layer(args) -> MoELayer:
    return MoELayer(args.hidden_size, args.ffn_hidden_size, args.num_experts, args.top_k, seed=args.seed,
                    dtype=DTYPES[args.dtype], aux_loss_coef=0.0)


def _device(args) -> torch.device:
    """This rank's device: the CPU, or its own GPU (``run_ranks(backend="nccl")`` has set it)."""
    return torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mib(device: torch.device) -> float:
    """Peak memory of this rank: GPU memory allocated on CUDA, resident memory on the CPU."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mib()


def _rank_fn(rank, world, args):
    torch.manual_seed(args.seed + rank)
    device = _device(args)
    layer = _layer(args)
    ExpertParallel(args.topology, dispatch=args.dispatch).shard_(layer)
    layer.to(device)
    x = torch.randn(args.tokens_per_rank, args.hidden_size, dtype=DTYPES[args.dtype]).to(device).requires_grad_(True)
    totals, comms, plans, experts = [], [], [], []
    for i in range(args.warmup + args.iters):
        _sync(device)
        dist.barrier()
        layer.expert_timings = {}
        start = time.perf_counter()
        out = layer(x)
        out.float().sum().backward()
        _sync(device)
        elapsed = time.perf_counter() - start
        if i >= args.warmup:
            totals.append(elapsed)
            comms.append(layer.last_handle.comm_seconds)
            plans.append(layer.last_handle.plan_seconds)
            experts.append(layer.expert_timings.get("forward", 0.0) + layer.expert_timings.get("backward", 0.0))
        layer.zero_grad(set_to_none=True)
        x.grad = None
    dist.barrier()
    return {"total": statistics.median(totals), "a2a": statistics.median(comms), "plan": statistics.median(plans),
            "experts": statistics.median(experts), "peak_rss_mib": _peak_mib(device)}


def _unsharded_fn(rank, world, args):
    device = _device(args)
    layer = _layer(args).to(device)
    x = torch.randn(args.tokens_per_rank * args.world_size, args.hidden_size, dtype=DTYPES[args.dtype])
    x = x.to(device).requires_grad_(True)
    out = layer(x)
    out.float().sum().backward()
    return {"peak_rss_mib": _peak_mib(device)}


def run(args) -> dict:
    from ..topology import Topology

    deadline = Deadline(args.timeout, "--timeout")  # bounds both launches together
    args.world_size = Topology.parse(args.topology).world_size
    launch = dict(backend="nccl", start_method="spawn") if args.device == "cuda" else {}
    per_rank = run_ranks(_rank_fn, args.world_size, args, timeout=deadline, **launch)
    unsharded = run_ranks(_unsharded_fn, 1, args, timeout=deadline, **launch)[0]
    # the slowest rank sets the step time; report its split
    slowest = max(per_rank, key=lambda r: r["total"])
    other = max(slowest["total"] - slowest["a2a"] - slowest["experts"], 0.0)
    return {
        "topology": args.topology, "dispatch": args.dispatch, "num_experts": args.num_experts, "top_k": args.top_k,
        "hidden_size": args.hidden_size, "ffn_hidden_size": args.ffn_hidden_size, "tokens_per_rank": args.tokens_per_rank,
        "dtype": args.dtype, "device": args.device,
        "step_ms": slowest["total"] * 1e3,
        "split_ms": {"a2a": slowest["a2a"] * 1e3, "experts": slowest["experts"] * 1e3, "other": other * 1e3,
                     "of_which_planning": slowest["plan"] * 1e3},
        "split_share": {"a2a": slowest["a2a"] / slowest["total"], "experts": slowest["experts"] / slowest["total"],
                        "other": other / slowest["total"]},
        "peak_rss_mib": {"sharded_per_rank_max": max(r["peak_rss_mib"] for r in per_rank),
                         "unsharded": unsharded["peak_rss_mib"]},
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--topology", default="4")
    p.add_argument("--dispatch", default="flat")
    p.add_argument("--num-experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--ffn-hidden-size", type=int, default=512)
    p.add_argument("--tokens-per-rank", type=int, default=4096)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (gloo) or cuda (one GPU per rank, NCCL; peak memory is then GPU memory allocated)")
    p.add_argument("--impl", default=None, metavar="LIST",
                   help="compare layers instead: comma-separated hiermoe:<dispatch>[:overlap=<C>], torchtitan, "
                        "deepspeed, megatron-style, megatron-core (e.g. hiermoe:auto,hiermoe:flat,torchtitan,"
                        "deepspeed,megatron-style); cpu only")
    p.add_argument("--repeats", type=int, default=None,
                   help="with --impl: launch every impl this many times, interleaved (default 1)")
    p.add_argument("--emulate-inter-mbit", type=int, default=None, metavar="N",
                   help="with --impl: each top-level group of ranks in its own network namespace, node links limited "
                        "to N Mbit/s each way (needs root; exit status 3 otherwise)")
    p.add_argument("--emulate-latency-ms", type=float, default=None, metavar="L",
                   help="with --emulate-inter-mbit: add L ms of delay on every shaped hop (default 0)")
    p.add_argument("--output", default=None, metavar="FILE", help="also write the JSON report to FILE")
    add_timeout_and_json(p, 600.0)


def main(args) -> int:
    if args.impl is not None:
        from .e2e import report_main

        return report_main(args, run_impls, format_impls)
    for flag, value in (("--repeats", args.repeats), ("--emulate-inter-mbit", args.emulate_inter_mbit),
                        ("--emulate-latency-ms", args.emulate_latency_ms)):
        if value is not None:
            raise ValueError(f"{flag} needs --impl (without it the command runs one sharded layer, as before)")
    res = run(args)
    if args.output:
        _write_json(args.output, res)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        s = res["split_ms"]
        print(f"{res['topology']} {res['dispatch']} E={res['num_experts']} K={res['top_k']} M={res['hidden_size']} "
              f"T={res['tokens_per_rank']}/rank {res['dtype']}: step {res['step_ms']:.1f} ms")
        for k in ("a2a", "experts", "other"):
            print(f"  {k:<8} {s[k]:9.1f} ms  {100 * res['split_share'][k]:5.1f}%")
        print(f"  planning (inside other) {s['of_which_planning']:.1f} ms")
        m = res["peak_rss_mib"]
        what = "GPU memory" if res["device"] == "cuda" else "RSS"
        print(f"  peak {what} per rank {m['sharded_per_rank_max']:.0f} MiB vs unsharded layer {m['unsharded']:.0f} MiB")
    return 0


def _write_json(path: str, report: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(json.dumps(report, indent=2) + "\n")


# ---------------------------------------------------------------------------- --impl: ours against its peers
IMPL_BYTES_NOTE = (
    "bytes_per_step: payload bytes of ONE forward's dispatch + combine, summed over ranks (each rank's sends: its rows "
    "out in the dispatch, the rows it served back in the combine), token rows of hidden size M in --dtype only; "
    "inter = level-1 links (between top-level groups, the emulated nodes), intra = deeper links. Not counted: "
    "routing metadata (counts, pair indices, router weights), the backward's exchanges (the same rows again), the "
    "rows a rank keeps for itself. hiermoe: DispatchHandle.bytes_by_level(); torchtitan and megatron-style: their "
    "split sizes; deepspeed: E x capacity rows each way, zero padding included (what its all-to-all carries).")
IMPL_TIMING_NOTE = (
    "step_ms: forward + backward (a fixed random output gradient) of one rank, the slowest rank of each timed "
    "iteration, median over iterations and repeats (step_ms_repeats: per repeat). comm_ms: that rank's time inside "
    "collectives in the same iteration, median likewise: posting + waiting (for slower peers too), forward and "
    "backward, count exchanges included. hiermoe: DispatchHandle.comm_seconds; megatron-style: its own "
    "all_to_all_single calls; torchtitan and deepspeed: torch's all-to-all entry points wrapped with a timer in the "
    "rank (dist.all_to_all_single, _c10d_functional.all_to_all_single + wait_tensor).")
SKIPPED, ERROR = "skipped", "error"
BASELINE = "hiermoe:flat"
_RAISE_OWN = (HIERMOE, MEGATRON_STYLE)  # our own impls: a failing rank ends the command; a peer's is one error line


@dataclass(frozen=True)
class ImplConfig:
    """What the ranks of every impl need, from the checked flags (:func:`_resolve_impls`, in the parent)."""

    topology: Topology
    shape: LayerShape
    specs: tuple[ImplSpec, ...]
    warmup: int
    iters: int
    repeats: int


def _resolve_impls(args: argparse.Namespace) -> ImplConfig:
    """Validate every flag in the parent, before any namespace or rank exists."""
    topology = topology_flag(args.topology)
    world = topology.world_size
    if world < 2:
        raise ValueError(f"--topology {args.topology!r} has {world} rank; expert parallelism needs at least 2")
    if args.device != "cpu":
        raise ValueError("--impl runs on --device cpu only (the peers are set up for gloo)")
    for value, flag, low in ((args.hidden_size, "--hidden-size", 1), (args.ffn_hidden_size, "--ffn-hidden-size", 1),
                             (args.num_experts, "--num-experts", 1), (args.top_k, "--top-k", 1),
                             (args.tokens_per_rank, "--tokens-per-rank", 1), (args.iters, "--iters", 1),
                             (args.warmup, "--warmup", 0), (args.seed, "--seed", 0)):
        int_flag(value, flag, low)
    repeats = 1 if args.repeats is None else int_flag(args.repeats, "--repeats", 1)
    if args.top_k > args.num_experts:
        raise ValueError(f"--top-k ({args.top_k}) must be <= --num-experts ({args.num_experts})")
    if args.num_experts % world:
        raise ValueError(f"--num-experts ({args.num_experts}) must be divisible by the {world} ranks of --topology")
    if args.emulate_inter_mbit is not None:
        int_flag(args.emulate_inter_mbit, "--emulate-inter-mbit", 1)
    if args.emulate_latency_ms is not None:
        if args.emulate_inter_mbit is None:
            raise ValueError("--emulate-latency-ms needs --emulate-inter-mbit")
        if not 0 <= args.emulate_latency_ms <= 10_000:
            raise ValueError(f"--emulate-latency-ms must be >= 0 and <= 10000, got {args.emulate_latency_ms}")
    if not args.timeout > 0:
        raise ValueError(f"--timeout must be > 0, got {args.timeout}")
    specs = tuple(parse_impls(args.impl, topology.num_levels))
    shape = LayerShape(args.hidden_size, args.ffn_hidden_size, args.num_experts, args.top_k, args.tokens_per_rank,
                       DTYPES[args.dtype], args.seed)
    return ImplConfig(topology, shape, specs, args.warmup, args.iters, repeats)


# ---- on every rank
def _impl_rank_fn(rank: int, world: int, cfg: ImplConfig, spec: ImplSpec) -> dict:
    """Build ``spec``'s layer on this rank, time ``warmup + iters`` forward+backward steps; the per-iteration times,
    and the last step's bytes and facts. A build that fails on any rank returns ``{"error": ...}`` on every rank."""
    os.dup2(2, 1)  # peers print progress to stdout, which belongs to the parent's report (--json)
    with quiet_peers():
        built = _build_everywhere(spec, rank, world, cfg)
        if isinstance(built, str):
            return {"error": built}
        return _time_steps(built, rank, cfg)


def _build_everywhere(spec: ImplSpec, rank: int, world: int, cfg: ImplConfig) -> "BuiltLayer | str":
    """The built layer, or (on every rank alike, after one all-reduce) the error one of them raised."""
    error, built = None, None
    try:
        built = make_impl(spec).build(rank, world, cfg.topology, cfg.shape)
    except Exception as e:  # noqa: BLE001 - a peer's failure is reported, not raised
        if spec.kind in _RAISE_OWN:
            raise
        error = f"{type(e).__name__}: {' '.join(str(e).split())}"
    failed = torch.tensor([int(error is not None)])
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if int(failed):
        return error or "another rank failed to build it"
    return built


def _time_steps(built: BuiltLayer, rank: int, cfg: ImplConfig) -> dict:
    shape = cfg.shape
    g = torch.Generator().manual_seed(shape.seed + rank)  # the same input and output gradient for every impl
    x = torch.randn(shape.tokens_per_rank, shape.hidden_size, generator=g).to(shape.dtype).requires_grad_(True)
    grad = torch.randn(shape.tokens_per_rank, shape.hidden_size, generator=g).to(shape.dtype)
    steps, comms = [], []
    with built.timing():
        for i in range(cfg.warmup + cfg.iters):
            dist.barrier()
            built.start_step()
            start = time.perf_counter()
            built.forward(x).backward(grad)
            elapsed = time.perf_counter() - start
            if i >= cfg.warmup:
                steps.append(elapsed)
                comms.append(built.comm_seconds())
            built.module.zero_grad(set_to_none=True)
            x.grad = None
    dist.barrier()
    return {"step_seconds": steps, "comm_seconds": comms, "bytes": built.bytes_last_step(), "extra": built.extra()}


# ---- in the parent
def _launch(spec: ImplSpec, cfg: ImplConfig, launch: dict) -> "list[dict] | str":
    """One launch of ``spec`` on every rank: the per-rank results, or the error that stopped it."""
    try:
        per_rank = run_ranks(_impl_rank_fn, cfg.topology.world_size, cfg, spec, **launch)
    except RanksTimeout:
        raise
    except RankFailure as e:
        if spec.kind in _RAISE_OWN:
            raise
        return e.summary
    errors = [r["error"] for r in per_rank if "error" in r]
    return errors[0] if errors else per_rank


def summarise_launches(launches: list[list[dict]]) -> dict:
    """One impl's launches (one per repeat, each a list of per-rank results) -> step_ms (median over every timed
    iteration of the slowest rank in it), comm_ms (that rank's, median), the bytes of one forward summed over ranks
    (last launch), and the impl's facts (``dispatch_resolved``; DeepSpeed's ``drop_rate``)."""
    steps, comms, per_repeat = [], [], []
    for per_rank in launches:
        repeat = []
        for i in range(len(per_rank[0]["step_seconds"])):
            slowest = max(per_rank, key=lambda r: r["step_seconds"][i])
            repeat.append(slowest["step_seconds"][i])
            comms.append(slowest["comm_seconds"][i])
        steps += repeat
        per_repeat.append(statistics.median(repeat) * 1e3)
    last = launches[-1]
    out = {"step_ms": statistics.median(steps) * 1e3, "step_ms_repeats": per_repeat,
           "comm_ms": None if None in comms else statistics.median(comms) * 1e3,
           "bytes_per_step": {k: sum(r["bytes"][k] for r in last) for k in ("inter", "intra")}}
    extra = last[0]["extra"]
    if "dispatch_resolved" in extra:
        out["dispatch_resolved"] = extra["dispatch_resolved"]
    if "kept_pairs" in extra:
        pairs = sum(r["extra"]["pairs"] for r in last)
        out["drop_rate"] = 1.0 - sum(r["extra"]["kept_pairs"] for r in last) / pairs
        out["capacity_per_expert"] = extra["capacity"]
    return out


def run_impls(args: argparse.Namespace) -> dict:
    """Validate, then launch every available impl ``--repeats`` times, interleaved; return the report."""
    cfg = _resolve_impls(args)
    topology, world = cfg.topology, cfg.topology.world_size
    impls = {spec.name: make_impl(spec) for spec in cfg.specs}
    results: dict[str, dict] = {}
    for name, impl in impls.items():
        results[name] = {"version": impl.version(), "settings": impl.settings(cfg.shape)}
        reason = impl.unavailable()
        if reason is not None:
            results[name] = {SKIPPED: reason, "version": impl.version()}
    runnable = [name for name in impls if SKIPPED not in results[name]]
    launches: dict[str, list] = {name: [] for name in runnable}
    launch = dict(timeout=Deadline(float(args.timeout), "--timeout"), pg_timeout=min(float(args.timeout), 300.0))
    with emulated_network(args.emulate_inter_mbit, topology.sizes[0], args.emulate_latency_ms) as net:
        if net is not None:
            launch.update(netns=net, ranks_per_node=world // topology.sizes[0])
        for r in range(cfg.repeats):
            for name in _round(runnable, r):
                if ERROR in results[name]:
                    continue
                outcome = _launch(impls[name].spec, cfg, launch)
                if isinstance(outcome, str):
                    results[name][ERROR] = outcome
                else:
                    launches[name].append(outcome)
    for name in runnable:
        if ERROR not in results[name]:
            results[name].update(summarise_launches(launches[name]))
    _add_speedups(results)
    return _impl_report(args, cfg, results)


def _round(names: list[str], r: int) -> list[str]:
    """Round ``r``'s order: ``names`` rotated to start with the ``r``-th (every impl leads once in turn)."""
    k = r % len(names) if names else 0
    return names[k:] + names[:k]


def _add_speedups(results: dict[str, dict]) -> None:
    """``speedup_vs_hiermoe_flat`` = hiermoe:flat's step_ms / this impl's (> 1: faster); None without that baseline."""
    base = results.get(BASELINE, {}).get("step_ms")
    for r in results.values():
        if "step_ms" in r:
            r["speedup_vs_hiermoe_flat"] = base / r["step_ms"] if base else None


def _impl_report(args: argparse.Namespace, cfg: ImplConfig, results: dict) -> dict:
    shape, topology = cfg.shape, cfg.topology
    report = {
        "topology": str(topology), "world_size": topology.world_size, "num_experts": shape.num_experts,
        "top_k": shape.top_k, "hidden_size": shape.hidden_size, "ffn_hidden_size": shape.ffn_hidden_size,
        "tokens_per_rank": shape.tokens_per_rank, "dtype": args.dtype, "device": "cpu", "seed": shape.seed,
        "iters": cfg.iters, "warmup": cfg.warmup, "repeats": cfg.repeats, "impls": [s.name for s in cfg.specs],
        "order": "interleaved: one launch per impl and repeat, round r starts with the r-th impl",
        "results": results, "bytes_note": IMPL_BYTES_NOTE, "timing_note": IMPL_TIMING_NOTE,
        "torch_version": torch.__version__, "cpu_count": os.cpu_count(),
    }
    if args.emulate_inter_mbit is not None:
        report["emulation"] = {"inter_mbit": args.emulate_inter_mbit,
                               "latency_ms": float(args.emulate_latency_ms or 0.0),
                               "num_nodes": topology.sizes[0],
                               "ranks_per_node": topology.world_size // topology.sizes[0],
                               "link": "each node's namespace <-> hub bridge, tbf rate limit on both directions"}
    return report


def format_impls(report: dict) -> str:
    """An aligned table, one line per impl (skipped and failed ones included), then the notes."""
    mib = float(1 << 20)
    head = (f"topology {report['topology']} ({report['world_size']} ranks, gloo on this machine), "
            f"E={report['num_experts']} top-{report['top_k']}, hidden {report['hidden_size']}, FFN "
            f"{report['ffn_hidden_size']}, {report['tokens_per_rank']} tokens/rank, {report['dtype']}; "
            f"{report['iters']} timed iterations after {report['warmup']} warmup, {report['repeats']} repeat(s) "
            f"interleaved")
    head += emulation_line(report)
    rows = [["impl", "step ms", "vs flat", "comm ms", "inter MiB", "intra MiB", "version / note"]]
    for name, r in report["results"].items():
        if SKIPPED in r or ERROR in r:
            why = f"{SKIPPED}: {r[SKIPPED]}" if SKIPPED in r else f"{ERROR}: {r[ERROR]}"
            rows.append([name, "", "", "", "", "", why])
            continue
        note = r["version"] or ""
        if "drop_rate" in r:
            note += f"; drops {100 * r['drop_rate']:.1f}% of pairs (capacity {r['capacity_per_expert']})"
        if r.get("dispatch_resolved") and name.startswith("hiermoe:auto"):
            note += f"; auto chose {r['dispatch_resolved']}"
        speedup = r.get("speedup_vs_hiermoe_flat")
        rows.append([name, f"{r['step_ms']:.1f}", f"{speedup:.2f}x" if speedup else "",
                     f"{r['comm_ms']:.1f}" if r["comm_ms"] is not None else "n/a",
                     f"{r['bytes_per_step']['inter'] / mib:.2f}", f"{r['bytes_per_step']['intra'] / mib:.2f}", note])
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]) - 1)]
    lines = ["  ".join([cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths))]
                       + [row[-1]]) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 14)
    return "\n".join([head, "", *lines, "", report["timing_note"], report["bytes_note"]])
