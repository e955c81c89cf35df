"""``hiermoe bench placement``: the expert-swap planner against other placements, on the same routing.

Methods: the planners of :mod:`hiermoe_lightning.placement.planners` by name (the ones ``HierMoECallback(planner=...)``
takes), each starting from the contiguous placement and seeing the whole routing:

* ``none``: no swap, the contiguous placement.
* ``hiermoe``: :func:`hiermoe_lightning.placement.planner.plan_swaps` (up to ``max_swaps`` swaps).
* ``eplb``: DeepSeek EPLB-style balanced packing of the expert loads, one slot per expert
  (:func:`hiermoe_lightning.placement.baselines.eplb_balanced_placement`): balances tokens per rank, ignores dedup and
  the previous placement.
* ``smartmoe``: SmartMoE-style greedy packing from the current placement
  (:func:`hiermoe_lightning.placement.baselines.smartmoe_greedy_placement`).

For each it reports the cost model's predicted one-way all-to-all time of the fastest ``hd<d>`` (plain max over
ranks, unequal splits: :func:`hiermoe_lightning.cost.model.predict`), the chosen ``d``, how many experts moved away
from the contiguous placement, the load imbalance (max / mean over ranks of the (token, expert) pairs its experts
process) and the seconds the method took to compute its placement.

Routings: ``uniform``, ``zipf:S``, ``trace:PATH`` (see :mod:`hiermoe_lightning.traces`) and ``clusters:C[:F]``
(:func:`generate_clusters`): the experts form ``C`` clusters (a seeded random partition of the expert ids) and each
token draws ``round(F * K)`` of its ``K`` experts from one cluster, the rest from the other experts (``F`` default
0.75). Co-activated experts that the contiguous placement scatters are what the planner can gather.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Sequence

import torch

from ..cli.flags import int_flag, topology_flag
from ..cli.plan import DTYPE_BYTES
from ..cost.link_costs import LinkCosts
from ..cost.model import predict
from ..dispatch.spec import dispatch_names, parse_dispatch
from ..placement.baselines import moved_experts
from ..placement.placement import Placement
from ..placement.planners import PlanRequest, resolve_planner
from ..topology import Topology
from ..traces import ALLOWED_ROUTINGS, generate_routing, load_trace, parse_routing

__all__ = [
    "add_arguments",
    "main",
    "compare_placements",
    "generate_clusters",
    "cluster_assignment",
    "parse_clusters",
    "resolve_routing",
    "load_imbalance",
    "expert_load",
    "format_report",
    "METHODS",
]

METHODS = ("none", "hiermoe", "eplb", "smartmoe")  # planner names (placement.planners.PLANNERS)
DEFAULT_IN_CLUSTER = 0.75
DEFAULT_MAX_SWAPS = 16
ROUTINGS_HELP = f"{ALLOWED_ROUTINGS}, or 'clusters:C[:F]' (C clusters, share F of each token's experts in one, default 0.75)"
_CHUNK = 16384


# ---------------------------------------------------------------------------------------------------- routings
def parse_clusters(text: str) -> tuple[int, float]:
    """``"clusters:8"`` -> ``(8, 0.75)``; ``"clusters:8:0.9"`` -> ``(8, 0.9)``. ``ValueError`` otherwise."""
    parts = text.split(":")
    if parts[0] != "clusters" or len(parts) not in (2, 3):
        raise ValueError(f"routing {text!r} is not valid; expected clusters:C or clusters:C:F")
    try:
        C = int(parts[1])
        F = float(parts[2]) if len(parts) == 3 else DEFAULT_IN_CLUSTER
    except ValueError:
        raise ValueError(f"routing {text!r}: C must be an int >= 1 and F a number in (0, 1]") from None
    if C < 1 or not math.isfinite(F) or not 0.0 < F <= 1.0:
        raise ValueError(f"routing {text!r}: C must be an int >= 1 and F a number in (0, 1], got C={C}, F={F:g}")
    return C, F


def _draw_clusters(num_experts: int, num_clusters: int, gen: torch.Generator) -> torch.Tensor:
    perm = torch.randperm(num_experts, generator=gen)
    cluster_of = torch.empty(num_experts, dtype=torch.long)
    cluster_of[perm] = torch.arange(num_experts) % num_clusters
    return cluster_of


def cluster_assignment(num_experts: int, num_clusters: int, seed: int = 0) -> torch.Tensor:
    """``[E]`` int64: the cluster of each expert that :func:`generate_clusters` uses for this ``seed``."""
    return _draw_clusters(num_experts, num_clusters, torch.Generator().manual_seed(seed))


def generate_clusters(
    num_clusters: int,
    world_size: int,
    tokens_per_rank: int,
    num_experts: int,
    top_k: int,
    seed: int = 0,
    in_cluster: float = DEFAULT_IN_CLUSTER,
) -> torch.Tensor:
    """A co-activation routing: int64 ``[world_size, tokens_per_rank, top_k]``, ``top_k`` distinct experts per token.

    The experts form ``num_clusters`` clusters: expert ``perm[i]`` is in cluster ``i % C`` for a seeded random
    permutation ``perm`` (so clusters do not line up with the contiguous placement). Each token picks a cluster
    uniformly, draws ``k_in = min(max(1, round(in_cluster * K)), smallest cluster size)`` distinct experts uniformly
    from it and the other ``K - k_in`` uniformly from the experts outside it; the ``K`` slots are then shuffled.
    Deterministic in ``seed`` (one ``torch.Generator`` for all draws).
    """
    for value, what in ((num_clusters, "num_clusters"), (world_size, "world_size"),
                        (tokens_per_rank, "tokens_per_rank"), (num_experts, "num_experts"), (top_k, "top_k")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what} must be an int >= 1, got {value!r}")
    E, K, C = num_experts, top_k, num_clusters
    if C > E:
        raise ValueError(f"clusters: {C} clusters need at least as many experts, got num_experts={E}")
    if K > E:
        raise ValueError(f"top_k ({K}) must be <= num_experts ({E})")
    if not 0.0 < float(in_cluster) <= 1.0:
        raise ValueError(f"in_cluster must be in (0, 1], got {in_cluster}")
    gen = torch.Generator().manual_seed(seed)
    cluster_of = _draw_clusters(E, C, gen)
    sizes = torch.bincount(cluster_of, minlength=C)
    k_in = min(max(1, round(float(in_cluster) * K)), int(sizes.min()))
    k_out = K - k_in
    if k_out > E - int(sizes.max()):
        raise ValueError(f"clusters:{C}: top_k={K} leaves {k_out} experts to draw outside a cluster of "
                         f"{int(sizes.max())}, but only {E - int(sizes.max())} exist; use fewer clusters")
    N = world_size * tokens_per_rank
    token_cluster = torch.randint(C, (N,), generator=gen)
    out = torch.empty(N, K, dtype=torch.long)
    for s in range(0, N, _CHUNK):
        e = min(s + _CHUNK, N)
        inside = (cluster_of[None, :] == token_cluster[s:e, None]).float()  # [n, E]
        parts = [torch.multinomial(inside, k_in, replacement=False, generator=gen)]
        if k_out:
            parts.append(torch.multinomial(1.0 - inside, k_out, replacement=False, generator=gen))
        ids = torch.cat(parts, dim=1)
        order = torch.rand(e - s, K, generator=gen).argsort(dim=1)
        out[s:e] = ids.gather(1, order)
    return out.reshape(world_size, tokens_per_rank, K)


def resolve_routing(
    routing: str,
    topology: Topology,
    num_experts: int,
    top_k: int | None,
    tokens_per_rank: int | None,
    seed: int = 0,
    default_top_k: int = 8,
    default_tokens_per_rank: int = 1024,
) -> torch.Tensor:
    """The routing ``[G, T, K]`` a ``--routing`` value names: generated (``uniform``, ``zipf:S``, ``clusters:C[:F]``)
    or loaded (``trace:PATH``; its world size must be the topology's, and ``top_k`` / ``tokens_per_rank``, when given,
    must match it)."""
    G = topology.world_size
    if not isinstance(routing, str):
        raise TypeError(f"--routing must be a string: {ROUTINGS_HELP}; got {routing!r}")
    text = routing.strip()
    if text.startswith("clusters:") or text == "clusters":
        C, F = parse_clusters(text)
        return generate_clusters(C, G, tokens_per_rank or default_tokens_per_rank, num_experts,
                                 top_k or default_top_k, seed, F)
    try:
        spec = parse_routing(text)
    except ValueError:
        raise ValueError(f"--routing {routing!r} is not valid; allowed: {ROUTINGS_HELP}") from None
    if spec.kind != "trace":
        K = top_k or default_top_k
        if K > num_experts:
            raise ValueError(f"--top-k ({K}) must be <= --num-experts ({num_experts})")
        return generate_routing(spec, G, tokens_per_rank or default_tokens_per_rank, num_experts, K, seed)
    try:
        ids = load_trace(spec.path, num_experts)
    except (TypeError, ValueError) as e:
        raise type(e)(f"--routing: {e}") from None
    g, t, k = ids.shape
    if g != G:
        raise ValueError(f"--routing trace file {spec.path!r} has world size {g}, the topology {topology} has {G} ranks")
    if top_k is not None and top_k != k:
        raise ValueError(f"--top-k {top_k} does not match trace file {spec.path!r}, which has top_k {k}; omit --top-k")
    if tokens_per_rank is not None and tokens_per_rank != t:
        raise ValueError(f"--tokens-per-rank {tokens_per_rank} does not match trace file {spec.path!r}, which has "
                         f"{t} tokens per rank; omit --tokens-per-rank")
    return ids


# ---------------------------------------------------------------------------------------------------- measures
def expert_load(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[E]`` int64: (token, expert) pairs per expert (``-1`` = dropped pair, not counted)."""
    ids = expert_ids.reshape(-1).to(torch.long)
    return torch.bincount(ids[ids >= 0], minlength=num_experts)


def load_imbalance(expert_ids: torch.Tensor, placement: Placement) -> float:
    """Max over ranks / mean over ranks of the (token, expert) pairs the rank's experts process (1.0 = balanced)."""
    per_rank = torch.zeros(placement.world_size, dtype=torch.long).index_add_(
        0, placement.expert_to_rank, expert_load(expert_ids, placement.num_experts))
    mean = per_rank.float().mean()
    return float(per_rank.max() / mean) if mean > 0 else 1.0


def compare_placements(
    expert_ids: torch.Tensor,
    topology: "str | Topology",
    num_experts: int,
    link_costs: "LinkCosts | str" = "paper-a6000",
    hidden_size: int = 2048,
    bytes_per_elem: int = 2,
    *,
    max_swaps: int = DEFAULT_MAX_SWAPS,
    gamma: float = 10.0,
    expert_bytes: int | None = None,
    horizon_steps: int | None = None,
    methods: Sequence[str] = METHODS,
) -> dict:
    """Compute each method's placement for ``expert_ids`` (int ``[G, T, K]``) and price it with the cost model.

    Returns ``{name: {predicted_ms, chosen, predicted_ms_by_hd, flat_ms, moved_experts, load_imbalance, seconds,
    speedup_vs_none, placement}}`` in ``methods`` order (``hiermoe`` adds ``swaps`` and the planner's own
    ``planner_predicted_ms_before/after``). ``predicted_ms`` is the fastest ``hd<d>``'s one-way time (plain max over
    ranks, unequal splits); ``moved_experts`` counts experts whose rank differs from the contiguous placement.
    """
    topology = Topology.parse(topology)
    link_costs = LinkCosts.resolve(link_costs)
    G, D = topology.world_size, topology.num_levels
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"--methods {','.join(methods)!r} is not valid; allowed (comma-separated): {', '.join(METHODS)}")
    start_placement = Placement.contiguous(num_experts, G)
    request = PlanRequest(expert_ids, None, start_placement, topology, link_costs, hidden_size, bytes_per_elem,
                          max_swaps=max_swaps, gamma=gamma, expert_bytes=expert_bytes,
                          horizon_steps=horizon_steps if expert_bytes is not None else None)
    placements: dict[str, tuple[Placement, float, dict]] = {}
    for name in methods:
        plan = resolve_planner(name)(request)
        extra: dict = {}
        if name == "hiermoe":  # the swap planner's own view (the baselines' swaps only restate their placement)
            extra = {"swaps": [[int(a), int(b)] for a, b in plan.swaps],
                     "planner_predicted_ms_before": float(plan.predicted_ms_before),
                     "planner_predicted_ms_after": float(plan.predicted_ms_after)}
        placements[name] = (plan.placement_after, plan.seconds, extra)

    names = ["flat"] + [f"hd{d}" for d in range(1, D + 1)]
    results: dict[str, dict] = {}
    for name, (placement, seconds, extra) in placements.items():
        pred = predict(topology, placement, expert_ids, hidden_size, bytes_per_elem, link_costs, dispatches=names)
        results[name] = {
            "predicted_ms": pred.chosen_ms,
            "chosen": pred.chosen,
            "predicted_ms_by_hd": {n: pred.dispatch[n].predicted_ms for n in names if n != "flat"},
            "flat_ms": pred.dispatch["flat"].predicted_ms,
            "moved_experts": moved_experts(start_placement, placement),
            "load_imbalance": load_imbalance(expert_ids, placement),
            "seconds": seconds,
            **extra,
            "placement": placement.to_list(),
        }
    if "none" in results:
        base = results["none"]["predicted_ms"]
        for r in results.values():
            r["speedup_vs_none"] = base / r["predicted_ms"] if r["predicted_ms"] > 0 else None
    return results


# ---------------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``bench placement`` flags to ``p`` (defaults: Qwen3-30B-A3B-like on the paper's cluster)."""
    p.add_argument("--topology", default="4x2x2x2", help="level sizes, outermost first (default 4x2x2x2)")
    p.add_argument("--num-experts", type=int, default=128, help="number of experts E (default 128)")
    p.add_argument("--top-k", type=int, default=None, help="experts per token K (default 8; a trace fixes it)")
    p.add_argument("--hidden-size", type=int, default=2048, help="hidden size M of a token row (default 2048)")
    p.add_argument("--tokens-per-rank", type=int, default=None,
                   help="tokens routed by each rank (default 1024; a trace fixes it)")
    p.add_argument("--dtype", default="bf16", help="payload dtype: fp32, bf16 or fp16 (default bf16)")
    p.add_argument("--routing", default="zipf:1.2", help=f"{ROUTINGS_HELP} (default zipf:1.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated routing (default 0)")
    p.add_argument("--link-costs", default="paper-a6000",
                   help="preset name (paper-a6000) or a YAML file from calibration (default paper-a6000)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated methods to compare (default {','.join(METHODS)})")
    p.add_argument("--max-swaps", type=int, default=DEFAULT_MAX_SWAPS,
                   help=f"most swaps the planner makes (default {DEFAULT_MAX_SWAPS})")
    p.add_argument("--gamma", type=float, default=10.0, help="smooth-max exponent of the planner (default 10)")
    p.add_argument("--expert-bytes", type=int, default=None,
                   help="bytes one expert's migration moves (with --horizon-steps: the planner charges migration)")
    p.add_argument("--horizon-steps", type=int, default=None,
                   help="steps until the next plan over which a saving counts (with --expert-bytes)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


_int_flag = int_flag  # shared validator (cli/flags.py)


def build_report(args: argparse.Namespace) -> dict:
    """Validate ``args``, build the routing, compare the methods; the report as a JSON-ready dict."""
    topology = topology_flag(args.topology)
    G = topology.world_size
    E = _int_flag(args.num_experts, "--num-experts", 1)
    hidden = _int_flag(args.hidden_size, "--hidden-size", 1)
    max_swaps = _int_flag(args.max_swaps, "--max-swaps", 0)
    if args.top_k is not None:
        _int_flag(args.top_k, "--top-k", 1)
    if args.tokens_per_rank is not None:
        _int_flag(args.tokens_per_rank, "--tokens-per-rank", 1)
    if isinstance(args.seed, bool) or not isinstance(args.seed, int):
        raise TypeError(f"--seed must be an int, got {args.seed!r}")
    if args.dtype not in DTYPE_BYTES:
        raise ValueError(f"--dtype {args.dtype!r} is not valid; allowed: {', '.join(DTYPE_BYTES)}")
    if E % G != 0:
        raise ValueError(f"--num-experts ({E}) must be divisible by the topology's world size ({G}, topology {topology})")
    if (args.expert_bytes is None) != (args.horizon_steps is None):
        raise ValueError("--expert-bytes and --horizon-steps go together: give both or neither")
    if args.expert_bytes is not None:
        _int_flag(args.expert_bytes, "--expert-bytes", 0)
        _int_flag(args.horizon_steps, "--horizon-steps", 1)
    methods = [m.strip() for m in str(args.methods).split(",") if m.strip()]
    if not methods or any(m not in METHODS for m in methods):
        raise ValueError(f"--methods {args.methods!r} is not valid; allowed (comma-separated): {', '.join(METHODS)}")
    try:
        link_costs = LinkCosts.resolve(args.link_costs)
        for name in dispatch_names(topology.num_levels):
            link_costs.require(parse_dispatch(name, topology.num_levels).phases)
    except (TypeError, ValueError) as e:
        raise type(e)(f"--link-costs: {e}") from None
    ids = resolve_routing(args.routing, topology, E, args.top_k, args.tokens_per_rank, args.seed)
    _, T, K = ids.shape
    bytes_per_elem = DTYPE_BYTES[args.dtype]
    results = compare_placements(ids, topology, E, link_costs, hidden, bytes_per_elem, max_swaps=max_swaps,
                                 gamma=float(args.gamma), expert_bytes=args.expert_bytes,
                                 horizon_steps=args.horizon_steps, methods=methods)
    return {
        "topology": str(topology),
        "world_size": G,
        "num_experts": E,
        "top_k": K,
        "hidden_size": hidden,
        "bytes_per_elem": bytes_per_elem,
        "tokens_per_rank": T,
        "routing": args.routing.strip(),
        "seed": args.seed,
        "link_costs": link_costs.name,
        "max_swaps": max_swaps,
        "gamma": float(args.gamma),
        "expert_bytes": args.expert_bytes,
        "horizon_steps": args.horizon_steps,
        "methods": results,
        "note": ("predicted_ms = the cost model's one-way all-to-all time of the fastest hd<d> on that placement "
                 "(plain max over ranks, unequal splits); load_imbalance = max/mean (token, expert) pairs per rank; "
                 "moved_experts vs the contiguous placement; seconds = time to compute the placement"),
    }


def format_report(report: dict) -> str:
    """A markdown table, one row per method."""
    head = (f"topology {report['topology']} ({report['world_size']} ranks), {report['num_experts']} experts, "
            f"top-{report['top_k']}, hidden {report['hidden_size']} x {report['bytes_per_elem']} B, "
            f"{report['tokens_per_rank']} tokens/rank, routing {report['routing']} (seed {report['seed']}), "
            f"link costs {report['link_costs']}, planner up to {report['max_swaps']} swaps")
    lines = [head, "",
             "| method | predicted ms (hd<d*>) | chosen | vs none | flat ms | moved experts | load imbalance | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in report["methods"].items():
        label = f"{name} ({len(r['swaps'])} swaps)" if "swaps" in r else name
        vs = r.get("speedup_vs_none")
        lines.append(f"| {label} | {r['predicted_ms']:.3f} | {r['chosen']} | {'-' if vs is None else f'{vs:.3f}x'} | "
                     f"{r['flat_ms']:.3f} | {r['moved_experts']} | {r['load_imbalance']:.3f} | {r['seconds']:.3f} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    report = build_report(args)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
