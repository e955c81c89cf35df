"""Unsharded MoELayer against tests.reference.naive_moe: outputs, gradients, dtypes, capacity and errors."""

from __future__ import annotations

import math

import pytest
import torch

from hiermoe_lightning import MoELayer
from tests.reference import naive_moe

M, FF, E = 16, 24, 8


def _layer(**kw) -> MoELayer:
    args = dict(hidden_size=M, ffn_hidden_size=FF, num_experts=E, top_k=2)
    args.update(kw)
    return MoELayer(**args)


CONFIGS = {
    "top1": dict(top_k=1),
    "top2": dict(top_k=2),
    "top4": dict(top_k=4),
    "top2_no_norm": dict(top_k=2, norm_topk_prob=False),
    "shared": dict(top_k=2, num_shared_experts=2, shared_ffn_hidden_size=8),
    "shared_default_ffn": dict(top_k=2, num_shared_experts=1),
    "sigmoid_groups": dict(top_k=2, score_func="sigmoid", num_expert_groups=4, topk_groups=2),
    "bias": dict(top_k=2, bias_update_rate=0.1),
    "capacity_probs": dict(top_k=2, capacity_factor=0.5, drop_policy="probs"),
    "capacity_position": dict(top_k=2, capacity_factor=0.75, drop_policy="position"),
    "capacity_large": dict(top_k=4, capacity_factor=2.0),
    "all_experts": dict(top_k=E),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_equals_naive(name):
    layer = _layer(seed=11, **CONFIGS[name])
    if name == "bias":
        with torch.no_grad():
            layer.router.expert_bias.copy_(torch.linspace(-0.3, 0.3, E))
    x = torch.randn(20, M)
    out = layer(x)
    assert out.shape == x.shape and out.dtype == torch.float32
    with torch.no_grad():
        ref = naive_moe(layer, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["top1", "top2", "top4", "shared", "sigmoid_groups", "capacity_probs", "capacity_position"])
def test_gradients_equal_naive(name):
    layer = _layer(seed=4, aux_loss_coef=0.0, **CONFIGS[name])
    params = [layer.router.weight, *layer.experts.slot_parameters()]
    if layer.shared_experts is not None:
        params += list(layer.shared_experts.parameters())
    x = torch.randn(12, M, requires_grad=True)
    g = torch.randn(12, M)

    (layer(x) * g).sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in params]
    x.grad = None
    layer.zero_grad(set_to_none=True)

    (naive_moe(layer, x) * g).sum().backward()
    want = [x.grad] + [p.grad for p in params]
    names = ["x", "router"] + [f"param{i}" for i in range(len(params) - 1)]
    for n, a, b in zip(names, got, want):
        assert b is not None, n
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    assert got[1].abs().sum() > 0  # the router learns through the weights


def test_expert_weight_grads_are_full_size_and_zero_for_unused_experts():
    layer = _layer(top_k=1)
    with torch.no_grad():
        layer.router.expert_bias.zero_()
    x = torch.randn(3, M)
    layer(x).sum().backward()
    used = set(layer.last_expert_ids.flatten().tolist())
    for p in layer.experts.slot_parameters():
        assert p.grad is not None and p.grad.shape == p.shape
        for e in range(E):
            if e not in used:
                assert torch.equal(p.grad[e], torch.zeros_like(p.grad[e]))


def test_bf16():
    l16 = _layer(seed=2, dtype=torch.bfloat16, num_shared_experts=1)
    l32 = _layer(seed=2, dtype=torch.float32, num_shared_experts=1)
    assert l16.experts.w_gate.dtype == torch.bfloat16
    assert torch.equal(l16.experts.w_gate, l32.experts.w_gate.bfloat16())
    x16 = torch.randn(32, M).bfloat16()
    x16.requires_grad_(True)
    out16 = l16(x16)
    assert out16.dtype == torch.bfloat16 and out16.shape == (32, M)
    ref = l32(x16.detach().float())
    torch.testing.assert_close(out16.float(), ref, rtol=5e-2, atol=3e-2)
    # and against the reference loop on the bf16 layer itself
    with torch.no_grad():
        torch.testing.assert_close(out16.float(), naive_moe(l16, x16.detach()).float(), rtol=2e-2, atol=2e-2)
    out16.float().sum().backward()
    assert x16.grad is not None and x16.grad.dtype == torch.bfloat16
    assert l16.experts.w_gate.grad is not None and l16.experts.w_gate.grad.dtype == torch.bfloat16
    assert torch.isfinite(l16.router.weight.grad).all()


@pytest.mark.parametrize("shape", [(2, 5, M), (1, 1, 3, M), (7, M), (M,)])
def test_input_shapes(shape):
    layer = _layer(seed=1)
    x = torch.randn(*shape)
    out = layer(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, layer(x.reshape(-1, M)).reshape(shape))


def test_batch_seq_input_equals_naive():
    layer = _layer(seed=1, top_k=2)
    x = torch.randn(2, 6, M)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), naive_moe(layer, x), rtol=1e-5, atol=1e-5)


def test_empty_input():
    layer = _layer()
    out = layer(torch.randn(0, M))
    assert out.shape == (0, M)


# ---------------------------------------------------------------------------------------------- dropless / capacity
def _force_all_to_expert(layer, e):
    """Router logits favour expert ``e`` overwhelmingly for every token (inputs with a positive mean)."""
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[e] = 1.0


def test_dropless_by_default_keeps_everything_even_when_imbalanced():
    layer = _layer(top_k=2)
    assert layer.capacity_factor is None
    _force_all_to_expert(layer, 3)
    x = torch.randn(16, M).abs() + 0.5
    out = layer(x)
    ids = layer.last_expert_ids
    assert (ids >= 0).all()
    assert (ids == 3).any(-1).all()  # every token reached expert 3 (16 pairs > any capacity of ceil(16*2/8)=4)
    assert torch.equal(ids, layer.router(x).expert_ids)
    with torch.no_grad():
        torch.testing.assert_close(out, naive_moe(layer, x), rtol=1e-5, atol=1e-5)


def _hand_capacity(ids, weights, capacity, policy):
    """Independent reference: per expert, rank its pairs and keep the first ``capacity``."""
    T, K = ids.shape
    keep = torch.zeros(T, K, dtype=torch.bool)
    for e in range(E):
        pairs = [(t, k) for t in range(T) for k in range(K) if int(ids[t, k]) == e]
        if policy == "probs":
            pairs.sort(key=lambda tk: (-float(weights[tk]), tk[0] * K + tk[1]))
        else:
            pairs.sort(key=lambda tk: tk[0] * K + tk[1])
        for tk in pairs[:capacity]:
            keep[tk] = True
    return keep


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("cf, K", [(0.5, 2), (1.0, 2), (1.25, 4), (0.3, 1), (3.0, 2)])
def test_capacity_policy_random(policy, cf, K):
    layer = _layer(top_k=K, capacity_factor=cf, drop_policy=policy, norm_topk_prob=False)
    with torch.no_grad():  # skew the router so some experts overflow
        layer.router.weight[0] += 0.8
    T = 24
    x = torch.randn(T, M) + 0.3
    layer(x)
    routed = layer.router(x)
    capacity = math.ceil(cf * T * K / E)
    kept = layer.last_expert_ids
    keep = _hand_capacity(routed.expert_ids, routed.weights.detach(), capacity, policy)
    assert torch.equal(kept, torch.where(keep, routed.expert_ids, -1))
    counts = torch.bincount(kept[kept >= 0], minlength=E)
    assert int(counts.max()) <= capacity
    # an expert below capacity loses nothing
    full = torch.bincount(routed.expert_ids.flatten(), minlength=E)
    assert torch.equal(counts, torch.minimum(full, torch.full_like(full, capacity)))


def test_capacity_hand_case():
    # identity-like gate: token t's logits are its input; 4 tokens all prefer expert 0
    layer = MoELayer(4, 6, 4, 1, capacity_factor=1.0, norm_topk_prob=False)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(4))
    x = torch.tensor([[1.0, 0, 0, 0], [3.0, 0, 0, 0], [2.0, 0, 0, 0], [0.5, 0, 0, 0]])
    # capacity = ceil(1.0 * 4 * 1 / 4) = 1
    layer.drop_policy = "probs"
    out_p = layer(x)
    assert layer.last_expert_ids.flatten().tolist() == [-1, 0, -1, -1]  # the highest weight (token 1) stays
    layer.drop_policy = "position"
    out_q = layer(x)
    assert layer.last_expert_ids.flatten().tolist() == [0, -1, -1, -1]  # the earliest token stays
    # dropped tokens get zero output (no shared experts)
    assert torch.equal(out_p[[0, 2, 3]], torch.zeros(3, 4))
    assert torch.equal(out_q[1:], torch.zeros(3, 4))
    assert out_p[1].abs().sum() > 0 and out_q[0].abs().sum() > 0


def test_capacity_dropped_pairs_have_zero_weight_and_match_naive():
    layer = _layer(top_k=2, capacity_factor=0.5)
    x = torch.randn(16, M)
    out = layer(x)
    assert (layer.last_expert_ids == -1).any()
    with torch.no_grad():
        torch.testing.assert_close(out, naive_moe(layer, x), rtol=1e-5, atol=1e-5)
    ids, w = layer._apply_capacity(*[t.detach() for t in (layer.router(x).expert_ids, layer.router(x).weights)])
    assert torch.equal(w[ids < 0], torch.zeros(int((ids < 0).sum())))


# ---------------------------------------------------------------------------------------------- aux loss / bias
def test_aux_loss_is_0dim_and_not_added_to_output():
    a = _layer(seed=9, aux_loss_coef=0.0)
    b = _layer(seed=9, aux_loss_coef=1.0)
    x = torch.randn(10, M)
    oa, ob = a(x), b(x)
    assert isinstance(a.aux_loss, torch.Tensor) and a.aux_loss.dim() == 0
    assert isinstance(b.aux_loss, torch.Tensor) and b.aux_loss.dim() == 0
    assert float(a.aux_loss.detach()) == 0.0
    assert float(b.aux_loss.detach()) > 0.0
    assert torch.equal(oa, ob)
    b.aux_loss.backward()
    assert b.router.weight.grad is not None


def test_aux_loss_before_first_forward_is_zero_tensor():
    layer = _layer()
    assert isinstance(layer.aux_loss, torch.Tensor) and layer.aux_loss.dim() == 0 and float(layer.aux_loss) == 0


def test_update_routing_bias_uses_accumulated_counts():
    layer = _layer(top_k=2, bias_update_rate=0.1)
    assert layer.training
    x1, x2 = torch.randn(10, M), torch.randn(7, M)
    layer(x1)
    c1 = torch.bincount(layer.last_expert_ids.flatten(), minlength=E)
    layer(x2)
    c2 = torch.bincount(layer.last_expert_ids.flatten(), minlength=E)
    total = c1 + c2
    assert torch.equal(layer.routed_tokens, total)
    layer.update_routing_bias()
    expected = 0.1 * torch.sign(total.float().mean() - total.float())
    torch.testing.assert_close(layer.router.expert_bias, expected)
    assert torch.equal(layer.routed_tokens, torch.zeros(E, dtype=torch.long))
    # a second call with nothing routed since is balanced: no change
    layer.update_routing_bias()
    torch.testing.assert_close(layer.router.expert_bias, expected)


def test_eval_mode_does_not_accumulate_routed_tokens():
    layer = _layer(bias_update_rate=0.1)
    layer.eval()
    layer(torch.randn(10, M))
    assert torch.equal(layer.routed_tokens, torch.zeros(E, dtype=torch.long))
    layer.update_routing_bias()
    assert torch.equal(layer.router.expert_bias, torch.zeros(E))


def test_routed_tokens_not_in_state_dict():
    assert "routed_tokens" not in _layer().state_dict()


# ---------------------------------------------------------------------------------------------- init
@pytest.mark.parametrize("kw", [dict(), dict(num_shared_experts=2, score_func="sigmoid", num_expert_groups=2)])
def test_deterministic_init(kw):
    torch.manual_seed(1)
    a = _layer(seed=5, **kw)
    torch.manual_seed(2)
    torch.randn(1000)
    b = _layer(seed=5, **kw)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    c = _layer(seed=6, **kw)
    assert not torch.equal(c.experts.w_gate, a.experts.w_gate)
    assert not torch.equal(c.router.weight, a.router.weight)


def test_unsharded_facts():
    layer = _layer()
    assert not layer.is_sharded
    assert layer.experts.num_slots == E
    assert layer.local_expert_ids().tolist() == list(range(E))
    assert "num_experts=8" in repr(layer)


# ---------------------------------------------------------------------------------------------- errors
def test_wrong_hidden_size_input():
    layer = _layer()
    with pytest.raises(ValueError, match="hidden_size"):
        layer(torch.randn(4, M + 1))
    with pytest.raises(ValueError, match="hidden_size"):
        layer(torch.tensor(1.0))
    with pytest.raises(TypeError):
        layer([[0.0] * M])


@pytest.mark.parametrize(
    "kw, param",
    [
        (dict(top_k=0), "top_k"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=E + 1), "top_k"),
        (dict(top_k=2.0), "top_k"),
        (dict(hidden_size=16.0), "hidden_size"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(ffn_hidden_size="24"), "ffn_hidden_size"),
        (dict(ffn_hidden_size=-3), "ffn_hidden_size"),
        (dict(num_experts=True), "num_experts"),
        (dict(num_experts=None), "num_experts"),
        (dict(num_experts=0), "num_experts"),
        (dict(capacity_factor=0), "capacity_factor"),
        (dict(capacity_factor=-1.0), "capacity_factor"),
        (dict(capacity_factor="1.0"), "capacity_factor"),
        (dict(capacity_factor=float("nan")), "capacity_factor"),
        (dict(capacity_factor=float("inf")), "capacity_factor"),
        (dict(drop_policy="random"), "drop_policy"),
        (dict(drop_policy=None), "drop_policy"),
        (dict(num_shared_experts=-1), "num_shared_experts"),
        (dict(num_shared_experts=1.5), "num_shared_experts"),
        (dict(score_func="tanh"), "score_func"),
        (dict(num_expert_groups=3), "num_expert_groups"),
        (dict(aux_loss_coef=-1.0), "aux_loss_coef"),
        (dict(dtype=torch.int32), "dtype"),
    ],
)
def test_bad_args_name_parameter(kw, param):
    with pytest.raises((ValueError, TypeError)) as ei:
        _layer(**kw)
    assert param in str(ei.value)


def test_bad_type_is_type_error():
    with pytest.raises(TypeError, match="hidden_size"):
        _layer(hidden_size=16.0)


def test_drop_policy_error_lists_allowed():
    with pytest.raises(ValueError) as ei:
        _layer(drop_policy="random")
    assert "probs" in str(ei.value) and "position" in str(ei.value)


# ---------------------------------------------------------------------------------------------- options that HF families need
def _routed_only(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """The routed experts' part of ``naive_moe`` (which adds the shared experts ungated)."""
    out = naive_moe(layer, x)
    if layer.shared_experts is not None:
        out = out - layer.shared_experts(x.reshape(-1, M)).reshape(x.shape)
    return out


@pytest.mark.parametrize("shape", [(10, M), (2, 5, M)])
def test_shared_expert_gate_equals_sigmoid_of_x_w_times_shared(shape):
    layer = _layer(seed=3, num_shared_experts=2, shared_ffn_hidden_size=8, shared_expert_gate=True)
    gate = layer.shared_expert_gate
    assert isinstance(gate, torch.nn.Linear) and gate.bias is None and gate.weight.shape == (1, M)
    x = torch.randn(*shape)
    out = layer(x)
    with torch.no_grad():
        x2 = x.reshape(-1, M)
        w = layer.shared_expert_gate.weight  # [1, M]
        sw = layer.shared_experts
        shared = (torch.nn.functional.silu(x2 @ sw.w_gate) * (x2 @ sw.w_up)) @ sw.w_down
        want = _routed_only(layer, x) + (torch.sigmoid(x2 @ w.t()) * shared).reshape(shape)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    # the gate matters: without it the output is different
    ungated = _layer(seed=3, num_shared_experts=2, shared_ffn_hidden_size=8)
    assert not torch.allclose(ungated(x), out, atol=1e-3)


def test_shared_expert_gate_gradients_equal_manual_reference():
    layer = _layer(seed=5, num_shared_experts=1, shared_expert_gate=True, aux_loss_coef=0.0)
    x = torch.randn(9, M, requires_grad=True)
    g = torch.randn(9, M)
    (layer(x) * g).sum().backward()
    got = {n: p.grad.clone() for n, p in layer.named_parameters()}
    got_x = x.grad.clone()
    x.grad = None
    layer.zero_grad(set_to_none=True)
    w, sw = layer.shared_expert_gate.weight, layer.shared_experts
    shared = (torch.nn.functional.silu(x @ sw.w_gate) * (x @ sw.w_up)) @ sw.w_down
    ((_routed_only(layer, x) + torch.sigmoid(x @ w.t()) * shared) * g).sum().backward()
    for n, p in layer.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    torch.testing.assert_close(got_x, x.grad, rtol=1e-4, atol=1e-5)
    assert got["shared_expert_gate.weight"].abs().sum() > 0


def test_shared_expert_gate_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a = _layer(seed=7, num_shared_experts=1, shared_expert_gate=True)
    assert torch.equal(torch.get_rng_state(), state)
    b = _layer(seed=7, num_shared_experts=1, shared_expert_gate=True)
    c = _layer(seed=8, num_shared_experts=1, shared_expert_gate=True)
    assert torch.equal(a.shared_expert_gate.weight, b.shared_expert_gate.weight)
    assert not torch.equal(a.shared_expert_gate.weight, c.shared_expert_gate.weight)
    assert "shared_expert_gate.weight" in a.state_dict()
    # std ~ M**-0.5, like the other parameters
    assert 0.05 < float(a.shared_expert_gate.weight.detach().std()) < 0.6


def test_shared_expert_gate_in_bf16_follows_the_layer_dtype():
    layer = _layer(seed=1, num_shared_experts=1, shared_expert_gate=True, dtype=torch.bfloat16)
    assert layer.shared_expert_gate.weight.dtype == torch.bfloat16
    out = layer(torch.randn(6, M).to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_defaults_add_nothing_to_the_state_dict():
    keys = set(_layer().state_dict())
    assert keys == {"router.weight", "router.expert_bias", "experts.w_gate", "experts.w_up", "experts.w_down"}
    assert _layer().shared_expert_gate is None


def test_layer_passes_routed_scaling_factor_to_the_router():
    x = torch.randn(14, M)
    plain = _layer(seed=2, score_func="sigmoid")
    scaled = _layer(seed=2, score_func="sigmoid", routed_scaling_factor=2.5)
    assert scaled.router.routed_scaling_factor == 2.5
    out = scaled(x)
    ref = plain(x)
    assert torch.equal(scaled.last_expert_ids, plain.last_expert_ids)  # scaling never changes the selection
    torch.testing.assert_close(out, 2.5 * ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(out, naive_moe(scaled, x), rtol=1e-5, atol=1e-5)


def test_layer_honours_a_fixed_bias_with_rate_zero():
    layer = _layer(seed=4, top_k=2, score_func="sigmoid")
    with torch.no_grad():
        layer.router.expert_bias[3] = 10.0  # expert 3 in every token's top-2
    x = torch.randn(16, M)
    out = layer(x)
    assert (layer.last_expert_ids == 3).any(-1).all()
    with torch.no_grad():
        torch.testing.assert_close(out, naive_moe(layer, x), rtol=1e-5, atol=1e-5)
        # weighted by the unbiased sigmoid scores (renormalised over the two chosen)
        scores = torch.sigmoid(x @ layer.router.weight.t()).gather(1, layer.last_expert_ids)
        torch.testing.assert_close(layer.router(x).weights, scores / scores.sum(-1, keepdim=True))


def test_layer_router_dtype_none_computes_the_gate_in_the_input_dtype():
    layer = _layer(seed=6, router_dtype=None, dtype=torch.bfloat16)
    assert layer.router.router_dtype is None and layer.router.weight.dtype == torch.float32
    x = torch.randn(12, M).to(torch.bfloat16)
    layer(x)
    logits = (x @ layer.router.weight.to(torch.bfloat16).t()).float()
    want = torch.softmax(logits, dim=-1).topk(2, dim=-1).indices
    assert torch.equal(layer.last_expert_ids, want)


@pytest.mark.parametrize("kw, error, param", [
    (dict(shared_expert_gate=True), ValueError, "shared_expert_gate"),  # no shared experts
    (dict(shared_expert_gate=1, num_shared_experts=1), TypeError, "shared_expert_gate"),
    (dict(shared_expert_gate=None, num_shared_experts=1), TypeError, "shared_expert_gate"),
    (dict(routed_scaling_factor=0), ValueError, "routed_scaling_factor"),
    (dict(routed_scaling_factor="1"), TypeError, "routed_scaling_factor"),
    (dict(router_dtype=torch.int64), ValueError, "router_dtype"),
    (dict(router_dtype="float32"), TypeError, "router_dtype"),
])
def test_new_options_bad_values_name_the_parameter(kw, error, param):
    with pytest.raises(error) as ei:
        _layer(**kw)
    assert param in str(ei.value)


def test_update_routing_bias_resets_counts_even_at_rate_zero_as_before():
    layer = _layer(seed=1)
    layer(torch.randn(5, M))
    assert int(layer.routed_tokens.sum()) == 10
    layer.update_routing_bias()
    assert int(layer.routed_tokens.sum()) == 0 and torch.equal(layer.router.expert_bias, torch.zeros(E))


# ------------------------------------------------------------------ built on meta (device="meta"), materialised later
META_VARIANTS = [
    dict(),
    dict(num_shared_experts=2, shared_ffn_hidden_size=8, dtype=torch.bfloat16),
    dict(score_func="sigmoid", num_expert_groups=4, topk_groups=2, bias_update_rate=0.01, capacity_factor=1.5),
]


def _all_tensors(layer):
    return [*layer.named_parameters(), *layer.named_buffers()]


@pytest.mark.parametrize("kw", META_VARIANTS)
@pytest.mark.parametrize("how", ["argument", "context"])
def test_meta_build_allocates_nothing_and_materialises_to_the_normal_build(kw, how, monkeypatch):
    normal = _layer(seed=7, **kw)
    real_generator = torch.Generator

    def no_draws(*a, **k):
        raise AssertionError("a meta build must not draw")

    monkeypatch.setattr(torch, "Generator", no_draws)
    if how == "argument":
        layer = _layer(seed=7, device="meta", **kw)
    else:
        with torch.device("meta"):
            layer = _layer(seed=7, **kw)
    monkeypatch.setattr(torch, "Generator", real_generator)
    assert layer.is_meta and all(t.is_meta for _, t in _all_tensors(layer))
    assert layer.placement.expert_to_rank.device.type == "cpu"  # placements stay host metadata
    assert layer.materialize_() is layer and not layer.is_meta
    got, want = layer.state_dict(), normal.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].device.type == "cpu", name
        assert torch.equal(got[name], want[name]), name
    assert {n: p.requires_grad for n, p in layer.named_parameters()} == \
        {n: p.requires_grad for n, p in normal.named_parameters()}
    x = torch.randn(12, M).to(kw.get("dtype", torch.float32))
    assert torch.equal(layer(x), normal(x))


def test_meta_build_under_a_meta_default_materialises_on_the_cpu():
    with torch.device("meta"):
        layer = _layer(seed=1)
        layer.materialize_()  # None under a meta default: the CPU
    assert all(t.device.type == "cpu" for _, t in _all_tensors(layer)) and layer.aux_loss.device.type == "cpu"


def test_materialize_keeps_tensors_that_are_not_on_meta():
    layer = _layer(seed=1, device="meta")
    layer.router.weight = torch.nn.Parameter(torch.ones(E, M))  # e.g. loaded with assign=True
    layer.materialize_()
    assert torch.equal(layer.router.weight, torch.ones(E, M))
    assert torch.equal(layer.experts.w_gate, _layer(seed=1).experts.w_gate)


def test_a_normal_build_is_unchanged_by_the_device_argument():
    a, b = _layer(seed=4), _layer(seed=4, device="cpu")
    for (n, x), (_, y) in zip(_all_tensors(a), _all_tensors(b)):
        assert torch.equal(x, y), n
    assert not a.is_meta and a.materialize_() is a
