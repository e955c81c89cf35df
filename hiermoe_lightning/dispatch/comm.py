"""The only code that talks to ``torch.distributed`` during a forward/backward: counts, then payloads.

gloo does not check that a sender and a receiver agree on split sizes (too few rows leaves garbage, too many aborts
the receiver), so every payload exchange is preceded by a count exchange, and the engine can verify agreement
(``verify_splits``) collectively (every rank raises the same error, so none waits forever).

How the rows move is the group's :class:`~hiermoe_lightning.dispatch.transport.Transport`, chosen once at setup
(gloo point to point, shared memory between ranks of one host, or the backend's ``all_to_all_single``, e.g. NCCL).
On a shared-memory group the ready messages carry the row counts, so such an exchange needs no count exchange
before it (:func:`sizes_ride_along`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .payload import Gathered, PendingExchange, SplitMismatchError, num_rows, source_of
from .shm import SharedMemoryChannel, SharedMemoryError
from .transport import Transport, transport_for

__all__ = ["PeerGroup", "Gathered", "num_rows", "PendingExchange", "start_exchange", "exchange_counts", "all_to_all_rows",
           "SplitMismatchError", "SharedMemoryError", "sizes_ride_along"]


@dataclass(frozen=True)
class PeerGroup:
    """A process group plus this rank's position in it. ``group=None`` with ``size == 1`` means "only me".

    :attr:`transport` moves its payloads: ``custom_transport`` when given, else the one the flags stand for
    (:func:`~hiermoe_lightning.dispatch.transport.transport_for`: ``shm`` set: shared memory; ``receive_first``: gloo
    point to point; else ``all_to_all_single``). :class:`~hiermoe_lightning.parallel.ExpertParallel` finds the flags
    at setup (:func:`~hiermoe_lightning.dispatch.transport.probe_group`)."""

    group: "dist.ProcessGroup | None"
    size: int
    index: int
    ranks: tuple[int, ...]  # positions in the expert-parallel world, ordered by peer index
    global_ranks: tuple[int, ...] = ()  # the same peers as ranks of the default group (for point-to-point)
    receive_first: bool = False  # payloads as point-to-point with every receive posted before any send (gloo)
    shm: "SharedMemoryChannel | None" = field(default=None, compare=False, repr=False)  # same-host payloads
    custom_transport: "Transport | None" = field(default=None, compare=False, repr=False)  # overrides the flags

    def __post_init__(self):
        object.__setattr__(self, "_transport", self.custom_transport or transport_for(self.receive_first, self.shm))

    @property
    def transport(self) -> Transport:
        """What moves this group's payloads (:mod:`~hiermoe_lightning.dispatch.transport`)."""
        return self._transport

    @property
    def is_local(self) -> bool:
        return self.size == 1


def start_exchange(payloads, peers: PeerGroup, tag: int = 0) -> PendingExchange:
    """Post several all-to-alls on one group at once, without waiting: each payload ``(x, send_splits,
    recv_splits)`` sends rows ``x`` ``[sum(send_splits), ...]`` (a tensor or :class:`Gathered`) grouped by peer and
    receives ``[sum(recv_splits), ...]`` grouped by source peer.

    The splits must come from a count exchange (or its mirror): gloo cannot tell if they disagree. Where the
    transport carries the row counts itself (:func:`sizes_ride_along`) ``recv_splits`` may be None: ``wait()`` then
    returns one more tensor, ``[peers, payloads]`` int64, the rows received from each peer; given splits are checked
    against them (``SplitMismatchError``). Payloads posted together travel concurrently (one latency for all);
    exchanges on different groups may be in flight together, and so may several on one group when the transport
    allows it and each has its own ``tag`` (payload ``i`` uses ``tag + i``; every rank must number them alike).
    """
    checked = []
    for x, send_splits, recv_splits in payloads:
        rows = num_rows(x)
        if rows != sum(send_splits):
            raise ValueError(f"exchange got {rows} rows but send splits sum to {sum(send_splits)}")
        checked.append((x if isinstance(x, Gathered) else x.contiguous(), list(send_splits),
                        None if recv_splits is None else list(recv_splits)))
    if len(checked) > peers.transport.max_payloads:
        raise ValueError(f"an exchange on the {peers.transport.name} transport holds at most "
                         f"{peers.transport.max_payloads} payloads, got {len(checked)}")
    if not sizes_ride_along(peers, *(source_of(x) for x, _, _ in checked)) and any(r is None for _, _, r in checked):
        raise ValueError("recv_splits may be None only on a shared-memory group, or another transport that carries "
                         "the counts (sizes_ride_along): elsewhere the receivers must know them from a count exchange")
    if peers.is_local:
        return PendingExchange([x.materialize() if isinstance(x, Gathered) else x for x, _, _ in checked], [])
    return peers.transport.start(checked, peers, tag)


def sizes_ride_along(peers: PeerGroup, *tensors: torch.Tensor) -> bool:
    """Whether an exchange of ``tensors`` on ``peers`` tells the receivers its row counts itself (shared memory):
    such an exchange needs no count exchange before it (``recv_splits`` None in :func:`start_exchange`). The same
    answer on every rank of the group (same group, same device type)."""
    return not peers.is_local and peers.transport.counts_ride_along(*tensors)


def exchange_counts(send_counts: torch.Tensor, peers: PeerGroup) -> torch.Tensor:
    """``send_counts`` ``[size, C]`` int64 (row ``p`` = what I send to peer ``p``) -> ``[size, C]`` what each peer sends me."""
    if send_counts.shape[0] != peers.size:
        raise ValueError(f"send_counts has {send_counts.shape[0]} rows, the group has {peers.size} peers")
    ones = [1] * peers.size
    return start_exchange([(send_counts, ones, ones)], peers).wait()[0].clone()


def all_to_all_rows(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], peers: PeerGroup) -> torch.Tensor:
    """Rows ``x`` ``[sum(send_splits), ...]`` grouped by peer -> ``[sum(recv_splits), ...]`` grouped by source peer.

    The splits must come from ``exchange_counts`` (or its mirror): gloo cannot tell if they disagree.
    """
    return start_exchange([(x, send_splits, recv_splits)], peers).wait()[0]
