"""Overlapped layers (``overlap_chunks > 1``): dispatch, experts and combine as one pipeline give the unsharded
layer's output and every gradient, for every dispatch and chunk count, with uneven, empty and token-less chunks;
they move exactly the bytes of the sequential path; the programs are what the module doc says."""

import pytest
import torch

from hiermoe_lightning.dispatch.overlap import even_bounds
from tests.sharded import Case, assert_matches_reference, run_sharded

DISPATCHES = ["flat", "2dh", "hd1", "hd2", "auto"]


@pytest.mark.parametrize("chunks", [1, 2, 4])
def test_overlapped_layer_matches_reference_on_2x2(chunks):
    cases = []
    for i, name in enumerate(DISPATCHES):
        kw = {"overlap_chunks": chunks}
        cases += [
            Case("2x2", name, 8, 2, [6, 2, 5, 1], seed=i, parallel_kwargs=kw),  # fewer tokens than chunks
            Case("2x2", name, 16, 8, [7, 4, 0, 9], seed=i + 20, parallel_kwargs=kw),  # a rank without tokens
            Case("2x2", name, 8, 5, [3, 3, 3, 3], seed=i + 30, force_expert=2, parallel_kwargs=kw),  # a hot expert
        ]
    results = run_sharded(4, cases)
    for i, case in enumerate(cases):
        per_rank = [r[i] for r in results]
        if chunks > 1:  # chunks of leaving pairs, (multi-hop) pairs staying in the node, pairs served here (two
            hops = 1 if case.dispatch in ("flat", "hd1") else 2  # halves: the fill's and the drain's)
            resolved_multi_hop = case.dispatch in ("2dh", "hd2") or (case.dispatch == "auto" and hops == 2)
            if case.dispatch != "auto":
                assert all(r["num_chunks"] == chunks + (3 if resolved_multi_hop else 2) for r in per_rank), case
        assert_matches_reference(case, per_rank)


def test_overlap_on_one_level_and_three_levels_and_with_shared_experts():
    cases = [Case("4", name, 8, 3, [5, 0, 7, 2], seed=i, parallel_kwargs={"overlap_chunks": 3})
             for i, name in enumerate(["flat", "hd1"])]
    cases.append(Case("4", "hd1", 8, 2, [4, 4, 1, 6], seed=9, layer_kwargs={"num_shared_experts": 1},
                      parallel_kwargs={"overlap_chunks": 2}))
    results = run_sharded(4, cases)
    for i, case in enumerate(cases):
        assert_matches_reference(case, [r[i] for r in results])
    deep = [Case("2x2x2", name, 16, 6, [5, 0, 2, 7, 1, 3, 6, 2], seed=i, parallel_kwargs={"overlap_chunks": 3})
            for i, name in enumerate(["2dh", "hd3"])]
    results = run_sharded(8, deep, timeout=120)
    for i, case in enumerate(deep):
        assert_matches_reference(case, [r[i] for r in results])


def test_overlap_in_bf16_and_moves_exactly_the_bytes_of_one_pass():
    bf16 = Case("2x2", "hd2", 8, 4, [5, 2, 4, 3], dtype=torch.bfloat16, seed=3, parallel_kwargs={"overlap_chunks": 2})
    base = [Case("2x2", name, 16, 6, [40, 33, 0, 27], seed=5) for name in ("flat", "hd2")]
    over = [Case(c.topology, c.dispatch, c.num_experts, c.top_k, c.tokens, seed=c.seed,
                 parallel_kwargs={"overlap_chunks": 3}) for c in base]
    results = run_sharded(4, [bf16] + base + over)
    assert_matches_reference(bf16, [r[0] for r in results], atol=3e-2, rtol=3e-2)
    for i in range(len(base)):
        for r in results:
            assert r[1 + i]["bytes"] == r[1 + len(base) + i]["bytes"], base[i].dispatch


def test_even_bounds_split_tokens_into_nearly_equal_chunks():
    assert even_bounds(10, 4) == [0, 2, 5, 7, 10]
    assert even_bounds(2, 4) == [0, 0, 1, 1, 2]  # fewer tokens than chunks: empty chunks, every rank alike
    assert even_bounds(0, 3) == [0, 0, 0, 0]


@pytest.mark.parametrize("value", [0, 65, 2.0, True, "Auto"])
def test_overlap_chunks_is_validated(value):
    from hiermoe_lightning import ExpertParallel, HierMoEStrategy

    with pytest.raises(ValueError, match="overlap_chunks must be 'auto' or an int in 1..64"):
        ExpertParallel("2", dispatch="flat", overlap_chunks=value)
    with pytest.raises(ValueError, match="overlap_chunks must be 'auto' or an int in 1..64"):
        HierMoEStrategy(overlap_chunks=value)


def _auto_chunks(rank, world):
    from hiermoe_lightning import ExpertParallel, MoELayer
    from hiermoe_lightning.cost.link_costs import LinkCosts

    # bandwidth-bound links with almost no latency (any measurable compute is worth hiding, an extra chunk costs
    # 16 microseconds), then links whose every exchange costs 50 ms (no compute here is worth another chunk)
    out = []
    for costs in ({"a2a": (1e-3, 1e-3), "inter1": (1e-3, 1e-3), "intra1": (1e-3, 1e-3)},
                  {"a2a": (50.0, 1e-9), "inter1": (50.0, 1e-9), "intra1": (50.0, 1e-9)}):
        layer = MoELayer(32, 64, 8, 2, seed=0)
        ExpertParallel("2x2", dispatch="hd2", overlap_chunks="auto", link_costs=LinkCosts(costs)).shard_(layer)
        x = torch.randn(256, 32, generator=torch.Generator().manual_seed(rank))
        chosen = []
        for _ in range(3):
            layer(x).sum().backward()
            chosen.append(layer.dispatcher.overlap_in_use)
        out.append(chosen)
    return out


def test_auto_chunk_count_is_chosen_at_the_second_forward_alike_on_every_rank():
    from hiermoe_lightning.testing import run_ranks

    results = run_ranks(_auto_chunks, 4)
    assert all(r == results[0] for r in results)  # every rank the same count (the programs must match)
    slow_link, huge_alpha = results[0]
    assert slow_link[0] == 1 and slow_link[1] > 1  # 1 until measured; then overlap pays on a bandwidth-bound link
    assert huge_alpha == [1, 1, 1]  # 50 ms per extra exchange: one chunk


def test_overlap_auto_matches_reference():
    cases = [Case("2x2", name, 8, 3, [5, 0, 4, 6], seed=i, parallel_kwargs={"overlap_chunks": "auto"})
             for i, name in enumerate(["hd2", "flat"])]
    results = run_sharded(4, cases)
    for i, case in enumerate(cases):
        assert_matches_reference(case, [r[i] for r in results])


def test_shared_experts_and_their_gate_run_inside_the_pipeline_exactly():
    kw = {"overlap_chunks": 2}
    cases = [Case("2x2", "hd2", 8, 2, [4, 4, 1, 6], seed=11, layer_kwargs={"num_shared_experts": 2}, parallel_kwargs=kw),
             Case("2x2", "flat", 8, 3, [3, 0, 5, 2], seed=12,
                  layer_kwargs={"num_shared_experts": 1, "shared_expert_gate": True}, parallel_kwargs=kw)]
    results = run_sharded(4, cases)
    for i, case in enumerate(cases):
        assert_matches_reference(case, [r[i] for r in results])


def _inference(rank, world):
    from hiermoe_lightning import ExpertParallel

    case = Case("2x2", "hd2", 8, 3, [5, 3, 0, 4], seed=4, layer_kwargs={"num_shared_experts": 1})
    layer = case.build().eval()
    ExpertParallel("2x2", dispatch="hd2", overlap_chunks=2).shard_(layer)
    x, _ = case.inputs()
    start = sum(case.tokens[:rank])
    with torch.no_grad():
        out = layer(x[start:start + case.tokens[rank]])
    return out, out.requires_grad


def test_inference_under_no_grad_keeps_no_graph_and_matches_reference():
    from hiermoe_lightning.testing import run_ranks

    case = Case("2x2", "hd2", 8, 3, [5, 3, 0, 4], seed=4, layer_kwargs={"num_shared_experts": 1})
    layer = case.build().eval()
    with torch.no_grad():
        expected = layer(case.inputs()[0])
    results = run_ranks(_inference, 4)
    assert not any(grad for _, grad in results)
    torch.testing.assert_close(torch.cat([out for out, _ in results]), expected, atol=2e-5, rtol=1e-4)
