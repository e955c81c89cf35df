"""Calibrate LinkCosts on N local gloo ranks and print the fitted table (optionally write it as YAML).

    .venv/bin/python examples/calibrate_links.py --topology 2x2 --out calibrated-2x2.yaml

Every rank calls ``LinkCosts.calibrate`` (a collective) and gets the same result; the YAML can be passed as
``ExpertParallel(..., link_costs="calibrated-2x2.yaml")``.
"""

from __future__ import annotations

import argparse
import math
import time

from hiermoe_lightning import ExpertParallel, LinkCosts
from hiermoe_lightning.testing import run_ranks
from hiermoe_lightning.topology import Topology


def _calibrate_on_rank(rank, world, topology, repeats, warmup, name):
    ep = ExpertParallel(topology, dispatch="flat")
    t0 = time.perf_counter()
    costs = LinkCosts.calibrate(ep, repeats=repeats, warmup=warmup, name=name)
    return costs, time.perf_counter() - t0


def format_table(costs: LinkCosts) -> str:
    lines = ["| phase | alpha (ms) | beta (ms/byte) | r2 | predicted 1 MiB (ms) |",
             "|---|---|---|---|---|"]
    for phase, pc in costs.phases.items():
        r2 = "-" if pc.r2 is None else f"{pc.r2:.4f}"
        lines.append(f"| {phase} | {pc.alpha:.4f} | {pc.beta:.3e} | {r2} | {pc.ms(1 << 20):.3f} |")
    return "\n".join(lines)


def main(argv=None) -> LinkCosts:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="2x2", help="e.g. 2x2 or 4 (world size = product of the sizes)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--name", default=None, help="name stored in the YAML (default: calibrated-<topology>)")
    parser.add_argument("--out", default=None, help="write the fitted LinkCosts to this YAML file")
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)

    topo = Topology.parse(args.topology)
    name = args.name or f"calibrated-{args.topology}"
    t0 = time.perf_counter()
    results = run_ranks(_calibrate_on_rank, topo.world_size, args.topology, args.repeats, args.warmup, name,
                        timeout=args.timeout, pg_timeout=max(30.0, args.timeout))
    wall = time.perf_counter() - t0
    costs = results[0][0]
    if any(c != costs for c, _ in results):
        raise SystemExit("ranks returned different LinkCosts")
    assert all(math.isfinite(pc.beta) for pc in costs.phases.values())
    print(f"topology {topo} ({topo.world_size} gloo ranks), repeats={args.repeats}, warmup={args.warmup}")
    print(format_table(costs))
    print(f"calibration {max(t for _, t in results):.2f} s on the slowest rank; {wall:.2f} s with process start-up")
    if args.out:
        costs.to_yaml(args.out)
        print(f"wrote {args.out}")
    return costs


if __name__ == "__main__":
    main()
