"""``hiermoe bench layer``: forward+backward of one sharded MoELayer, time split into all-to-all, expert compute and
everything else (routing, planning, permutation, bookkeeping), plus peak memory against the unsharded layer.

All-to-all = time inside collectives (``DispatchHandle.comm_seconds``, waiting for slower peers included); experts =
the expert forward plus the backward from the experts' output gradient to their input rows' gradient, timed in place
(``MoELayer.expert_timings``; that backward window also holds the gather's backward); other = the rest of the step."""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist

from ..cli.flags import add_timeout_and_json
from ..layer import MoELayer
from ..parallel import ExpertParallel
from ..testing import Deadline, run_ranks

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
    add_timeout_and_json(p, 600.0)


def main(args) -> int:
    res = run(args)
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
