"""Time the level-1 lower-bound traffic alone on an emulated 2-node network: what the link and TCP deliver.

    sudo .venv/bin/python examples/wire_floor.py --emulate-inter-mbit 1000 --mib-per-rank 4

Four ranks, two per emulated node (``hiermoe_lightning.bench.netem``; needs root). Every rank ``(node, i)`` exchanges
``--mib-per-rank`` MiB each way with its peer ``(other node, i)``, twice (a dispatch and a combine), as plain
point-to-point messages: no dispatch logic, no copies of ours. With 1024 tokens of 1024 fp32 per rank (4 MiB) this
is exactly the level-1 lower-bound traffic of ``hiermoe bench comm --topology 2x2 --hidden-size 1024
--tokens-per-rank 1024`` at K=4..8, so ``median / bound`` is the floor a deduplicated dispatch can reach on this
network (docs/benchmarks.md, section 2). Prints the median over ``--iters`` timed iterations of the slowest rank.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from hiermoe_lightning.bench.netem import EmulatedNetwork
from hiermoe_lightning.testing import run_ranks


def _exchange_on_rank(rank: int, world: int, mib: float, iters: int, warmup: int) -> list[float]:
    peer = (rank + world // 2) % world  # same position on the other node
    n = int(mib * (1 << 20) / 4)
    send, recv = torch.randn(n), torch.empty(n)
    times = []
    for it in range(warmup + iters):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(2):  # dispatch and combine
            ops = [dist.P2POp(dist.irecv, recv, peer), dist.P2POp(dist.isend, send, peer)]
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        if it >= warmup:
            times.append(time.perf_counter() - start)
    slowest = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return slowest.tolist()


def measure(mbit: float, mib_per_rank: float, iters: int = 6, warmup: int = 2) -> tuple[float, float]:
    """``(median ms, lower-bound ms)`` of the lower-bound traffic at ``mbit`` Mbit/s (root: emulated network)."""
    with EmulatedNetwork(2, mbit) as net:
        times = run_ranks(_exchange_on_rank, 4, mib_per_rank, iters, warmup, netns=net, ranks_per_node=2,
                          timeout=600)[0]
    # the busiest node link carries both of its ranks' bytes, each way, for the dispatch and the combine
    bound_ms = 2 * 2 * mib_per_rank * (1 << 20) / (mbit * 1e6 / 8) * 1e3
    return statistics.median(times) * 1e3, bound_ms


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--emulate-inter-mbit", type=float, required=True, help="node link rate, Mbit/s each way")
    p.add_argument("--mib-per-rank", type=float, default=4.0, help="MiB each rank sends each way per pass (default 4)")
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)
    if args.emulate_inter_mbit <= 0 or args.mib_per_rank <= 0 or args.iters < 1 or args.warmup < 0:
        p.error("--emulate-inter-mbit and --mib-per-rank must be > 0, --iters >= 1, --warmup >= 0")
    median_ms, bound_ms = measure(args.emulate_inter_mbit, args.mib_per_rank, args.iters, args.warmup)
    print(f"{args.emulate_inter_mbit:g} Mbit/s, {args.mib_per_rank:g} MiB per rank each way, dispatch + combine: "
          f"median {median_ms:.1f} ms, lower bound {bound_ms:.1f} ms, ratio {median_ms / bound_ms:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
