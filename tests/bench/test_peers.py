"""``hiermoe_lightning.bench.peers``: ``--impl`` parsing, the pure helpers against hand counts, and the layers against
a plain single-process reference of the same weights (megatron-style always; torchtitan and DeepSpeed where
installed)."""

import pytest
import torch
import torch.nn.functional as F

from hiermoe_lightning.bench import peers
from hiermoe_lightning.bench.peers import (ImplSpec, LayerShape, deepspeed_capacity, expert_major_order, kept_pairs,
                                           link_bytes, parse_impls, permute_by_expert)
from hiermoe_lightning.testing import run_ranks
from hiermoe_lightning.topology import Topology

WORLD, TOPOLOGY = 4, Topology([2, 2])
SHAPE = LayerShape(hidden_size=32, ffn_hidden_size=16, num_experts=8, top_k=2, tokens_per_rank=16,
                   dtype=torch.float32, seed=0)


# ---------------------------------------------------------------------------- parsing
def test_parse_impls_keeps_order_normalises_and_drops_duplicates():
    specs = parse_impls(" hiermoe:auto, hiermoe:flat,torchtitan,deepspeed,megatron-style,hiermoe:auto:overlap=4,"
                        "hiermoe:flat,megatron-core", 2)
    assert [s.name for s in specs] == ["hiermoe:auto", "hiermoe:flat", "torchtitan", "deepspeed", "megatron-style",
                                       "hiermoe:auto:overlap=4", "megatron-core"]
    assert specs[5] == ImplSpec("hiermoe:auto:overlap=4", "hiermoe", "auto", 4)
    assert specs[1].overlap_chunks is None  # not given: not passed to ExpertParallel
    assert [s.dispatch for s in parse_impls("hiermoe:2dh,hiermoe:hd1,hiermoe:hd2", 2)] == ["2dh", "hd1", "hd2"]


@pytest.mark.parametrize("text, match", [
    ("", "empty"), ("hiermoe:flat,,torchtitan", "empty"), ("fairscale", "'fairscale' is not an impl"),
    ("hiermoe", "needs a dispatch"), ("hiermoe:", "needs a dispatch"), ("hiermoe:hd3", "hd3"),
    ("hiermoe:flat:overlap=0", "overlap must be an integer >= 1"), ("hiermoe:flat:overlap=x", "overlap must be"),
    ("hiermoe:flat:chunks=2", "unknown or repeated option"), ("hiermoe:flat:overlap=2:overlap=3", "repeated"),
    ("torchtitan:flat", "is not an impl"), ("TorchTitan", "is not an impl"),
])
def test_bad_impls_name_the_flag_and_the_allowed_values(text, match):
    with pytest.raises(ValueError, match=match) as e:
        parse_impls(text, 2)
    assert str(e.value).startswith("--impl ") and "allowed: hiermoe:<dispatch>" in str(e.value)
    assert "megatron-style" in str(e.value)


def test_parse_impls_wants_a_string():
    with pytest.raises(TypeError, match="--impl"):
        parse_impls(["hiermoe:flat"], 2)


# ---------------------------------------------------------------------------- pure helpers, by hand
def test_link_bytes_splits_by_link_level_and_counts_both_directions():
    # 2x2: rank 0's node holds ranks 0, 1; ranks 2, 3 are on the other node; the rows it keeps (to itself) are free
    out = link_bytes(0, send_rows=[5, 1, 2, 3], recv_rows=[4, 6, 7, 8], row_bytes=10, topology=TOPOLOGY)
    assert out == {"intra": (1 + 6) * 10, "inter": (2 + 7 + 3 + 8) * 10}
    # one level: every other rank is its own node
    assert link_bytes(1, [1, 1, 1], [2, 2, 2], 4, Topology([3])) == {"inter": 2 * 3 * 4, "intra": 0}


def test_deepspeed_capacity_and_kept_pairs():
    assert deepspeed_capacity(tokens=1024, num_experts=16, top_k=8, capacity_factor=1.0, min_capacity=4) == 512
    assert deepspeed_capacity(tokens=16, num_experts=8, top_k=2, capacity_factor=1.0, min_capacity=4) == 4
    assert deepspeed_capacity(tokens=10, num_experts=4, top_k=1, capacity_factor=1.0, min_capacity=1) == 3  # ceil(2.5)
    assert kept_pairs(torch.tensor([5, 0, 2, 9]), capacity=4) == 4 + 0 + 2 + 4


def test_permute_by_expert_and_expert_major_order():
    ids = torch.tensor([[2, 0], [0, 1], [2, 1]])  # pairs 0..5 -> experts 2, 0, 0, 1, 2, 1
    order, per_expert = permute_by_expert(ids, 4)
    assert order.tolist() == [1, 2, 3, 5, 0, 4] and per_expert.tolist() == [2, 2, 2, 0]
    # rows arrive rank-major: rank 0 sends 1 row of local expert 0 and 2 of expert 1, rank 1 sends 3 of expert 0
    counts = torch.tensor([[1, 2], [3, 0]])  # [G=2, e=2]
    assert expert_major_order(counts).tolist() == [0, 3, 4, 5, 1, 2]


def test_gate_and_experts_are_the_ones_a_hiermoe_layer_has():
    from hiermoe_lightning import MoELayer

    layer = MoELayer(SHAPE.hidden_size, SHAPE.ffn_hidden_size, SHAPE.num_experts, SHAPE.top_k, seed=SHAPE.seed)
    assert torch.equal(peers.gate_weight(SHAPE), layer.router.weight.detach())
    w_gate, w_up, w_down = peers.local_expert_weights(SHAPE, 2, 3)
    assert torch.equal(w_gate, layer.experts.w_gate.detach()[2:5])
    assert torch.equal(w_down, layer.experts.w_down.detach()[2:5])


def test_collective_timer_puts_torch_back():
    import torch.distributed as dist

    before = (dist.all_to_all_single, torch.ops._c10d_functional.all_to_all_single)
    clock = peers.CommClock()
    with peers.CollectiveTimer(clock):
        assert dist.all_to_all_single is not before[0]
        assert torch.ops._c10d_functional.all_to_all_single.default is before[1].default  # attributes pass through
    assert (dist.all_to_all_single, torch.ops._c10d_functional.all_to_all_single) == before


# ---------------------------------------------------------------------------- layers vs one process
def reference(x, gate, w_gate, w_up, w_down, top_k):
    """One process, every expert here, a loop over tokens and their top-k experts: softmax over E of fp32 logits,
    top-k, renormalised, each token's SwiGLU outputs summed with those weights."""
    probs = (x.float() @ gate.t()).softmax(-1)
    top_w, top_i = probs.topk(top_k, dim=-1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    out = []
    for t in range(x.shape[0]):
        acc = torch.zeros(x.shape[1])
        for k in range(top_k):
            e = int(top_i[t, k])
            acc = acc + ((F.silu(x[t] @ w_gate[e]) * (x[t] @ w_up[e])) @ w_down[e]).float() * top_w[t, k]
        out.append(acc)
    return torch.stack(out).to(x.dtype)


def skewed_gate(shape):
    """With positive inputs: the last rank's experts (logits < 0) never make any token's top-k."""
    g = torch.Generator().manual_seed(7)
    gate = torch.rand(shape.num_experts, shape.hidden_size, generator=g)
    gate[-shape.num_experts // WORLD:] *= -1
    return gate


def _inputs(rank, shape, positive):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(shape.tokens_per_rank, shape.hidden_size, generator=g)
    grad = torch.randn(shape.tokens_per_rank, shape.hidden_size, generator=g)
    return (x.abs() if positive else x).requires_grad_(True), grad


def _megatron_rank(rank, world, shape, skew):
    torch.set_num_threads(1)
    built = peers.make_impl(ImplSpec("megatron-style", "megatron-style")).build(rank, world, TOPOLOGY, shape)
    module = built.module
    if skew:
        with torch.no_grad():
            module.gate.copy_(skewed_gate(shape))
    x, grad = _inputs(rank, shape, positive=skew)
    out = built.forward(x)
    out.backward(grad)
    return {"out": out.detach(), "x_grad": x.grad, "gate_grad": module.gate.grad,
            "expert_grads": [p.grad for p in (module.w_gate, module.w_up, module.w_down)],
            "splits": module.last_splits, "bytes": built.bytes_last_step(), "comm": built.comm_seconds()}


def _run_reference(shape, skew):
    gate = (skewed_gate(shape) if skew else peers.gate_weight(shape)).requires_grad_(True)
    weights = [w.requires_grad_(True) for w in peers.local_expert_weights(shape, 0, shape.num_experts)]
    xs, grads = zip(*(_inputs(r, shape, positive=skew) for r in range(WORLD)))
    x = torch.cat([t.detach() for t in xs]).requires_grad_(True)
    out = reference(x, gate, *weights, shape.top_k)
    out.backward(torch.cat(grads))
    return out.detach(), x.grad, gate.grad, [w.grad for w in weights]


@pytest.mark.parametrize("skew", [False, True], ids=["random-gate", "a-rank-gets-no-row"])
def test_megatron_style_equals_one_process(skew):
    """Output and every gradient (input, gate, each expert) equal one process holding all experts; with a gate that
    sends nothing to the last rank, that rank still runs its exchanges and its experts' gradients are zero."""
    res = run_ranks(_megatron_rank, WORLD, SHAPE, skew, timeout=60)
    out, x_grad, gate_grad, expert_grads = _run_reference(SHAPE, skew)
    T, local = SHAPE.tokens_per_rank, SHAPE.num_experts // WORLD
    tol = dict(atol=1e-5, rtol=1e-5)
    for r, got in enumerate(res):
        torch.testing.assert_close(got["out"], out[r * T:(r + 1) * T], **tol)
        torch.testing.assert_close(got["x_grad"], x_grad[r * T:(r + 1) * T], **tol)
        for g, ref in zip(got["expert_grads"], expert_grads):
            torch.testing.assert_close(g, ref[r * local:(r + 1) * local], **tol)
        assert got["comm"] > 0
    torch.testing.assert_close(sum(got["gate_grad"] for got in res), gate_grad, **tol)  # each rank: its tokens' part
    # every row sent is a row received, and every pair travels once
    sent = torch.tensor([got["splits"][0] for got in res])
    received = torch.tensor([got["splits"][1] for got in res])
    assert torch.equal(sent, received.t()) and int(sent.sum()) == WORLD * T * SHAPE.top_k
    if skew:
        assert int(sent[:, -1].sum()) == 0 and all(float(g.abs().sum()) == 0 for g in res[-1]["expert_grads"])


def _peer_rank(rank, world, kind, shape):
    torch.set_num_threads(1)
    with peers.quiet_peers():
        built = peers.make_impl(ImplSpec(kind, kind)).build(rank, world, TOPOLOGY, shape)
        x, grad = _inputs(rank, shape, positive=False)
        with built.timing():
            built.start_step()
            out = built.forward(x)
            out.backward(grad)
        grads = [p.grad for p in built.module.parameters()]
        return {"out": out.detach(), "x_grad": x.grad, "grads": grads, "bytes": built.bytes_last_step(),
                "comm": built.comm_seconds(), "extra": built.extra()}


def test_torchtitan_equals_one_process_and_moves_the_rows_megatron_style_moves():
    pytest.importorskip("torchtitan")
    pytest.importorskip("spmd_types")
    res = run_ranks(_peer_rank, WORLD, "torchtitan", SHAPE, timeout=120)
    mega = run_ranks(_peer_rank, WORLD, "megatron-style", SHAPE, timeout=60)
    out, x_grad, _, _ = _run_reference(SHAPE, skew=False)
    T = SHAPE.tokens_per_rank
    for r, (got, other) in enumerate(zip(res, mega)):
        torch.testing.assert_close(got["out"], out[r * T:(r + 1) * T], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["x_grad"], x_grad[r * T:(r + 1) * T], atol=1e-5, rtol=1e-5)
        assert got["grads"] and all(g is not None and torch.isfinite(g).all() for g in got["grads"])
        assert got["bytes"] == other["bytes"] and got["comm"] > 0  # the same routing: the same rows on each link


def test_deepspeed_runs_and_counts_its_drops():
    pytest.importorskip("deepspeed")
    res = run_ranks(_peer_rank, WORLD, "deepspeed", SHAPE, timeout=240)  # its first use JIT-builds an op (cached)
    capacity = deepspeed_capacity(SHAPE.tokens_per_rank, SHAPE.num_experts, SHAPE.top_k, 1.0, 4)
    for got in res:
        assert torch.isfinite(got["out"]).all() and torch.isfinite(got["x_grad"]).all()
        assert all(g is not None and torch.isfinite(g).all() for g in got["grads"])
        assert got["extra"]["capacity"] == capacity and 0 < got["extra"]["kept_pairs"] <= got["extra"]["pairs"]
        assert got["comm"] > 0
    # every rank sends E/G * capacity rows to each rank, padding included: 2 of its 3 peers across nodes
    row = SHAPE.num_experts // WORLD * capacity * SHAPE.row_bytes
    assert res[0]["bytes"] == {"inter": 2 * 2 * row, "intra": 2 * row}
