"""Shared-memory payloads between the ranks of one host: the buffers, the collective set-up, and exchanges that
must return exactly the rows the process group returns (hand-built expectations, not the transport itself)."""

import dataclasses
import os

import pytest
import torch

from hiermoe_lightning import ExpertParallel
from hiermoe_lightning.dispatch import shm
from hiermoe_lightning.dispatch.comm import (Gathered, SharedMemoryError, SplitMismatchError, sizes_ride_along,
                                             start_exchange)
from hiermoe_lightning.testing import run_ranks

WORLD = 4


# ---------------------------------------------------------------------------- buffers, in one process
def test_host_identity_names_this_host_and_its_namespaces():
    ident = shm.host_identity()
    assert ident.shape == (5,) and ident.dtype == torch.int64
    assert int(ident[0]) == 1  # Linux with memfd
    assert int(ident[2]) == os.stat("/proc/self/ns/net").st_ino
    assert int(ident[3]) == os.stat("/proc/self/ns/pid").st_ino
    assert int(ident[4]) == os.getuid()


def test_outbox_grows_shrinks_and_reuses_by_generation_and_a_peer_reads_what_was_written():
    me = os.getpid()
    channel = shm.SharedMemoryChannel(2, 0, [me, me])  # "peer 1" is this process: it maps its own buffers
    data, fd, gen, fresh = channel.outbox(1, 0, 0, 100)
    assert fresh and data.numel() == 100
    data.copy_(torch.arange(100, dtype=torch.uint8))
    view, mapped = channel.inbox(1, 0, 0, fd, gen, 100)
    assert mapped and torch.equal(view, torch.arange(100, dtype=torch.uint8))
    assert not channel.inbox(1, 0, 0, fd, gen, 60)[1]  # same generation: mapped once
    again = channel.outbox(1, 0, 0, 1000)  # fits in the 64 KiB minimum: same buffer
    assert again[1:] == (fd, gen, False)
    assert channel.outbox(1, 1, 0, 10)[3] and channel.outbox(1, 0, 1, 10)[3]  # other parity / slot: own buffers
    big = channel.outbox(1, 0, 0, 20 << 20)
    assert big[3] and big[2] > gen  # grew: a new generation
    assert channel.outbox(1, 0, 0, 10 << 20)[3] is False  # half of it: kept
    for _ in range(3):  # sizes that alternate (a calibration's rounds) never churn the buffer
        assert channel.outbox(1, 0, 0, 1 << 20)[3] is False and channel.outbox(1, 0, 0, 20 << 20)[3] is False
    for _ in range(shm._SHRINK_AFTER - 1):
        assert channel.outbox(1, 0, 0, 1 << 20)[3] is False
    small = channel.outbox(1, 0, 0, 1 << 20)
    assert small[3] and small[2] > big[2]  # under a quarter of a 16 MiB+ buffer, many times in a row: replaced
    with pytest.raises(SharedMemoryError, match="bytes"):
        channel.inbox(1, 0, 0, small[1], small[2], 1 << 30)  # more than the buffer holds
    channel.close()


# ---------------------------------------------------------------------------- exchanges on 4 ranks
def _splits(rank: int, step: int) -> list[int]:
    """Rows rank ``rank`` sends each peer at exchange ``step``: zeros, growth and shrinking over the steps."""
    scale = [1, 40, 3, 200, 0, 7][step % 6]
    return [((rank * 3 + p * 2 + step) % 4) * scale for p in range(WORLD)]


def _payloads(rank: int, step: int, dtype):
    send = _splits(rank, step)
    n = sum(send)
    source = (torch.arange(300 * 5, dtype=torch.float64).view(300, 5) + 10_000 * rank + step).to(dtype)
    index = (torch.arange(n) * 7 + rank) % 300
    meta = (torch.arange(n * 3, dtype=torch.int64).view(n, 3) + 100_000 * rank + step).to(torch.int32)
    return source, index, meta


def _expected(rank: int, step: int, dtype):
    rows, metas = [], []
    for src in range(WORLD):
        send = _splits(src, step)
        start = sum(send[:rank])
        source, index, meta = _payloads(src, step, dtype)
        rows.append(source[index[start:start + send[rank]]])
        metas.append(meta[start:start + send[rank]])
    return torch.cat(rows), torch.cat(metas)


def _many_exchanges(rank, world, shared_memory):
    ep = ExpertParallel(str(world), dispatch="flat", shared_memory=shared_memory)
    peers = ep.peer_group("a2a")
    out = {"shm": peers.shm is not None, "steps": []}
    for step in range(12):
        dtype = [torch.float32, torch.bfloat16, torch.float64][step % 3]
        send = _splits(rank, step)
        recv = [_splits(src, step)[rank] for src in range(world)]
        source, index, meta = _payloads(rank, step, dtype)
        gathered, plain, meta_out = start_exchange(
            [(Gathered(source, index), send, recv), (source[index], send, recv), (meta, send, recv)], peers).wait()
        if shared_memory:  # the receivers learn the sizes from the ready messages: no count exchange first
            assert sizes_ride_along(peers, source)
            sized = start_exchange([(Gathered(source, index), send, None), (meta, send, None)], peers).wait()
            out.setdefault("sized", []).append(sized)
        else:
            assert not sizes_ride_along(peers, source)
            try:
                start_exchange([(meta, send, None)], peers)
            except ValueError as e:
                out["refused"] = str(e)
        out["steps"].append((gathered, plain, meta_out))
    return out


@pytest.mark.parametrize("shared_memory", [True, False])
def test_exchanges_return_the_hand_built_rows_through_either_transport(shared_memory):
    results = run_ranks(_many_exchanges, WORLD, shared_memory)
    for rank, result in enumerate(results):
        assert result["shm"] is shared_memory  # one host, one namespace: shared memory unless switched off
        for step, (gathered, plain, meta_out) in enumerate(result["steps"]):
            rows, metas = _expected(rank, step, [torch.float32, torch.bfloat16, torch.float64][step % 3])
            assert torch.equal(gathered, rows), (rank, step)
            assert torch.equal(plain, rows), (rank, step)
            assert torch.equal(meta_out, metas), (rank, step)
            if shared_memory:
                sized_rows, sized_meta, counts = result["sized"][step]
                assert torch.equal(sized_rows, rows) and torch.equal(sized_meta, metas), (rank, step)
                expected = [_splits(src, step)[rank] for src in range(WORLD)]
                assert counts.tolist() == [[n, n] for n in expected], (rank, step)
        if not shared_memory:
            assert "only on a shared-memory group" in result["refused"]


def _wrong_splits(rank, world):
    ep = ExpertParallel(str(world), dispatch="flat")
    peers = ep.peer_group("a2a")
    send = [1] * world
    recv = [2, 1, 1, 1] if rank == 3 else [1] * world  # rank 3 expects one row too many from peer 0
    try:
        start_exchange([(torch.zeros(world, 2), send, recv)], peers).wait()
    except SplitMismatchError as e:
        return str(e)
    return None


def test_given_splits_are_checked_against_the_announced_rows():
    results = run_ranks(_wrong_splits, WORLD, timeout=60)
    assert results[:3] == [None, None, None]  # nothing hangs; only the rank with the wrong expectation raises
    assert "expected [2, 1, 1, 1]" in results[3] and "[1, 1, 1, 1]" in results[3]


def _failing_allocation(rank, world):
    ep = ExpertParallel(str(world), dispatch="flat")
    peers = ep.peer_group("a2a")
    if rank == 1:  # this rank's host is "out of memory" for a new buffer
        def refuse(self, nbytes, gen):
            raise SharedMemoryError(f"could not allocate a {nbytes}-byte shared-memory buffer: no space")
        shm._Outbox.__init__ = refuse
    send = [2] * world
    try:
        start_exchange([(torch.ones(2 * world, 3), send, send)], peers).wait()
    except SharedMemoryError as e:
        failed = str(e)
    else:
        failed = None
    # the group is still usable through the process group: nothing hangs, nothing is left half-sent
    plain = dataclasses.replace(peers, shm=None)
    (back,) = start_exchange([(torch.full((world, 1), float(rank)), [1] * world, [1] * world)], plain).wait()
    return failed, back.flatten().tolist()


def test_a_failed_allocation_raises_on_every_rank_of_the_group_instead_of_hanging():
    results = run_ranks(_failing_allocation, WORLD, timeout=60)
    for rank, (failed, back) in enumerate(results):
        assert failed is not None, rank
        assert ("no space" in failed) if rank == 1 else ("peer(s) [1]" in failed and "shared_memory=False" in failed)
        assert back == [0.0, 1.0, 2.0, 3.0]


def test_shared_memory_is_validated():
    with pytest.raises(ValueError, match="shared_memory must be True or False"):
        ExpertParallel("2x2", shared_memory="yes")
