"""Clustered router init: a synthetic stand-in for the co-activation structure of trained MoE routers.

Trained MoE models route with structure: the experts a token picks together come from recurring clusters
(co-activation), which is what lets expert swaps gather a cluster onto one node and cut inter-node traffic. A freshly
initialised gate ``[E, M]`` routes near uniformly, so swaps can gain nothing on it. This module builds a gate whose
routing is clustered from step 0, deterministically from a seed (see ``docs/clustered-routing.md``).

Shapes: ``E`` experts, ``M`` hidden size, ``C`` clusters, ``T`` tokens, ``K`` experts per token.

Design (:func:`cluster_router_weights`): ``C`` random orthonormal directions ``u_c [M]``; expert ``e`` belongs to
cluster ``e % C`` (interleaved: under the default contiguous placement, rank ``r`` holds experts
``r*E/G .. (r+1)*E/G - 1``, so every cluster is spread over all ranks, the worst start, and swaps can gather a
cluster onto one node); gate row ``w_e = strength * u_{e % C} + noise_e`` with ``noise_e ~ N(0, 1/M)``, the router's
usual init, whose row norm is about 1. For a token ``x`` the logit of expert ``e`` is
``strength * (x . u_c) + x . noise_e``: a term shared by the whole cluster plus the expert's own term, of about the
same spread for an isotropic ``x``. So ``strength`` is the ratio of the two: 0 is the usual (near uniform) routing,
large values put all of a token's top-k into its best cluster (when ``K <= E / C``).

Everything here is pure and seeded with its own ``torch.Generator``: building the same weights neither reads nor
advances the global RNG, and every rank computes the same values from the seed alone.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..checkpoint import moe_layers
from ..experts import derive_seed
from ..layer import MoELayer
from ..validation import check_int, check_number

__all__ = [
    "DEFAULT_STRENGTH", "cluster_of_expert", "cluster_directions", "cluster_router_weights", "cluster_routers_",
    "layer_cluster_seed", "within_cluster_share", "chance_within_cluster_share", "check_clusters", "ClusteredMoELayer",
]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# MoEGPT's default router_cluster_strength (and bench e2e's): measured, docs/clustered-routing.md
DEFAULT_STRENGTH = 1.5


def check_clusters(clusters: object, num_experts: int, name: str = "clusters", *, allow_zero: bool = False,
                   hidden_size: int | None = None) -> int:
    """``clusters`` as an int that divides ``num_experts`` (0 too with ``allow_zero``: "off"), and at most
    ``hidden_size`` when given (the cluster directions are orthonormal in ``M`` dimensions). TypeError / ValueError
    naming ``name`` and the allowed values otherwise."""
    divisors = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
    if hidden_size is not None:
        divisors = [d for d in divisors if d <= hidden_size]
    allowed = ([0] if allow_zero else []) + divisors
    text = ", ".join(map(str, allowed))
    what = f"a divisor of num_experts ({num_experts})" + (f" that is <= hidden_size ({hidden_size})"
                                                          if hidden_size is not None else "")
    if isinstance(clusters, bool) or not isinstance(clusters, int):
        raise TypeError(f"{name} must be {'0 (off) or ' if allow_zero else ''}{what}, one of {text}; got "
                        f"{type(clusters).__name__} {clusters!r}")
    if clusters not in allowed:
        raise ValueError(f"{name} must be {'0 (off) or ' if allow_zero else ''}{what}, one of {text}; got {clusters}")
    return clusters


def cluster_of_expert(num_experts: int, clusters: int) -> torch.Tensor:
    """``[E]`` int64: the cluster of every expert, ``e % clusters`` (interleaved)."""
    check_int(num_experts, "num_experts", 1)
    check_clusters(clusters, num_experts)
    return torch.arange(num_experts) % clusters


def cluster_directions(hidden_size: int, clusters: int, seed: int) -> torch.Tensor:
    """``[C, M]`` fp32: ``clusters`` orthonormal random directions (QR of a seeded Gaussian ``[M, C]``, signs fixed
    so that ``R``'s diagonal is positive: the same directions on every platform's QR). Needs ``C <= M``."""
    check_int(hidden_size, "hidden_size", 1)
    check_int(clusters, "clusters", 1, hidden_size)
    check_int(seed, "seed", 0)
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(hidden_size, clusters, generator=g, dtype=torch.float64))
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return (q * signs).t().contiguous().float()


def cluster_router_weights(num_experts: int, hidden_size: int, clusters: int, strength: float, seed: int,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A gate weight ``[E, M]`` (CPU, ``dtype``) whose routing is clustered: row ``e`` is
    ``strength * u_{e % C} + noise_e``, with ``u [C, M]`` from :func:`cluster_directions` and ``noise [E, M]`` ~
    N(0, 1/M) (the router's usual init, row norm about 1), both drawn from generators seeded by ``seed`` alone.

    ``strength`` (>= 0) is the norm of the cluster term relative to the noise row's (about 1): the ratio of the spread
    of the logit a token's cluster adds to every expert of the cluster to the spread of each expert's own logit.
    ``strength=0`` is a plain N(0, 1/M) gate."""
    check_int(num_experts, "num_experts", 1)
    check_int(hidden_size, "hidden_size", 1)
    check_clusters(clusters, num_experts, hidden_size=hidden_size)
    strength = check_number(strength, "strength", low=0.0)
    check_int(seed, "seed", 0)
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {', '.join(map(str, _FLOAT_DTYPES))}, got {dtype!r}")
    directions = cluster_directions(hidden_size, clusters, derive_seed(seed, "directions"))  # [C, M]
    g = torch.Generator().manual_seed(derive_seed(seed, "noise"))
    noise = torch.randn(num_experts, hidden_size, generator=g, dtype=torch.float32) * hidden_size**-0.5  # [E, M]
    return (strength * directions[cluster_of_expert(num_experts, clusters)] + noise).to(dtype)


def layer_cluster_seed(seed: int, index: int) -> int:
    """The seed of the ``index``-th MoE layer's clustered gate (in module order; dense blocks are not counted)."""
    return derive_seed(seed, "router_clusters", index)


@torch.no_grad()
def _write_clustered_gate(layer: MoELayer, clusters: int, strength: float, seed: int) -> None:
    """``layer``'s gate weight := :func:`cluster_router_weights` (in its dtype and on its device)."""
    weight = layer.router.weight
    weight.copy_(cluster_router_weights(layer.num_experts, layer.hidden_size, clusters, strength, seed,
                                        dtype=weight.dtype).to(weight.device))


@torch.no_grad()
def cluster_routers_(module: nn.Module, clusters: int, strength: float, seed: int) -> list[str]:
    """Rewrite the gate weight of every :class:`~hiermoe_lightning.layer.MoELayer` in ``module`` (``module`` itself
    included) with :func:`cluster_router_weights`; the ``i``-th layer in module order gets
    ``layer_cluster_seed(seed, i)``, so the result depends on the seed alone and is identical on every rank. Returns
    the names of the layers rewritten.

    Works on sharded layers too (the gate is dense: the full ``[E, M]`` on every rank; ``E`` is the layer's global
    expert count). Only the gate changes: the selection bias, the experts and any optimizer state are left alone.
    Everything is checked before anything is written: a layer whose gate is on the meta device (materialise it first,
    or build ``MoEGPT(router_clusters=...)``, which clusters its gates at materialisation), or whose expert count the
    ``clusters`` do not divide, is a ValueError naming the layer."""
    check_int(clusters, "clusters", 1)
    strength = check_number(strength, "strength", low=0.0)
    check_int(seed, "seed", 0)
    layers = list(moe_layers(module).items())
    if not layers:
        raise ValueError(f"cluster_routers_: {type(module).__name__} has no MoELayer")
    for name, layer in layers:
        label = name or type(module).__name__
        weight = layer.router.weight
        if weight.is_meta:
            raise ValueError(f"cluster_routers_: the router of {label} is on the meta device; materialise the layer "
                             f"first (MoELayer.materialize_ or ExpertParallel.shard_), or build MoEGPT with "
                             f"router_clusters={clusters}, which clusters its gates when they are materialised")
        if tuple(weight.shape) != (layer.num_experts, layer.hidden_size):
            raise ValueError(f"cluster_routers_: the router weight of {label} has shape {tuple(weight.shape)}, "
                             f"expected the full gate [{layer.num_experts}, {layer.hidden_size}]")
        try:
            check_clusters(clusters, layer.num_experts, hidden_size=layer.hidden_size)
        except ValueError as e:
            raise ValueError(f"cluster_routers_ ({label}): {e}") from None
    for i, (_, layer) in enumerate(layers):
        _write_clustered_gate(layer, clusters, strength, layer_cluster_seed(seed, i))
    return [name for name, _ in layers]


class ClusteredMoELayer(MoELayer):
    """A :class:`~hiermoe_lightning.layer.MoELayer` whose gate is :func:`cluster_router_weights` of
    ``(num_experts, hidden_size, router_clusters, router_cluster_strength, router_cluster_seed)`` instead of the
    usual init, in every build: eagerly at construction, and, built on meta, when :meth:`materialize_` (so also
    ``ExpertParallel.shard_``, ``HierMoEStrategy``) gives the gate its storage. Everything else (experts, shared
    experts, buffers, state-dict keys) is the plain layer's. What ``MoEGPT(router_clusters=C)`` builds."""

    def __init__(self, *args, router_clusters: int, router_cluster_strength: float, router_cluster_seed: int,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.router_clusters = check_clusters(router_clusters, self.num_experts, "router_clusters",
                                              hidden_size=self.hidden_size)
        self.router_cluster_strength = check_number(router_cluster_strength, "router_cluster_strength", low=0.0)
        self.router_cluster_seed = check_int(router_cluster_seed, "router_cluster_seed", 0)
        self._cluster_router()  # a no-op on meta: materialize_ does it

    def _cluster_router(self) -> None:
        """Gate weight := the clustered weights (nothing on meta)."""
        if not self.router.weight.is_meta:
            _write_clustered_gate(self, self.router_clusters, self.router_cluster_strength, self.router_cluster_seed)

    def materialize_(self, device: "torch.device | str | None" = None) -> "ClusteredMoELayer":
        """:meth:`MoELayer.materialize_`, then the clustered gate if the gate was on meta (a gate with storage is
        kept: it may have been trained or loaded)."""
        redraw = self.router.weight.is_meta
        super().materialize_(device)
        if redraw:
            self._cluster_router()
        return self


# ---------------------------------------------------------------------------------------------- measurement
def within_cluster_share(expert_ids: torch.Tensor, clusters: int) -> float:
    """The share of the (token, expert) pairs of ``expert_ids [T, K]`` (int; ``-1`` = dropped, ignored) that fall in
    the cluster (``e % clusters``) holding most of that token's pairs: ``sum_t max_c n_tc / sum_t K_t``. 1.0 =
    perfectly clustered; uniform random top-k gives :func:`chance_within_cluster_share`. Vectorised (no loop over
    tokens). ValueError when no pair is routed."""
    if not isinstance(expert_ids, torch.Tensor) or expert_ids.dim() != 2 or expert_ids.is_floating_point():
        raise ValueError(f"expert_ids must be an integer tensor [tokens, top_k], got "
                         f"{getattr(expert_ids, 'shape', expert_ids)!r}")
    check_int(clusters, "clusters", 1)
    valid = expert_ids >= 0  # [T, K]
    cluster = expert_ids.clamp_min(0) % clusters  # [T, K]
    counts = torch.zeros(expert_ids.shape[0], clusters, dtype=torch.long, device=expert_ids.device)
    counts.scatter_add_(1, cluster, valid.long())  # [T, C]: pairs of token t in cluster c
    total = int(valid.sum())
    if total == 0:
        raise ValueError("within_cluster_share: expert_ids holds no routed pair")
    return float(counts.max(dim=1).values.sum()) / total


def chance_within_cluster_share(num_experts: int, top_k: int, clusters: int) -> float:
    """The expected :func:`within_cluster_share` of uniform random top-k (``top_k`` distinct experts of
    ``num_experts``, every set equally likely) with interleaved clusters of ``E / C`` experts each: exact, by dynamic
    programming over the clusters on (pairs placed, largest cluster count so far). E=16, K=8, C=2: 0.595."""
    check_int(num_experts, "num_experts", 1)
    check_int(top_k, "top_k", 1, num_experts)
    check_clusters(clusters, num_experts)
    size = num_experts // clusters
    ways = {(0, 0): 1}  # (pairs placed, max count so far) -> number of expert sets
    for _ in range(clusters):
        nxt: dict[tuple[int, int], int] = {}
        for (used, top), n in ways.items():
            for k in range(min(size, top_k - used) + 1):
                key = (used + k, max(top, k))
                nxt[key] = nxt.get(key, 0) + n * math.comb(size, k)
        ways = nxt
    total = math.comb(num_experts, top_k)
    return sum(n * top for (used, top), n in ways.items() if used == top_k) / (total * top_k)
