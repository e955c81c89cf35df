"""The layers ``hiermoe bench layer --impl`` compares: ours and its peers, each with its own gate and dispatcher.

Every impl is one small adapter (:class:`LayerImpl`): its name, the version of the code it runs, its exact settings,
whether it can run here (checked in the parent, before any rank starts), and ``build(rank, world, topology, shape)``
which, on a forked rank with the gloo process group up, returns a :class:`BuiltLayer`: ``forward(x)`` ``[T, M] ->
[T, M]``, the time this step spent inside collectives, and the payload bytes of its last forward's dispatch + combine
split into inter-node and intra-node links.

=====================  ======================================================================================
``hiermoe:<dispatch>``  our ``MoELayer`` sharded by ``ExpertParallel(topology, dispatch=...)``; ``:overlap=<C>``
                        adds ``overlap_chunks=C``
``torchtitan``          torchtitan's ``MoE`` (``TokenChoiceTopKRouter`` + ``AllToAllTokenDispatcher`` +
                        ``GroupedExperts``), dropless
``deepspeed``           DeepSpeed's ``deepspeed.moe.layer.MoE`` (GShard-style ``TopKGate``), capacity factor 1.0:
                        it drops the pairs over capacity
``megatron-style``      ours, in plain ``torch.distributed``: Megatron-Core's dropless all-to-all dispatcher
                        (:class:`MegatronStyleMoE`)
``megatron-core``       Megatron-Core's ``MoEAlltoAllTokenDispatcher``: constructed, to name why it cannot run here
=====================  ======================================================================================

The same for every impl: SwiGLU experts of hidden ``M`` and FFN ``F``, ``E`` experts, top-``K``, ``T`` tokens per rank,
expert compute in ``--dtype``. The gate weight ``[E, M]`` (fp32) and each expert's weights are the ones a hiermoe
``MoELayer`` built with the same seed has, and every gate is softmax over ``E`` in fp32, top-``K``, renormalised: the
dropless impls route every token to the same experts (DeepSpeed then drops some), so their bytes compare one to one.

Shape suffixes: ``T`` tokens of this rank, ``K`` top-k, ``N = T*K`` pairs, ``E`` experts, ``e = E / G`` local experts,
``G`` ranks, ``R`` rows this rank's experts receive, ``M`` hidden, ``F`` FFN hidden.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import sys
import time
import types
import warnings
from dataclasses import dataclass
from importlib import metadata
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from ..dispatch.spec import validate_dispatch
from ..experts import _normal, derive_seed, init_expert_weights
from ..topology import Topology

__all__ = ["ImplSpec", "LayerShape", "LayerImpl", "BuiltLayer", "parse_impls", "make_impl", "IMPL_KINDS",
           "PEERS_INSTALL", "link_bytes", "gate_weight", "route_top_k", "permute_by_expert", "expert_major_order",
           "deepspeed_capacity", "kept_pairs", "CommClock", "CollectiveTimer", "MegatronStyleMoE"]

HIERMOE, TORCHTITAN, DEEPSPEED, MEGATRON_STYLE, MEGATRON_CORE = (
    "hiermoe", "torchtitan", "deepspeed", "megatron-style", "megatron-core")
IMPL_KINDS = (HIERMOE, TORCHTITAN, DEEPSPEED, MEGATRON_STYLE, MEGATRON_CORE)
PEERS_INSTALL = "pip install 'hiermoe-lightning[peers]'"
OVERLAP = "overlap"
DEEPSPEED_CAPACITY_FACTOR = 1.0
DEEPSPEED_MIN_CAPACITY = 4  # deepspeed.moe.layer.MoE's default
TORCHTITAN_SPMD_BACKEND = "partial_dtensor"
_ALLOWED = ("hiermoe:<dispatch>[:overlap=<C>] (dispatch: flat, 2dh, hd1..hd<levels>, auto), torchtitan, deepspeed, "
            "megatron-style, megatron-core")


# ---------------------------------------------------------------------------- what to run (pure)
@dataclass(frozen=True)
class ImplSpec:
    """One ``--impl`` entry: ``name`` as the report shows it, ``kind`` (one of :data:`IMPL_KINDS`), and for
    ``hiermoe`` its ``dispatch`` and ``overlap_chunks`` (None: not given, so not passed to ``ExpertParallel``)."""

    name: str
    kind: str
    dispatch: str | None = None
    overlap_chunks: int | None = None


@dataclass(frozen=True)
class LayerShape:
    """The layer every impl builds: ``E`` experts of SwiGLU ``M -> F -> M``, top-``K``, ``T`` tokens per rank, expert
    compute in ``dtype``; ``seed`` draws the gate and the experts (the same values for every impl)."""

    hidden_size: int
    ffn_hidden_size: int
    num_experts: int
    top_k: int
    tokens_per_rank: int
    dtype: torch.dtype
    seed: int = 0

    @property
    def row_bytes(self) -> int:
        """Bytes of one token row ``[M]`` in ``dtype``: what every impl's all-to-all carries per row."""
        return self.hidden_size * torch.empty((), dtype=self.dtype).element_size()

    @property
    def dtype_name(self) -> str:
        return {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(self.dtype, str(self.dtype))


def _impl_error(text: str, why: str) -> ValueError:
    return ValueError(f"--impl {text!r}: {why}; allowed: {_ALLOWED}, comma-separated")


def _parse_hiermoe(entry: str, text: str, num_levels: int) -> ImplSpec:
    parts = entry.split(":")
    if len(parts) < 2 or not parts[1]:
        raise _impl_error(text, f"{entry!r} needs a dispatch, e.g. 'hiermoe:flat' or 'hiermoe:auto'")
    try:
        dispatch = validate_dispatch(parts[1], num_levels)
    except (TypeError, ValueError) as e:
        raise _impl_error(text, f"{entry!r}: {e}") from None
    overlap = None
    for option in parts[2:]:
        key, sep, value = option.partition("=")
        if key != OVERLAP or not sep or overlap is not None:
            raise _impl_error(text, f"{entry!r}: unknown or repeated option {option!r} (only overlap=<C>)")
        if not value.isdigit() or int(value) < 1:
            raise _impl_error(text, f"{entry!r}: overlap must be an integer >= 1, got {value!r}")
        overlap = int(value)
    name = f"{HIERMOE}:{dispatch}" + (f":{OVERLAP}={overlap}" if overlap is not None else "")
    return ImplSpec(name, HIERMOE, dispatch, overlap)


def parse_impls(text: object, num_levels: int) -> list[ImplSpec]:
    """``"hiermoe:auto,hiermoe:flat,torchtitan"`` -> the specs, in order, duplicates dropped; dispatch values are
    checked for a ``num_levels``-level topology. Bad input raises ValueError/TypeError naming ``--impl`` and the
    allowed values (the parent calls this before any rank starts)."""
    if not isinstance(text, str):
        raise TypeError(f"--impl must be a comma-separated string, got {text!r}")
    entries = [e.strip() for e in text.split(",")]
    if not any(entries) or any(not e for e in entries):
        raise _impl_error(text, "an entry is empty")
    specs: dict[str, ImplSpec] = {}
    for entry in entries:
        kind = entry.split(":")[0]
        if kind == HIERMOE:
            spec = _parse_hiermoe(entry, text, num_levels)
        elif kind in IMPL_KINDS and entry == kind:
            spec = ImplSpec(kind, kind)
        else:
            raise _impl_error(text, f"{entry!r} is not an impl")
        specs.setdefault(spec.name, spec)
    return list(specs.values())


# ---------------------------------------------------------------------------- bytes, routing, capacity (pure)
def link_bytes(rank: int, send_rows: Sequence[int], recv_rows: Sequence[int], row_bytes: int,
               topology: Topology) -> dict[str, int]:
    """Payload bytes rank ``rank`` moves off-rank in one forward: ``send_rows[p]`` rows to rank ``p`` in the dispatch
    and, in the combine, the ``recv_rows[p]`` rows it got from ``p`` back to ``p``; ``{"inter": level-1 links
    (between top-level groups: nodes), "intra": deeper levels}``. Summed over ranks this counts every row once per
    direction, as ``DispatchHandle.bytes_by_level`` does."""
    out = {"inter": 0, "intra": 0}
    for peer, (s, r) in enumerate(zip(send_rows, recv_rows)):
        level = topology.link_level(rank, peer)
        if level:
            out["inter" if level == 1 else "intra"] += (int(s) + int(r)) * row_bytes
    return out


def levels_to_links(bytes_by_level: dict[str, int]) -> dict[str, int]:
    """hiermoe's ``{"level1": b1, "level2": b2, ...}`` -> ``{"inter": b1, "intra": b2 + ...}``."""
    return {"inter": int(bytes_by_level.get("level1", 0)),
            "intra": int(sum(v for k, v in bytes_by_level.items() if k != "level1"))}


def gate_weight(shape: LayerShape) -> torch.Tensor:
    """``[E, M]`` fp32: the router weight of a hiermoe ``MoELayer`` built with ``shape.seed`` (every impl's gate)."""
    m, e = shape.hidden_size, shape.num_experts
    return _normal((e, m), m**-0.5, derive_seed(shape.seed, "router"), torch.float32, "cpu")


def local_expert_weights(shape: LayerShape, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Experts ``first .. first+count-1`` as ``(w_gate [e, M, F], w_up [e, M, F], w_down [e, F, M])`` in
    ``shape.dtype``: hiermoe's per-expert seeds, so every impl holds the same experts."""
    weights = [init_expert_weights(shape.seed, first + i, shape.hidden_size, shape.ffn_hidden_size, shape.dtype)
               for i in range(count)]
    return tuple(torch.stack([w[j] for w in weights]) for j in range(3))


def route_top_k(x_TM: torch.Tensor, gate_EM: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the ``E`` experts of fp32 logits, top-``K``, renormalised: ``(weights_TK fp32, expert_ids_TK)``.
    Differentiable in ``x`` and the gate (through the weights)."""
    probs_TE = (x_TM.float() @ gate_EM.float().t()).softmax(dim=-1)
    weights_TK, ids_TK = probs_TE.topk(top_k, dim=-1)
    return weights_TK / weights_TK.sum(dim=-1, keepdim=True), ids_TK


def permute_by_expert(expert_ids_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order_N, tokens_per_expert_E)``: the flat pair indices sorted by expert (stable, so by token inside one
    expert; pair ``n`` is token ``n // K``) and the pairs per expert. With experts placed contiguously (rank ``g``
    holds ``g*e .. g*e+e-1``) the sorted pairs are grouped by destination rank too."""
    flat_N = expert_ids_TK.reshape(-1)
    return torch.argsort(flat_N, stable=True), torch.bincount(flat_N, minlength=num_experts)


def expert_major_order(counts_Ge: torch.Tensor) -> torch.Tensor:
    """Rows arrive rank-major (source rank, then local expert: ``counts_Ge[g, i]`` rows of local expert ``i`` from
    rank ``g``); the ``[R]`` permutation that lists them expert-major (local expert, then source rank), as the
    grouped expert compute wants them."""
    ranks, local = counts_Ge.shape
    expert_of_row = torch.arange(local).repeat(ranks).repeat_interleave(counts_Ge.reshape(-1).cpu())
    return torch.argsort(expert_of_row, stable=True).to(counts_Ge.device)


def deepspeed_capacity(tokens: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int) -> int:
    """Slots per expert of DeepSpeed's gate, ``max(ceil(T / E * capacity_factor * K), min_capacity)``
    (``deepspeed.moe.sharded_moe._capacity``): each expert keeps at most this many pairs, and the all-to-all carries
    exactly this many rows per expert, padding included."""
    return max(math.ceil(tokens * capacity_factor * top_k / num_experts), min_capacity)


def kept_pairs(tokens_per_expert_E: torch.Tensor, capacity: int) -> int:
    """Pairs a capacity-``capacity`` gate keeps: each expert serves ``min(routed, capacity)``."""
    return int(tokens_per_expert_E.clamp(max=capacity).sum())


# ---------------------------------------------------------------------------- timing collectives
class CommClock:
    """Seconds spent inside collectives; ``with clock:`` adds the block's wall time."""

    def __init__(self):
        self.seconds = 0.0
        self._start = 0.0

    def __enter__(self) -> "CommClock":
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds += time.perf_counter() - self._start


class _Timed:
    """``original`` (a function or an op packet) with its calls timed into ``clock``; every attribute (an op's
    ``.default`` overload, which torch's own code compares against) is the original's."""

    def __init__(self, original, clock: CommClock):
        self._original, self._clock = original, clock

    def __call__(self, *args, **kwargs):
        with self._clock:
            return self._original(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._original, name)


class CollectiveTimer:
    """While active (``with``), adds the wall time of every all-to-all a peer makes through torch's entry points to
    ``clock``: ``torch.distributed.all_to_all_single`` (DeepSpeed's ``_AllToAll``, forward and backward) and the
    functional ``torch.ops._c10d_functional.all_to_all_single`` + ``wait_tensor`` (torchtitan's dispatcher and the
    backward torch registers for it). Posting plus waiting: the time a rank waits for slower peers is included.
    Patched in this (rank) process only, and put back on exit."""

    def __init__(self, clock: CommClock):
        self.clock = clock
        self._saved: list[tuple[object, str, object]] = []

    def _wrap(self, owner: object, name: str) -> None:
        original = getattr(owner, name)
        self._saved.append((owner, name, original))
        setattr(owner, name, _Timed(original, self.clock))

    def __enter__(self) -> "CollectiveTimer":
        self._wrap(dist, "all_to_all_single")
        functional = torch.ops._c10d_functional
        for name in ("all_to_all_single", "wait_tensor"):
            self._wrap(functional, name)
        return self

    def __exit__(self, *exc) -> None:
        while self._saved:
            owner, name, original = self._saved.pop()
            setattr(owner, name, original)


# ---------------------------------------------------------------------------- megatron-style (collectives)
def _exchange_rows(rows: torch.Tensor, send: list[int], recv: list[int], group, clock: CommClock) -> torch.Tensor:
    """One ``all_to_all_single`` with unequal splits: ``send[p]`` rows of ``rows`` to rank ``p``; returns the
    ``sum(recv)`` rows received, rank-major."""
    out = rows.new_empty((sum(recv), *rows.shape[1:]))
    with clock:
        dist.all_to_all_single(out, rows.contiguous(), recv, send, group=group)
    return out


class _AllToAllRows(torch.autograd.Function):
    """Differentiable :func:`_exchange_rows`: the backward is the same exchange with the splits swapped."""

    @staticmethod
    def forward(ctx, rows, send, recv, group, clock):
        ctx.send, ctx.recv, ctx.group, ctx.clock = send, recv, group, clock
        return _exchange_rows(rows, send, recv, group, clock)

    @staticmethod
    def backward(ctx, grad):
        return _exchange_rows(grad, ctx.recv, ctx.send, ctx.group, ctx.clock), None, None, None, None


def grouped_swiglu(rows_RM: torch.Tensor, rows_per_expert: Sequence[int], w_gate: torch.Tensor, w_up: torch.Tensor,
                   w_down: torch.Tensor) -> torch.Tensor:
    """``rows_RM`` grouped by local expert (``rows_per_expert[i]`` rows for expert ``i``) -> each row through its
    expert's SwiGLU, ``[R, M]``. Loops over the local experts, never over rows; with no row at all the result stays
    connected to the rows and weights, so this rank's backward still runs its exchanges (its peers wait for them)."""
    outs = []
    for i, chunk in enumerate(torch.split(rows_RM, list(rows_per_expert))):
        if chunk.shape[0]:
            outs.append((F.silu(chunk @ w_gate[i]) * (chunk @ w_up[i])) @ w_down[i])
    if not outs:
        return rows_RM * 0 + 0 * (w_gate.sum() + w_up.sum() + w_down.sum())
    return torch.cat(outs)


class MegatronStyleMoE(nn.Module):
    """Megatron-Core's dropless all-to-all MoE, in plain ``torch.distributed`` (it runs on gloo; Megatron-Core's own
    dispatcher needs CUDA): its own softmax top-``K`` gate; permute the pairs by expert; exchange the per-expert
    counts (``all_to_all_single``); exchange the rows (``all_to_all_single`` with unequal splits); sort them by local
    expert; SwiGLU experts; the reverse; the exchange back; unpermute and sum with the router weights (applied after
    the experts, as Megatron's unpermute does). Rank ``g`` holds experts ``g*e .. g*e+e-1``. Every exchange is
    differentiable and timed into ``clock``.

    ``forward(x_TM)`` -> ``[T, M]`` in ``x``'s dtype. ``last_splits``: the rows this rank sent to / received from
    each rank in the last dispatch.
    """

    def __init__(self, shape: LayerShape, rank: int, world: int, group=None, clock: CommClock | None = None):
        super().__init__()
        if shape.num_experts % world:
            raise ValueError(f"num_experts ({shape.num_experts}) must be divisible by the {world} ranks")
        self.shape, self.world, self.group = shape, world, group
        self.local = shape.num_experts // world
        self.clock = clock if clock is not None else CommClock()
        self.gate = nn.Parameter(gate_weight(shape))  # [E, M] fp32
        w_gate, w_up, w_down = local_expert_weights(shape, rank * self.local, self.local)
        self.w_gate, self.w_up, self.w_down = nn.Parameter(w_gate), nn.Parameter(w_up), nn.Parameter(w_down)
        self.last_splits: tuple[list[int], list[int]] = ([], [])

    def _exchange_counts(self, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """``[G, e]``: how many rows of each local expert every rank sends here."""
        send = tokens_per_expert_E.view(self.world, self.local).contiguous()
        recv = torch.empty_like(send)
        with self.clock:
            dist.all_to_all_single(recv, send, group=self.group)
        return recv

    def forward(self, x_TM: torch.Tensor) -> torch.Tensor:
        top_k = self.shape.top_k
        weights_TK, ids_TK = route_top_k(x_TM, self.gate, top_k)
        order_N, per_expert_E = permute_by_expert(ids_TK, self.shape.num_experts)
        token_N = order_N // top_k
        counts_Ge = self._exchange_counts(per_expert_E)
        send = per_expert_E.view(self.world, self.local).sum(1).tolist()
        recv = counts_Ge.sum(1).tolist()
        self.last_splits = (send, recv)
        arrived_RM = _AllToAllRows.apply(x_TM[token_N], send, recv, self.group, self.clock)
        perm_R = expert_major_order(counts_Ge)
        y_RM = grouped_swiglu(arrived_RM[perm_R], counts_Ge.sum(0).tolist(), self.w_gate, self.w_up, self.w_down)
        y_RM = y_RM[torch.argsort(perm_R)]  # back to rank-major
        back_NM = _AllToAllRows.apply(y_RM, recv, send, self.group, self.clock)
        scaled_NM = back_NM.float() * weights_TK.reshape(-1)[order_N].unsqueeze(1)
        out_TM = torch.zeros(x_TM.shape, dtype=torch.float32, device=x_TM.device).index_add(0, token_N, scaled_NM)
        return out_TM.to(x_TM.dtype)


# ---------------------------------------------------------------------------- the adapters
class BuiltLayer:
    """One impl built on one rank. ``module``: its parameters (for ``zero_grad``); :meth:`forward` ``[T, M] ->
    [T, M]``; :meth:`timing` is entered around the timed steps; :meth:`start_step` before each step;
    :meth:`comm_seconds` the step's time inside collectives (None: not measurable); :meth:`bytes_last_step` the last
    forward's payload (dispatch + combine, this rank's sends) as ``{"inter", "intra"}``; :meth:`extra` more facts."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.clock = CommClock()

    def forward(self, x_TM: torch.Tensor) -> torch.Tensor:
        return self.module(x_TM)

    def timing(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def start_step(self) -> None:
        self.clock.seconds = 0.0

    def comm_seconds(self) -> float | None:
        return self.clock.seconds

    def bytes_last_step(self) -> dict[str, int]:
        raise NotImplementedError

    def extra(self) -> dict:
        return {}


class LayerImpl:
    """An impl of the comparison. Subclasses set ``kind``, ``dist_name`` (the distribution whose version is reported)
    and implement :meth:`settings` and :meth:`build`."""

    kind = ""
    dist_name = ""

    def __init__(self, spec: ImplSpec):
        self.spec = spec

    @property
    def name(self) -> str:
        return self.spec.name

    def version(self) -> str | None:
        """``"<distribution> <version>"``, or None when it is not installed."""
        try:
            return f"{self.dist_name} {metadata.version(self.dist_name)}"
        except metadata.PackageNotFoundError:
            return None

    def unavailable(self) -> str | None:
        """Why this impl cannot run here (checked in the parent, nothing imported), or None."""
        if self.version() is None:
            return f"{self.kind} is not installed ({PEERS_INSTALL})"
        return None

    def settings(self, shape: LayerShape) -> dict:
        raise NotImplementedError

    def build(self, rank: int, world: int, topology: Topology, shape: LayerShape) -> BuiltLayer:
        raise NotImplementedError


# ---- hiermoe
class _BuiltHierMoE(BuiltLayer):
    @override
    def comm_seconds(self) -> float | None:
        return self.module.last_handle.comm_seconds

    @override
    def bytes_last_step(self) -> dict[str, int]:
        return levels_to_links(self.module.last_handle.bytes_by_level())

    @override
    def extra(self) -> dict:
        return {"dispatch_resolved": self.module.last_handle.dispatch}


class HierMoEImpl(LayerImpl):
    kind, dist_name = HIERMOE, "hiermoe-lightning"

    @override
    def version(self) -> str | None:
        from ..cli.main import _version

        return f"{self.dist_name} {_version()}"

    @override
    def unavailable(self) -> str | None:
        return None  # this package: always here

    @override
    def settings(self, shape: LayerShape) -> dict:
        out = {"layer": "hiermoe_lightning.MoELayer sharded by ExpertParallel", "dispatch": self.spec.dispatch,
               "gate": "Router: softmax over E of fp32 logits, top-k, renormalised (norm_topk_prob=True)",
               "capacity_factor": None, "dropless": True, "expert_dtype": shape.dtype_name,
               "experts": "ExpertBank: SwiGLU per local slot, looped over slots", "aux_loss_coef": 0.0}
        if self.spec.dispatch == "auto":
            out["link_costs"] = "paper-a6000 (ExpertParallel's default)"
        if self.spec.overlap_chunks is not None:
            out["overlap_chunks"] = self.spec.overlap_chunks
        return out

    @override
    def build(self, rank: int, world: int, topology: Topology, shape: LayerShape) -> BuiltLayer:
        from ..layer import MoELayer
        from ..parallel import ExpertParallel

        layer = MoELayer(shape.hidden_size, shape.ffn_hidden_size, shape.num_experts, shape.top_k, seed=shape.seed,
                         dtype=shape.dtype, aux_loss_coef=0.0)
        ExpertParallel(str(topology), dispatch=self.spec.dispatch,
                       overlap_chunks=self.spec.overlap_chunks or 1).shard_(layer)
        return _BuiltHierMoE(layer)


# ---- megatron-style
class _BuiltMegatronStyle(BuiltLayer):
    def __init__(self, module: MegatronStyleMoE, rank: int, topology: Topology):
        super().__init__(module)
        self.clock = module.clock
        self.rank, self.topology = rank, topology

    @override
    def bytes_last_step(self) -> dict[str, int]:
        send, recv = self.module.last_splits
        return link_bytes(self.rank, send, recv, self.module.shape.row_bytes, self.topology)


class MegatronStyleImpl(LayerImpl):
    kind, dist_name = MEGATRON_STYLE, "hiermoe-lightning"

    @override
    def version(self) -> str | None:
        return HierMoEImpl.version(self) + " (hiermoe_lightning.bench.peers.MegatronStyleMoE)"

    @override
    def unavailable(self) -> str | None:
        return None

    @override
    def settings(self, shape: LayerShape) -> dict:
        return {"layer": "MegatronStyleMoE (Megatron-Core's dropless all-to-all dispatcher, plain torch.distributed)",
                "dispatcher": "per-expert counts by all_to_all_single, then the permuted rows by all_to_all_single "
                              "with unequal splits; reverse for the combine",
                "gate": "softmax over E of fp32 logits, top-k, renormalised; weights applied after the experts",
                "capacity_factor": None, "dropless": True, "expert_dtype": shape.dtype_name,
                "experts": "SwiGLU per local expert, looped over local experts"}

    @override
    def build(self, rank: int, world: int, topology: Topology, shape: LayerShape) -> BuiltLayer:
        return _BuiltMegatronStyle(MegatronStyleMoE(shape, rank, world), rank, topology)


# ---- torchtitan
def _stub_torchtitan_kernels() -> None:
    """torchtitan's token dispatcher module imports ``minimal_async_ep.kernels``, which imports triton (GPU only).
    Where triton is missing, a stand-in module takes its place: any kernel it is asked for raises (the all-to-all
    dispatcher used here never asks)."""
    name = "torchtitan.distributed.minimal_async_ep.kernels"
    if name in sys.modules or importlib.util.find_spec("triton") is not None:
        return
    stub = types.ModuleType(name)

    def missing(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)

        def kernel(*args, **kwargs):
            raise RuntimeError(f"{name}.{attr} needs triton, which is not installed (stand-in module)")

        return kernel

    stub.__getattr__ = missing
    sys.modules[name] = stub


class _BuiltTorchTitan(BuiltLayer):
    def __init__(self, module: nn.Module, dispatcher, rank: int, topology: Topology, shape: LayerShape):
        super().__init__(module)
        self.dispatcher, self.rank, self.topology, self.shape = dispatcher, rank, topology, shape

    @override
    def forward(self, x_TM: torch.Tensor) -> torch.Tensor:
        return self.module(x_TM.unsqueeze(0)).squeeze(0)  # torchtitan's MoE takes [B, L, D]

    @override
    def timing(self) -> contextlib.AbstractContextManager:
        return CollectiveTimer(self.clock)

    @override
    def bytes_last_step(self) -> dict[str, int]:
        send, recv = self.dispatcher.last_splits
        return link_bytes(self.rank, send, recv, self.shape.row_bytes, self.topology)


def _torchtitan_classes(compute_dtype: torch.dtype):
    """torchtitan's classes, and two subclasses: experts that compute in ``compute_dtype`` (torchtitan's
    ``GroupedExperts.forward`` casts to bf16; the same three grouped matmuls, through its ``_grouped_mm`` seam) and an
    all-to-all dispatcher that remembers its last splits."""
    _stub_torchtitan_kernels()
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.moe import GroupedExperts, MoE, RoutedExperts, TokenChoiceTopKRouter
    from torchtitan.models.common.token_dispatcher import AllToAllTokenDispatcher

    class ExpertsInDtype(GroupedExperts):
        @override
        def forward(self, x_RD: torch.Tensor, num_tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
            offsets_E = torch.cumsum(num_tokens_per_expert_E, dim=0, dtype=torch.int32)
            x = x_RD.to(compute_dtype)
            w1, w2, w3 = (w.to(compute_dtype) for w in (self.w1_EFD, self.w2_EDF, self.w3_EFD))
            h_RF = F.silu(self._grouped_mm(A=x, B_t=w1.transpose(-2, -1), offs=offsets_E))
            h_RF = h_RF * self._grouped_mm(A=x, B_t=w3.transpose(-2, -1), offs=offsets_E)
            return self._grouped_mm(A=h_RF, B_t=w2.transpose(-2, -1), offs=offsets_E).type_as(x_RD)

    class RecordingDispatcher(AllToAllTokenDispatcher):
        last_splits: tuple = ([], [])

        @override
        def dispatch(self, *args, **kwargs):
            out = super().dispatch(*args, **kwargs)
            self.last_splits = (list(out[2].input_splits), list(out[2].output_splits))
            return out

    return types.SimpleNamespace(Linear=Linear, GroupedExperts=GroupedExperts, MoE=MoE, RoutedExperts=RoutedExperts,
                                 Router=TokenChoiceTopKRouter, Dispatcher=AllToAllTokenDispatcher,
                                 ExpertsInDtype=ExpertsInDtype, RecordingDispatcher=RecordingDispatcher)


class TorchTitanImpl(LayerImpl):
    kind, dist_name = TORCHTITAN, "torchtitan"

    @override
    def settings(self, shape: LayerShape) -> dict:
        return {"layer": "torchtitan.models.common.moe.MoE",
                "dispatcher": "AllToAllTokenDispatcher (EP over all ranks, ep mesh from init_device_mesh('cpu'))",
                "spmd_backend": f"{TORCHTITAN_SPMD_BACKEND} (the default spmd_types exchanges the rows with "
                                f"dist.all_to_all over a list of tensors, which gloo rejects for unequal sizes)",
                "gate": "TokenChoiceTopKRouter(score_func='softmax', route_norm=True): fp32 logits (the gate's input "
                        "cast to fp32, as its autocast does on GPUs), top-k, renormalised",
                "load_balance_coeff": None, "capacity_factor": None, "dropless": True,
                "expert_dtype": shape.dtype_name,
                "experts": "GroupedExperts (torch._grouped_mm); torchtitan computes them in bf16 as shipped, here "
                           f"in --dtype ({shape.dtype_name})",
                "triton": "kernels module stubbed where triton is missing (not used by this dispatcher)"}

    @override
    def build(self, rank: int, world: int, topology: Topology, shape: LayerShape) -> BuiltLayer:
        from torch.distributed.device_mesh import init_device_mesh

        tt = _torchtitan_classes(shape.dtype)
        import torchtitan.distributed.utils as tt_dist

        tt_dist.set_spmd_backend(TORCHTITAN_SPMD_BACKEND)
        e, m, f, k = shape.num_experts, shape.hidden_size, shape.ffn_hidden_size, shape.top_k
        local = e // world
        experts_cfg = tt.GroupedExperts.Config(dim=m, hidden_dim=f, num_experts=local)
        config = tt.MoE.Config(
            num_experts=e, load_balance_coeff=None,
            routed_experts=tt.RoutedExperts.Config(inner_experts=experts_cfg,
                                                   token_dispatcher=tt.Dispatcher.Config(num_experts=e, top_k=k)),
            router=tt.Router.Config(num_experts=e, gate=tt.Linear.Config(in_features=m, out_features=e), top_k=k,
                                    score_func="softmax", route_norm=True))
        moe = config.build()
        routed = moe.routed_experts
        routed.inner_experts = tt.ExpertsInDtype(experts_cfg)
        routed.token_dispatcher = tt.RecordingDispatcher(tt.Dispatcher.Config(num_experts=e, top_k=k))
        routed.token_dispatcher.wire_meshes(ep_mesh=init_device_mesh("cpu", (world,), mesh_dim_names=("ep",)))
        self._load_weights(moe, shape, rank * local, local)
        moe.router.gate.register_forward_pre_hook(lambda module, args: (args[0].float(),))
        return _BuiltTorchTitan(moe, routed.token_dispatcher, rank, topology, shape)

    @staticmethod
    @torch.no_grad()
    def _load_weights(moe: nn.Module, shape: LayerShape, first: int, local: int) -> None:
        """The shared gate and experts: w1 = w_gate^T ``[e, F, M]``, w3 = w_up^T, w2 = w_down^T ``[e, M, F]``."""
        moe.router.gate.weight.copy_(gate_weight(shape))
        w_gate, w_up, w_down = local_expert_weights(shape, first, local)
        experts = moe.routed_experts.inner_experts
        for name, w in (("w1_EFD", w_gate), ("w3_EFD", w_up), ("w2_EDF", w_down)):
            setattr(experts, name, nn.Parameter(w.transpose(-2, -1).contiguous()))


# ---- deepspeed
class _SwiGLU(nn.Module):
    """One expert for DeepSpeed's ``Experts`` (which deep-copies it per local expert): ``[..., M] -> [..., M]``."""

    def __init__(self, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor):
        super().__init__()
        self.w_gate, self.w_up, self.w_down = nn.Parameter(w_gate), nn.Parameter(w_up), nn.Parameter(w_down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.silu(x @ self.w_gate) * (x @ self.w_up)) @ self.w_down


class _BuiltDeepSpeed(BuiltLayer):
    def __init__(self, module: nn.Module, rank: int, topology: Topology, shape: LayerShape):
        super().__init__(module)
        self.rank, self.topology, self.shape = rank, topology, shape
        self.capacity = deepspeed_capacity(shape.tokens_per_rank, shape.num_experts, shape.top_k,
                                           DEEPSPEED_CAPACITY_FACTOR, DEEPSPEED_MIN_CAPACITY)

    @override
    def forward(self, x_TM: torch.Tensor) -> torch.Tensor:
        return self.module(x_TM)[0]  # (output, l_aux, exp_counts)

    @override
    def timing(self) -> contextlib.AbstractContextManager:
        return CollectiveTimer(self.clock)

    @override
    def bytes_last_step(self) -> dict[str, int]:
        """Every rank sends ``e * capacity`` rows (kept pairs and zero padding) to every rank, and gets as many."""
        world = self.topology.world_size
        rows = [self.shape.num_experts // world * self.capacity] * world
        return link_bytes(self.rank, rows, rows, self.shape.row_bytes, self.topology)

    @override
    def extra(self) -> dict:
        counts_E = self.module.deepspeed_moe.exp_counts  # pairs routed per expert before the capacity cut
        pairs = self.shape.tokens_per_rank * self.shape.top_k
        return {"capacity": self.capacity, "pairs": pairs, "kept_pairs": kept_pairs(counts_E, self.capacity)}


class DeepSpeedImpl(LayerImpl):
    kind, dist_name = DEEPSPEED, "deepspeed"

    @override
    def settings(self, shape: LayerShape) -> dict:
        capacity = deepspeed_capacity(shape.tokens_per_rank, shape.num_experts, shape.top_k,
                                      DEEPSPEED_CAPACITY_FACTOR, DEEPSPEED_MIN_CAPACITY)
        gating = {1: "top1gating", 2: "top2gating"}.get(shape.top_k, "topkgating")
        return {"layer": "deepspeed.moe.layer.MoE (MOELayer + TopKGate + Experts)", "ep_size": "all ranks",
                "gate": f"TopKGate ({gating}): fp32 logits, softmax over E, top-k, weights renormalised over the "
                        f"kept experts; use_rts=False, top2_2nd_expert_sampling=False, noisy_gate_policy=None",
                "capacity_factor": DEEPSPEED_CAPACITY_FACTOR, "min_capacity": DEEPSPEED_MIN_CAPACITY,
                "capacity_per_expert": capacity, "drop_tokens": True, "drop_policy": "probs", "dropless": False,
                "expert_dtype": shape.dtype_name,
                "experts": "deepspeed Experts: one SwiGLU module per local expert, run one after another",
                "dispatch": "all_to_all_single of [E, capacity, M] (padded, equal splits), both ways",
                "setup": "DS_ACCELERATOR=cpu in the rank, deepspeed.init_distributed('gloo') wraps the existing "
                         "process group (its TorchBackend JIT-builds DeepSpeed's shared-memory all-reduce op once, "
                         "cached under ~/.cache/torch_extensions; the MoE layer does not use it)"}

    @override
    def build(self, rank: int, world: int, topology: Topology, shape: LayerShape) -> BuiltLayer:
        os.environ["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's own convention; this forked rank's environment only
        import deepspeed
        from deepspeed.moe.layer import MoE

        _quiet_deepspeed()
        deepspeed.init_distributed("gloo")  # needed: deepspeed.comm's backend is None until then
        e = shape.num_experts
        w_gate, w_up, w_down = local_expert_weights(shape, 0, 1)
        # Experts deep-copies the template per local expert; each copy then gets its own expert's weights
        moe = MoE(shape.hidden_size, _SwiGLU(w_gate[0], w_up[0], w_down[0]), num_experts=e, ep_size=world,
                  k=shape.top_k, capacity_factor=DEEPSPEED_CAPACITY_FACTOR, min_capacity=DEEPSPEED_MIN_CAPACITY,
                  drop_tokens=True, use_rts=False, top2_2nd_expert_sampling=False)
        moe.set_deepspeed_parallelism()
        self._load_weights(moe, shape, rank * (e // world), e // world)
        return _BuiltDeepSpeed(moe, rank, topology, shape)

    @staticmethod
    @torch.no_grad()
    def _load_weights(moe: nn.Module, shape: LayerShape, first: int, local: int) -> None:
        moe.deepspeed_moe.gate.wg.weight.copy_(gate_weight(shape))
        w_gate, w_up, w_down = local_expert_weights(shape, first, local)
        for i, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            expert.w_gate.copy_(w_gate[i])
            expert.w_up.copy_(w_up[i])
            expert.w_down.copy_(w_down[i])


def _quiet_deepspeed() -> None:
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


# ---- megatron-core (needs CUDA: constructed to name its error)
class MegatronCoreImpl(LayerImpl):
    kind, dist_name = MEGATRON_CORE, "megatron-core"

    @override
    def settings(self, shape: LayerShape) -> dict:
        return {"dispatcher": "megatron.core.transformer.moe.token_dispatcher.MoEAlltoAllTokenDispatcher",
                "config": f"TransformerConfig(num_moe_experts={shape.num_experts}, moe_router_topk={shape.top_k}, "
                          f"moe_ffn_hidden_size={shape.ffn_hidden_size}, moe_token_dispatcher_type='alltoall', "
                          f"use_cpu_initialization=True)",
                "groups": "ep = all ranks, expt_tp = each rank alone"}

    @override
    def build(self, rank: int, world: int, topology: Topology, shape: LayerShape) -> BuiltLayer:
        from megatron.core.process_groups_config import ProcessGroupCollection
        from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
        from megatron.core.transformer.transformer_config import TransformerConfig

        alone = [dist.new_group([r]) for r in range(world)][rank]  # every rank creates every group, in order
        config = TransformerConfig(num_layers=1, hidden_size=shape.hidden_size, num_attention_heads=1,
                                   num_moe_experts=shape.num_experts, moe_router_topk=shape.top_k,
                                   moe_ffn_hidden_size=shape.ffn_hidden_size, moe_token_dispatcher_type="alltoall",
                                   use_cpu_initialization=True)
        groups = ProcessGroupCollection(ep=dist.group.WORLD, expt_tp=alone, tp_ep=dist.group.WORLD)
        local = shape.num_experts // world
        MoEAlltoAllTokenDispatcher(local, list(range(rank * local, (rank + 1) * local)), config, pg_collection=groups)
        raise RuntimeError("MoEAlltoAllTokenDispatcher was built, but this comparison has no Megatron-Core layer to "
                           "run it in")


_IMPLS = {HIERMOE: HierMoEImpl, TORCHTITAN: TorchTitanImpl, DEEPSPEED: DeepSpeedImpl,
          MEGATRON_STYLE: MegatronStyleImpl, MEGATRON_CORE: MegatronCoreImpl}


def make_impl(spec: ImplSpec) -> LayerImpl:
    """The adapter of ``spec.kind``."""
    return _IMPLS[spec.kind](spec)


@contextlib.contextmanager
def quiet_peers() -> Iterator[None]:
    """In a rank: the warnings peers print on CPU (autocast to fp32, missing Apex/Transformer Engine) silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*autocast.*")
        warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
        warnings.filterwarnings("ignore", category=UserWarning, module="megatron.*")
        yield
