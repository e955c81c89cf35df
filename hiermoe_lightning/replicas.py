"""Expert parallelism inside data parallelism: the world as replicas of one expert-parallel group.

With ``expert_parallel_size = E`` on ``W`` ranks there are ``R = W // E`` replicas of consecutive ranks (rank ``r`` is
in replica ``r // E``, at expert-parallel rank ``r % E``, Megatron-Core's and DeepSpeed's ``ep_size`` convention).
Every replica holds every expert once, sharded with the same placement; the ``R`` ranks that hold the same experts
(same expert-parallel rank, one per replica) are this rank's *copies*. Dense parameters stay data-parallel over all
``W`` ranks. Why it still trains like one process: each expert's gradient in replica ``k`` is the sum over replica
``k``'s tokens scaled by ``1 / E`` (the strategy's hook); the mean over the ``R`` copies is then the sum over every
token scaled by ``1 / W``, which is what DDP's mean gives the dense parameters.

:class:`ReplicaLayout` is pure arithmetic (validated before any collective); :func:`build_replicas` creates the process
groups (collective over the world); :func:`average_over_copies_` is the one bucketed all-reduce per optimizer step.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Optional

import torch
import torch.distributed as dist

__all__ = ["ReplicaLayout", "Replicas", "average_over_copies_", "build_replicas", "default_replica_topology"]


@dataclasses.dataclass(frozen=True)
class ReplicaLayout:
    """``world_size`` ranks as ``world_size // expert_parallel_size`` replicas of consecutive ranks."""

    world_size: int
    expert_parallel_size: int

    @classmethod
    def resolve(cls, expert_parallel_size: Optional[int], world_size: int) -> "ReplicaLayout":
        """The layout for ``expert_parallel_size`` (None: the whole world) on ``world_size`` ranks; a size that does
        not divide the world is a ValueError naming ``expert_parallel_size`` (the same on every rank)."""
        if expert_parallel_size is None:
            return cls(world_size, world_size)
        check_expert_parallel_size(expert_parallel_size)
        if world_size % expert_parallel_size != 0:
            divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
            raise ValueError(f"expert_parallel_size={expert_parallel_size} must divide the world size ({world_size} "
                             f"ranks): one of {divisors}, or None for the whole world")
        return cls(world_size, expert_parallel_size)

    @property
    def num_replicas(self) -> int:
        return self.world_size // self.expert_parallel_size

    def replica_of(self, rank: int) -> int:
        return rank // self.expert_parallel_size

    def expert_parallel_ranks(self, replica: int) -> list[int]:
        """The global ranks of one replica, in expert-parallel rank order."""
        start = replica * self.expert_parallel_size
        return list(range(start, start + self.expert_parallel_size))

    def copies_of(self, expert_parallel_rank: int) -> list[int]:
        """The global ranks holding the experts of ``expert_parallel_rank``, one per replica."""
        return list(range(expert_parallel_rank, self.world_size, self.expert_parallel_size))


def check_expert_parallel_size(value) -> Optional[int]:
    """None or an int >= 1 (TypeError / ValueError naming ``expert_parallel_size``)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expert_parallel_size must be None (the whole world) or an int >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"expert_parallel_size must be None (the whole world) or an int >= 1, got {value!r}")
    return value


def default_replica_topology(expert_parallel_size: int, devices_per_node: int) -> str:
    """The topology of one replica when none is given: ``f"{E // devices}x{devices}"`` when ``E`` is a multiple of
    the devices per node (a replica spans whole nodes), else one level of ``E`` ranks (it fits inside one node)."""
    if expert_parallel_size % devices_per_node == 0:
        return f"{expert_parallel_size // devices_per_node}x{devices_per_node}"
    return str(expert_parallel_size)


@dataclasses.dataclass
class Replicas:
    """This rank's place among the replicas and the groups it talks over.

    Attributes:
        layout: the :class:`ReplicaLayout`.
        index: this rank's replica.
        expert_group: this replica's ranks (the expert-parallel group); None when there is one replica (the world).
        copies_group: this rank's copies, one per replica (the expert-gradient all-reduce); None with one replica.
        everyone: every rank, for gathers whose result must be identical in every replica (routing statistics,
            plans); None with one replica.
    """

    layout: ReplicaLayout
    index: int
    expert_group: "dist.ProcessGroup | None"
    copies_group: "dist.ProcessGroup | None"
    everyone: "dist.ProcessGroup | None"

    @property
    def num_replicas(self) -> int:
        return self.layout.num_replicas


def build_replicas(layout: ReplicaLayout, rank: int) -> Replicas:
    """Create the groups of ``layout`` (collective over the default group: every rank creates every group, in the
    same order, as ``torch.distributed.new_group`` requires). One replica: no group is created."""
    if layout.num_replicas == 1:
        return Replicas(layout, 0, None, None, None)
    expert_group = copies_group = None
    for replica in range(layout.num_replicas):
        group = dist.new_group(layout.expert_parallel_ranks(replica))
        if replica == layout.replica_of(rank):
            expert_group = group
    for ep_rank in range(layout.expert_parallel_size):
        group = dist.new_group(layout.copies_of(ep_rank))
        if ep_rank == rank % layout.expert_parallel_size:
            copies_group = group
    # a group of its own, so the routing gathers posted asynchronously never share a queue with DDP or FSDP
    everyone = dist.new_group(list(range(layout.world_size)))
    return Replicas(layout, layout.replica_of(rank), expert_group, copies_group, everyone)


@torch.no_grad()
def average_over_copies_(params: Iterable[torch.Tensor], group: "dist.ProcessGroup | None", num_copies: int,
                         bucket_bytes: int = 64 << 20) -> int:
    """Average the gradients of ``params`` over ``group`` (this rank's copies, ``num_copies`` ranks) in place: one
    all-reduce per bucket of at most ``bucket_bytes`` of one dtype and device, so one per step for a model whose
    expert gradients fit a bucket. A parameter without a gradient on this rank takes part with zeros and gets the
    mean when another copy has one; one without a gradient on every copy keeps ``None`` (its optimizer then skips it,
    as one process would): whether each has one rides in the first bucket. Every copy must pass the same parameters
    in the same order. Returns the number of all-reduces."""
    params = list(params)
    if group is None or num_copies == 1 or not params:
        return 0
    missing = [p.grad is None for p in params]
    grads = [torch.zeros_like(p) if gone else p.grad for p, gone in zip(params, missing)]
    buckets = _buckets(grads, bucket_bytes)
    for i, bucket in enumerate(buckets):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        if i == 0:  # one flag per parameter: 1 where this copy has a gradient
            flags = torch.tensor([0.0 if gone else 1.0 for gone in missing], dtype=flat.dtype, device=flat.device)
            flat = torch.cat([flat, flags])
        dist.all_reduce(flat, group=group)
        if i == 0:
            flat, anywhere = flat[:-len(params)], flat[-len(params):].tolist()
        flat.div_(num_copies)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()
    for p, g, gone, somewhere in zip(params, grads, missing, anywhere):
        if gone and somewhere > 0:
            p.grad = g
    return len(buckets)


def _buckets(grads: list[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    """``grads`` split into runs of one dtype and device, each at most ``bucket_bytes`` (a larger tensor alone)."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for g in grads:
        nbytes = g.numel() * g.element_size()
        last = out[-1] if out else None
        if (last is None or last[0].dtype != g.dtype or last[0].device != g.device
                or size + nbytes > bucket_bytes):
            out.append([g])
            size = nbytes
        else:
            last.append(g)
            size += nbytes
    return out
