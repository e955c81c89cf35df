"""Migration executor: move whole experts between ranks in place (weights, gradients, optimizer state).

Two phases, so a failure leaves the old placement and weights intact:

1. *stage*: for every layer and every slot tensor (``w_gate``, ``w_up``, ``w_down``, their gradients when present, the
   optimizer's per-parameter state with a slot dimension: Adam/AdamW ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``,
   SGD ``momentum_buffer``), build the tensor's new contents with one all-to-all over the expert-parallel world.
   Split sizes follow from the old and the new placement, which every rank knows, so sender and receiver agree by
   construction. Nothing is modified.
2. *commit*: copy the staged contents into the existing tensors (``Tensor.copy_``: the optimizer keeps its Parameter
   objects and state tensors) and switch each layer to its new placement.

The two phases may lie apart in time (:func:`start_migration`): the payload leaves at once, and the commit waits until
something needs the experts, the first forward of a migrating layer, a ``state_dict``, a checkpoint, the next plan
(:meth:`MigrationInFlight.settle`, reached through :meth:`~hiermoe_lightning.parallel.ExpertParallel.settle_migration`).
Training's work in between (the rest of the step's callbacks, loading the next batch, the layers before the first
migrating one) runs while the experts travel: on gloo in its own threads, on NCCL on its stream. :func:`migrate_` is
both phases at once.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..dispatch.comm import start_exchange
from .placement import Placement

__all__ = ["migrate_", "start_migration", "MigrationInFlight", "MigrationStats", "SUPPORTED_OPTIMIZERS",
           "check_optimizer", "expert_state_bytes", "settle_migrations"]

SUPPORTED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)
_SLOT_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


@dataclass
class MigrationStats:
    moved_experts: int  # experts whose rank changed (summed over layers)
    bytes_sent: int  # payload bytes this rank sent
    seconds: float  # wall time from the start to the commit (training ran in between when the two lay apart)
    exposed_seconds: float | None = None  # of it, the time the caller was held: posting, waiting, committing

    def __post_init__(self):
        if self.exposed_seconds is None:  # both phases at once: all of it was exposed
            self.exposed_seconds = self.seconds


def _inner(optimizer):
    return getattr(optimizer, "_optimizer", optimizer)  # unwrap a LightningOptimizer


def check_optimizer(optimizer) -> None:
    """Raise ``ValueError`` for an optimizer whose per-expert state the executor cannot move."""
    if optimizer is None:
        return
    inner = _inner(optimizer)
    if not isinstance(inner, SUPPORTED_OPTIMIZERS):
        raise ValueError(
            f"optimizer {type(inner).__name__} is not supported by the expert migration (its per-expert state could "
            f"not be moved); supported: {', '.join(o.__name__ for o in SUPPORTED_OPTIMIZERS)}"
        )
    for state in inner.state.values():
        unknown = set(state) - set(_SLOT_STATE_KEYS) - {"step"}
        if unknown:
            raise ValueError(f"optimizer state keys {sorted(unknown)} are unknown to the expert migration")


def expert_state_bytes(layer, optimizer=None) -> int:
    """Bytes one expert's migration moves: weights, gradients (when present) and optimizer state."""
    total = 0
    for p in layer.experts.slot_parameters():
        per_slot = p[0].numel() * p.element_size()
        total += per_slot
        if p.grad is not None:
            total += per_slot
        if optimizer is not None:
            for key in _SLOT_STATE_KEYS:
                t = _inner(optimizer).state.get(p, {}).get(key)
                if isinstance(t, torch.Tensor) and t.dim() > 0:
                    total += t[0].numel() * t.element_size()
    return total


def _slot_tensors(layer, optimizer) -> list[torch.Tensor]:
    """Every tensor of the layer whose first dimension is the slot, in a fixed order (the same on every rank)."""
    out = []
    for p in layer.experts.slot_parameters():
        out.append(p.data)
        if p.grad is not None:
            out.append(p.grad)
        if optimizer is not None:
            state = _inner(optimizer).state.get(p, {})
            for key in _SLOT_STATE_KEYS:
                t = state.get(key)
                if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == p.shape[0]:
                    out.append(t)
    return out


def _moves(old: Placement, new: Placement, rank: int):
    """Index plans for one rank: which local slots leave (ordered by destination, then new slot), which slots the
    arrivals fill (ordered by source, then new slot), and local slot-to-slot moves."""
    E = old.num_experts
    experts = torch.arange(E)
    leaving = experts[(old.expert_to_rank == rank) & (new.expert_to_rank != rank)]
    leaving = leaving[torch.argsort(new.expert_to_rank[leaving] * E + new.expert_to_slot[leaving])]
    arriving = experts[(new.expert_to_rank == rank) & (old.expert_to_rank != rank)]
    arriving = arriving[torch.argsort(old.expert_to_rank[arriving] * E + new.expert_to_slot[arriving])]
    staying = experts[(old.expert_to_rank == rank) & (new.expert_to_rank == rank)]
    G = old.world_size
    return {
        "send_slots": old.expert_to_slot[leaving],
        "send_splits": torch.bincount(new.expert_to_rank[leaving], minlength=G).tolist(),
        "recv_slots": new.expert_to_slot[arriving],
        "recv_splits": torch.bincount(old.expert_to_rank[arriving], minlength=G).tolist(),
        "stay_from": old.expert_to_slot[staying],
        "stay_to": new.expert_to_slot[staying],
        "moved": int((old.expert_to_rank != new.expert_to_rank).sum()),
    }


def _check_consistent_presence(layers, optimizer, group) -> None:
    """Gradient / optimizer-state presence decides the payload layout: it must be the same on every rank."""
    counts = torch.tensor([len(_slot_tensors(layer, optimizer)) for layer in layers], dtype=torch.long)
    both = torch.cat([counts, -counts])  # max and -min in one collective
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(both[:len(layers)], -both[len(layers):]):
        raise ValueError("expert migration: ranks disagree on which gradients / optimizer states exist; "
                         "migrate after the optimizer step on every rank alike")


def _post_packed(pieces: list[tuple[torch.Tensor, list[int], list[int]]], peers):
    """Post every piece ``(rows [n, ...], send_splits, recv_splits)`` (rows grouped by destination peer) in ONE
    exchange: per dtype one flat payload ordered by peer, then piece, posted together (one latency, where one
    all-to-all per tensor cost a latency each: 24 in the demo's migration). Returns the pending exchange and the
    pieces of each payload, for :func:`_unpack_packed`. The payloads are copies: the pieces' tensors may change
    once this returns."""
    G = len(pieces[0][1])
    widths = [math.prod(x.shape[1:]) for x, _, _ in pieces]
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, (x, _, _) in enumerate(pieces):
        by_dtype.setdefault(x.dtype, []).append(i)
    payloads = []
    for idx in by_dtype.values():
        starts = {i: 0 for i in idx}
        parts, send, recv = [], [0] * G, [0] * G
        for p in range(G):
            for i in idx:
                x, s, r = pieces[i]
                parts.append(x[starts[i]: starts[i] + s[p]].reshape(-1))
                starts[i] += s[p]
                send[p] += s[p] * widths[i]
                recv[p] += r[p] * widths[i]
        payloads.append((torch.cat(parts), send, recv))
    return start_exchange(payloads, peers), list(by_dtype.values())


def _unpack_packed(received: list[torch.Tensor], groups: list[list[int]], pieces) -> list[torch.Tensor]:
    """The flat payloads :func:`_post_packed` received -> per piece the rows it receives ``[sum(recv_splits),
    ...]``, grouped by source peer."""
    G = len(pieces[0][1])
    out: list[torch.Tensor | None] = [None] * len(pieces)
    for idx, flat in zip(groups, received):
        chunks: dict[int, list[torch.Tensor]] = {i: [] for i in idx}
        pos = 0
        for p in range(G):
            for i in idx:
                x, _, recv = pieces[i]
                n = recv[p] * math.prod(x.shape[1:])
                chunks[i].append(flat[pos: pos + n])
                pos += n
        for i in idx:
            out[i] = torch.cat(chunks[i]).reshape(-1, *pieces[i][0].shape[1:])
    return out  # type: ignore[return-value]


def _exchange_packed(pieces: list[tuple[torch.Tensor, list[int], list[int]]], peers) -> list[torch.Tensor]:
    """Each piece ``(rows [n, ...], send_splits, recv_splits)`` -> the rows it receives, all pieces in one exchange
    (:func:`_post_packed`, then :func:`_unpack_packed`)."""
    if not pieces:
        return []
    pending, groups = _post_packed(pieces, peers)
    return _unpack_packed(pending.wait(), groups, pieces)


class MigrationInFlight:
    """A migration whose payload has left and whose commit waits (:func:`start_migration`).

    Until :meth:`settle`, nothing of the model has changed: the layers keep their old placement, weights, gradients
    and optimizer state (a layer must not be trained, nor its optimizer stepped, before it is settled; its forward
    settles it). :meth:`settle` waits for the exchange, commits every layer and returns the
    :class:`MigrationStats`; it is collective (every rank settles one migration at the same point of its program),
    and later calls return the same stats. If the exchange fails, the old placement stays and the error is raised."""

    def __init__(self, layers, new_placements, pending, groups, pieces, places, moved: int, sent: int,
                 started: float, exposed: float):
        self.layers, self.new_placements = list(layers), list(new_placements)
        self._pending, self._groups, self._pieces, self._places = pending, groups, pieces, places
        self._moved, self._sent, self._started, self._exposed = moved, sent, started, exposed
        self.stats: MigrationStats | None = None
        self._failed: str | None = None

    @property
    def settled(self) -> bool:
        return self.stats is not None

    def placement_after(self, layer):
        """The placement ``layer`` has once this settles (its current one if this migration does not move it)."""
        for moving, target in zip(self.layers, self.new_placements):
            if moving is layer:
                return target
        return layer.placement

    @property
    def start_seconds(self) -> float:
        """The time :func:`start_migration` took (staging and posting): the part of the migration on the step that
        started it."""
        return self._exposed

    def abandon(self) -> None:
        """Give up without waiting (a peer may be gone): the old placement, weights and optimizer state stay; a later
        :meth:`settle` raises. No-op once settled."""
        if self.stats is not None or self._failed is not None:
            return
        self._failed = "abandoned after an error elsewhere"
        self._release()

    def _release(self) -> None:
        """No longer the migration in flight of the layers' ExpertParallel; the staged buffers are dropped."""
        ep = self.layers[0].expert_parallel if self.layers else None
        if ep is not None and ep.migration_in_flight is self:
            ep.migration_in_flight = None
        self._pending = self._pieces = self._places = None

    @torch.no_grad()
    def settle(self) -> MigrationStats:
        if self.stats is not None:
            return self.stats
        if self._failed is not None:
            raise RuntimeError(f"this expert migration failed earlier ({self._failed}); the old placement stayed")
        start = time.perf_counter()
        try:
            received = self._pending.wait() if self._pending is not None else []
            incoming = _unpack_packed(received, self._groups, self._pieces) if self._pieces else []
        except BaseException as e:
            self._failed = f"{type(e).__name__}: {e}"
            raise
        else:
            # commit: nothing before this line modified the model; only the slots whose expert changes are written
            for (tensor, targets, stay), got in zip(self._places, incoming):
                tensor[targets] = torch.cat([got, stay])
            for layer, new in zip(self.layers, self.new_placements):
                layer.set_placement(new)
        finally:
            self._release()
        end = time.perf_counter()
        self.stats = MigrationStats(self._moved, self._sent, end - self._started, self._exposed + end - start)
        return self.stats


def _check_migration(layers, new_placements, optimizer):
    """The expert parallel the layers share; a ValueError for anything :func:`start_migration` cannot do."""
    if len(layers) != len(new_placements):
        raise ValueError(f"migrate_ got {len(layers)} layers but {len(new_placements)} placements")
    check_optimizer(optimizer)
    if not layers:
        return None
    ep = layers[0].expert_parallel
    for layer, new in zip(layers, new_placements):
        if layer.expert_parallel is not ep or ep is None:
            raise ValueError("migrate_ needs layers sharded by one ExpertParallel")
        if not isinstance(new, Placement) or new.num_experts != layer.num_experts or new.world_size != ep.world_size:
            raise ValueError(
                f"new placement must be a Placement of {layer.num_experts} experts on {ep.world_size} ranks"
            )
    return ep


@torch.no_grad()
def start_migration(layers, new_placements, optimizer=None) -> MigrationInFlight:
    """Stage a migration and post its payload, without waiting or changing anything; collective over the
    expert-parallel world. ``layers[i]`` is to follow ``new_placements[i]`` once the returned
    :class:`MigrationInFlight` settles: explicitly, or through ``ExpertParallel.settle_migration()``, which every
    forward of the layers, their ``state_dict`` and the strategy's checkpoints call. One migration may be in flight
    per ExpertParallel: a second start settles the first."""
    start = time.perf_counter()
    ep = _check_migration(layers, new_placements, optimizer)
    if ep is None:
        return MigrationInFlight([], [], None, [], [], [], 0, 0, start, 0.0)
    ep.settle_migration()
    peers = ep.peer_group("a2a")
    _check_consistent_presence(layers, optimizer, peers.group)

    moved, sent, pieces, places = 0, 0, [], []
    for layer, new in zip(layers, new_placements):
        plan = _moves(layer.placement, new, ep.rank)
        moved += plan["moved"]
        shifted = plan["stay_from"] != plan["stay_to"]  # experts that stay on this rank but change slot
        targets = torch.cat([plan["recv_slots"], plan["stay_to"][shifted]])
        for tensor in _slot_tensors(layer, optimizer):
            outgoing = tensor[plan["send_slots"]]
            pieces.append((outgoing, plan["send_splits"], plan["recv_splits"]))
            places.append((tensor, targets, tensor[plan["stay_from"][shifted]]))  # stay: a copy, taken now
            sent += outgoing.numel() * outgoing.element_size()
    pending, groups = _post_packed(pieces, peers) if pieces else (None, [])  # every layer's every tensor at once
    flight = MigrationInFlight(layers, new_placements, pending, groups, pieces, places, moved, sent, start,
                               time.perf_counter() - start)
    ep.migration_in_flight = flight
    return flight


def migrate_(layers, new_placements, optimizer=None) -> MigrationStats:
    """Move experts so that ``layers[i]`` follows ``new_placements[i]``; collective over the expert-parallel world.

    All layers must be sharded by the same ExpertParallel. The optimizer (if given) keeps its Parameter objects;
    only slot contents change. On any error before the commit, nothing has changed. Both phases at once:
    :func:`start_migration`, then :meth:`MigrationInFlight.settle`.
    """
    return start_migration(layers, new_placements, optimizer).settle()


def settle_migrations(module) -> None:
    """Settle the migration in flight of every ExpertParallel sharding a layer of ``module`` (collective)."""
    seen = set()
    for m in module.modules():
        ep = getattr(m, "expert_parallel", None)
        if ep is not None and id(ep) not in seen and hasattr(ep, "settle_migration"):
            seen.add(id(ep))
            ep.settle_migration()
