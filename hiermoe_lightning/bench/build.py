"""``hiermoe bench build``: per-rank time and peak memory to build a stack of MoE layers and shard it, today's path
(every rank builds every expert, then ``ExpertParallel.shard_`` keeps its own) against building on the meta device
(``MoELayer(..., device="meta")``; ``shard_`` then draws only this rank's experts).

Each path runs in its own launch of fresh forked ranks (one after the other, so they never share the CPUs). Per rank:
the seconds to construct the layers, the seconds ``shard_`` takes (the process groups are created before the clock
starts), and the peak resident memory (VmHWM) above the rank's resident memory before the build. The expert share is
what a rank keeps: ``layers x E/G x 3 x M x F x bytes``; the issue's targets are peak <= 1.2 x that share and a meta
build (construct + shard) taking <= 1/3 of today's time. Defaults: Qwen3-30B-A3B-shaped layers (hidden 2048, expert
FFN 768, 128 experts, bf16), 2 of them, on 4 ranks."""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch
import torch.distributed as dist
from torch import nn

from ..layer import MoELayer
from ..parallel import ExpertParallel
from ..testing import Deadline, run_ranks

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PATHS = ("today", "meta")


def _status_mib(key: str) -> float:
    """``/proc/self/status`` field ``key`` (``VmHWM``, ``VmRSS``), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rank_fn(rank, world, args, path):
    torch.set_num_threads(1)
    ep = ExpertParallel(args.topology, dispatch="flat")  # process groups first: not part of the build
    gc.collect()
    dist.barrier()
    base = _status_mib("VmRSS")
    device = "meta" if path == "meta" else None
    start = time.perf_counter()
    layers = nn.ModuleList(
        MoELayer(args.hidden_size, args.ffn_hidden_size, args.num_experts, args.top_k, seed=args.seed + i,
                 dtype=DTYPES[args.dtype], device=device)
        for i in range(args.num_layers))
    built = time.perf_counter()
    ep.shard_(layers, device="cpu")
    sharded = time.perf_counter()
    peak = _status_mib("VmHWM")
    kept = sum(p.untyped_storage().nbytes() for layer in layers for p in layer.experts.slot_parameters())
    left_on_meta = sum(t.is_meta for layer in layers for t in (*layer.parameters(), *layer.buffers()))
    dist.barrier()
    return {"construct_s": built - start, "shard_s": sharded - built, "total_s": sharded - start,
            "base_rss_mib": base, "peak_rss_mib": peak, "peak_over_base_mib": peak - base,
            "kept_expert_mib": kept / 2**20, "left_on_meta": int(left_on_meta)}


def run(args) -> dict:
    from ..topology import Topology

    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_experts", "top_k"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    deadline = Deadline(args.timeout, "--timeout")  # bounds every launch together
    world = Topology.parse(args.topology).world_size
    if args.num_experts % world:
        raise ValueError(f"--num-experts ({args.num_experts}) must be divisible by the world size ({world})")
    elem = torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    share_mib = args.num_layers * (args.num_experts // world) * 3 * args.hidden_size * args.ffn_hidden_size * elem / 2**20
    out = {"topology": args.topology, "world_size": world, "num_layers": args.num_layers,
           "hidden_size": args.hidden_size, "ffn_hidden_size": args.ffn_hidden_size, "num_experts": args.num_experts,
           "dtype": args.dtype, "expert_share_per_rank_mib": share_mib, "paths": {}}
    for path in args.paths:
        per_rank = run_ranks(_rank_fn, world, args, path, timeout=deadline)
        worst = {k: max(r[k] for r in per_rank) for k in per_rank[0]}
        worst["peak_over_share"] = worst["peak_over_base_mib"] / share_mib
        out["paths"][path] = {"per_rank": per_rank, "max": worst}
    if "today" in out["paths"] and "meta" in out["paths"]:
        today, meta = out["paths"]["today"]["max"], out["paths"]["meta"]["max"]
        out["meta_vs_today"] = {"time_ratio": meta["total_s"] / today["total_s"],
                                "peak_ratio": meta["peak_over_base_mib"] / today["peak_over_base_mib"]}
    out["targets"] = {"peak_over_share_max": 1.2, "time_ratio_max": 1 / 3}
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--topology", default="4", help="expert-parallel ranks (fork, gloo), e.g. 4 or 2x2")
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=2048)
    p.add_argument("--ffn-hidden-size", type=int, default=768)
    p.add_argument("--num-experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS),
                   help="today: every rank builds every expert, then shard_; meta: device='meta', then shard_")
    p.add_argument("--timeout", type=float, default=1200.0,
                   help="seconds for the whole command; when they pass, every rank is stopped (exit status 124)")
    p.add_argument("--json", action="store_true")


def main(args) -> int:
    res = run(args)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{res['num_layers']} MoE layers (M={res['hidden_size']}, F={res['ffn_hidden_size']}, "
          f"E={res['num_experts']}, {res['dtype']}) on {res['world_size']} ranks; "
          f"expert share per rank {res['expert_share_per_rank_mib']:.0f} MiB (slowest / largest rank)")
    print(f"  {'path':<6} {'construct s':>11} {'shard_ s':>9} {'total s':>8} {'peak MiB':>9} {'x share':>8}")
    for path, r in res["paths"].items():
        m = r["max"]
        print(f"  {path:<6} {m['construct_s']:11.2f} {m['shard_s']:9.2f} {m['total_s']:8.2f} "
              f"{m['peak_over_base_mib']:9.0f} {m['peak_over_share']:8.2f}")
    if "meta_vs_today" in res:
        r = res["meta_vs_today"]
        print(f"  meta / today: time {r['time_ratio']:.3f} (target <= {res['targets']['time_ratio_max']:.3f}), "
              f"peak {r['peak_ratio']:.3f}; meta peak / share target <= {res['targets']['peak_over_share_max']}")
    return 0
