"""How payload rows move between the ranks of one group: the :class:`Transport` seam.

A transport is chosen once per process group at setup (:func:`transport_for`, from the facts :func:`probe_group` finds) and answers everything the pipeline runner (:func:`~hiermoe_lightning.dispatch.engine.
_run_pipeline`) must know about it, so the runner never checks types:

* :attr:`Transport.tags_per_exchange` and :attr:`Transport.max_payloads`: exchange ``n`` on a group owns tags
  ``n * tags_per_exchange .. (n + 1) * tags_per_exchange - 1``; its payload ``i`` uses tag ``base + i``, and any
  control messages the transport needs use the tags above ``max_payloads``;
* :meth:`Transport.max_in_flight`: how many exchanges may be in flight on one group at once;
* :meth:`Transport.counts_ride_along`: whether receivers learn row counts from the payload messages themselves
  (then a hop needs no count exchange first);
* :meth:`Transport.start`: post the payloads, return a :class:`~hiermoe_lightning.dispatch.payload.PendingExchange`.

Implementations:

==============================  =========================================================================
:class:`CollectiveTransport`    ``all_to_all_single`` per payload, asynchronous (NCCL and any non-gloo backend:
                                NCCL runs it on its own stream, so it overlaps the compute stream)
:class:`PointToPointTransport`  gloo: every receive posted before any send (both directions stream at once)
:class:`SharedMemoryTransport`  ranks of one host: rows through shared memory, one small ready message each
==============================  =========================================================================

:func:`transport_for` maps a group's facts (found once at setup by :func:`probe_group`) to its transport. A new
transport (e.g. an NVSHMEM or DeepEP buffer) implements the members above and is either returned there or given to
a :class:`~hiermoe_lightning.dispatch.comm.PeerGroup` as ``custom_transport``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
import torch.distributed as dist

from .payload import Gathered, PendingExchange, SplitMismatchError, copy_block, offsets, source_of
from .shm import SharedMemoryChannel, SharedMemoryError, open_channel

if TYPE_CHECKING:
    from .comm import PeerGroup

__all__ = ["Transport", "CollectiveTransport", "PointToPointTransport", "SharedMemoryTransport", "probe_group", "transport_for"]


@runtime_checkable
class Transport(Protocol):
    """Moves one exchange's payloads (``(x, send_splits, recv_splits)`` each) across one process group."""

    name: str
    tags_per_exchange: int
    max_payloads: int

    def max_in_flight(self, slowest_link: bool) -> int | None:
        """Exchanges allowed in flight on one group at once (None: no limit); ``slowest_link``: the group spans the
        outermost (slowest) links, where queueing exchanges back to back keeps the link busy."""

    def counts_ride_along(self, *tensors: torch.Tensor) -> bool:
        """Whether an exchange of ``tensors`` tells the receivers its row counts itself (no count exchange first).
        The same answer on every rank of the group."""

    def start(self, payloads: list, peers: "PeerGroup", tag: int) -> PendingExchange:
        """Post every payload (splits already checked against the rows), return without waiting."""


class _PayloadByPayload:
    """A transport that posts each payload on its own (the socket and collective ones): several exchanges may queue
    back to back on the slowest links; receivers need the counts first."""

    tags_per_exchange = 8
    max_payloads = 8

    def max_in_flight(self, slowest_link: bool) -> int | None:
        return None if slowest_link else 1

    def counts_ride_along(self, *tensors: torch.Tensor) -> bool:
        return False

    def start(self, payloads: list, peers: "PeerGroup", tag: int) -> PendingExchange:
        outputs, works = [], []
        for i, (x, send_splits, recv_splits) in enumerate(payloads):
            like = source_of(x)
            out = like.new_empty((sum(recv_splits), *like.shape[1:]))
            works += self._post(out, x, send_splits, recv_splits, peers, tag + i)
            outputs.append(out)
        return PendingExchange(outputs, works)

    def _post(self, out, x, send_splits, recv_splits, peers: "PeerGroup", tag: int) -> list:
        raise NotImplementedError


class CollectiveTransport(_PayloadByPayload):
    """One asynchronous ``all_to_all_single`` per payload (NCCL, or any backend without gloo's split caveat).

    On CUDA the collective runs on the backend's own stream and ``wait()`` only makes the current stream wait for
    it: the host does not block. Tags are not used; several exchanges may queue on the slowest links."""

    name = "collective"

    def _post(self, out, x, send_splits, recv_splits, peers: "PeerGroup", tag: int) -> list:
        rows = x.materialize() if isinstance(x, Gathered) else x
        return [dist.all_to_all_single(out, rows, output_split_sizes=recv_splits, input_split_sizes=send_splits,
                                       group=peers.group, async_op=True)]


class PointToPointTransport(_PayloadByPayload):
    """gloo: each payload as point-to-point messages with every receive posted before any send.

    gloo's ``all_to_all_single`` posts each send before the matching receive; on a slow link a peer's "ready to
    receive" message then queues behind bulk payload and the two directions serialise. Posting all receives first
    lets both directions stream at once (measured on the emulated 2-node network: flat 1.15x, 2dh 1.35x faster).
    Zero-row messages are skipped on both sides (their sizes are agreed beforehand); payload ``i`` uses tag
    ``tag + i``, so exchanges posted together (or queued back to back) stay apart."""

    name = "p2p"

    def _post(self, out, x, send_splits, recv_splits, peers: "PeerGroup", tag: int) -> list:
        return _post_receive_first(out, x, send_splits, recv_splits, peers, tag)


def _post_receive_first(out, x, send_splits, recv_splits, peers: "PeerGroup", tag: int) -> list:
    """One payload as point-to-point messages, every receive posted first; returns the requests."""
    recv_offsets, send_offsets = offsets(recv_splits), offsets(send_splits)
    me = peers.index
    copy_block(out[recv_offsets[me]:recv_offsets[me + 1]], x, send_offsets[me], send_offsets[me + 1])
    if isinstance(x, Gathered):  # the rest gathered into one send buffer
        own = send_offsets[me + 1] - send_offsets[me]
        x = x.source.index_select(0, torch.cat([x.index[:send_offsets[me]], x.index[send_offsets[me + 1]:]]))
        send_offsets = [o if i <= me else o - own for i, o in enumerate(send_offsets)]
    ops = [dist.P2POp(dist.irecv, out[recv_offsets[p]:recv_offsets[p + 1]], peers.global_ranks[p], peers.group, tag)
           for p in range(peers.size) if p != me and recv_splits[p] > 0]
    ops += [dist.P2POp(dist.isend, x[send_offsets[p]:send_offsets[p + 1]], peers.global_ranks[p], peers.group, tag)
            for p in range(peers.size) if p != me and send_splits[p] > 0]
    return list(dist.batch_isend_irecv(ops)) if ops else []


_FAILED = -2  # fd in a ready message: the sender could not allocate its buffer


class SharedMemoryTransport:
    """Ranks of one host (gloo group with a :class:`~hiermoe_lightning.dispatch.shm.SharedMemoryChannel`): each
    peer's rows are written into a buffer that peer has mapped, and one small ready message per peer (buffer and row
    count of each payload) goes over the group; the receiver copies the rows out in ``wait()``.

    The ready messages carry the row counts, so CPU payloads need no count exchange first (``recv_splits`` may be
    None: ``wait()`` then returns one more tensor, ``[peers, payloads]`` int64, the rows received from each peer).
    Buffers alternate by exchange parity, which is safe only with **one exchange in flight per group** (see
    :mod:`~hiermoe_lightning.dispatch.shm`). Payloads use tags ``tag .. tag + max_payloads - 1``; the last tag of an
    exchange acknowledges that a new buffer was mapped. Non-CPU payloads go point to point."""

    name = "shared-memory"
    tags_per_exchange = 8
    max_payloads = 7
    _ack_tag = 7  # == max_payloads: above every payload's tag, inside the exchange's own range

    def __init__(self, channel: SharedMemoryChannel):
        self.channel = channel
        self._fallback = PointToPointTransport()

    def max_in_flight(self, slowest_link: bool) -> int | None:
        return 1

    def counts_ride_along(self, *tensors: torch.Tensor) -> bool:
        return all(t.device.type == "cpu" for t in tensors)

    def start(self, payloads: list, peers: "PeerGroup", tag: int) -> PendingExchange:
        if not self.counts_ride_along(*(source_of(x) for x, _, _ in payloads)):
            return self._fallback.start(payloads, peers, tag)
        channel, me = self.channel, peers.index
        parity = channel.begin_exchange()
        ready = torch.full((peers.size, len(payloads), 3), -1, dtype=torch.int64)
        error, fresh_to = None, set()
        for slot, (x, send_splits, _) in enumerate(payloads):
            like = source_of(x)
            row_bytes = like.element_size() * math.prod(like.shape[1:])
            send_off = offsets(send_splits)
            ready[:, slot, 2] = torch.tensor(send_splits, dtype=torch.int64)
            for p, n in enumerate(send_splits):
                if p == me or n == 0 or row_bytes == 0:
                    continue
                try:
                    data, fd, gen, fresh = channel.outbox(p, parity, slot, n * row_bytes)
                except SharedMemoryError as e:  # tell the peers (they raise too) instead of leaving them waiting
                    ready[p, slot, 0], error = _FAILED, str(e)
                    continue
                copy_block(data.view(like.dtype).view(n, *like.shape[1:]), x, send_off[p], send_off[p + 1])
                ready[p, slot, 0], ready[p, slot, 1] = fd, gen
                if fresh:
                    fresh_to.add(p)
        ready_in = torch.empty_like(ready)
        ops = [dist.P2POp(dist.irecv, ready_in[q], peers.global_ranks[q], peers.group, tag)
               for q in range(peers.size) if q != me]
        ops += [dist.P2POp(dist.isend, ready[p], peers.global_ranks[p], peers.group, tag)
                for p in range(peers.size) if p != me]
        works = list(dist.batch_isend_irecv(ops))
        acks = torch.empty(peers.size, 1, dtype=torch.int64)  # a new buffer must be mapped before this rank may exit
        ack_ops = [dist.P2POp(dist.irecv, acks[p], peers.global_ranks[p], peers.group, tag + self._ack_tag)
                   for p in sorted(fresh_to)]
        ack_works = list(dist.batch_isend_irecv(ack_ops)) if ack_ops else []
        return _SharedMemoryExchange(works, channel, parity, ready_in, payloads, error, peers,
                                     tag + self._ack_tag, ack_works)


class _SharedMemoryExchange(PendingExchange):
    """Payloads written into shared memory. ``wait()`` takes every peer's ready message (buffer and row count of
    each payload), allocates the outputs, copies this rank's own block and every peer's rows in, and acknowledges new
    buffers. With sender-sized payloads (``recv_splits`` None) it also returns the received counts."""

    def __init__(self, works, channel: SharedMemoryChannel, parity: int, ready_in: torch.Tensor, payloads: list,
                 error: str | None, peers: "PeerGroup", ack_tag: int, ack_works: list):
        super().__init__([], works)
        self._channel, self._parity, self._ready_in, self._error = channel, parity, ready_in, error
        self._payloads = payloads
        self._peers, self._ack_tag, self._ack_works = peers, ack_tag, ack_works
        self._sender_sized = any(r is None for _, _, r in payloads)
        self._result: list | None = None

    def wait(self) -> list[torch.Tensor]:
        if self._payloads is None:  # already waited for
            return self._result
        super().wait()
        me, ready = self._channel.index, self._ready_in
        failed = [q for q in range(self._channel.size) if q != me and bool((ready[q, :, 0] == _FAILED).any())]
        counts = ready[:, :, 2].clone()  # [peers, payloads] rows each peer announced
        mismatched = []
        mapped = set()  # peers whose new buffer this rank mapped now: they wait for word of it
        for slot, (x, send_splits, recv_splits) in enumerate(self._payloads):
            counts[me, slot] = send_splits[me]
            announced = counts[:, slot].tolist()
            if recv_splits is not None and list(recv_splits) != announced:
                mismatched.append((slot, list(recv_splits), announced))
            like = source_of(x)
            out = like.new_empty((sum(announced), *like.shape[1:]))
            row_bytes = like.element_size() * math.prod(like.shape[1:])
            send_off, recv_off = offsets(send_splits), offsets(announced)
            copy_block(out[recv_off[me]:recv_off[me + 1]], x, send_off[me], send_off[me + 1])
            for q, n in enumerate(announced):
                fd, gen = int(ready[q, slot, 0]), int(ready[q, slot, 1])
                if q != me and n * row_bytes > 0 and fd != _FAILED:
                    src, fresh = self._channel.inbox(q, self._parity, slot, fd, gen, n * row_bytes)
                    out[recv_off[q]:recv_off[q + 1]].copy_(src.view(out.dtype).view(n, *out.shape[1:]))
                    if fresh:
                        mapped.add(q)
            self._outputs.append(out)
        self._ready_in = self._payloads = None
        if mapped:
            ack = torch.ones(1, dtype=torch.int64)
            ops = [dist.P2POp(dist.isend, ack, self._peers.global_ranks[q], self._peers.group, self._ack_tag)
                   for q in sorted(mapped)]
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        for work in self._ack_works:  # after sending ours: two ranks may each wait for the other's
            work.wait()
        self._ack_works = []
        # errors only now: the exchange has run its course on every rank, so the group stays usable
        if self._error is not None:
            raise SharedMemoryError(self._error)
        if failed:
            raise SharedMemoryError(f"peer(s) {failed} of this group could not allocate shared memory for their rows "
                                    f"(free memory, or pass shared_memory=False to use the process group)")
        if mismatched:
            slot, expected, announced = mismatched[0]
            raise SplitMismatchError(f"payload {slot}: expected {expected} rows from the peers, they sent {announced}")
        self._result = self._outputs + [counts] if self._sender_sized else self._outputs
        return self._result


def transport_for(receive_first: bool, channel: "SharedMemoryChannel | object | None") -> Transport:
    """The one place a group's transport is chosen from its facts: shared memory when it has a channel, point to
    point with receives first on gloo, else the backend's ``all_to_all_single`` (NCCL)."""
    if channel is not None:
        return SharedMemoryTransport(channel)
    return PointToPointTransport() if receive_first else CollectiveTransport()


def probe_group(group: "dist.ProcessGroup | None", size: int, index: int, shared_memory: bool
                ) -> tuple[bool, "SharedMemoryChannel | None"]:
    """The facts of one process group that choose its transport, at setup: ``(receive_first, channel)``.

    ``receive_first``: the backend is gloo. ``channel``: every member shares this host (collective over the group's
    ``size`` ranks when ``shared_memory`` and the backend is gloo: :func:`~hiermoe_lightning.dispatch.shm.
    open_channel`); call it on every member, in the same order for every group."""
    receive_first = group is not None and dist.get_backend(group) == "gloo"
    channel = open_channel(group, size, index) if receive_first and shared_memory else None
    return receive_first, channel
