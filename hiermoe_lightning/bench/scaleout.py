"""``hiermoe bench scaleout``: expert parallelism inside data parallelism and FSDP dense sharding, side by side.

Each variant ``ep<E>-<ddp|fsdp|fsdp-keep>`` trains the same model on the same global batches (``bench e2e``'s
machinery: one fork of the ranks per variant, barrier-synchronised step times, round-robin repeats) with
``HierMoEStrategy(expert_parallel_size=E, dense_sharding=...)``: ``ep4-ddp`` is the default layout on 4 ranks (experts
over the whole world, dense replicated), ``ep2-ddp`` two replicas of 2, ``ep4-fsdp`` the dense part sharded with FSDP2
(``fsdp-keep``: ``fsdp_reshard_after_forward=False``, one all-gather per block and step instead of two). Each
replica's topology is :func:`~hiermoe_lightning.replicas.default_replica_topology` of ``E`` and the ranks per node of
``--topology`` (the physical layout: ``2x2`` = 2 nodes of 2 ranks, the namespaces of ``--emulate-inter-mbit``).

The model (``--model dense-heavy``, the default) is the ``deepseek-v3-like`` preset scaled to this machine: the same
structure (a dense first layer, a shared expert, sigmoid routing over expert groups) with a dense part several times
the size of one rank's experts, which is what makes a real DeepSeek-V3 not fit replicated. ``--model moegpt`` is the
bundled default model of ``bench e2e``.

Reported per variant: tokens/s, step times, and the bytes of parameters + gradients + optimizer state the fullest
rank holds, dense and expert (:func:`~hiermoe_lightning.bench.memory.state_bytes`, counted from the tensors), and each
FSDP variant's dense share against the DDP variant of the same ``E`` (the target is ``1 / world + 10 %``).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import replace

from ..cli.flags import topology_flag
from ..replicas import ReplicaLayout, default_replica_topology
from . import e2e

__all__ = ["DENSE_HEAVY", "add_arguments", "format_report", "main", "parse_variant", "run"]

DEFAULT_VARIANTS = "ep4-ddp,ep4-fsdp,ep4-fsdp-keep,ep2-ddp"
# the deepseek-v3-like preset (moe_gpt.PRESETS) scaled to a 2-core machine: byte vocabulary, 4 layers (1 dense)
DENSE_HEAVY = dict(
    vocab_size=256, seq_len=64, num_layers=4, dense_layers=1, hidden_size=256, num_heads=4, ffn_hidden_size=64,
    dense_ffn_hidden_size=1024, num_experts=16, top_k=4, num_shared_experts=1, score_func="sigmoid",
    num_expert_groups=4, topk_groups=2, aux_loss_coef=1e-4, bias_update_rate=1e-3, lr=1e-3, weight_decay=0.1,
    optimizer="adamw", seed=0,
)
_VARIANT = re.compile(r"^ep(\d+)-(ddp|fsdp|fsdp-keep)$")


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--topology", default="2x2",
                   help="the physical layout, nodes x ranks per node; its product = ranks (default 2x2)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help=f"comma-separated ep<E>-<ddp|fsdp|fsdp-keep> (default {DEFAULT_VARIANTS})")
    p.add_argument("--model", default="dense-heavy", choices=("dense-heavy", "moegpt"),
                   help="dense-heavy (deepseek-v3-like, scaled; default) or moegpt (bench e2e's default model)")
    p.add_argument("--dispatch", default="auto", help="the dispatch of every variant (default auto)")
    p.add_argument("--batch-size", type=int, default=4, help="samples per rank and step (default 4)")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per variant (default 10)")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed optimizer steps first (default 2)")
    p.add_argument("--repeats", type=int, default=1, help="round-robin repeats; the median is reported (default 1)")
    p.add_argument("--link-costs", default="paper-a6000", help="preset, YAML file or 'calibrate' (default paper-a6000)")
    p.add_argument("--emulate-inter-mbit", type=int, default=None, metavar="N",
                   help="each node of --topology in its own network namespace, node links N Mbit/s (needs root)")
    p.add_argument("--emulate-latency-ms", type=float, default=0.0, metavar="L", help="delay per shaped hop")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds for the whole command (default 900)")
    p.add_argument("--output", default=None, metavar="FILE", help="also write the JSON report to FILE")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def parse_variant(name: str, world: int, ranks_per_node: int) -> tuple[int, dict]:
    """``"ep2-fsdp"`` -> ``(2, HierMoEStrategy arguments)``; a bad name or size is a ValueError naming --variants."""
    m = _VARIANT.match(name)
    if m is None:
        raise ValueError(f"--variants: {name!r} is not ep<E>-<ddp|fsdp|fsdp-keep> (e.g. ep2-ddp, ep4-fsdp)")
    size, dense = int(m.group(1)), m.group(2)
    try:
        ReplicaLayout.resolve(size, world)
    except (TypeError, ValueError) as e:
        raise ValueError(f"--variants {name}: {e}") from None
    kwargs = dict(expert_parallel_size=size, topology=default_replica_topology(size, ranks_per_node),
                  dense_sharding="ddp" if dense == "ddp" else "fsdp")
    if dense == "fsdp-keep":
        kwargs["fsdp_reshard_after_forward"] = False
    return size, kwargs


def _e2e_args(args: argparse.Namespace) -> argparse.Namespace:
    parser = e2e.add_arguments(argparse.ArgumentParser())
    e2e_args = parser.parse_args([])
    for key in ("topology", "batch_size", "steps", "warmup_steps", "repeats", "link_costs", "emulate_inter_mbit",
                "emulate_latency_ms", "timeout"):
        setattr(e2e_args, key, getattr(args, key))
    e2e_args.dispatch = args.dispatch
    if args.model == "dense-heavy":
        e2e_args.seq_len = DENSE_HEAVY["seq_len"]
        e2e_args.num_experts = DENSE_HEAVY["num_experts"]
        e2e_args.top_k = DENSE_HEAVY["top_k"]
    return e2e_args


def run(args: argparse.Namespace) -> dict:
    topology = topology_flag(args.topology)
    world, per_node = topology.world_size, topology.sizes[-1]
    names = [v.strip() for v in str(args.variants).split(",") if v.strip()]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"--variants must name each variant once, got {args.variants!r}")
    options = {name: parse_variant(name, world, per_node) for name in names}
    e2e_args = _e2e_args(args)
    if args.dispatch not in e2e.variant_names(e2e_args, topology.num_levels):
        raise ValueError(f"--dispatch must be one dispatch name (e.g. auto, hd1, flat), got {args.dispatch!r}")
    cfg = e2e._resolve(e2e_args)
    model = dict(DENSE_HEAVY) if args.model == "dense-heavy" else cfg.model
    for size, _ in options.values():
        if model["num_experts"] % size:
            raise ValueError(f"--variants: {model['num_experts']} experts do not divide over {size} ranks")
    cfg = replace(cfg, model=model, seed=int(model.get("seed", 0)), names=tuple(names),
                  variant_options=tuple((n, args.dispatch, kw) for n, (_, kw) in options.items()))
    report = e2e.run(e2e_args, cfg)
    report["bench"] = "scaleout"
    report["variant_options"] = {n: kw for n, (_, kw) in options.items()}
    report["model_name"] = args.model
    dense_ddp = {options[n][0]: r["state_bytes_per_rank"]["dense"] for n, r in report["results"].items()
                 if options[n][1]["dense_sharding"] == "ddp"}
    for name, r in report["results"].items():
        size, kw = options[name]
        dense = r["state_bytes_per_rank"]["dense"]
        base = dense_ddp.get(size)
        r["dense_share_vs_ddp"] = (sum(dense.values()) / sum(base.values())) if base else None
        r["expert_parallel_size"], r["replicas"] = size, world // size
    report["fsdp_dense_share_target"] = 1.0 / world * 1.1
    return report


def format_report(report: dict) -> str:
    mib = float(1 << 20)
    head = (f"{report['world_size']} ranks (topology {report['topology']}), model {report['model_name']}, "
            f"{report['tokens_per_step']} tokens/step, {report['steps']} timed steps after {report['warmup_steps']} "
            f"warmup" + (f", median of {report['repeats']} repeats" if report.get("repeats", 1) > 1 else ""))
    if "emulation" in report:
        em = report["emulation"]
        head += (f"\nemulated network: {em['num_nodes']} nodes x {em['ranks_per_node']} ranks, node links "
                 f"{em['inter_mbit']} Mbit/s each way")
    cols = ["variant", "EP x replicas", "tokens/s", "step ms", "dense MiB/rank", "vs ddp", "expert MiB/rank", "loss"]
    rows = [cols]
    for name, r in report["results"].items():
        mem = r["state_bytes_per_rank"]
        share = r["dense_share_vs_ddp"]
        rows.append([name, f"{r['expert_parallel_size']} x {r['replicas']}", f"{r['tokens_per_s']:,.0f}",
                     f"{r['step_ms_median']:.1f}", f"{sum(mem['dense'].values()) / mib:.2f}",
                     f"{share:.3f}" if share is not None else "",
                     f"{sum(mem['expert'].values()) / mib:.2f}",
                     f"{r['loss_last']:.3f}" if r["loss_last"] is not None else ""])
    widths = [max(len(row[c]) for row in rows) for c in range(len(cols))]
    lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    foot = ["MiB/rank: parameters + gradients + optimizer state the fullest rank holds (activations not counted); "
            f"vs ddp: dense share against the ddp variant of the same EP (target <= "
            f"{report['fsdp_dense_share_target']:.3f} = 1/{report['world_size']} + 10 %)"]
    return "\n".join([head, "", *lines, "", *foot])


def main(args: argparse.Namespace) -> int:
    return e2e.report_main(args, run, format_report)
