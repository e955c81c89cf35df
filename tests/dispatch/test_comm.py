"""``start_exchange``: unequal splits, several payloads at once, rows given as ``Gathered``, both payload paths
(gloo receive-first point-to-point and ``all_to_all_single``), against a hand-built expectation."""

import dataclasses

import pytest
import torch

from hiermoe_lightning import ExpertParallel
from hiermoe_lightning.dispatch.comm import Gathered, PeerGroup, start_exchange
from hiermoe_lightning.testing import run_ranks

WORLD = 4


def _splits(rank: int) -> list[int]:
    """Rows rank ``rank`` sends to each peer (zeros included, its own block too)."""
    return [(rank * 3 + p * 2) % 4 for p in range(WORLD)]


def _source(rank: int) -> torch.Tensor:
    return torch.arange(10 * 3, dtype=torch.float32).view(10, 3) + 100 * rank


def _index(rank: int) -> torch.Tensor:
    """Which source rows rank ``rank`` sends, in peer order (with repeats, like a dedup hop's copies)."""
    n = sum(_splits(rank))
    return (torch.arange(n) * 7 + rank) % 10


def _exchange(rank, world, receive_first):
    ep = ExpertParallel(str(world), dispatch="flat")
    peers = dataclasses.replace(ep.peer_group("a2a"), receive_first=receive_first)
    send = _splits(rank)
    recv = [_splits(src)[rank] for src in range(world)]
    meta = torch.arange(sum(send), dtype=torch.float64) + 1000 * rank
    gathered, plain, meta_out = start_exchange(
        [(Gathered(_source(rank), _index(rank)), send, recv), (_source(rank)[_index(rank)], send, recv),
         (meta, send, recv)], peers).wait()
    return gathered, plain, meta_out


@pytest.mark.parametrize("receive_first", [True, False])
def test_exchange_matches_hand_built_rows(receive_first):
    results = run_ranks(_exchange, WORLD, receive_first)
    for rank, (gathered, plain, meta_out) in enumerate(results):
        rows, metas = [], []
        for src in range(WORLD):
            start = sum(_splits(src)[:rank])
            block = _index(src)[start:start + _splits(src)[rank]]
            rows.append(_source(src)[block])
            metas.append(torch.arange(start, start + len(block), dtype=torch.float64) + 1000 * src)
        assert torch.equal(gathered, torch.cat(rows)), rank
        assert torch.equal(plain, torch.cat(rows)), rank
        assert torch.equal(meta_out, torch.cat(metas)), rank


def test_local_exchange_and_bad_rows():
    me = PeerGroup(None, 1, 0, (0,))
    source, index = torch.randn(5, 2), torch.tensor([4, 0, 0])
    (out,) = start_exchange([(Gathered(source, index), [3], [3])], me).wait()
    assert torch.equal(out, source[index])
    with pytest.raises(ValueError, match="send splits sum to 2"):
        start_exchange([(Gathered(source, index), [2], [2])], me)
