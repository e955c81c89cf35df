"""balancing.update_routing_biases: global counts (one all-reduce for all layers), the same update on every rank,
counts reset; nothing changes when some rank skipped its step."""

from __future__ import annotations

import torch
import torch.distributed as dist

from hiermoe_lightning import MoELayer
from hiermoe_lightning.balancing import update_routing_biases
from hiermoe_lightning.testing import run_ranks

M = 8


def _layers(rate=0.5):
    return [MoELayer(M, 8, 4, 1, seed=1, bias_update_rate=rate), MoELayer(M, 8, 6, 2, seed=2, bias_update_rate=rate)]


def _sign_rule(bias, counts, rate):
    counts = counts.float()
    return bias + rate * torch.sign(counts.mean() - counts)


def test_one_process_updates_each_layer_from_its_own_counts_and_resets_them():
    layers = _layers()
    counts = [torch.tensor([3, 0, 1, 4]), torch.tensor([2, 2, 5, 0, 1, 6])]
    for layer, c in zip(layers, counts):
        layer.routed_tokens.copy_(c)
    assert update_routing_biases(layers) is True
    for layer, c in zip(layers, counts):
        torch.testing.assert_close(layer.router.expert_bias, _sign_rule(torch.zeros(len(c)), c, 0.5))
        assert int(layer.routed_tokens.abs().sum()) == 0


def test_a_skipped_step_keeps_the_counts_and_the_biases():
    layers = _layers()
    layers[0].routed_tokens.copy_(torch.tensor([3, 0, 1, 4]))
    assert update_routing_biases(layers, step_taken=False) is False
    assert torch.equal(layers[0].routed_tokens, torch.tensor([3, 0, 1, 4]))
    assert all(int(layer.router.expert_bias.abs().sum()) == 0 for layer in layers)
    assert update_routing_biases([]) is False


def _ranks(rank, world):
    calls = []
    real = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return real(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        layers = _layers()
        g = torch.Generator().manual_seed(rank)
        local = [torch.randint(0, 9, (layer.num_experts,), generator=g) for layer in layers]
        for layer, c in zip(layers, local):
            layer.routed_tokens.copy_(c)
        updated = update_routing_biases(layers, dist.group.WORLD)
        biases = [layer.router.expert_bias.clone() for layer in layers]
        reset = all(int(layer.routed_tokens.abs().sum()) == 0 for layer in layers)
        # a step skipped on rank 1 only: no rank changes anything, every rank keeps its counts
        for layer, c in zip(layers, local):
            layer.routed_tokens.copy_(c)
        skipped = update_routing_biases(layers, dist.group.WORLD, step_taken=rank != 1)
        kept = all(torch.equal(layer.routed_tokens, c) for layer, c in zip(layers, local))
        unchanged = all(torch.equal(layer.router.expert_bias, b) for layer, b in zip(layers, biases))
    finally:
        dist.all_reduce = real
    return {"local": local, "updated": updated, "biases": biases, "reset": reset, "calls": calls,
            "skipped": skipped, "kept": kept, "unchanged": unchanged}


def test_ranks_sum_their_counts_in_one_all_reduce_and_agree():
    out = run_ranks(_ranks, 3, timeout=60)
    for layer_index in range(2):
        total = sum(r["local"][layer_index] for r in out)
        want = _sign_rule(torch.zeros(len(total)), total, 0.5)
        for r in out:
            torch.testing.assert_close(r["biases"][layer_index], want)
    for r in out:
        assert r["updated"] and r["reset"]
        assert r["calls"] == [4 + 6 + 1, 4 + 6 + 1]  # one all-reduce per call: both layers' counts + the step flag
        assert r["skipped"] is False and r["kept"] and r["unchanged"]
