"""Where one dispatch's time goes: a per-exchange timeline of a dispatch and its combine on "2x2".

    sudo .venv/bin/python examples/dispatch_timeline.py --dispatch hd2 --pipeline-chunks 2 --emulate-inter-mbit 1000
    .venv/bin/python examples/dispatch_timeline.py --dispatch hd2 --pipeline-chunks 2          # plain loopback
    .venv/bin/python examples/dispatch_timeline.py --dispatch hd2 --events                     # every post and wait

Four ranks, two per node (with ``--emulate-inter-mbit N`` each node in its own network namespace, node links limited
to N Mbit/s: ``hiermoe_lightning.bench.netem``, needs root). The problem is the one of ``hiermoe bench comm
--top-k 8 --hidden-size 1024 --tokens-per-rank 1024`` (uniform routing, stand-in experts). Every rank traces its last
timed dispatch and combine (``DispatchHandle.trace``: each post and wait of an exchange, with its group, link level
and rows) and splits its dispatch window into:

* **planning**: from the barrier to the first payload leaving over the slowest link (level 1);
* **crossing**: from there to the last level-1 payload landing;
* **after**: from there to the end of the dispatch (the intra-node relay of what landed last).

The numbers are one rank's view of one iteration, not medians: use ``hiermoe bench comm`` for timings. This is the
tool behind the breakdown in docs/benchmarks.md (section 2).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from hiermoe_lightning import ExpertParallel
from hiermoe_lightning.dispatch.engine import DispatchHandle, combine, dispatch_blocks, gather_rows, total_rows
from hiermoe_lightning.placement import Placement
from hiermoe_lightning.testing import run_ranks


def _is_payload(event) -> bool:
    """Count exchanges carry exactly one row per peer; payloads (rows plus pair metadata) more."""
    return event.rows > len(event.ranks)


def summarise(events: list, start: float, end: float) -> dict:
    """``planning_ms``, ``crossing_ms``, ``after_ms`` (summing to ``dispatch_ms``) of one traced dispatch window
    ``start``..``end`` (``perf_counter`` seconds); crossing is 0 when nothing crossed a level-1 link."""
    slow = [e for e in events if e.level == 1 and _is_payload(e)]
    first_post = min((e.start for e in slow if e.kind == "post"), default=end)
    last_landing = max((e.end for e in slow if e.kind == "wait"), default=first_post)
    return {"dispatch_ms": (end - start) * 1e3, "planning_ms": (first_post - start) * 1e3,
            "crossing_ms": (last_landing - first_post) * 1e3, "after_ms": (end - last_landing) * 1e3}


def _timeline_on_rank(rank: int, world: int, dispatch: str, chunks: int, num_experts: int, top_k: int, hidden: int,
                      tokens: int, iters: int) -> dict:
    ep = ExpertParallel("2x2", dispatch="flat", pipeline_chunks=chunks)
    route = ep.build_route(dispatch, Placement.contiguous(num_experts, world))
    g = torch.Generator().manual_seed(rank)
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(tokens)])
    x, weight = torch.randn(tokens, hidden, generator=g), torch.rand(tokens * top_k, generator=g)
    pair_row, pair_expert = torch.arange(tokens).repeat_interleave(top_k), ids.reshape(-1)
    for _ in range(iters):
        handle = DispatchHandle(dispatch, 2, hidden * 4, trace=[])
        with torch.no_grad():
            dist.barrier()
            start = time.perf_counter()
            blocks, w, prow, _ = dispatch_blocks(x, weight, pair_row, pair_expert, route, handle)
            end = time.perf_counter()
            dispatch_events, handle.trace = handle.trace, []
            # stand-in experts: each row's weighted copies, summed
            y = torch.zeros(total_rows(blocks), hidden).index_add_(0, prow, gather_rows(blocks, prow) * w[:, None])
            dist.barrier()
            combine_start = time.perf_counter()
            combine(y, handle, torch.float32)
            combine_end = time.perf_counter()
    summary = summarise(dispatch_events, start, end)
    summary["combine_ms"] = (combine_end - combine_start) * 1e3
    summary["events"] = [(e.kind, e.ranks, e.level, e.rows, (e.start - start) * 1e3, (e.end - start) * 1e3)
                         for e in dispatch_events + handle.trace]
    return summary


def measure(dispatch: str = "hd2", chunks: int = 2, mbit: float | None = None, num_experts: int = 16,
            top_k: int = 8, hidden: int = 1024, tokens: int = 1024, iters: int = 4) -> list[dict]:
    """One summary per rank (see :func:`summarise`, plus ``combine_ms`` and ``events``: ``(kind, ranks, level,
    rows, start ms, end ms)`` from the dispatch's start) of the last of ``iters`` iterations."""
    args = (dispatch, chunks, num_experts, top_k, hidden, tokens, iters)
    if mbit is None:
        return run_ranks(_timeline_on_rank, 4, *args, timeout=600)
    from hiermoe_lightning.bench.netem import EmulatedNetwork

    with EmulatedNetwork(2, mbit) as net:
        return run_ranks(_timeline_on_rank, 4, *args, netns=net, ranks_per_node=2, timeout=600)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dispatch", default="hd2", help="flat, 2dh, hd1 or hd2 (default hd2)")
    p.add_argument("--pipeline-chunks", type=int, default=2, help="default 2")
    p.add_argument("--emulate-inter-mbit", type=float, default=None, help="node link rate, Mbit/s (needs root)")
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--tokens-per-rank", type=int, default=1024)
    p.add_argument("--iters", type=int, default=4, help="iterations; the last one is traced (default 4)")
    p.add_argument("--events", action="store_true", help="also print every post and wait")
    args = p.parse_args(argv)
    if args.iters < 1 or args.top_k < 1 or args.hidden_size < 1 or args.tokens_per_rank < 1:
        p.error("--iters, --top-k, --hidden-size and --tokens-per-rank must be >= 1")
    ranks = measure(args.dispatch, args.pipeline_chunks, args.emulate_inter_mbit, 16, args.top_k, args.hidden_size,
                    args.tokens_per_rank, args.iters)
    net = f"{args.emulate_inter_mbit:g} Mbit/s node links" if args.emulate_inter_mbit else "plain loopback"
    print(f"{args.dispatch}, {args.pipeline_chunks} chunk(s), K={args.top_k}, hidden {args.hidden_size}, "
          f"{args.tokens_per_rank} tokens/rank, {net}; the last of {args.iters} iterations, ms")
    print("rank  dispatch = planning + crossing + after   combine")
    for rank, r in enumerate(ranks):
        print(f"{rank:>4}  {r['dispatch_ms']:8.1f}   {r['planning_ms']:8.1f}   {r['crossing_ms']:8.1f}  "
              f"{r['after_ms']:6.1f}   {r['combine_ms']:7.1f}")
        if args.events:
            for kind, group, level, rows, start, end in r["events"]:
                print(f"      {start:8.1f} {end:8.1f}  {kind:4s} ranks {group} level {level} rows {rows}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
