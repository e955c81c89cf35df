"""The only code that talks to ``torch.distributed`` during a forward/backward: counts, then payloads.

gloo does not check that a sender and a receiver agree on split sizes (too few rows leaves garbage, too many aborts
the receiver), so every payload exchange is preceded by a count exchange, and the engine can verify agreement (``verify_splits``)
collectively (every rank raises the same error, so none waits forever).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["PeerGroup", "Gathered", "num_rows", "PendingExchange", "start_exchange", "exchange_counts", "all_to_all_rows",
           "SplitMismatchError"]


class SplitMismatchError(ValueError):
    """The split sizes a rank expects to receive differ from what its peers announce to send."""


@dataclass(frozen=True)
class PeerGroup:
    """A process group plus this rank's position in it. ``group=None`` with ``size == 1`` means "only me"."""

    group: "dist.ProcessGroup | None"
    size: int
    index: int
    ranks: tuple[int, ...]  # positions in the expert-parallel world, ordered by peer index
    global_ranks: tuple[int, ...] = ()  # the same peers as ranks of the default group (for point-to-point)
    receive_first: bool = False  # payloads as point-to-point with every receive posted before any send (gloo)

    @property
    def is_local(self) -> bool:
        return self.size == 1


class PendingExchange:
    """Payload exchanges in flight on one peer group; ``wait()`` returns the received tensors, in payload order."""

    def __init__(self, outputs: list[torch.Tensor], works: list):
        self._outputs, self._works = outputs, works

    def wait(self) -> list[torch.Tensor]:
        for work in self._works:
            work.wait()
        self._works = []
        return self._outputs


@dataclass(frozen=True)
class Gathered:
    """Rows ``source[index]`` not copied yet (``source`` ``[N, ...]``, ``index`` ``[R]``): the exchange gathers them
    itself, the rank's own block straight into the receive buffer, one copy less than gathering first."""

    source: torch.Tensor
    index: torch.Tensor

    @property
    def num_rows(self) -> int:
        return self.index.shape[0]

    def materialize(self) -> torch.Tensor:
        return self.source.index_select(0, self.index)


def num_rows(x: "torch.Tensor | Gathered") -> int:
    """Rows of a payload, gathered or not."""
    return x.num_rows if isinstance(x, Gathered) else x.shape[0]


def start_exchange(payloads, peers: PeerGroup, tag: int = 0) -> PendingExchange:
    """Post several all-to-alls on one group at once, without waiting: each payload ``(x, send_splits,
    recv_splits)`` sends rows ``x`` ``[sum(send_splits), ...]`` (a tensor or :class:`Gathered`) grouped by peer and
    receives ``[sum(recv_splits), ...]`` grouped by source peer.

    The splits must come from a count exchange (or its mirror): gloo cannot tell if they disagree. Payloads posted
    together travel concurrently (one latency for all); exchanges on different groups may be in flight together, and
    so may several on one group when each has its own ``tag`` (payload ``i`` uses ``tag + i``; every rank must
    number them alike).
    """
    checked = []
    for x, send_splits, recv_splits in payloads:
        rows = num_rows(x)
        if rows != sum(send_splits):
            raise ValueError(f"exchange got {rows} rows but send splits sum to {sum(send_splits)}")
        checked.append((x if isinstance(x, Gathered) else x.contiguous(), list(send_splits), list(recv_splits)))
    if peers.is_local:
        return PendingExchange([x.materialize() if isinstance(x, Gathered) else x for x, _, _ in checked], [])
    outputs, works = [], []
    for i, (x, send_splits, recv_splits) in enumerate(checked):
        like = x.source if isinstance(x, Gathered) else x
        out = like.new_empty((sum(recv_splits), *like.shape[1:]))
        outputs.append(out)
        if peers.receive_first:
            works += _post_receive_first(out, x, send_splits, recv_splits, peers, tag + i)
        else:
            rows = x.materialize() if isinstance(x, Gathered) else x
            works.append(dist.all_to_all_single(out, rows, output_split_sizes=recv_splits,
                                                input_split_sizes=send_splits, group=peers.group, async_op=True))
    return PendingExchange(outputs, works)


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


def _post_receive_first(out, x, send_splits, recv_splits, peers: PeerGroup, tag: int) -> list:
    """all_to_all as point-to-point messages with every receive posted before any send; returns the requests.

    gloo's ``all_to_all_single`` posts each send before the matching receive; on a slow link a peer's "ready to
    receive" message then queues behind bulk payload and the two directions serialise. Posting all receives first
    lets both directions stream at once (measured on the emulated 2-node network: flat 1.15x, 2dh 1.35x faster).
    Zero-row messages are skipped on both sides (their sizes are agreed beforehand); ``tag`` keeps payloads posted
    together apart.
    """
    recv_offsets = [0]
    for r in recv_splits:
        recv_offsets.append(recv_offsets[-1] + r)
    send_offsets = [0]
    for s in send_splits:
        send_offsets.append(send_offsets[-1] + s)
    me = peers.index
    own_recv = out[recv_offsets[me]:recv_offsets[me + 1]]
    if isinstance(x, Gathered):  # own block gathered straight into the receive buffer, the rest into a send buffer
        torch.index_select(x.source, 0, x.index[send_offsets[me]:send_offsets[me + 1]], out=own_recv)
        own = send_offsets[me + 1] - send_offsets[me]
        x = x.source.index_select(0, torch.cat([x.index[:send_offsets[me]], x.index[send_offsets[me + 1]:]]))
        send_offsets = [o if i <= me else o - own for i, o in enumerate(send_offsets)]
    else:
        own_recv.copy_(x[send_offsets[me]:send_offsets[me + 1]])
    ops = [dist.P2POp(dist.irecv, out[recv_offsets[p]:recv_offsets[p + 1]], peers.global_ranks[p], peers.group, tag)
           for p in range(peers.size) if p != me and recv_splits[p] > 0]
    ops += [dist.P2POp(dist.isend, x[send_offsets[p]:send_offsets[p + 1]], peers.global_ranks[p], peers.group, tag)
            for p in range(peers.size) if p != me and send_splits[p] > 0]
    return list(dist.batch_isend_irecv(ops)) if ops else []
