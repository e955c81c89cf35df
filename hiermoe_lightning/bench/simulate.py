"""``hiermoe bench simulate``: the cost model's all-to-all time at the HierMoE paper's scale, next to the paper's rows.

No ranks are spawned: every number is a *prediction* of :func:`hiermoe_lightning.cost.model.predict` (one-way
all-to-all, ``alpha + beta * n`` per phase) for a generated routing, with the given link costs (default
``paper-a6000``, the paper's own fit on 4 x 8 RTX A6000).

The paper's configurations (its table "All-to-all speedup over Megatron-LM"): a Qwen3-30B-A3B-like base point,
``E = 128`` experts, top-``K = 8``, hidden 2048 in bf16, 1024 tokens per rank (micro-batch 1 x sequence 1024) on
``G = 32`` ranks as ``"4x2x2x2"``, with one parameter varied at a time: ``K`` in 6/8/10, ``E`` in 64/128/256, ``G`` in
8/16/32 as ``"1x8"``, ``"2x8"``, ``"4x2x2x2"``.

For every point it reports the predicted ms of ``flat`` (Megatron-LM), ``2dh`` (Tutel), ``hd1 .. hdD``, ``auto``
(the chosen ``hd<d>``, the paper's "HD-auto (no swap)") and ``auto+swaps``: the expert-swap planner
(:func:`hiermoe_lightning.placement.planner.plan_swaps`, up to ``max_swaps`` swaps on the same routing, starting
from the contiguous placement), then the chosen ``hd<d>`` on the placement after (the paper's "HierMoE (with
swap)"). Speedups are over ``flat`` on the contiguous placement. ``--padded`` prices every phase in the paper's padded
form (group size x largest chunk) instead of the real unequal splits; the planner's own objective is unchanged, only
the reported times use the padded form.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Iterable, Sequence

import torch

from ..cli.plan import DTYPE_BYTES
from ..cost.link_costs import LinkCosts
from ..cost.model import predict
from ..dispatch.spec import dispatch_names, parse_dispatch
from ..placement.placement import Placement
from ..topology import Topology
from ..traces import generate_routing, parse_routing

__all__ = [
    "add_arguments",
    "main",
    "simulate",
    "simulate_points",
    "paper_points",
    "parse_point",
    "format_markdown",
    "PAPER_POINTS",
    "PAPER_SPEEDUP",
    "PAPER_METHODS",
    "SWEEPS",
]

# The paper's sweep points: (sweep, label, topology, num_experts, top_k). Base: K=8, E=128, G=32 ("4x2x2x2").
PAPER_POINTS: tuple[tuple[str, str, str, int, int], ...] = (
    ("K", "K=6", "4x2x2x2", 128, 6),
    ("K", "K=8", "4x2x2x2", 128, 8),
    ("K", "K=10", "4x2x2x2", 128, 10),
    ("E", "E=64", "4x2x2x2", 64, 8),
    ("E", "E=128", "4x2x2x2", 128, 8),
    ("E", "E=256", "4x2x2x2", 256, 8),
    ("G", "G=8", "1x8", 128, 8),
    ("G", "G=16", "2x8", 128, 8),
    ("G", "G=32", "4x2x2x2", 128, 8),
)
SWEEPS = ("K", "E", "G")

# The paper's measured all-to-all speedup over Megatron-LM (reference/paper-facts.md), by method and sweep label.
PAPER_METHODS = ("HD2", "HD-auto (no swap)", "HierMoE (with swap)")
_LABELS = [p[1] for p in PAPER_POINTS]
PAPER_SPEEDUP: dict[str, dict[str, float]] = {
    "HD2": dict(zip(_LABELS, (0.95, 1.26, 1.30, 1.12, 1.26, 1.18, 1.24, 1.71, 1.26))),
    "HD-auto (no swap)": dict(zip(_LABELS, (1.37, 1.72, 1.82, 1.57, 1.72, 1.61, 2.36, 2.50, 1.72))),
    "HierMoE (with swap)": dict(zip(_LABELS, (1.56, 1.99, 2.10, 1.83, 1.99, 1.84, 2.86, 2.62, 1.99))),
}
# Which of our predicted methods stands for which paper row.
OURS_FOR_PAPER = {"HD2": "hd2", "HD-auto (no swap)": "auto", "HierMoE (with swap)": "auto+swaps"}

DEFAULT_HIDDEN = 2048
DEFAULT_TOKENS_PER_RANK = 1024
DEFAULT_MAX_SWAPS = 16


def paper_points(sweeps: Iterable[str] = SWEEPS) -> list[dict]:
    """The paper's points of the given sweeps (``"K"``, ``"E"``, ``"G"``), in table order, as dicts
    ``{sweep, label, topology, num_experts, top_k}``."""
    wanted = list(sweeps)
    for s in wanted:
        if s not in SWEEPS:
            raise ValueError(f"--sweep {s!r} is not valid; allowed: {', '.join(SWEEPS)} (comma-separated)")
    return [dict(sweep=s, label=lab, topology=t, num_experts=e, top_k=k)
            for s, lab, t, e, k in PAPER_POINTS if s in wanted]


def parse_point(text: str) -> dict:
    """``"TOPOLOGY:E:K"`` (e.g. ``"2x2:8:2"``) -> a custom point ``{sweep: "custom", label, topology, num_experts, top_k}``."""
    if not isinstance(text, str):
        raise TypeError(f"--point must be a string TOPOLOGY:E:K, got {text!r}")
    parts = text.split(":")
    if len(parts) != 3:
        raise ValueError(f"--point {text!r} is not valid; expected TOPOLOGY:E:K, e.g. 4x2x2x2:128:8")
    try:
        topology = Topology.parse(parts[0])
        E, K = int(parts[1]), int(parts[2])
    except (TypeError, ValueError) as e:
        raise ValueError(f"--point {text!r} is not valid ({e}); expected TOPOLOGY:E:K, e.g. 4x2x2x2:128:8") from None
    return dict(sweep="custom", label=f"{topology}:E={E}:K={K}", topology=str(topology), num_experts=E, top_k=K)


def _positive(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{what} must be >= 1, got {value}")
    return value


def _check_generated(routing: str) -> str:
    spec = parse_routing(routing)
    if spec.kind == "trace":
        raise ValueError(f"--routing {routing!r}: bench simulate generates its routings ('uniform' or 'zipf:S'); "
                         "a trace fixes one configuration, use 'hiermoe plan' or 'bench placement' for it")
    return str(spec)


def simulate(
    topology: "str | Topology",
    num_experts: int,
    top_k: int,
    *,
    hidden_size: int = DEFAULT_HIDDEN,
    bytes_per_elem: int = 2,
    tokens_per_rank: int = DEFAULT_TOKENS_PER_RANK,
    routing: str = "uniform",
    seed: int = 0,
    link_costs: "LinkCosts | str" = "paper-a6000",
    max_swaps: int = DEFAULT_MAX_SWAPS,
    padded: bool = False,
    expert_ids: torch.Tensor | None = None,
) -> dict:
    """Predict one configuration; pure apart from the planner's wall time.

    ``expert_ids`` (int ``[G, T, K]``) overrides the generated routing. Returns a JSON-ready dict: the configuration,
    ``predicted_ms`` ``{flat, 2dh, hd1..hdD, auto, auto+swaps}`` (one-way, ms), ``chosen`` / ``chosen_after_swaps``,
    ``speedup_over_flat`` for every entry of ``predicted_ms``, the planner's ``swaps`` (``[[a, b], ...]``),
    ``moved_experts``, ``planner_seconds`` and ``planner_predicted_ms_before/after`` (the planner's own numbers,
    unequal splits). ``max_swaps = 0`` skips the planner: ``auto+swaps`` then equals ``auto``.
    """
    topology = Topology.parse(topology)
    link_costs = LinkCosts.resolve(link_costs)
    G, D = topology.world_size, topology.num_levels
    E = _positive(num_experts, "num_experts")
    if isinstance(max_swaps, bool) or not isinstance(max_swaps, int) or max_swaps < 0:
        raise ValueError(f"max_swaps must be an int >= 0, got {max_swaps!r}")
    if E % G != 0:
        raise ValueError(f"num_experts ({E}) must be divisible by the world size ({G}) of topology {topology}")
    for name in dispatch_names(D):
        link_costs.require(parse_dispatch(name, D).phases)
    if expert_ids is None:
        routing = _check_generated(routing)
        K = _positive(top_k, "top_k")
        if K > E:
            raise ValueError(f"top_k ({K}) must be <= num_experts ({E})")
        ids = generate_routing(routing, G, _positive(tokens_per_rank, "tokens_per_rank"), E, K, seed)
    else:
        ids = expert_ids
        routing = "given"
    _, T, K = ids.shape
    before = Placement.contiguous(E, G)
    pred = predict(topology, before, ids, hidden_size, bytes_per_elem, link_costs, padded=padded)
    ms = {n: d.predicted_ms for n, d in pred.dispatch.items()}
    ms["auto"] = pred.chosen_ms

    swaps: list[list[int]] = []
    moved = 0
    planner_seconds = 0.0
    planner_before = planner_after = None
    chosen_after, after_ms = pred.chosen, pred.chosen_ms
    placement_after = before
    if max_swaps > 0:
        from ..placement.planner import plan_swaps

        start = time.perf_counter()
        plan = plan_swaps(ids, before, topology, link_costs, hidden_size, bytes_per_elem, max_swaps=max_swaps)
        planner_seconds = time.perf_counter() - start
        swaps = [[int(a), int(b)] for a, b in plan.swaps]
        moved = int(plan.moved_experts)
        placement_after = plan.placement_after
        planner_before, planner_after = float(plan.predicted_ms_before), float(plan.predicted_ms_after)
        after = predict(topology, placement_after, ids, hidden_size, bytes_per_elem, link_costs,
                        dispatches=[f"hd{d}" for d in range(1, D + 1)], padded=padded)
        chosen_after, after_ms = after.chosen, after.chosen_ms
    ms["auto+swaps"] = after_ms

    flat = ms["flat"]
    return {
        "topology": str(topology),
        "world_size": G,
        "num_experts": E,
        "top_k": K,
        "hidden_size": hidden_size,
        "bytes_per_elem": bytes_per_elem,
        "tokens_per_rank": T,
        "routing": routing,
        "seed": seed,
        "link_costs": link_costs.name,
        "padded": bool(padded),
        "max_swaps": max_swaps,
        "predicted_ms": ms,
        "chosen": pred.chosen,
        "chosen_after_swaps": chosen_after,
        "speedup_over_flat": {n: (flat / v if v > 0 else None) for n, v in ms.items()},
        "swaps": swaps,
        "num_swaps": len(swaps),
        "moved_experts": moved,
        "planner_seconds": planner_seconds,
        "planner_predicted_ms_before": planner_before,
        "planner_predicted_ms_after": planner_after,
        "placement_after": placement_after.to_list(),
    }


def simulate_points(points: Sequence[dict], **kwargs) -> list[dict]:
    """:func:`simulate` for each point (``{sweep, label, topology, num_experts, top_k}``); a configuration that
    repeats (the base point sits in every sweep) is computed once. Paper points get ``paper`` (the paper's measured
    speedups over Megatron-LM, by method)."""
    cache: dict[tuple, dict] = {}
    out = []
    for p in points:
        key = (str(Topology.parse(p["topology"])), p["num_experts"], p["top_k"])
        if key not in cache:
            cache[key] = simulate(p["topology"], p["num_experts"], p["top_k"], **kwargs)
        row = {"sweep": p["sweep"], "label": p["label"], **cache[key]}
        if p["sweep"] in SWEEPS and p["label"] in PAPER_SPEEDUP["HD2"]:
            row["paper"] = {m: PAPER_SPEEDUP[m][p["label"]] for m in PAPER_METHODS}
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------------- output
def _fmt_x(value: "float | None") -> str:
    return "-" if value is None else f"{value:.2f}"


def format_markdown(report: dict) -> str:
    """Two markdown tables: our predicted speedups beside the paper's measured rows, then the times per point."""
    points = report["points"]
    cfg = report["config"]
    head = (f"Predicted one-way all-to-all (cost model, link costs {cfg['link_costs']}"
            f"{', padded form' if cfg['padded'] else ', unequal splits'}), hidden {cfg['hidden_size']} x "
            f"{cfg['bytes_per_elem']} B, {cfg['tokens_per_rank']} tokens/rank, routing {cfg['routing']} "
            f"(seed {cfg['seed']}), planner up to {cfg['max_swaps']} swaps. Speedup = flat ms / method ms.")
    labels = [p["label"] for p in points]
    lines = [head, "", "| method | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    has_paper = any("paper" in p for p in points)
    for method in PAPER_METHODS:
        ours = OURS_FOR_PAPER[method]
        if has_paper:
            cells = [_fmt_x(p.get("paper", {}).get(method)) for p in points]
            lines.append(f"| {method}, paper (measured) | " + " | ".join(cells) + " |")
        cells = [_fmt_x(p["speedup_over_flat"].get(ours)) for p in points]
        lines.append(f"| {method}, ours ({ours}, predicted) | " + " | ".join(cells) + " |")
    cells = [_fmt_x(p["speedup_over_flat"].get("2dh")) for p in points]
    lines.append("| Tutel-2DH, ours (2dh, predicted) | " + " | ".join(cells) + " |")
    lines += ["", "| point | topology | E | K | flat ms | 2dh ms | hd2 ms | auto ms (chosen) | auto+swaps ms (chosen) "
                  "| swaps | moved experts | planner s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        ms = p["predicted_ms"]
        hd2 = f"{ms['hd2']:.2f}" if "hd2" in ms else "-"
        lines.append(
            f"| {p['label']} | {p['topology']} | {p['num_experts']} | {p['top_k']} | {ms['flat']:.2f} | "
            f"{ms['2dh']:.2f} | {hd2} | {ms['auto']:.2f} ({p['chosen']}) | {ms['auto+swaps']:.2f} "
            f"({p['chosen_after_swaps']}) | {p['num_swaps']} | {p['moved_experts']} | {p['planner_seconds']:.2f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``bench simulate`` flags to ``p`` (defaults: the paper's sweep, uniform routing, paper-a6000)."""
    p.add_argument("--sweep", default="K,E,G",
                   help="comma-separated sweeps of the paper's table to run: K, E, G (default K,E,G)")
    p.add_argument("--point", action="append", default=None, metavar="TOPOLOGY:E:K",
                   help="a custom point instead of the paper's sweeps, e.g. 2x8:128:8 (repeatable)")
    p.add_argument("--hidden-size", type=int, default=DEFAULT_HIDDEN,
                   help=f"hidden size M of a token row (default {DEFAULT_HIDDEN})")
    p.add_argument("--tokens-per-rank", type=int, default=DEFAULT_TOKENS_PER_RANK,
                   help=f"tokens routed by each rank (default {DEFAULT_TOKENS_PER_RANK}: micro-batch 1 x sequence 1024)")
    p.add_argument("--dtype", default="bf16", help="payload dtype: fp32, bf16 or fp16 (default bf16)")
    p.add_argument("--routing", default="uniform", help="generated routing: 'uniform' or 'zipf:S' (default uniform)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated routing (default 0)")
    p.add_argument("--link-costs", default="paper-a6000",
                   help="preset name (paper-a6000) or a YAML file from calibration (default paper-a6000)")
    p.add_argument("--max-swaps", type=int, default=DEFAULT_MAX_SWAPS,
                   help=f"most swaps the planner makes per point for auto+swaps (default {DEFAULT_MAX_SWAPS}; 0 = none)")
    p.add_argument("--padded", action="store_true",
                   help="price phases as the paper's padded all-to-all (group size x largest chunk)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of markdown tables")
    return p


def build_report(args: argparse.Namespace) -> dict:
    """Validate ``args`` and run every point; returns ``{"config": {...}, "points": [...]}``."""
    hidden = _positive(args.hidden_size, "--hidden-size")
    tokens = _positive(args.tokens_per_rank, "--tokens-per-rank")
    if isinstance(args.seed, bool) or not isinstance(args.seed, int):
        raise TypeError(f"--seed must be an int, got {args.seed!r}")
    if isinstance(args.max_swaps, bool) or not isinstance(args.max_swaps, int) or args.max_swaps < 0:
        raise ValueError(f"--max-swaps must be an int >= 0, got {args.max_swaps!r}")
    if args.dtype not in DTYPE_BYTES:
        raise ValueError(f"--dtype {args.dtype!r} is not valid; allowed: {', '.join(DTYPE_BYTES)}")
    try:
        routing = _check_generated(args.routing)
    except (TypeError, ValueError) as e:
        msg = str(e)
        raise type(e)(msg if msg.startswith("--routing") else f"--routing: {msg}") from None
    try:
        link_costs = LinkCosts.resolve(args.link_costs)
    except (TypeError, ValueError) as e:
        raise type(e)(f"--link-costs: {e}") from None
    if args.point:
        points = [parse_point(t) for t in args.point]
    else:
        points = paper_points([s.strip() for s in str(args.sweep).split(",") if s.strip()])
    for pt in points:  # fail on a bad point before computing anything
        topo = Topology.parse(pt["topology"])
        E, K, G = pt["num_experts"], pt["top_k"], topo.world_size
        if E <= 0 or K <= 0 or K > E or E % G != 0:
            raise ValueError(f"point {pt['label']}: need 1 <= K <= E and E divisible by the world size {G}, "
                             f"got E={E}, K={K}")
        try:
            for name in dispatch_names(topo.num_levels):
                link_costs.require(parse_dispatch(name, topo.num_levels).phases)
        except ValueError as e:
            raise ValueError(f"--link-costs: point {pt['label']} (topology {topo}): {e}") from None
    common = dict(hidden_size=hidden, bytes_per_elem=DTYPE_BYTES[args.dtype], tokens_per_rank=tokens,
                  routing=routing, seed=args.seed, link_costs=link_costs, max_swaps=args.max_swaps,
                  padded=bool(args.padded))
    config = {k: v for k, v in common.items() if k != "link_costs"}
    config["link_costs"] = link_costs.name
    config["dtype"] = args.dtype
    config["speedup_note"] = ("speedup_over_flat = predicted_ms(flat) / predicted_ms(method), one-way all-to-all, "
                              "contiguous placement for flat; paper = measured all-to-all speedup over Megatron-LM")
    return {"config": config, "points": simulate_points(points, **common)}


def main(args: argparse.Namespace) -> int:
    report = build_report(args)
    print(json.dumps(report, indent=2) if args.json else format_markdown(report))
    return 0
