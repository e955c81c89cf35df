"""ExpertParallel + flat dispatch: the sharded layer computes exactly the unsharded layer's function."""

import pytest
import torch

from hiermoe_lightning import ExpertParallel, MoELayer
from hiermoe_lightning.parallel import pack_routings, unpack_routings
from hiermoe_lightning.testing import run_ranks
from tests.sharded import Case, assert_matches_reference, run_sharded


@pytest.mark.parametrize("world", [1, 2, 4])
def test_flat_matches_reference_for_world_sizes_and_top_k(world):
    cases = [Case(str(world), "flat", 8, k, [5 + r for r in range(world)], seed=k) for k in (1, 2, 4)]
    results = run_sharded(world, cases)
    for i, case in enumerate(cases):
        assert_matches_reference(case, [r[i] for r in results])


def test_flat_edge_cases_uneven_zero_tokens_one_hot_expert_shared_experts():
    cases = [
        Case("4", "flat", 8, 2, [7, 0, 3, 1]),                 # uneven, one rank without tokens
        Case("4", "flat", 8, 1, [4, 4, 4, 4], force_expert=5),  # every token to expert 5
        Case("4", "flat", 8, 4, [4, 2, 4, 6], force_expert=0),  # expert 0 plus three others
        Case("4", "flat", 8, 2, [3, 5, 2, 4], layer_kwargs={"num_shared_experts": 1}),
        Case("4", "flat", 8, 2, [6, 6, 6, 6], layer_kwargs={"capacity_factor": 0.5},
             per_rank_reference=True),
        Case("4", "flat", 8, 3, [5, 5, 5, 5], layer_kwargs={"score_func": "sigmoid", "num_expert_groups": 4,
                                                           "topk_groups": 2}),
        Case("4", "flat", 4, 2, [0, 0, 0, 0]),                 # nobody has tokens
    ]
    results = run_sharded(4, cases)
    for i, case in enumerate(cases):
        assert_matches_reference(case, [r[i] for r in results])


def test_bf16_matches_reference_within_bf16_tolerance():
    cases = [Case("4", "flat", 8, 2, [6, 3, 5, 4], dtype=torch.bfloat16)]
    results = run_sharded(4, cases)
    assert results[0][0]["out"].dtype == torch.bfloat16
    assert_matches_reference(cases[0], [r[0] for r in results], atol=3e-2, rtol=3e-2)


def _shard_slices(rank, world):
    full = MoELayer(16, 24, 8, 2, seed=11)
    layer = MoELayer(16, 24, 8, 2, seed=11)
    ExpertParallel(str(world), dispatch="flat").shard_(layer)
    ids = layer.local_expert_ids()
    return {
        "ids": ids,
        "slices_equal": all(torch.equal(getattr(layer.experts, n), getattr(full.experts, n)[ids])
                            for n in ("w_gate", "w_up", "w_down")),
        "router_equal": torch.equal(layer.router.weight, full.router.weight),
        "slots": layer.experts.num_slots,
    }


def test_sharding_keeps_exactly_the_contiguous_slices():
    res = run_ranks(_shard_slices, 4)
    for rank, r in enumerate(res):
        assert r["ids"].tolist() == [2 * rank, 2 * rank + 1]
        assert r["slices_equal"] and r["router_equal"] and r["slots"] == 2


def _bad_inputs(rank, world):
    errors = {}
    attempts = {
        "topology_size": lambda: ExpertParallel("2x3", dispatch="flat"),
        "topology_string": lambda: ExpertParallel("2xx2", dispatch="flat"),
        "topology_zero": lambda: ExpertParallel([0, 4], dispatch="flat"),
        "dispatch": lambda: ExpertParallel("2x2", dispatch="hd3"),
        "preset": lambda: ExpertParallel("2x2", dispatch="flat", link_costs="h100-magic"),
        "divisible": lambda: ExpertParallel("2x2", dispatch="flat").shard_(MoELayer(8, 8, 6, 2)),
    }
    for key, fn in attempts.items():
        try:
            fn()
            errors[key] = None
        except (ValueError, TypeError) as e:
            errors[key] = f"{type(e).__name__}: {e}"
    # afterwards the group must still work: nothing hung, nothing half-done
    layer = MoELayer(8, 8, 8, 2)
    ExpertParallel("2x2", dispatch="flat").shard_(layer)
    errors["still_works"] = tuple(layer(torch.randn(3, 8)).shape)
    try:
        layer(torch.randn(3, 7))
    except ValueError as e:
        errors["hidden"] = str(e)
    return errors


def test_bad_input_fails_on_every_rank_before_any_collective():
    res = run_ranks(_bad_inputs, 4, timeout=60)
    for r in res:
        assert "world size 6" in r["topology_size"] and "4 ranks" in r["topology_size"]
        assert "'2xx2'" in r["topology_string"]
        assert "positive" in r["topology_zero"]
        assert "hd3" in r["dispatch"] and "hd1..hd2" in r["dispatch"]
        assert "h100-magic" in r["preset"] and "paper-a6000" in r["preset"]
        assert "num_experts (6)" in r["divisible"] and "(4)" in r["divisible"]
        assert r["still_works"] == (3, 8)
        assert "hidden_size=8" in r["hidden"]


def test_expert_parallel_needs_initialised_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        ExpertParallel("2", dispatch="flat")


def _routing_of(rank: int, index: int) -> torch.Tensor:
    """Rank ``rank``'s routing number ``index``: its own token count (zero on one rank) and top-k per routing."""
    tokens = [(3, 0, 5, 2), (4, 4, 1, 0), (0, 0, 0, 0)][index][rank]
    top_k = (2, 3, 1)[index]
    return torch.arange(tokens * top_k).view(tokens, top_k) + 100 * rank + 1000 * index


def _gathered(rank, world):
    ep = ExpertParallel("4", dispatch="flat")
    together = ep.gather_routings([_routing_of(rank, i) for i in range(3)])
    one_by_one = [ep.gather_routing(_routing_of(rank, i)) for i in range(3)]
    return together, one_by_one


def test_gather_routings_equals_one_gather_per_routing_and_a_hand_build():
    together, one_by_one = run_ranks(_gathered, 4)[0]
    for i in range(3):
        parts = [_routing_of(r, i) for r in range(4)]
        longest = max(p.shape[0] for p in parts)
        expected = torch.full((4, longest, parts[0].shape[1]), -1, dtype=torch.long)
        for r, p in enumerate(parts):
            expected[r, : p.shape[0]] = p
        assert torch.equal(together[i], expected), i
        assert torch.equal(one_by_one[i], expected), i


def _expected_gather(parts: list[torch.Tensor]) -> torch.Tensor:
    """The documented ``gather_routings`` output built by hand: ``[G, max T, K]``, rank r's rows first, -1 below."""
    longest = max(p.shape[0] for p in parts)
    expected = torch.full((len(parts), longest, parts[0].shape[1]), -1, dtype=torch.long)
    for r, p in enumerate(parts):
        expected[r, : p.shape[0]] = p
    return expected


@pytest.mark.parametrize("rows", [5, 6, 9])
def test_pack_unpack_round_trip_gives_the_gather_routings_layout(rows):
    """Three routings (top_k 2, 3, 1) of 4 ranks with unequal token counts, one rank without tokens, one routing
    without tokens anywhere, and dropped (-1) pairs inside the data: unpacking the stacked fixed-size packs gives the
    hand-built ``[G, max_r T_r, K]`` of every routing; the pack size depends on ``rows`` and the K's only."""
    def routing(rank, index):
        ids = _routing_of(rank, index).clone()
        ids.view(-1)[::3] = -1  # dropped pairs must stay data, not padding
        return ids

    packs = [pack_routings([routing(r, i) for i in range(3)], rows) for r in range(4)]
    for r, pack in enumerate(packs):
        assert pack.shape == (1 + rows, 6) and pack.dtype == torch.long
        assert pack[0].tolist() == [[3, 0, 5, 2][r], -1, [4, 4, 1, 0][r], -1, -1, 0]
    out = unpack_routings(torch.stack(packs), [2, 3, 1])
    for i in range(3):
        expected = _expected_gather([routing(r, i) for r in range(4)])
        assert torch.equal(out[i], expected), i
    assert out[2].shape == (4, 0, 1)


def test_pack_routings_rejects_more_tokens_than_rows_and_unpack_rejects_bad_counts():
    with pytest.raises(ValueError, match="rows_per_rank=2"):
        pack_routings([torch.zeros(3, 2, dtype=torch.long)], 2)
    bad = pack_routings([torch.zeros(2, 2, dtype=torch.long)], 2).unsqueeze(0)
    bad[0, 0, 0] = 3
    with pytest.raises(ValueError, match="0..2"):
        unpack_routings(bad, [2])


def _gathered_async(rank, world, rows):
    ep = ExpertParallel(str(world), dispatch="flat")
    handle = ep.start_gather_routings([_routing_of(rank, i) for i in range(3)], rows)
    # other collectives on the same group while the gather is in flight (as the next training step's all-to-alls)
    together = ep.gather_routings([_routing_of(rank, i) for i in range(3)])
    fixed = handle.wait()
    assert handle.wait() is fixed
    return fixed, together


@pytest.mark.parametrize("world, rows", [(4, 5), (4, 8), (1, 6)])
def test_async_fixed_size_gather_equals_gather_routings(world, rows):
    for rank, (fixed, together) in enumerate(run_ranks(_gathered_async, world, rows)):
        for i in range(3):
            expected = _expected_gather([_routing_of(r, i) for r in range(world)])
            assert torch.equal(fixed[i], expected), (rank, i)
            assert torch.equal(together[i], expected), (rank, i)


# ------------------------------------------------------------------ every rank builds only what it keeps
META_KWARGS = dict(hidden_size=16, ffn_hidden_size=24, num_experts=8, top_k=2, seed=11, num_shared_experts=1,
                   bias_update_rate=0.01)


def _meta_shard_rank(rank, world, kwargs, how):
    if how == "argument":
        layer = MoELayer(**kwargs, device="meta")
    else:
        with torch.device("meta"):
            layer = MoELayer(**kwargs)
    was_meta = [n for n, t in (*layer.named_parameters(), *layer.named_buffers()) if not t.is_meta]
    ExpertParallel(str(world), dispatch="flat").shard_(layer)
    return {
        "not_meta_before": was_meta,
        "meta_after": [n for n, t in (*layer.named_parameters(), *layer.named_buffers()) if t.is_meta],
        "state": {k: v.clone() for k, v in layer.state_dict().items()},
        "experts": layer.local_expert_ids(), "slots": layer.experts.num_slots,
        "expert_bytes": sum(p.untyped_storage().nbytes() for p in layer.experts.slot_parameters()),
        "devices": sorted({t.device.type for _, t in (*layer.named_parameters(), *layer.named_buffers())}),
    }


@pytest.mark.parametrize("world, how, dtype", [(2, "argument", torch.float32), (4, "context", torch.bfloat16),
                                               (4, "argument", torch.float32)])
def test_meta_build_then_shard_keeps_only_local_experts_with_the_normal_values(world, how, dtype):
    kwargs = {**META_KWARGS, "dtype": dtype}
    normal = MoELayer(**kwargs).state_dict()
    results = run_ranks(_meta_shard_rank, world, kwargs, how, timeout=60)
    E, per = kwargs["num_experts"], kwargs["num_experts"] // world
    for rank, r in enumerate(results):
        assert r["not_meta_before"] == [] and r["meta_after"] == [] and r["devices"] == ["cpu"]
        assert r["slots"] == per and r["experts"].tolist() == list(range(rank * per, (rank + 1) * per))
        elem = torch.empty((), dtype=dtype).element_size()
        assert r["expert_bytes"] == per * 3 * 16 * 24 * elem  # only this rank's experts were ever allocated
        assert r["state"].keys() == normal.keys()
        for name, want in normal.items():
            got = r["state"][name]
            if name.startswith("experts."):
                want = want[r["experts"]]
            assert got.dtype == want.dtype and torch.equal(got, want), (rank, name)


class _MetaCase(Case):
    """The same case, its layer built on meta on every rank (shard_ materialises it)."""

    def build(self) -> MoELayer:
        return MoELayer(16, 24, self.num_experts, self.top_k, seed=self.seed, dtype=self.dtype, device="meta",
                        **self.layer_kwargs)


@pytest.mark.parametrize("world, topology, dispatch", [(2, "2", "flat"), (4, "2x2", "hd2")])
def test_sharded_meta_built_layer_matches_the_unsharded_reference(world, topology, dispatch):
    cases = [Case(topology, dispatch, 8, 2, [5 + r for r in range(world)], seed=3),
             Case(topology, dispatch, 8, 2, [3, 0, 4, 6][:world], seed=4, layer_kwargs={"num_shared_experts": 1})]
    meta_cases = [_MetaCase(**vars(c)) for c in cases]
    results = run_sharded(world, meta_cases)
    for i, case in enumerate(cases):  # against the normally built unsharded layer
        assert_matches_reference(case, [r[i] for r in results])
