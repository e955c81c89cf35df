"""The dispatch on a GPU: CUDA tensors, NCCL collectives, at most one host synchronisation per hop.

Marked ``cuda``: skipped without a GPU (``scripts/gpu-check.sh`` runs them on one). Multi-rank cases need one GPU
per rank (NCCL refuses two ranks on one device) and are skipped on a single-GPU machine, with the reason.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from hiermoe_lightning.dispatch.engine import pack_pairs, plan_hop, plan_hop_counts
from tests.sharded import Case, assert_matches_reference, run_sharded

pytestmark = pytest.mark.cuda


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


needs_two_gpus = pytest.mark.skipif(_gpus() < 2, reason="NCCL needs one GPU per rank: 2 or more GPUs")


def _syncs(fn):
    """Run ``fn``; return (its result, the number of synchronising CUDA calls it made)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return out, sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.parametrize("dedup", [True, False])
def test_planning_a_hop_on_the_gpu_needs_no_host_synchronisation_and_matches_the_cpu(dedup):
    g = torch.Generator().manual_seed(0)
    P, rows, peers = 4000, 900, 4
    pair_row = torch.randint(0, rows, (P,), generator=g)
    pair_peer = torch.randint(0, peers, (P,), generator=g)
    weight = torch.rand(P, generator=g)
    ref = plan_hop(pair_row, pair_peer, rows, peers, dedup)
    dev = "cuda"
    pr, pp, w = pair_row.to(dev), pair_peer.to(dev), weight.to(dev)

    def planned():
        counts = plan_hop_counts(pr, pp, rows, peers, dedup)
        plan = counts.finish(int(ref.send_splits.sum()))  # the host learns this from the count exchange
        return plan, pack_pairs(plan.pair_local_row, pp[plan.pair_order], w[plan.pair_order])

    (plan, meta), syncs = _syncs(planned)
    assert syncs == 0
    for name in ("send_src_row", "send_splits", "pair_order", "pair_splits", "pair_local_row"):
        assert torch.equal(getattr(plan, name).cpu(), getattr(ref, name)), name
    assert meta.shape == (P, 3)


def test_unsharded_layer_on_the_gpu_equals_the_cpu_layer():
    from hiermoe_lightning import MoELayer

    cpu = MoELayer(64, 96, 8, 3, seed=1, num_shared_experts=1)
    gpu = MoELayer(64, 96, 8, 3, seed=1, num_shared_experts=1).cuda()
    x = torch.randn(200, 64, generator=torch.Generator().manual_seed(2))
    xc, xg = x.clone().requires_grad_(True), x.cuda().requires_grad_(True)
    out_c, out_g = cpu(xc), gpu(xg)
    (out_c * out_c).sum().backward()
    (out_g * out_g).sum().backward()
    torch.testing.assert_close(out_g.cpu(), out_c, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(xg.grad.cpu(), xc.grad, atol=1e-4, rtol=1e-4)
    for (name, pc), (_, pg) in zip(cpu.named_parameters(), gpu.named_parameters()):
        torch.testing.assert_close(pg.grad.cpu(), pc.grad, atol=1e-4, rtol=1e-3, msg=lambda m: f"{name}: {m}")


def _topology(world: int) -> str:
    return "2x2" if world == 4 else str(world)


@needs_two_gpus
def test_every_dispatch_on_nccl_equals_the_unsharded_layer():
    world = 4 if _gpus() >= 4 else 2
    topo = _topology(world)
    names = ["flat", "2dh", "hd1", "auto"] + (["hd2"] if world == 4 else [])
    tokens = [37, 0, 21, 16][:world]
    cases = [Case(topo, name, 8, 3, tokens, seed=4) for name in names]
    cases += [Case(topo, "hd2" if world == 4 else "hd1", 8, 3, tokens, seed=5, parallel_kwargs={"pipeline_chunks": 2})]
    cases += [Case(topo, "flat", 8, 2, tokens, dtype=torch.bfloat16, seed=6)]
    # overlapped layers (experts between the hops, shared experts inside the pipeline) on NCCL too
    cases += [Case(topo, "hd2" if world == 4 else "hd1", 8, 3, tokens, seed=7, layer_kwargs={"num_shared_experts": 1},
                   parallel_kwargs={"overlap_chunks": 2})]
    results = run_sharded(world, cases, timeout=240, backend="nccl")
    for i, case in enumerate(cases):
        tol = dict(atol=3e-2, rtol=3e-2) if case.dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-3)
        assert_matches_reference(case, [r[i] for r in results], **tol)


def _count_syncs_per_hop(rank, world):
    from hiermoe_lightning import ExpertParallel, MoELayer
    from hiermoe_lightning.dispatch.engine import DispatchHandle, dispatch_blocks

    dev = f"cuda:{torch.cuda.current_device()}"
    out = {}
    for name in ("flat", "hd1"):
        layer = MoELayer(32, 48, 8, 3, seed=2)
        ExpertParallel(str(world), dispatch=name).shard_(layer)
        layer.to(dev)
        x = torch.randn(64, 32, device=dev)
        routed = layer.router(x)
        layout = layer.dispatcher.layout(routed.expert_ids, routed.weights)
        route = layer.expert_parallel.route(name, layer.placement, x.device)  # tables on the GPU before timing
        handle = DispatchHandle(name, 1, 128)
        _, syncs = _syncs(lambda: dispatch_blocks(x, layout.pair_weight, layout.pair_row, layout.pair_expert, route,
                                                  handle))
        out[name] = (syncs, len(handle.hops))
    return out


@needs_two_gpus
def test_the_dispatch_synchronises_with_the_host_once_per_hop():
    from hiermoe_lightning.testing import run_ranks

    for per_rank in run_ranks(_count_syncs_per_hop, 2, timeout=240, backend="nccl", start_method="spawn"):
        for name, (syncs, hops) in per_rank.items():
            assert hops >= 1 and syncs <= hops, (name, syncs, hops)
