"""Every dispatch value on every topology computes the unsharded layer's function, and moves the bytes it should."""

import pytest
import torch

from hiermoe_lightning import ExpertParallel
from hiermoe_lightning.dispatch import DispatchHandle, combine, dispatch
from hiermoe_lightning.dispatch.comm import SplitMismatchError
from hiermoe_lightning.placement import Placement
from hiermoe_lightning.testing import run_ranks
from tests.sharded import Case, assert_matches_reference, run_sharded

ALL_2LEVEL = ["flat", "2dh", "hd1", "hd2"]


@pytest.mark.parametrize("topology", ["4", "2x2", "1x4", "4x1"])
def test_every_dispatch_matches_reference_on_4_ranks(topology):
    names = ["flat", "2dh", "hd1"] + (["hd2"] if "x" in topology else [])
    cases = []
    for i, name in enumerate(names):
        cases += [
            Case(topology, name, 4, 1, [5, 3, 0, 4], seed=i),               # 1 expert per rank, a rank without tokens
            Case(topology, name, 8, 2, [6, 2, 5, 1], seed=i + 10),          # 2 experts per rank
            Case(topology, name, 16, 8, [7, 4, 0, 6], seed=i + 20),         # 4 per rank, top-8: lots of duplicates
            Case(topology, name, 8, 5, [3, 3, 3, 3], seed=i + 30, force_expert=2),
        ]
    results = run_sharded(4, cases)
    for i, case in enumerate(cases):
        assert_matches_reference(case, [r[i] for r in results])


def test_every_dispatch_matches_reference_through_the_process_group_too():
    # the same layers with shared memory off: every byte between ranks of this host crosses gloo's sockets
    cases = [Case("2x2", name, 16, 8, [7, 4, 0, 6], seed=i + 40, parallel_kwargs={"shared_memory": False})
             for i, name in enumerate(ALL_2LEVEL)]
    cases += [Case("2x2", "hd2", 8, 5, [3, 3, 3, 3], seed=50, force_expert=2,
                   parallel_kwargs={"shared_memory": False, "pipeline_chunks": 2})]
    results = run_sharded(4, cases)
    for i, case in enumerate(cases):
        assert_matches_reference(case, [r[i] for r in results])


def test_every_dispatch_matches_reference_on_8_ranks_three_levels():
    names = ["flat", "2dh", "hd1", "hd2", "hd3"]
    cases = []
    for i, name in enumerate(names):
        cases += [
            Case("2x2x2", name, 8, 3, [4, 0, 2, 5, 1, 3, 6, 2], seed=i),
            Case("2x2x2", name, 16, 7, [3, 2, 2, 4, 0, 1, 3, 2], seed=i + 40),
        ]
    results = run_sharded(8, cases, timeout=120)
    for i, case in enumerate(cases):
        assert_matches_reference(case, [r[i] for r in results])


def test_bf16_hierarchical_matches_within_bf16_tolerance():
    cases = [Case("2x2", name, 8, 4, [5, 2, 4, 3], dtype=torch.bfloat16, seed=3) for name in ("hd2", "2dh")]
    results = run_sharded(4, cases)
    for i, case in enumerate(cases):
        assert_matches_reference(case, [r[i] for r in results], atol=3e-2, rtol=3e-2)


# ---------------------------------------------------------------------------- bytes, counted by hand
# Topology 2x2 (node 0 = ranks 0, 1; node 1 = ranks 2, 3); E = 8, rank r holds experts 2r, 2r+1.
# Only rank 0 has tokens:  t0 -> {4, 5} (both on rank 2)   t1 -> {4, 6} (ranks 2, 3)
#                          t2 -> {1, 2} (rank 0, rank 1)    t3 -> {0, 7} (rank 0, rank 3)
HAND_IDS = torch.tensor([[4, 5], [4, 6], [1, 2], [0, 7]])
# rows of the dispatch direction per level (the combine sends the same back, so bytes = 2 x rows x row bytes)
HAND_ROWS = {
    "flat": {"level1": 5, "level2": 1},   # one row per off-rank (token, expert)
    "hd1": {"level1": 4, "level2": 1},    # one row per (token, off-rank destination)
    "2dh": {"level1": 5, "level2": 3},    # inter1: 5 pairs to node 1; intra1: t1(6), t3(7) on node 1 + t2(2) on node 0
    "hd2": {"level1": 3, "level2": 3},    # inter1: t0, t1, t3 once each; intra1: t1 and t3 to rank 3, t2 to rank 1
}
HAND_PHASE_ROWS = {"hd2": {"inter1": 3, "intra1": 3}, "2dh": {"inter1": 5, "intra1": 3}}
LOWER_BOUND_LEVEL1_ROWS = 3  # distinct (token, other node): t0, t1, t3


def _hand_bytes(rank, world, M):
    out = {}
    ep = ExpertParallel("2x2", dispatch="flat")
    placement = Placement.contiguous(8, 4)
    for name in HAND_ROWS:
        route = ep.build_route(name, placement)
        ids = HAND_IDS if rank == 0 else torch.zeros(0, 2, dtype=torch.long)
        T, K = ids.shape
        x = torch.randn(T, M).requires_grad_(True)
        w = torch.rand(T, K).requires_grad_(True)
        handle = DispatchHandle(name, 2, M * 4)
        rows, pw, prow, pexp = dispatch(x, w.reshape(-1), torch.arange(T).repeat_interleave(K), ids.reshape(-1), route, handle)
        assert bool((placement.expert_to_rank[pexp] == rank).all()), "a pair ended on a rank that lacks its expert"
        # identity experts: the combine must return x * (sum of the token's weights)
        y = torch.zeros(rows.shape[0], M).index_add(0, prow, rows[prow].float() * pw[:, None])
        back = combine(y, handle, x.dtype)
        back.sum().backward()
        out[name] = {
            "bytes": handle.bytes_by_level(), "phases": handle.phase_bytes(),
            "identity_ok": torch.allclose(back, x * w.sum(1, keepdim=True), atol=1e-6),
            "w_grad_ok": torch.allclose(w.grad, x.sum(1, keepdim=True).expand_as(w), atol=1e-5) if T else True,
        }
    return out


def test_bytes_by_level_equal_hand_count():
    M = 6
    res = run_ranks(_hand_bytes, 4, M)
    row_bytes = M * 4
    for name, rows in HAND_ROWS.items():
        total = {lvl: sum(r[name]["bytes"][lvl] for r in res) for lvl in rows}
        assert total == {lvl: 2 * n * row_bytes for lvl, n in rows.items()}, name
        assert all(r[name]["identity_ok"] and r[name]["w_grad_ok"] for r in res), name
        for phase, n in HAND_PHASE_ROWS.get(name, {}).items():
            sent = sum(p["rows_sent"] for r in res for p in r[name]["phases"] if p["name"] == phase)
            recv = sum(p["rows_recv"] for r in res for p in r[name]["phases"] if p["name"] == phase)
            assert sent == recv == n, (name, phase)
    # hd2 reaches the level-1 lower bound; flat and 2dh send one row per off-node (token, expert)
    assert HAND_ROWS["hd2"]["level1"] == LOWER_BOUND_LEVEL1_ROWS


# ---------------------------------------------------------------------------- split agreement
def _mismatch(rank, world):
    import hiermoe_lightning.dispatch.engine as engine

    real = engine.start_exchange
    seen = []

    def corrupted(payloads, peers, tag=0):
        pending = real(payloads, peers, tag)
        first_counts = payloads[0][0].dtype == torch.long and not seen
        if rank != 1 or not first_counts:
            return pending
        seen.append(True)
        wait = pending.wait

        def corrupted_wait():
            out = wait()
            out[0][0, 0] += 1  # rank 1 now expects one row too many from peer 0
            return out

        pending.wait = corrupted_wait
        return pending

    engine.start_exchange = corrupted
    from hiermoe_lightning import MoELayer

    layer = MoELayer(8, 8, 8, 2)
    # through the process group: on shared memory the counts ride with the rows and there is no count exchange
    ExpertParallel("4", dispatch="flat", verify_splits=True, shared_memory=False).shard_(layer)
    try:
        layer(torch.randn(5, 8))
    except SplitMismatchError as e:
        return str(e)
    finally:
        engine.start_exchange = real
    return None


def test_mismatched_count_exchange_is_caught_on_every_rank():
    res = run_ranks(_mismatch, 4, timeout=60)
    assert all(msg is not None and "disagree" in msg for msg in res), res
    assert "expected" in res[1]


# ---------------------------------------------------------------------------- bytes: dispatchers vs the pure model
def _measured_bytes(rank, world, topology, routing, E, names, M):
    ep = ExpertParallel(topology, dispatch="flat")
    G, T, K = routing.shape
    placement = Placement.contiguous(E, G)
    out = {}
    for name in names:
        handle = DispatchHandle(name, ep.topology.num_levels, M * 4)
        ids = routing[rank].reshape(-1)
        dispatch(torch.randn(T, M), torch.rand(T * K), torch.arange(T).repeat_interleave(K), ids,
                 ep.build_route(name, placement), handle)
        out[name] = handle.bytes_by_level()
    return out


@pytest.mark.parametrize("topology, E, K", [("2x2", 8, 3), ("2x2x2", 16, 4)])
def test_dispatcher_bytes_equal_the_pure_cost_model(topology, E, K):
    from hiermoe_lightning.cost.traffic import bytes_by_level, phase_rows
    from hiermoe_lightning.dispatch.spec import dispatch_names, parse_dispatch
    from hiermoe_lightning.topology import Topology
    from hiermoe_lightning.traces import generate_routing

    topo = Topology.parse(topology)
    M, G = 8, topo.world_size
    routing = generate_routing("zipf:1.0", G, 24, E, K, seed=3)
    names = dispatch_names(topo.num_levels)
    res = run_ranks(_measured_bytes, G, topology, routing, E, names, M, timeout=90)
    placement = Placement.contiguous(E, G)
    for name in names:
        measured = {lvl: sum(r[name][lvl] for r in res) for lvl in res[0][name]}
        model = bytes_by_level(topo, phase_rows(topo, placement, routing, parse_dispatch(name, topo.num_levels)), M * 4)
        assert measured == model, name
        assert sum(measured.values()) > 0
