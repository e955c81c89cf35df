"""Shared-memory buffers between the ranks of one host: the memory side of the same-host payload transport.

gloo moves every byte between two processes of one machine through a loopback TCP socket: a copy into the kernel,
the network stack on both ends, a copy out, all on CPUs the ranks also compute on. With a
:class:`SharedMemoryChannel` a sender writes (gathers) a peer's rows straight into a buffer that peer has mapped,
and only a tiny "ready" message goes over the process group; the receiver copies the rows out. The protocol lives
in :mod:`hiermoe_lightning.dispatch.comm`; this module owns the buffers.

* Buffers are anonymous ``memfd`` files the peer opens through ``/proc/<pid>/fd/<fd>``: nothing is ever named in
  ``/dev/shm`` (no leftovers when a process dies, no limit of a small ``/dev/shm`` mount), and the kernel frees
  a buffer when its last mapping goes.
* One outgoing buffer per (peer, payload slot, exchange parity); exchange ``n`` on a group writes the parity
  ``n % 2`` buffers. Reuse is safe when every rank has at most one exchange in flight on the group (the pipeline
  runner keeps to that on shared-memory groups): a sender writes exchange ``n + 2`` only after its wait of
  ``n + 1`` returned, which needed the receiver's ready message of ``n + 1``, which the receiver sends only after
  its wait of ``n`` (where it copied message ``n`` out). A ready message flows between every pair of the group in
  every exchange, rows or not, so the chain never breaks.
* :func:`open_channel` (collective, at setup) enables a channel only when every rank of the group shares this
  host's boot, pid namespace, network namespace and user, and every rank could read every other rank's probe
  buffer. The network namespace is part of the test on purpose: emulated nodes, each in a namespace of its own,
  never share memory, so their traffic still crosses the emulated links.
"""

from __future__ import annotations

import mmap
import os
import zlib

import torch
import torch.distributed as dist

__all__ = ["SharedMemoryChannel", "SharedMemoryError", "host_identity", "open_channel"]

_MIN_BYTES = 1 << 16  # buffers grow in steps of at least 64 KiB
_SHRINK_ABOVE = 1 << 24  # a buffer over 16 MiB is replaced by a smaller one when messages need under a quarter...
_SHRINK_AFTER = 16  # ...of it this many times in a row (sizes that alternate, as in a calibration, never churn)


class SharedMemoryError(RuntimeError):
    """A shared-memory buffer could not be created (the host is out of memory for it)."""


def host_identity() -> torch.Tensor:
    """int64 ``[5]``: ``(available, boot id hash, network namespace, pid namespace, uid)``; ``available`` is 0
    (and the rest 0) where ``memfd``/``/proc`` are missing (not Linux)."""
    try:
        if not hasattr(os, "memfd_create"):
            raise OSError("no memfd_create")
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = zlib.crc32(f.read().strip().encode())
        net, pid = (os.stat(f"/proc/self/ns/{kind}").st_ino for kind in ("net", "pid"))
        return torch.tensor([1, boot, net, pid, os.getuid()], dtype=torch.int64)
    except OSError:
        return torch.zeros(5, dtype=torch.int64)


def _map(fd: int, nbytes: int) -> tuple[mmap.mmap, torch.Tensor]:
    mm = mmap.mmap(fd, nbytes)
    return mm, torch.frombuffer(mm, dtype=torch.uint8)


def _read_probe(pid: int, fd: int) -> int:
    """The int64 a peer wrote in its probe buffer, or -1 when it cannot be opened."""
    try:
        f = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY)
    except OSError:
        return -1
    try:
        data = os.pread(f, 8, 0)
    finally:
        os.close(f)
    return int.from_bytes(data, "little", signed=True) if len(data) == 8 else -1


def open_channel(group: "dist.ProcessGroup", size: int, index: int) -> "SharedMemoryChannel | None":
    """Collective over ``group`` (``size`` ranks, this one at ``index``): a channel when every rank can share
    memory with every other (see the module doc), else None, the same answer on every rank."""
    ident = host_identity()
    idents = [torch.empty_like(ident) for _ in range(size)]
    dist.all_gather(idents, ident, group=group)
    if not all(int(i[0]) == 1 and torch.equal(i, idents[0]) for i in idents):
        return None
    fd = os.memfd_create("hiermoe-probe", os.MFD_CLOEXEC)
    try:
        token = int.from_bytes(os.urandom(8), "little", signed=True) & ((1 << 62) - 1)
        os.pwrite(fd, token.to_bytes(8, "little", signed=True), 0)
        mine = torch.tensor([os.getpid(), fd, token], dtype=torch.int64)
        probes = [torch.empty_like(mine) for _ in range(size)]
        dist.all_gather(probes, mine, group=group)
        ok = all(_read_probe(int(p[0]), int(p[1])) == int(p[2]) for q, p in enumerate(probes) if q != index)
        flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)  # also: nobody closes a probe still being read
    finally:
        os.close(fd)
    if int(flag) != 1:
        return None
    return SharedMemoryChannel(size, index, [int(p[0]) for p in probes])


class _Outbox:
    """One outgoing buffer: the memfd (kept open: the peer opens it through /proc), its mapping and generation."""

    def __init__(self, nbytes: int, gen: int):
        self.fd = os.memfd_create("hiermoe-outbox", os.MFD_CLOEXEC)
        try:
            os.posix_fallocate(self.fd, 0, nbytes)  # reserve now: a full tmpfs is an error here, not a SIGBUS later
            self.mm, self.data = _map(self.fd, nbytes)
        except OSError as e:
            os.close(self.fd)
            raise SharedMemoryError(f"could not allocate a {nbytes}-byte shared-memory buffer: {e}") from e
        self.nbytes, self.gen = nbytes, gen

    def close(self) -> None:
        self.data = None  # the mapping goes with its last tensor
        os.close(self.fd)


class SharedMemoryChannel:
    """The shared-memory buffers of one process group on this rank: outgoing buffers it writes and the peers'
    buffers it has mapped. Made by :func:`open_channel`; used by
    :func:`~hiermoe_lightning.dispatch.comm.start_exchange`.
    """

    def __init__(self, size: int, index: int, pids: list[int]):
        self.size, self.index, self._pids = size, index, pids
        self._outboxes: dict[tuple[int, int, int], _Outbox] = {}
        self._oversized: dict[tuple[int, int, int], int] = {}  # key -> messages in a row under a quarter of it
        self._inboxes: dict[tuple[int, int, int], tuple[int, torch.Tensor]] = {}  # key -> (gen, bytes)
        self._exchanges = 0
        self._generation = 0

    def begin_exchange(self) -> int:
        """The parity of the next exchange on the group (every rank numbers its exchanges alike)."""
        parity = self._exchanges % 2
        self._exchanges += 1
        return parity

    def outbox(self, peer: int, parity: int, slot: int, nbytes: int) -> tuple[torch.Tensor, int, int, bool]:
        """A writable uint8 ``[nbytes]`` view of the buffer for ``peer``, ``(fd, generation)`` for its ready
        message, and whether the buffer is new. The buffer grows (and one much too large for the last
        ``_SHRINK_AFTER`` messages shrinks) by replacing it with a new generation; the peer must map a new one
        before this rank may close it or exit (the protocol waits for the peer's acknowledgement), after that the
        pages live as long as either side maps them."""
        key = (peer, parity, slot)
        box = self._outboxes.get(key)
        fresh = False
        oversized = box is not None and box.nbytes > _SHRINK_ABOVE and 4 * nbytes < box.nbytes
        streak = self._oversized.get(key, 0) + 1 if oversized else 0
        self._oversized[key] = streak
        if box is None or box.nbytes < nbytes or streak >= _SHRINK_AFTER:
            self._oversized[key] = 0
            self._generation += 1
            made = _Outbox(max(_MIN_BYTES, -(-nbytes * 5 // 4 // _MIN_BYTES) * _MIN_BYTES), self._generation)
            if box is not None:
                box.close()  # the peer has copied its last message out (see the module doc)
            self._outboxes[key] = box = made
            fresh = True
        return box.data[:nbytes], box.fd, box.gen, fresh

    def inbox(self, peer: int, parity: int, slot: int, fd: int, gen: int, nbytes: int) -> tuple[torch.Tensor, bool]:
        """A uint8 ``[nbytes]`` view of ``peer``'s buffer ``(fd, gen)`` for this rank (mapped once per generation),
        and whether it was mapped just now (then the peer waits for an acknowledgement)."""
        key = (peer, parity, slot)
        cached = self._inboxes.get(key)
        fresh = cached is None or cached[0] != gen
        if fresh:
            f = os.open(f"/proc/{self._pids[peer]}/fd/{fd}", os.O_RDWR)
            try:
                _, data = _map(f, os.fstat(f).st_size)
            finally:
                os.close(f)
            self._inboxes[key] = cached = (gen, data)
        if cached[1].numel() < nbytes:
            raise SharedMemoryError(f"peer {peer}'s buffer holds {cached[1].numel()} bytes, {nbytes} announced")
        return cached[1][:nbytes], fresh

    def close(self) -> None:
        """Release every buffer (also done by the garbage collector)."""
        for box in self._outboxes.values():
            box.close()
        self._outboxes.clear()
        self._inboxes.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
