"""ExpertParallel: the process groups of every phase, and ``shard_`` which turns MoELayers expert-parallel."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

import torch
import torch.distributed as dist
from torch import nn

from .cost.link_costs import LinkCosts
from .dispatch.comm import PeerGroup
from .dispatch.dispatcher import HopDispatcher
from .dispatch.engine import PhaseRoute, Route, validate_overlap_chunks, validate_pipeline_chunks
from .dispatch.transport import Transport, probe_group
from .dispatch.spec import parse_dispatch, phase_groups, phase_next_rank, phase_peer_index, validate_dispatch
from .layer import MoELayer
from .placement import Placement
from .replicas import Replicas
from .topology import Topology
from .validation import check_flag, check_positive_int

if TYPE_CHECKING:
    from .placement.migrate import MigrationInFlight

__all__ = ["ExpertParallel", "PendingRoutings", "fold_replicas", "pack_routings", "unpack_routings"]


def pack_routings(samples: list[torch.Tensor], rows_per_rank: int) -> torch.Tensor:
    """Several routings ``[T_i, K_i]`` (each ``T_i <= rows_per_rank``) -> one fixed-size int64 tensor
    ``[1 + rows_per_rank, sum K_i]``: routing ``i`` owns columns ``c_i .. c_i + K_i - 1``; row 0 holds ``T_i`` in
    column ``c_i`` (the rest of row 0 is ``-1``), rows ``1 .. T_i`` its ids, and the rows below are ``-1``.

    Its size depends only on ``rows_per_rank`` and the ``K_i``, so when every rank agrees on those (the same MoE
    layers everywhere) the ranks can gather it without first exchanging counts (:func:`unpack_routings` undoes it).
    """
    if isinstance(rows_per_rank, bool) or not isinstance(rows_per_rank, int) or rows_per_rank < 0:
        raise ValueError(f"rows_per_rank must be an int >= 0, got {rows_per_rank!r}")
    ids = [s.detach().to("cpu", torch.long) for s in samples]
    for i, s in enumerate(ids):
        if s.dim() != 2 or s.shape[1] < 1:
            raise ValueError(f"routing {i} must have shape [tokens, top_k >= 1], got {list(s.shape)}")
        if s.shape[0] > rows_per_rank:
            raise ValueError(f"routing {i} has {s.shape[0]} tokens, more than rows_per_rank={rows_per_rank}")
    widths = [s.shape[1] for s in ids]
    packed = torch.full((1 + rows_per_rank, sum(widths)), -1, dtype=torch.long)
    col = 0
    for s, w in zip(ids, widths):
        packed[0, col] = s.shape[0]
        packed[1: 1 + s.shape[0], col: col + w] = s
        col += w
    return packed


def unpack_routings(gathered: torch.Tensor, widths: list[int]) -> list[torch.Tensor]:
    """Every rank's :func:`pack_routings` output stacked, ``[G, 1 + rows, sum K_i]`` -> ``[G, max_r T_r_i, K_i]`` per
    routing (rank ``r``'s ``T_r_i`` ids first, ``-1`` below): exactly what :meth:`ExpertParallel.gather_routings`
    returns for the same routings."""
    if gathered.dim() != 3 or gathered.shape[1] < 1 or gathered.shape[2] != sum(widths):
        raise ValueError(f"gathered routings must have shape [G, 1 + rows, {sum(widths)}], got {list(gathered.shape)}")
    if not widths:
        return []
    starts = torch.tensor([0] + widths[:-1], dtype=torch.long).cumsum(0)
    counts = gathered[:, 0, starts]  # [G, L]
    rows = gathered.shape[1] - 1
    if counts.numel() and (int(counts.min()) < 0 or int(counts.max()) > rows):
        raise ValueError(f"gathered routing counts must be in 0..{rows}, got {counts.tolist()}")
    longest = counts.max(dim=0).values.tolist()
    return [gathered[:, 1: 1 + n, c: c + w].contiguous() for n, c, w in zip(longest, starts.tolist(), widths)]


class PendingRoutings:
    """A routing gather in flight (:meth:`ExpertParallel.start_gather_routings`): :meth:`wait` completes it and
    returns the routings ``[G, max_r T_r_i, K_i]``; later calls return the same list.

    Waiting needs nothing from the other ranks' main threads (each posted the same gather, which gloo runs on its
    worker threads), so it may happen at a different point on each rank; dropping an unwaited handle is safe too.
    """

    def __init__(self, work, parts: list[torch.Tensor], widths: list[int], replicas: int = 1):
        self._work, self._parts, self._widths, self._replicas = work, parts, widths, replicas
        self._result: list[torch.Tensor] | None = None

    def wait(self) -> list[torch.Tensor]:
        if self._result is None:
            if self._work is not None:
                self._work.wait()
            self._result = [fold_replicas(r, self._replicas)
                            for r in unpack_routings(torch.stack(self._parts), self._widths)]
            self._work = self._parts = None
        return self._result


def fold_replicas(routing: torch.Tensor, replicas: int) -> torch.Tensor:
    """Every rank's routing ``[R * G, T, K]`` (replica-major: global rank ``k * G + g``) -> ``[G, R * T, K]``: the
    tokens of expert-parallel rank ``g`` of every replica, as if one rank had routed them all (the traffic and the
    load every replica's rank ``g`` puts on the network, summed). One replica: unchanged."""
    if replicas == 1:
        return routing
    world, tokens, k = routing.shape
    return routing.reshape(replicas, world // replicas, tokens, k).transpose(0, 1).reshape(
        world // replicas, replicas * tokens, k).contiguous()


class ExpertParallel:
    """Expert parallelism over ``group`` (default: the whole world) laid out as ``topology``.

    Construction is collective over the ranks of ``group`` (with ``replicas``: over the world): it creates one process
    group per phase group (own groups, never the default one, so DDP's gradient all-reduce can't interleave with the
    all-to-alls). Every argument is
    checked on every rank before the first collective, so bad input fails everywhere instead of hanging.

    Args:
        topology: ``"2x2"``, a list of sizes or a Topology; None = one level over the whole group.
        dispatch: ``"flat" | "2dh" | "hd1" .. "hd<D>" | "auto"``.
        link_costs: preset name, YAML path or LinkCosts (used by ``auto`` and the statistics), or ``"calibrate"``:
            fit them on the live process groups right after they are created (collective, a few seconds).
        group: the process group of the expert-parallel ranks; None = the default group.
        verify_splits: before every payload, check collectively that senders and receivers agree on split sizes
            (a debugging aid: gloo itself does not check, and a mismatch silently corrupts data or aborts).
        auto_interval: with ``dispatch="auto"``, each layer re-chooses its depth every ``auto_interval`` training
            forwards (and at its first forward) from the routing of that forward, gathered from every rank.
        pipeline_chunks: split each dispatch's tokens into this many chunks and run their hops as a software
            pipeline, so one chunk's fast intra-node hop and local copies overlap the next chunk's slow inter-node
            transfer (1 = no pipelining; 2-4 pays off when the inter-node link dominates; results are identical).
        shared_memory: between ranks on one host (same boot, pid and network namespace: checked collectively here)
            of a gloo group, move CPU payloads through shared memory instead of the loopback socket (one copy in,
            one copy out; :mod:`~hiermoe_lightning.dispatch.shm`). False = always through the process group.
            Results are identical either way.
        transport: None (default: each group's transport follows its facts, :func:`~hiermoe_lightning.dispatch.
            transport.transport_for`), or a callable ``transport(peers: PeerGroup) -> Transport`` called once per
            phase group at setup (``peers.transport`` is the default one, to wrap or replace): the seam for another
            way of moving rows (:mod:`~hiermoe_lightning.dispatch.transport`).
        overlap_chunks: > 1 runs each layer's dispatch, experts and combine as one pipeline of this many token chunks
            (:mod:`~hiermoe_lightning.dispatch.overlap`): a chunk's experts compute while other chunks' rows travel,
            forward and backward (1 = off; results equal, up to the order of floating-point sums). It takes the
            place of ``pipeline_chunks`` where both are set. ``"auto"``: each layer chooses its count with the cost
            model (:mod:`~hiermoe_lightning.cost.overlap`) from the predicted communication of its dispatch and the
            slowest rank's measured expert compute, at its second training forward and every ``auto_interval``
            after (:meth:`choose_overlap`).
        replicas: None (one replica: ``group`` is all there is), or a :class:`~hiermoe_lightning.replicas.Replicas`
            whose ``expert_group`` is ``group`` (None: taken from it): the routing gathers behind ``auto`` and the swap
            planner then see every replica's tokens (folded per expert-parallel rank, :func:`fold_replicas`), and
            :meth:`all_gather_object` returns the first replica's objects everywhere, so every replica makes the same
            choices and keeps the same placement.
    """

    def __init__(self, topology=None, dispatch: str = "auto", link_costs="paper-a6000", group=None, *,
                 verify_splits: bool = False, auto_interval: int = 50, pipeline_chunks: int = 1,
                 shared_memory: bool = True, transport: "Callable[[PeerGroup], Transport] | None" = None,
                 replicas: "Replicas | None" = None, overlap_chunks: "int | str" = 1):
        check_positive_int(auto_interval, "auto_interval")
        if replicas is not None and not isinstance(replicas, Replicas):
            raise TypeError(f"replicas must be None or a hiermoe_lightning.replicas.Replicas, got {replicas!r}")
        if replicas is not None and replicas.num_replicas > 1:
            if group is not None and group is not replicas.expert_group:
                raise ValueError("group must be None or replicas.expert_group when replicas are given")
            group = replicas.expert_group
        self.replicas = replicas if replicas is not None and replicas.num_replicas > 1 else None
        if transport is not None and not callable(transport):
            raise TypeError(f"transport must be None or a callable (PeerGroup) -> Transport, got {transport!r}")
        self._transport_factory = transport
        self.shared_memory = check_flag(shared_memory, "shared_memory")
        self.pipeline_chunks = validate_pipeline_chunks(pipeline_chunks)
        self.overlap_chunks = validate_overlap_chunks(overlap_chunks)
        self.auto_interval = auto_interval
        topo = Topology.parse(topology) if topology is not None else None
        validate_dispatch(dispatch, topo.num_levels if topo is not None else 1)
        calibrate = isinstance(link_costs, str) and link_costs == "calibrate"
        self.link_costs = None if calibrate else LinkCosts.resolve(link_costs)
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ExpertParallel needs torch.distributed initialised (init_process_group) first")
        ranks = list(dist.get_process_group_ranks(group)) if group is not None else list(range(dist.get_world_size()))
        if topo is None:
            topo = Topology([len(ranks)])
        if topo.world_size != len(ranks):
            raise ValueError(
                f"topology {topo} has world size {topo.world_size} but the process group has {len(ranks)} ranks"
            )
        if dispatch == "auto" and not calibrate:
            from .dispatch.spec import dispatch_names

            self.link_costs.require(p for name in dispatch_names(topo.num_levels) if name.startswith("hd")
                                    for p in parse_dispatch(name, topo.num_levels).phases)
        if self.overlap_chunks == "auto" and dispatch != "auto" and not calibrate:
            self.link_costs.require(parse_dispatch(dispatch, topo.num_levels).phases)
        self.topology, self.dispatch, self.global_ranks = topo, dispatch, ranks
        self.verify_splits = bool(verify_splits)
        self.rank = ranks.index(dist.get_rank())
        self.world_size = len(ranks)
        self._transports: dict[tuple[int, ...], Transport] = {}
        self._peer_groups = self._build_groups(group is not None and len(ranks) != dist.get_world_size())
        self._routes: dict[tuple, tuple[Placement, Route]] = {}  # (dispatch, id(placement)) -> (placement, route)
        # the expert migration whose payload has left and whose commit waits (placement.migrate.start_migration)
        self.migration_in_flight: "MigrationInFlight | None" = None
        if calibrate:
            self.link_costs = LinkCosts.calibrate(self)

    def settle_migration(self) -> None:
        """Commit the expert migration in flight, if any (collective: it waits for the migration's exchange). Every
        forward of a layer this shards calls it first, and so do its ``state_dict``, the strategy's checkpoints and
        the swap callback's next plan: nothing reads the experts half-moved."""
        if self.migration_in_flight is not None:
            self.migration_in_flight.settle()

    # ------------------------------------------------------------------ process groups
    def _build_groups(self, local_sync: bool) -> dict[str, PeerGroup]:
        phases = ["a2a"] + [f"{k}{i}" for i in range(1, self.topology.num_levels) for k in ("inter", "intra")]
        made: dict[tuple[int, ...], "dist.ProcessGroup | None"] = {}
        facts: dict[tuple[int, ...], tuple] = {}  # members -> (receive_first, shared-memory channel)
        out: dict[str, PeerGroup] = {}
        for phase in phases:
            for members in phase_groups(self.topology, phase):
                key = tuple(members)
                if key not in made:
                    if len(members) == 1:
                        made[key] = None
                    elif local_sync:
                        made[key] = (dist.new_group([self.global_ranks[m] for m in members], use_local_synchronization=True)
                                     if self.rank in members else None)
                    else:
                        made[key] = dist.new_group([self.global_ranks[m] for m in members])
                if self.rank in members:
                    pg = made[key]
                    if key not in facts:  # collective over the group's members, in the same order everywhere
                        facts[key] = probe_group(pg, len(members), members.index(self.rank), self.shared_memory)
                    out[phase] = self._with_transport(PeerGroup(
                        pg, len(members), members.index(self.rank), key, tuple(self.global_ranks[m] for m in members),
                        *facts[key]))
        return out

    def _with_transport(self, peers: PeerGroup) -> PeerGroup:
        """``peers`` with the user's transport, when one was given (once per group object: phases that share a
        group share it)."""
        if self._transport_factory is None or peers.is_local:
            return peers
        made = self._transports.get(peers.ranks)
        if made is None:
            made = self._transports[peers.ranks] = self._transport_factory(peers)
            if not isinstance(made, Transport):
                raise TypeError(f"transport(peers) must return a Transport (name, tags_per_exchange, max_payloads, "
                                f"max_in_flight, counts_ride_along, start), got {type(made).__name__}")
        return dataclasses.replace(peers, custom_transport=made)

    def peer_group(self, phase: str) -> PeerGroup:
        return self._peer_groups[phase]

    # ------------------------------------------------------------------ routes
    def route(self, dispatch: str, placement: Placement, device: "torch.device | str" = "cpu") -> Route:
        """The route of a concrete ``dispatch`` for ``placement`` on this rank, its tables on ``device`` (cached per
        dispatch, placement object and device, so a GPU forward never copies them)."""
        device = torch.device(device)
        key = (dispatch, id(placement), device)
        cached = self._routes.get(key)
        if cached is not None and cached[0] is placement:
            return cached[1]
        route = self.build_route(dispatch, placement, device)
        self._routes[key] = (placement, route)
        return route

    def build_route(self, dispatch: str, placement: Placement, device: "torch.device | str" = "cpu") -> Route:
        spec = parse_dispatch(dispatch, self.topology.num_levels)
        phases = []
        here = torch.tensor(self.rank)
        for phase in spec.phases:
            peers = self._peer_groups[phase]
            if peers.is_local:
                continue
            nxt = phase_next_rank(self.topology, phase, here.expand_as(placement.expert_to_rank), placement.expert_to_rank)
            peer_of_expert = phase_peer_index(self.topology, phase, nxt).to(device)
            levels = tuple(self.topology.link_level(self.rank, r) for r in peers.ranks)
            phases.append(PhaseRoute(phase, peers, peer_of_expert, levels))
        return Route(spec, tuple(phases), self.topology.num_levels, self.verify_splits, self.pipeline_chunks)

    # ------------------------------------------------------------------ dispatch="auto"
    def gather_routing(self, expert_ids: torch.Tensor) -> torch.Tensor:
        """Every rank's ``[T_r, K]`` expert ids -> ``[G, max T, K]`` (``-1`` padding), identical on every rank."""
        return self.gather_routings([expert_ids])[0]

    def gather_routings(self, expert_ids: list[torch.Tensor]) -> list[torch.Tensor]:
        """Several routings at once (e.g. one per MoE layer): ``[T_r_i, K_i]`` each -> ``[G, max_r T_r_i, K_i]`` each,
        exactly what :meth:`gather_routing` returns for it, with two ``all_gather``s in all instead of two per
        routing: the largest token count first, then :meth:`start_gather_routings` sized by it."""
        count = torch.tensor([max((e.shape[0] for e in expert_ids), default=0)], dtype=torch.long)
        group, size = self._gather_group()
        if size > 1:
            counts = [torch.zeros_like(count) for _ in range(size)]
            dist.all_gather(counts, count, group=group)
            count = torch.stack(counts).max()
        return self.start_gather_routings(expert_ids, int(count)).wait()

    def start_gather_routings(self, expert_ids: list[torch.Tensor], rows_per_rank: int) -> PendingRoutings:
        """Asynchronous, fixed-size :meth:`gather_routings` for routings of at most ``rows_per_rank`` tokens each
        (``[T_r_i, K_i]``): ONE ``all_gather`` of :func:`pack_routings` (``[1 + rows_per_rank, sum K_i]``, the counts
        travel in row 0), posted with ``async_op=True``; the handle's ``wait()`` gives exactly what
        :meth:`gather_routings` gives. Collective over the ``a2a`` group: every rank must post it with the same
        ``rows_per_rank``, the same number of routings and the same ``K_i``, in the same order relative to the other
        collectives on that group. One rank: nothing to exchange."""
        packed = pack_routings(expert_ids, rows_per_rank)
        widths = [e.shape[1] for e in expert_ids]
        group, size = self._gather_group()
        if size == 1:
            return PendingRoutings(None, [packed], widths)
        parts = [torch.empty_like(packed) for _ in range(size)]
        work = dist.all_gather(parts, packed, group=group, async_op=True)
        return PendingRoutings(work, parts, widths, self.num_replicas)

    def all_gather_object(self, obj) -> list:
        """Every expert-parallel rank's picklable ``obj``, in rank order (collective over the ``a2a`` group, or the
        world with replicas, where every replica gets the *first* replica's objects; one rank: ``[obj]`` without a
        collective). Used to share results computed on one rank, e.g. a layer's swap plan."""
        group, size = self._gather_group()
        if size == 1:
            return [obj]
        out = [None] * size
        dist.all_gather_object(out, obj, group=group)
        return out[: self.world_size]

    @property
    def num_replicas(self) -> int:
        return 1 if self.replicas is None else self.replicas.num_replicas

    @property
    def replica_index(self) -> int:
        """This rank's replica (0 without replicas); only the first replica's plans are used."""
        return 0 if self.replicas is None else self.replicas.index

    def _gather_group(self) -> tuple:
        """(group, size) of the gathers every replica must agree on: the world with replicas, else ``a2a``."""
        if self.replicas is not None:
            return self.replicas.everyone, self.replicas.layout.world_size
        return self._peer_groups["a2a"].group, self.world_size

    def choose_dispatch(self, layer: MoELayer, expert_ids: torch.Tensor) -> str:
        """Collective: predict every ``hd<d>`` on the live routing of all ranks and pick the fastest (same on all)."""
        names = [f"hd{d}" for d in range(1, self.topology.num_levels + 1)]
        pred = self._predict(layer, expert_ids, names, self.pipeline_chunks)
        layer.auto_predictions = {name: pred.dispatch[name].predicted_ms for name in names}
        return pred.chosen

    def _predict(self, layer: MoELayer, expert_ids: torch.Tensor, names: list[str], pipeline_chunks: int = 1):
        """Collective: the cost model's prediction of the dispatches ``names`` for ``layer`` on the live routing of
        every rank (the same on every rank)."""
        from .cost.model import predict

        routing = self.gather_routing(expert_ids)
        element = torch.empty((), dtype=layer.experts.w_gate.dtype).element_size()
        return predict(self.topology, layer.placement, routing, layer.hidden_size, element, self.link_costs, names,
                       pipeline_chunks=pipeline_chunks)

    def choose_overlap(self, layer: MoELayer, expert_ids: torch.Tensor, dispatch: str, compute_ms: float) -> int:
        """Collective: the chunk count of ``layer`` (:func:`~hiermoe_lightning.cost.overlap.choose_overlap_chunks`):
        the cost model's time of ``dispatch`` on the live routing of every rank (dispatch and combine, forward and
        backward: 4 x the one-way prediction) against the slowest rank's expert compute ``compute_ms`` (forward and
        backward of the last step), the same on every rank."""
        from .cost.overlap import choose_overlap_chunks, chunk_overhead_ms

        pred = self._predict(layer, expert_ids, [dispatch])
        slowest = torch.tensor([float(compute_ms)], dtype=torch.float64)
        group, size = self._gather_group()
        if size > 1:
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
        overhead = chunk_overhead_ms(self.link_costs, parse_dispatch(dispatch, self.topology.num_levels).phases)
        return choose_overlap_chunks(4 * pred.dispatch[dispatch].predicted_ms, float(slowest), overhead)

    def refresh_auto(self, module: nn.Module) -> None:
        """Force every ``auto`` layer to re-choose at its next forward (e.g. after a placement change)."""
        for m in module.modules():
            if isinstance(m, MoELayer) and m.expert_parallel is self and self.dispatch == "auto":
                m.auto_calls = 0

    # ------------------------------------------------------------------ sharding
    def shard_(self, module: nn.Module, device: "torch.device | str | None" = None) -> nn.Module:
        """In place: every MoELayer inside keeps only this rank's experts (contiguous placement) and routes with the
        chosen dispatch (a :class:`~hiermoe_lightning.dispatch.dispatcher.HopDispatcher`). Checks every layer before
        changing any.

        A layer built on the meta device (``MoELayer(..., device="meta")`` or inside ``with torch.device("meta")``)
        is materialised on ``device`` (None: the current default device, the CPU under a meta default): only this
        rank's experts are allocated, each drawn from its own seed, plus the layer's router, shared experts and
        buffers, all with exactly the values of a normal build. Layers built normally are sharded as before."""
        layers = [(name, m) for name, m in module.named_modules() if isinstance(m, MoELayer)]
        for name, layer in layers:
            if layer.is_sharded:
                raise ValueError(f"MoELayer {name or '<root>'} is already sharded")
            if layer.num_experts % self.world_size != 0:
                raise ValueError(
                    f"num_experts ({layer.num_experts}) of MoELayer {name or '<root>'} must be divisible by the "
                    f"expert-parallel world size ({self.world_size})"
                )
        for _, layer in layers:
            with torch.device("cpu"):  # placements are host metadata (also under a meta default device)
                placement = Placement.contiguous(layer.num_experts, self.world_size)
            layer.become_expert_parallel(self, placement, HopDispatcher(layer, self), device=device)
        return module
