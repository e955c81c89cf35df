"""dispatch="auto": every rank picks the same depth from the live routing, switches when the arithmetic says so, and
the layer still computes the unsharded function while it switches."""

import torch
import torch.distributed as dist

from hiermoe_lightning import ExpertParallel, LinkCosts, MoELayer
from hiermoe_lightning.testing import run_ranks

# a2a is cheap to start but slow per byte; the hierarchical phases cost a start-up but are fast per byte:
# small batches -> hd1, big batches -> hd2
COSTS = {"a2a": (0.0, 1e-3), "inter1": (0.5, 1e-6), "intra1": (0.0, 1e-6)}


def _switching(rank, world, sizes):
    g = torch.Generator().manual_seed(0)
    ep = ExpertParallel("2x2", dispatch="auto", link_costs=LinkCosts(COSTS), auto_interval=1)
    layer = MoELayer(16, 24, 8, 4, seed=2)
    ref = MoELayer(16, 24, 8, 4, seed=2)
    ep.shard_(layer)
    seen = []
    for T in sizes:
        x_all = torch.randn(world * T, 16, generator=g)
        probe = torch.randn(world * T, 16, generator=g)
        sl = slice(rank * T, (rank + 1) * T)
        x = x_all[sl].clone().requires_grad_(True)
        out = layer(x)
        (out * probe[sl]).sum().backward()
        xr = x_all.clone().requires_grad_(True)
        ref_out = ref(xr)
        (ref_out * probe).sum().backward()
        router_grad = layer.router.weight.grad.clone()
        dist.all_reduce(router_grad)
        mine = layer.local_expert_ids()
        ok = (torch.allclose(out, ref_out[sl], atol=1e-5)
              and torch.allclose(x.grad, xr.grad[sl], atol=1e-5)
              and torch.allclose(router_grad, ref.router.weight.grad, atol=1e-5)
              and torch.allclose(layer.experts.w_down.grad, ref.experts.w_down.grad[mine], atol=1e-5))
        seen.append((layer.dispatch, ok, dict(layer.auto_predictions)))
        layer.zero_grad()
        ref.zero_grad()
    return seen


def test_auto_switches_depth_and_stays_exact():
    res = run_ranks(_switching, 4, [2, 300, 2])
    choices = [[d for d, _, _ in r] for r in res]
    assert all(c == choices[0] for c in choices), "ranks disagree on the depth"
    assert choices[0] == ["hd1", "hd2", "hd1"]
    assert all(ok for r in res for _, ok, _ in r)
    for d, _, pred in res[0]:
        assert min(pred, key=pred.get) == d


def _fixed(rank, world):
    ep = ExpertParallel("2x2", dispatch="hd2")
    layer = MoELayer(8, 8, 8, 2)
    ep.shard_(layer)
    layer(torch.randn(4, 8))
    return layer.dispatch, layer.auto_predictions


def test_concrete_dispatch_never_consults_the_model():
    assert all(r == ("hd2", {}) for r in run_ranks(_fixed, 4))


def _calibrated(rank, world):
    ep = ExpertParallel("2x2", dispatch="auto", link_costs="calibrate")
    layer = MoELayer(8, 8, 8, 2)
    ep.shard_(layer)
    layer(torch.randn(16, 8))
    return {k: (v.alpha, v.beta) for k, v in ep.link_costs.phases.items()}, layer.dispatch


def test_link_costs_calibrate_fits_on_the_live_groups_identically_everywhere():
    res = run_ranks(_calibrated, 4, timeout=90)
    assert all(r == res[0] for r in res)
    costs, chosen = res[0]
    assert {"a2a", "inter1", "intra1"} <= set(costs) and all(b >= 0 for _, b in costs.values())
    assert chosen in ("hd1", "hd2")
