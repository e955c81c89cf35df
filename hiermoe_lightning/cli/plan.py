"""``hiermoe plan``: the cost model's report for one routing (contract: "`hiermoe plan`").

Counts the rows every dispatch (flat, 2dh, hd1..hdD) moves in each phase for a generated or recorded routing on the
contiguous placement, prices each phase with the link costs (``alpha + beta * max_rank_bytes``) and names the fastest
``hd<d>``. ``--json`` prints one JSON object; otherwise an aligned table. ``--swaps N`` also runs the expert-swap
planner (:func:`hiermoe_lightning.placement.planner.plan_swaps`) from the contiguous placement and reports the
placements before and after, the swaps in order and the prediction after them.

Errors are ``ValueError`` / ``TypeError`` naming the flag; the ``hiermoe`` entry point prints them as one line.
"""

from __future__ import annotations

import argparse
import json
import math

from ..cost.link_costs import LinkCosts
from ..cost.model import Prediction, predict
from ..dispatch.spec import dispatch_names, parse_dispatch
from ..placement.placement import Placement
from ..topology import Topology
from ..traces import ALLOWED_ROUTINGS, generate_routing, load_trace, parse_routing
from ..validation import check_choice, check_int, check_number
from .flags import topology_flag

__all__ = ["add_arguments", "run", "build_report", "format_report", "DTYPE_BYTES"]

DTYPE_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2}
DEFAULT_TOP_K = 8
DEFAULT_TOKENS_PER_RANK = 1024


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``plan`` flags to ``parser`` (defaults: the contract's example, Qwen3-30B-A3B on the paper's cluster)."""
    parser.add_argument("--topology", default="4x2x2x2", help="level sizes, outermost first (default 4x2x2x2)")
    parser.add_argument("--num-experts", type=int, default=128, help="number of experts E (default 128)")
    parser.add_argument("--top-k", type=int, default=None,
                        help=f"experts per token K (default {DEFAULT_TOP_K}; a trace fixes it)")
    parser.add_argument("--hidden-size", type=int, default=2048, help="hidden size M of a token row (default 2048)")
    parser.add_argument("--tokens-per-rank", type=int, default=None,
                        help=f"tokens routed by each rank (default {DEFAULT_TOKENS_PER_RANK}; a trace fixes it)")
    parser.add_argument("--dtype", default="bf16", help="payload dtype: fp32, bf16 or fp16 (default bf16)")
    parser.add_argument("--link-costs", default="paper-a6000",
                        help="preset name (paper-a6000) or a YAML file from calibration (default paper-a6000)")
    parser.add_argument("--routing", default="uniform", help=f"{ALLOWED_ROUTINGS} (default uniform)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated routing (default 0)")
    parser.add_argument("--padded", action="store_true",
                        help="price phases as the paper's padded all-to-all (group size x largest chunk)")
    parser.add_argument("--swaps", type=int, default=0,
                        help="also run the expert-swap planner for up to N swaps from the contiguous placement "
                             "(default 0: no planner)")
    parser.add_argument("--expert-bytes", type=float, default=None,
                        help="bytes one expert's migration moves (weights, gradients, optimizer state); with "
                             "--horizon-steps, a swap must save more than its migration time")
    parser.add_argument("--horizon-steps", type=int, default=None,
                        help="steps until the next plan over which a swap's saving counts (with --expert-bytes)")
    parser.add_argument("--gamma", default="10",
                        help="smooth-max exponent the planner ranks swaps with (default 10; 'none' = plain max)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser


def _flag_error(flag: str, err: Exception) -> Exception:
    """Re-raise ``err`` (ValueError/TypeError) with its message prefixed by the flag it came from."""
    return type(err)(f"{flag}: {err}")


def _resolve_inputs(args: argparse.Namespace):
    """Validate the flags; return (topology, link_costs, bytes_per_elem, expert_ids [G, T, K])."""
    topology = topology_flag(args.topology)
    G = topology.world_size
    E = check_int(args.num_experts, "--num-experts", 1)
    check_int(args.hidden_size, "--hidden-size", 1)
    check_int(args.seed, "--seed")
    check_choice(args.dtype, "--dtype", DTYPE_BYTES)
    if E % G != 0:
        raise ValueError(f"--num-experts ({E}) must be divisible by the topology's world size ({G}, topology {topology})")
    try:
        link_costs = LinkCosts.resolve(args.link_costs)
        for name in dispatch_names(topology.num_levels):
            link_costs.require(parse_dispatch(name, topology.num_levels).phases)
    except (TypeError, ValueError) as e:
        raise _flag_error("--link-costs", e) from None
    try:
        routing = parse_routing(args.routing)
    except (TypeError, ValueError) as e:
        raise _flag_error("--routing", e) from None
    if routing.kind == "trace":
        ids = _trace_ids(routing.path, args, G, E)
    else:
        top_k = check_int(DEFAULT_TOP_K if args.top_k is None else args.top_k, "--top-k", 1)
        tokens = check_int(DEFAULT_TOKENS_PER_RANK if args.tokens_per_rank is None else args.tokens_per_rank,
                           "--tokens-per-rank", 1)
        if top_k > E:
            raise ValueError(f"--top-k ({top_k}) must be <= --num-experts ({E})")
        ids = generate_routing(routing, G, tokens, E, top_k, args.seed)
    return topology, link_costs, DTYPE_BYTES[args.dtype], ids


def _trace_ids(path: str, args: argparse.Namespace, world_size: int, num_experts: int):
    """Load a trace and check it against the topology and any ``--top-k`` / ``--tokens-per-rank`` given."""
    try:
        ids = load_trace(path, num_experts)
    except (TypeError, ValueError) as e:
        raise _flag_error("--routing", e) from None
    G, T, K = ids.shape
    if G != world_size:
        raise ValueError(f"--routing trace file {path!r} has world size {G}, the topology has {world_size} ranks")
    if args.top_k is not None and args.top_k != K:
        raise ValueError(f"--top-k {args.top_k} does not match trace file {path!r}, which has top_k {K}; omit --top-k")
    if args.tokens_per_rank is not None and args.tokens_per_rank != T:
        raise ValueError(f"--tokens-per-rank {args.tokens_per_rank} does not match trace file {path!r}, which has "
                         f"{T} tokens per rank; omit --tokens-per-rank")
    return ids


def _swap_options(args: argparse.Namespace) -> "dict | None":
    """Validate ``--swaps``, ``--expert-bytes``, ``--horizon-steps`` and ``--gamma``; None when ``--swaps`` is 0."""
    swaps = getattr(args, "swaps", 0)
    check_int(swaps, "--swaps", 0)
    expert_bytes = getattr(args, "expert_bytes", None)
    horizon = getattr(args, "horizon_steps", None)
    if (expert_bytes is None) != (horizon is None):
        raise ValueError("--expert-bytes and --horizon-steps must be given together (migration cost needs both)")
    if expert_bytes is not None:
        check_number(expert_bytes, "--expert-bytes", low=0.0, low_open=True)
        check_int(horizon, "--horizon-steps", 1)
    gamma_text = getattr(args, "gamma", "10")
    if gamma_text is None or (isinstance(gamma_text, str) and gamma_text.strip().lower() in ("none", "max")):
        gamma = None
    else:
        try:
            gamma = float(gamma_text)
        except (TypeError, ValueError):
            gamma = float("nan")
        if not math.isfinite(gamma) or gamma <= 0:
            raise ValueError(f"--gamma must be a number > 0 or 'none' (plain max), got {gamma_text!r}")
    if swaps == 0:
        return None
    return {"max_swaps": swaps, "gamma": gamma, "expert_bytes": expert_bytes, "horizon_steps": horizon}


def _swap_report(topology: Topology, placement: Placement, ids, args: argparse.Namespace, link_costs: LinkCosts,
                 bytes_per_elem: int, options: dict) -> dict:
    """The keys ``--swaps N`` adds: the planner's swaps and the prediction on the placement after them."""
    from ..placement.planner import plan_swaps

    plan = plan_swaps(ids, placement, topology, link_costs, args.hidden_size, bytes_per_elem, **options)
    after: Prediction = predict(topology, plan.placement_after, ids, args.hidden_size, bytes_per_elem, link_costs,
                                padded=bool(args.padded))
    return {
        "placement_before": plan.placement_before.to_list(),
        "placement_after": plan.placement_after.to_list(),
        "swaps": [[int(a), int(b)] for a, b in plan.swaps],
        "chosen_after": after.chosen,
        "predicted_ms_after": after.chosen_ms,
        "moved_experts": plan.moved_experts,
    }


def build_report(args: argparse.Namespace) -> dict:
    """The ``plan`` JSON object (contract keys first, then ``world_size``, ``routing``, ``seed``, ``link_costs``, ``padded``)."""
    topology, link_costs, bytes_per_elem, ids = _resolve_inputs(args)
    swap_options = _swap_options(args)
    G, T, K = ids.shape
    placement = Placement.contiguous(args.num_experts, G)
    pred: Prediction = predict(topology, placement, ids, args.hidden_size, bytes_per_elem, link_costs,
                               padded=bool(args.padded))
    report = {
        "topology": str(topology),
        "num_experts": args.num_experts,
        "top_k": K,
        "hidden_size": args.hidden_size,
        "bytes_per_elem": bytes_per_elem,
        "tokens_per_rank": T,
        "dispatch": pred.to_json_dict(),
        "chosen": pred.chosen,
        "world_size": G,
        "routing": str(parse_routing(args.routing)),
        "seed": args.seed,
        "link_costs": link_costs.name,
        "padded": bool(args.padded),
    }
    if swap_options is not None:
        report.update(_swap_report(topology, placement, ids, args, link_costs, bytes_per_elem, swap_options))
    return report


def format_report(report: dict) -> str:
    """An aligned text table of a :func:`build_report` object: one line per phase, speedups over flat."""
    head = (
        f"topology {report['topology']} ({report['world_size']} ranks), {report['num_experts']} experts, "
        f"top-{report['top_k']}, hidden {report['hidden_size']} x {report['bytes_per_elem']} B, "
        f"{report['tokens_per_rank']} tokens/rank, routing {report['routing']} (seed {report['seed']}), "
        f"link costs {report['link_costs']}" + (", padded all-to-all" if report["padded"] else "")
    )
    flat_ms = report["dispatch"]["flat"]["predicted_ms"]
    bytes_col = "padded_bytes" if report["padded"] else "max_rank_bytes"
    rows = [("dispatch", "phase", bytes_col, "phase ms", "predicted ms", "vs flat")]
    for name, d in report["dispatch"].items():
        total = d["predicted_ms"]
        for i, p in enumerate(d["phases"]):
            first = i == 0
            rows.append((
                name if first else "",
                p["name"],
                f"{p[bytes_col]:,}",
                f"{p['ms']:.3f}",
                f"{total:.3f}" if first else "",
                f"{flat_ms / total:.2f}x" if first and total > 0 else "",
            ))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    align = ["<", "<", ">", ">", ">", ">"]
    lines = ["  ".join(f"{cell:{a}{w}}" for cell, a, w in zip(r, align, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    chosen = report["chosen"]
    chosen_ms = report["dispatch"][chosen]["predicted_ms"]
    speed = f", {flat_ms / chosen_ms:.2f}x over flat" if chosen_ms > 0 else ""
    out = [head, "", *lines, "", f"chosen: {chosen} ({chosen_ms:.3f} ms{speed})"]
    if "swaps" in report:
        swaps = report["swaps"]
        after = report["predicted_ms_after"]
        gain = f", {100 * (chosen_ms - after) / chosen_ms:.2f}% below no swap" if chosen_ms > 0 else ""
        listed = ", ".join(f"{a}<->{b}" for a, b in swaps[:16]) + (", ..." if len(swaps) > 16 else "")
        out += ["", f"swaps: {len(swaps)} applied, {report['moved_experts']} experts moved"
                    + (f": {listed}" if swaps else ""),
                f"after swaps: {report['chosen_after']} ({after:.3f} ms{gain})"]
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    """Run ``hiermoe plan`` with parsed ``args``; print the report; return the exit status (0)."""
    report = build_report(args)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report))
    return 0
