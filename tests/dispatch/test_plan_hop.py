"""plan_hop (the pure planner of one dispatch hop) against a naive dict-building reference."""

from __future__ import annotations

import pytest
import torch

from hiermoe_lightning.dispatch.engine import plan_hop


def _naive(pair_row: list[int], pair_peer: list[int], num_peers: int, dedup: bool):
    """Loop over pairs: per peer, the rows it receives (a dict row -> local index with dedup, one per pair without)."""
    blocks: dict[int, list[int]] = {p: [] for p in range(num_peers)}
    index: dict[tuple[int, int], int] = {}
    pair_local: dict[int, int] = {}
    for i, (r, p) in enumerate(zip(pair_row, pair_peer)):
        if dedup:
            if (r, p) not in index:
                index[(r, p)] = len(blocks[p])
                blocks[p].append(r)
            pair_local[i] = index[(r, p)]
        else:
            pair_local[i] = len(blocks[p])
            blocks[p].append(r)
    pairs_by_peer = {p: [i for i, q in enumerate(pair_peer) if q == p] for p in range(num_peers)}
    return blocks, pairs_by_peer, pair_local


def _check(pair_row, pair_peer, num_rows, num_peers, dedup):
    pr = torch.tensor(pair_row, dtype=torch.long)
    pp = torch.tensor(pair_peer, dtype=torch.long)
    plan = plan_hop(pr, pp, num_rows, num_peers, dedup)
    blocks, pairs_by_peer, pair_local = _naive(pair_row, pair_peer, num_peers, dedup)
    P = len(pair_row)

    for t in (plan.send_src_row, plan.send_splits, plan.pair_order, plan.pair_splits, plan.pair_local_row):
        assert t.dtype == torch.long
    send_splits = plan.send_splits.tolist()
    assert send_splits == [len(blocks[p]) for p in range(num_peers)]
    assert sum(send_splits) == plan.send_src_row.numel()
    assert plan.pair_splits.tolist() == [len(pairs_by_peer[p]) for p in range(num_peers)]
    assert sum(plan.pair_splits.tolist()) == P
    # pairs leave in peer order, stable within a peer
    assert plan.pair_order.tolist() == [i for p in range(num_peers) for i in pairs_by_peer[p]]
    assert plan.pair_local_row.numel() == P

    # the rows sent to each peer: the same multiset as the reference block
    offsets = [sum(send_splits[:p]) for p in range(num_peers)]
    sent = plan.send_src_row.tolist()
    for p in range(num_peers):
        got = sent[offsets[p]:offsets[p] + send_splits[p]]
        assert sorted(got) == sorted(blocks[p])
        if dedup:
            assert len(set(got)) == len(got)  # each (row, peer) once
        assert all(0 <= r < max(num_rows, 1) for r in got)
    if dedup:
        assert len(set(zip(sent, [p for p in range(num_peers) for _ in range(send_splits[p])]))) == len(sent)
        assert len(sent) == len(set(zip(pair_row, pair_peer)))
    else:
        assert len(sent) == P

    # each pair's local row points into its peer's block at a copy of its own row
    local = plan.pair_local_row.tolist()
    used = {p: set() for p in range(num_peers)}
    for j, i in enumerate(plan.pair_order.tolist()):
        p = pair_peer[i]
        assert 0 <= local[j] < send_splits[p]
        assert sent[offsets[p] + local[j]] == pair_row[i]
        used[p].add(local[j])
    if not dedup:  # one row per pair: the local rows of a peer's pairs are a permutation of its block
        for p in range(num_peers):
            assert sorted(used[p]) == list(range(send_splits[p]))
    else:  # every sent row serves at least one pair
        for p in range(num_peers):
            assert used[p] == set(range(send_splits[p]))
    return plan


@pytest.mark.parametrize("dedup", [True, False])
@pytest.mark.parametrize("seed", range(12))
def test_random_against_naive(dedup, seed):
    g = torch.Generator().manual_seed(seed)
    num_rows = int(torch.randint(1, 30, (1,), generator=g))
    num_peers = int(torch.randint(1, 7, (1,), generator=g))
    K = int(torch.randint(1, 5, (1,), generator=g))
    # every row has K pairs in row order (as the layer builds them), some dropped at random
    pair_row = torch.arange(num_rows).repeat_interleave(K)
    keep = torch.rand(pair_row.numel(), generator=g) > 0.2
    pair_row = pair_row[keep]
    pair_peer = torch.randint(0, num_peers, (pair_row.numel(),), generator=g)
    _check(pair_row.tolist(), pair_peer.tolist(), num_rows, num_peers, dedup)


@pytest.mark.parametrize("dedup", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_random_unsorted_rows(dedup, seed):
    """Pairs in any row order (as after a previous hop)."""
    g = torch.Generator().manual_seed(100 + seed)
    num_rows, num_peers, P = 9, 4, 25
    pair_row = torch.randint(0, num_rows, (P,), generator=g)
    pair_peer = torch.randint(0, num_peers, (P,), generator=g)
    _check(pair_row.tolist(), pair_peer.tolist(), num_rows, num_peers, dedup)


@pytest.mark.parametrize("dedup", [True, False])
def test_zero_pairs(dedup):
    plan = _check([], [], 5, 3, dedup)
    assert plan.send_splits.tolist() == [0, 0, 0]
    assert plan.pair_splits.tolist() == [0, 0, 0]
    assert plan.send_src_row.numel() == 0 and plan.pair_order.numel() == 0 and plan.pair_local_row.numel() == 0


@pytest.mark.parametrize("dedup", [True, False])
def test_zero_pairs_zero_rows(dedup):
    plan = _check([], [], 0, 2, dedup)
    assert plan.send_splits.tolist() == [0, 0]


@pytest.mark.parametrize("dedup", [True, False])
def test_one_peer(dedup):
    pair_row = [0, 0, 1, 2, 2, 2]
    plan = _check(pair_row, [0] * 6, 3, 1, dedup)
    assert plan.send_splits.tolist() == ([3] if dedup else [6])
    assert plan.pair_splits.tolist() == [6]


def test_hand_case_dedup_vs_not():
    # rows 0..2, peers 0..1; row 0 -> peers 1, 1; row 1 -> peers 0, 1; row 2 -> peer 1
    pair_row = [0, 0, 1, 1, 2]
    pair_peer = [1, 1, 0, 1, 1]
    d = _check(pair_row, pair_peer, 3, 2, True)
    assert d.send_splits.tolist() == [1, 3]  # peer 0: row 1; peer 1: rows 0, 1, 2 (row 0 once)
    assert d.pair_splits.tolist() == [1, 4]
    assert d.pair_order.tolist() == [2, 0, 1, 3, 4]
    n = _check(pair_row, pair_peer, 3, 2, False)
    assert n.send_splits.tolist() == [1, 4]  # row 0 twice to peer 1
    assert sorted(n.send_src_row.tolist()[1:]) == [0, 0, 1, 2]


def test_peer_with_no_pairs_in_the_middle():
    plan = _check([0, 1, 2], [0, 3, 0], 3, 4, True)
    assert plan.send_splits.tolist() == [2, 0, 0, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_pair_metadata_round_trips_bit_exact_in_12_bytes_per_pair(dtype):
    from hiermoe_lightning.cost.calibrate import ENGINE_PAIR_BYTES
    from hiermoe_lightning.dispatch.engine import pack_pairs, unpack_pairs

    g = torch.Generator().manual_seed(0)
    local_row = torch.randint(0, 2**31 - 1, (37,), generator=g)
    expert = torch.randint(0, 4096, (37,), generator=g)
    weight = torch.rand(37, generator=g, dtype=torch.float64).to(dtype)
    weight[0] = torch.finfo(dtype).tiny  # extremes survive too
    weight[1] = torch.finfo(dtype).max
    meta = pack_pairs(local_row, expert, weight)
    assert meta.dtype == torch.int32
    per_pair = meta.shape[1] * meta.element_size()
    assert ENGINE_PAIR_BYTES == 12 and per_pair == (16 if dtype == torch.float64 else ENGINE_PAIR_BYTES)
    row, exp, w = unpack_pairs(meta, dtype)
    assert torch.equal(row, local_row) and torch.equal(exp, expert)
    assert w.dtype == dtype and torch.equal(w.view(torch.uint8), weight.view(torch.uint8))  # bit-exact
    empty = pack_pairs(local_row[:0], expert[:0], weight[:0])
    assert [t.numel() for t in unpack_pairs(empty, dtype)] == [0, 0, 0]
