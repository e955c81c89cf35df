"""Calibrate LinkCosts on N local gloo ranks and print the fitted table (optionally write it as YAML).

    .venv/bin/python examples/calibrate_links.py --topology 2x2 --out calibrated-2x2.yaml
    .venv/bin/python examples/calibrate_links.py --topology 2x2 --emulate-inter-mbit 200 --out calibrated-200.yaml

Every rank calls ``LinkCosts.calibrate`` (a collective) and gets the same result; the YAML can be passed as
``ExpertParallel(..., link_costs="calibrated-2x2.yaml")`` or ``hiermoe bench comm --link-costs calibrated-2x2.yaml``.

``--emulate-inter-mbit N`` (root; see ``hiermoe_lightning.bench.netem``) runs the ranks of each node (top-level group)
in a network namespace of their own, node links limited to N Mbit/s each way, exactly as ``hiermoe bench comm
--emulate-inter-mbit N`` does, so the costs describe that network. Byte counting (``--duplex``, ``--level1-link``)
defaults to what this machine's links are: loopback TCP copies both directions on the rank's CPU (``half``), and the
emulated node link is one tbf-limited link per node shared by its ranks (``node``); see docs/cost-model.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from hiermoe_lightning import ExpertParallel, LinkCosts
from hiermoe_lightning.cost.calibrate import DEFAULT_COPY_ROWS, DEFAULT_SIZES
from hiermoe_lightning.testing import Deadline, run_ranks
from hiermoe_lightning.topology import Topology


def _calibrate_on_rank(rank, world, topology, repeats, warmup, name, options):
    ep = ExpertParallel(topology, dispatch="flat")
    t0 = time.perf_counter()
    report: dict = {}
    costs = LinkCosts.calibrate(ep, repeats=repeats, warmup=warmup, name=name, report=report, **options)
    return costs, time.perf_counter() - t0, report


def format_table(costs: LinkCosts) -> str:
    lines = ["| phase | alpha (ms) | beta (ms/byte) | r2 | sync (ms) | predicted 1 MiB (ms) |",
             "|---|---|---|---|---|---|"]
    for phase, pc in costs.phases.items():
        r2 = "-" if pc.r2 is None else f"{pc.r2:.4f}"
        lines.append(f"| {phase} | {pc.alpha:.4f} | {pc.beta:.3e} | {r2} | {pc.sync_ms:.3f} | {pc.ms(1 << 20):.3f} |")
    lines.append(f"\ncopy_beta {costs.copy_beta:.3e} ms/byte ({costs.copy_beta * (1 << 20):.3f} ms per MiB copied), "
                 f"fault_beta {costs.fault_beta:.3e} ms/byte ({costs.fault_beta * (1 << 20):.3f} ms per MiB mapped "
                 f"fresh, buffers >= {costs.fault_threshold / 2**20:g} MiB), pair_bytes {costs.pair_bytes:g}, "
                 f"duplex {costs.duplex}, level1_link {costs.level1_link}")
    return "\n".join(lines)


def _sizes(text: str | None):
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"--sizes must be comma-separated byte counts, got {text!r}") from None


def main(argv=None) -> LinkCosts:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="2x2", help="e.g. 2x2 or 4 (world size = product of the sizes)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--sizes", default=None,
                        help=f"comma-separated payload sizes in bytes per rank (default {DEFAULT_SIZES[0]} .. "
                             f"{DEFAULT_SIZES[-1]}, {len(DEFAULT_SIZES)} points)")
    parser.add_argument("--no-faults", action="store_true", help="do not model fresh-buffer page faults")
    parser.add_argument("--copy-rows", default=",".join(map(str, DEFAULT_COPY_ROWS)),
                        help="comma-separated row counts (4 KiB rows) for copy_beta; 'none' to skip")
    parser.add_argument("--duplex", choices=["full", "half"], default="half",
                        help="a rank's load: half = sent + received (loopback: one CPU copies both ways; default), "
                             "full = max(sent, received)")
    parser.add_argument("--level1-link", choices=["rank", "node"], default=None,
                        help="rank: one link per rank; node: one link per node shared by its ranks "
                             "(default: node with --emulate-inter-mbit, else rank)")
    parser.add_argument("--emulate-inter-mbit", type=int, default=None, metavar="N",
                        help="calibrate on the emulated network of `hiermoe bench comm --emulate-inter-mbit N` (root)")
    parser.add_argument("--emulate-latency-ms", type=float, default=0.0, metavar="L")
    parser.add_argument("--name", default=None, help="name stored in the YAML (default: calibrated-<topology>)")
    parser.add_argument("--out", default=None, help="write the fitted LinkCosts to this YAML file")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--verbose", action="store_true", help="also print the measured medians behind each fit")
    args = parser.parse_args(argv)

    topo = Topology.parse(args.topology)
    emulated = args.emulate_inter_mbit is not None
    suffix = f"-{args.emulate_inter_mbit}mbit" if emulated else ""
    name = args.name or f"calibrated-{args.topology}{suffix}"
    copy_rows = None if args.copy_rows.strip().lower() == "none" else [int(v) for v in args.copy_rows.split(",")]
    options = {"sizes": _sizes(args.sizes), "copy_sizes": copy_rows, "duplex": args.duplex, "faults": not args.no_faults,
               "level1_link": args.level1_link or ("node" if emulated else "rank")}
    launch = dict(timeout=Deadline(args.timeout, "--timeout"), pg_timeout=max(30.0, args.timeout))
    t0 = time.perf_counter()
    if not emulated:
        results = run_ranks(_calibrate_on_rank, topo.world_size, args.topology, args.repeats, args.warmup, name,
                            options, **launch)
    else:
        from hiermoe_lightning.bench.netem import EmulatedNetwork, EmulationUnavailable

        nodes = topo.sizes[0]
        try:
            with EmulatedNetwork(nodes, args.emulate_inter_mbit, latency_ms=args.emulate_latency_ms) as net:
                results = run_ranks(_calibrate_on_rank, topo.world_size, args.topology, args.repeats, args.warmup,
                                    name, options, netns=net, ranks_per_node=topo.world_size // nodes, **launch)
        except EmulationUnavailable as e:
            print(f"--emulate-inter-mbit: {e}", file=sys.stderr)
            raise SystemExit(3) from None
    wall = time.perf_counter() - t0
    costs, _, report = results[0]
    if any(c != costs for c, _, _ in results):
        raise SystemExit("ranks returned different LinkCosts")
    assert all(math.isfinite(pc.beta) for pc in costs.phases.values())
    where = (f", emulated {topo.sizes[0]} nodes, node links {args.emulate_inter_mbit} Mbit/s each way"
             if emulated else "")
    print(f"topology {topo} ({topo.world_size} gloo ranks{where}), repeats={args.repeats}, warmup={args.warmup}")
    print(format_table(costs))
    if args.verbose:
        for phase, r in report.get("phases", {}).items():
            print(f"{phase}: sync {r['sync_ms']:.2f} ms; payload " + ", ".join(
                f"{b / 2**20:.2f} MiB {ms:.1f} ms" for b, ms in zip(r["bytes"], r["ms"])))
        if "fault" in report:
            print(f"fault (first touch - second touch) at {', '.join(f'{x:.1f} ms' for x in report['fault']['ms'])}")
        if "copy" in report:
            print("copy: " + ", ".join(f"{b / 2**20:.0f} MiB {ms:.1f} ms"
                                       for b, ms in zip(report["copy"]["bytes"], report["copy"]["ms"])))
    print(f"calibration {max(t for _, t, _ in results):.2f} s on the slowest rank; {wall:.2f} s with process start-up")
    if args.out:
        costs.to_yaml(args.out)
        print(f"wrote {args.out}")
    return costs


if __name__ == "__main__":
    main()
