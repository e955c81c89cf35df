"""Router: scores, top-k, group-limited routing, aux loss and the aux-loss-free bias."""

from __future__ import annotations

import math

import pytest
import torch

from hiermoe_lightning.routing import Router

M = 16


def _router(E=8, K=2, **kw) -> Router:
    return Router(M, E, K, **kw)


def _identity_router(E, K, **kw) -> Router:
    """hidden_size = E and an identity gate: the logits are the input itself."""
    r = Router(E, E, K, **kw)
    with torch.no_grad():
        r.weight.copy_(torch.eye(E))
    return r


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


# ---------------------------------------------------------------------------------------------- scores
def test_softmax_scores():
    r = _router(score_func="softmax")
    x = torch.randn(10, M)
    s = r.scores(x)
    assert s.dtype == torch.float32 and s.shape == (10, 8)
    torch.testing.assert_close(s, torch.softmax(x @ r.weight.t(), dim=-1))
    torch.testing.assert_close(s.sum(-1), torch.ones(10))


def test_sigmoid_scores():
    r = _router(score_func="sigmoid")
    x = torch.randn(10, M)
    torch.testing.assert_close(r.scores(x), torch.sigmoid(x @ r.weight.t()))


def test_scores_are_fp32_for_bf16_input():
    r = _router()
    x = torch.randn(5, M).bfloat16()
    out = r(x)
    assert r.scores(x).dtype == torch.float32
    assert out.weights.dtype == torch.float32
    torch.testing.assert_close(r.scores(x), torch.softmax(x.float() @ r.weight.t(), -1))


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("K", [1, 2, 3, 8])
def test_topk_ids_are_the_k_largest(score_func, K):
    r = _router(E=8, K=K, score_func=score_func, aux_loss_coef=0.0)
    x = torch.randn(32, M)
    out = r(x)
    scores = r.scores(x)
    assert out.expert_ids.shape == (32, K) and out.expert_ids.dtype == torch.int64
    top = torch.sort(scores, dim=-1, descending=True).indices[:, :K]
    assert torch.equal(torch.sort(out.expert_ids, -1).values, torch.sort(top, -1).values)
    for t in range(32):
        assert len(set(out.expert_ids[t].tolist())) == K
    assert torch.equal(out.tokens_per_expert, torch.bincount(out.expert_ids.flatten(), minlength=8))


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_norm_topk_prob_on(score_func):
    r = _router(K=3, score_func=score_func, norm_topk_prob=True)
    x = torch.randn(20, M)
    out = r(x)
    raw = r.scores(x).gather(1, out.expert_ids)
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(20))
    torch.testing.assert_close(out.weights, raw / raw.sum(-1, keepdim=True))


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_norm_topk_prob_off(score_func):
    r = _router(K=3, score_func=score_func, norm_topk_prob=False)
    x = torch.randn(20, M)
    out = r(x)
    torch.testing.assert_close(out.weights, r.scores(x).gather(1, out.expert_ids))


def test_weights_carry_router_gradient():
    r = _router(K=2)
    x = torch.randn(6, M)
    (r(x).weights * torch.randn(6, 2)).sum().backward()
    assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- group-limited
def test_group_limited_hand_case():
    # 4 groups of 2 experts; sigmoid scores:
    #   g0 = [0.90, 0.01] -> top-2 sum 0.91;  g1 = [0.60, 0.58] -> 1.18;  g2 = [0.55, 0.54] -> 1.09;  g3 -> 0.2
    # plain top-2 would take expert 0 (0.90, from g0, a bad group) and expert 2 (0.60);
    # with topk_groups=2 only g1 and g2 are eligible -> experts 2 and 3.
    probs = [0.90, 0.01, 0.60, 0.58, 0.55, 0.54, 0.10, 0.10]
    x = torch.tensor([[_logit(p) for p in probs]])
    plain = _identity_router(8, 2, score_func="sigmoid")
    assert sorted(plain(x).expert_ids[0].tolist()) == [0, 2]
    limited = _identity_router(8, 2, score_func="sigmoid", num_expert_groups=4, topk_groups=2, norm_topk_prob=False)
    out = limited(x)
    assert sorted(out.expert_ids[0].tolist()) == [2, 3]
    torch.testing.assert_close(sorted(out.weights[0].tolist()), [0.58, 0.60])
    # topk_groups=1: only g1
    one = _identity_router(8, 2, score_func="sigmoid", num_expert_groups=4, topk_groups=1)
    assert sorted(one(x).expert_ids[0].tolist()) == [2, 3]
    # top_k 3 across g1 and g2: 0.60, 0.58, 0.55
    three = _identity_router(8, 3, score_func="sigmoid", num_expert_groups=4, topk_groups=2)
    assert sorted(three(x).expert_ids[0].tolist()) == [2, 3, 4]


def test_group_score_is_sum_of_top2_not_max():
    # g0 has the single largest score but g1 has the larger top-2 sum
    probs = [0.95, 0.05, 0.05, 0.70, 0.65, 0.60]  # 2 groups of 3: g0 top2 = 1.00, g1 top2 = 1.35
    x = torch.tensor([[_logit(p) for p in probs]])
    r = _identity_router(6, 1, score_func="sigmoid", num_expert_groups=2, topk_groups=1)
    assert r(x).expert_ids[0].tolist() == [3]


def test_group_of_one_expert_scores_its_max():
    probs = [0.2, 0.9, 0.5, 0.4]
    x = torch.tensor([[_logit(p) for p in probs]])
    r = _identity_router(4, 2, score_func="sigmoid", num_expert_groups=4, topk_groups=2)
    assert sorted(r(x).expert_ids[0].tolist()) == [1, 2]


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("E, groups, topk_groups, K", [(8, 4, 2, 2), (16, 4, 1, 3), (12, 3, 2, 4), (8, 8, 3, 3)])
def test_group_limited_random(score_func, E, groups, topk_groups, K):
    r = _router(E=E, K=K, score_func=score_func, num_expert_groups=groups, topk_groups=topk_groups)
    x = torch.randn(64, M)
    out = r(x)
    scores = r.scores(x).detach()
    per = E // groups
    for t in range(64):
        gs = scores[t].view(groups, per)
        gscore = gs.topk(min(2, per), dim=-1).values.sum(-1)
        best = set(torch.topk(gscore, topk_groups).indices.tolist())
        chosen = out.expert_ids[t].tolist()
        assert all(e // per in best for e in chosen)
        allowed = [e for e in range(E) if e // per in best]
        allowed_sorted = sorted(allowed, key=lambda e: -float(scores[t, e]))
        assert sorted(chosen) == sorted(allowed_sorted[:K])


def test_group_limited_differs_from_plain_somewhere():
    plain = _router(E=16, K=4, num_expert_groups=1)
    limited = _router(E=16, K=4, num_expert_groups=8, topk_groups=2)
    limited.load_state_dict(plain.state_dict())
    x = torch.randn(64, M)
    a = torch.sort(plain(x).expert_ids, -1).values
    b = torch.sort(limited(x).expert_ids, -1).values
    assert not torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- aux loss
def _hand_aux(scores, ids, E, K, coef, score_func):
    T = scores.shape[0]
    counts = [0] * E
    for t in range(T):
        for e in ids[t].tolist():
            counts[e] += 1
    total = 0.0
    for e in range(E):
        f = counts[e] / (T * K)
        if score_func == "softmax":
            p = sum(float(scores[t, e]) for t in range(T)) / T
        else:
            p = sum(float(scores[t, e] / scores[t].sum()) for t in range(T)) / T
        total += f * p
    return coef * E * total


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("coef", [1e-3, 0.5, 2])
def test_aux_loss_by_hand(score_func, coef):
    E, K = 8, 2
    r = _router(E=E, K=K, score_func=score_func, aux_loss_coef=coef)
    x = torch.randn(24, M)
    out = r(x)
    assert out.aux_loss.dim() == 0
    expected = _hand_aux(r.scores(x).detach(), out.expert_ids, E, K, coef, score_func)
    assert float(out.aux_loss.detach()) == pytest.approx(expected, rel=1e-5)


def test_aux_loss_uniform_is_coef():
    # perfectly uniform probabilities and loads: E * sum_e (1/E)(1/E) = 1 -> loss = coef
    E, K = 4, 1
    r = _identity_router(E, K, aux_loss_coef=0.3)
    x = torch.zeros(4, E) + torch.eye(4) * 1e-6  # tiny tie-break, token t picks expert t
    out = r(x)
    assert out.expert_ids.flatten().tolist() == [0, 1, 2, 3]
    assert float(out.aux_loss.detach()) == pytest.approx(0.3, rel=1e-4)


def test_aux_loss_has_router_gradient():
    r = _router(aux_loss_coef=1.0)
    out = r(torch.randn(16, M))
    out.aux_loss.backward()
    assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0


def test_aux_loss_zero_when_coef_zero():
    r = _router(aux_loss_coef=0.0)
    out = r(torch.randn(16, M))
    assert out.aux_loss.dim() == 0
    assert float(out.aux_loss.detach()) == 0.0


def test_aux_loss_zero_tokens():
    r = _router(aux_loss_coef=1.0)
    out = r(torch.randn(0, M))
    assert out.expert_ids.shape == (0, 2)
    assert out.aux_loss.dim() == 0 and float(out.aux_loss.detach()) == 0.0


# ---------------------------------------------------------------------------------------------- bias
@pytest.mark.parametrize("norm", [False, True])
def test_bias_changes_selection_not_weights(norm):
    E, K = 8, 2
    r = _router(E=E, K=K, bias_update_rate=0.01, norm_topk_prob=norm, score_func="sigmoid")
    x = torch.randn(32, M)
    before = r(x)
    with torch.no_grad():
        r.expert_bias.zero_()
        r.expert_bias[5] = 100.0  # forces expert 5 into every token's top-k
    after = r(x)
    assert (after.expert_ids == 5).any(-1).all()
    assert not torch.equal(before.expert_ids, after.expert_ids)
    raw = r.scores(x).gather(1, after.expert_ids)
    expected = raw / raw.sum(-1, keepdim=True) if norm else raw
    torch.testing.assert_close(after.weights, expected)
    # the bias is not in the weights: the weight of expert 5 is its score, nowhere near 100
    assert float(after.weights.detach().max()) <= 1.0


def test_bias_selection_follows_biased_scores():
    r = _router(E=8, K=3, bias_update_rate=0.1)
    with torch.no_grad():
        r.expert_bias.copy_(torch.linspace(-0.2, 0.2, 8))
    x = torch.randn(40, M)
    out = r(x)
    biased = r.scores(x) + r.expert_bias
    top = torch.sort(biased, -1, descending=True).indices[:, :3]
    assert torch.equal(torch.sort(out.expert_ids, -1).values, torch.sort(top, -1).values)


def test_update_bias_sign_rule():
    r = _router(E=4, K=1, bias_update_rate=0.5)
    r.update_bias(torch.tensor([10, 0, 5, 5]))
    # mean 5: over-loaded expert 0 goes down, under-loaded expert 1 up, balanced ones stay
    torch.testing.assert_close(r.expert_bias, torch.tensor([-0.5, 0.5, 0.0, 0.0]))
    r.update_bias(torch.tensor([10, 0, 5, 5]))
    torch.testing.assert_close(r.expert_bias, torch.tensor([-1.0, 1.0, 0.0, 0.0]))


def test_update_bias_moves_toward_balance():
    E, K = 8, 2
    r = _router(E=E, K=K, bias_update_rate=0.02)
    with torch.no_grad():
        r.weight[0] += 3 * r.weight[1:].mean(0)  # make expert 0 popular
    x = torch.randn(128, M)
    spread = []
    for _ in range(30):
        with torch.no_grad():
            out = r(x)
        spread.append(int(out.tokens_per_expert.max() - out.tokens_per_expert.min()))
        r.update_bias(out.tokens_per_expert)
    assert spread[-1] < spread[0]


def test_update_bias_no_op_at_rate_zero():
    r = _router(E=4, K=1, bias_update_rate=0.0)
    r.update_bias(torch.tensor([10, 0, 5, 5]))
    assert torch.equal(r.expert_bias, torch.zeros(4))


def test_expert_bias_is_a_buffer():
    r = _router()
    assert "expert_bias" in dict(r.named_buffers())
    assert "expert_bias" in r.state_dict()
    assert all(name != "expert_bias" for name, _ in r.named_parameters())


def test_same_seed_same_gate_different_seed_differs():
    assert torch.equal(Router(M, 8, 2, seed=3).weight, Router(M, 8, 2, seed=3).weight)
    assert not torch.equal(Router(M, 8, 2, seed=3).weight, Router(M, 8, 2, seed=4).weight)


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(score_func="relu"), "score_func"),
        (dict(score_func="Softmax"), "score_func"),
        (dict(num_expert_groups=3), "num_expert_groups"),
        (dict(num_expert_groups=0), "num_expert_groups"),
        (dict(num_expert_groups=-2), "num_expert_groups"),
        (dict(num_expert_groups=2.0), "num_expert_groups"),
        (dict(num_expert_groups=4, topk_groups=0), "topk_groups"),
        (dict(num_expert_groups=4, topk_groups=5), "topk_groups"),
        (dict(num_expert_groups=4, topk_groups=1.5), "topk_groups"),
        (dict(num_expert_groups=4, topk_groups=1, top_k=3), "top_k"),
        (dict(num_expert_groups=8, topk_groups=2, top_k=3), "top_k"),
        (dict(aux_loss_coef=-0.1), "aux_loss_coef"),
        (dict(aux_loss_coef="0.1"), "aux_loss_coef"),
        (dict(bias_update_rate=-1.0), "bias_update_rate"),
        (dict(bias_update_rate=None), "bias_update_rate"),
    ],
)
def test_invalid_args_name_parameter(kwargs, param):
    kwargs = dict(kwargs)
    top_k = kwargs.pop("top_k", 2)
    with pytest.raises((ValueError, TypeError)) as ei:
        Router(M, 8, top_k, **kwargs)
    assert param in str(ei.value)


def test_score_func_error_lists_allowed():
    with pytest.raises(ValueError) as ei:
        Router(M, 8, 2, score_func="relu")
    assert "softmax" in str(ei.value) and "sigmoid" in str(ei.value)


# ---------------------------------------------------------------------------------------------- options that HF families need
@pytest.mark.parametrize("score_func, norm", [("sigmoid", True), ("sigmoid", False), ("softmax", True)])
def test_fixed_bias_is_honoured_without_bias_update_rate(score_func, norm):
    """A bias loaded from a checkpoint (DeepSeek-V3's e_score_correction_bias) selects with bias_update_rate=0;
    the weights stay the unbiased scores."""
    r = _router(E=8, K=3, score_func=score_func, norm_topk_prob=norm)
    assert r.bias_update_rate == 0.0
    x = torch.randn(40, M)
    unbiased = r(x).expert_ids
    with torch.no_grad():
        r.expert_bias.copy_(torch.linspace(0.3, -0.3, 8))
    out = r(x)
    scores = torch.sigmoid(x @ r.weight.t()) if score_func == "sigmoid" else torch.softmax(x @ r.weight.t(), -1)
    want = (scores + r.expert_bias).topk(3, dim=-1).indices
    assert torch.equal(torch.sort(out.expert_ids, -1).values, torch.sort(want, -1).values)
    assert not torch.equal(torch.sort(out.expert_ids, -1).values, torch.sort(unbiased, -1).values)
    raw = scores.gather(1, out.expert_ids)
    torch.testing.assert_close(out.weights, raw / raw.sum(-1, keepdim=True) if norm else raw)


def test_fixed_bias_selects_inside_group_limited_routing():
    """Groups are scored on the biased scores, as DeepSeek-V3 does (sum of each group's top-2 of scores + bias)."""
    r = _router(E=8, K=2, score_func="sigmoid", num_expert_groups=4, topk_groups=1)
    with torch.no_grad():
        r.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 5.0]))  # group 3 = experts 6, 7
    out = r(torch.randn(12, M))
    assert torch.equal(torch.sort(out.expert_ids, -1).values, torch.tensor([[6, 7]] * 12))


def test_zero_bias_selects_exactly_as_plain_top_k():
    r = _router(E=8, K=2)
    x = torch.randn(64, M)
    out = r(x)
    scores = torch.softmax(x.float() @ r.weight.t(), dim=-1)
    ids = scores.topk(2, dim=-1).indices
    assert torch.equal(out.expert_ids, ids)
    raw = scores.gather(1, ids)
    assert torch.equal(out.weights, raw / raw.sum(-1, keepdim=True).clamp_min(1e-20))


@pytest.mark.parametrize("norm", [True, False])
def test_routed_scaling_factor_multiplies_the_weights_after_renormalisation(norm):
    x = torch.randn(30, M)
    plain = _router(E=8, K=3, score_func="sigmoid", norm_topk_prob=norm)(x)
    scaled = _router(E=8, K=3, score_func="sigmoid", norm_topk_prob=norm, routed_scaling_factor=2.5)(x)
    assert torch.equal(scaled.expert_ids, plain.expert_ids)
    torch.testing.assert_close(scaled.weights, plain.weights * 2.5, rtol=0, atol=0)
    if norm:  # renormalised to 1, then scaled: the weights sum to the factor
        torch.testing.assert_close(scaled.weights.sum(-1), torch.full((30,), 2.5))
    torch.testing.assert_close(scaled.aux_loss, plain.aux_loss)  # the aux loss reads the scores, not the weights


def test_routed_scaling_factor_reaches_the_router_gradient():
    r = _router(E=8, K=2, routed_scaling_factor=3.0, aux_loss_coef=0.0)
    ref = _router(E=8, K=2, aux_loss_coef=0.0)
    x = torch.randn(10, M)
    r(x).weights.sum().backward()
    ref(x).weights.sum().backward()
    torch.testing.assert_close(r.weight.grad, 3.0 * ref.weight.grad)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_router_dtype_bf16_computes_the_logits_in_bf16(score_func):
    r = _router(E=8, K=2, score_func=score_func, router_dtype=torch.bfloat16)
    assert r.weight.dtype == torch.float32  # storage stays fp32
    x = torch.randn(50, M)
    logits = (x.to(torch.bfloat16) @ r.weight.to(torch.bfloat16).t()).float()  # HF: gate in bf16, then fp32 scores
    want = torch.softmax(logits, dim=-1) if score_func == "softmax" else torch.sigmoid(logits)
    got = r.scores(x)
    assert got.dtype == torch.float32
    assert torch.equal(got, want)
    fp32 = _router(E=8, K=2, score_func=score_func).scores(x)
    assert not torch.equal(got, fp32)  # bf16 logits really are rounded
    torch.testing.assert_close(got, fp32, atol=2e-2, rtol=2e-2)


def test_router_dtype_none_is_the_input_dtype():
    r = _router(E=8, K=2, router_dtype=None)
    x = torch.randn(20, M)
    assert torch.equal(r.scores(x), _router(E=8, K=2).scores(x))  # fp32 input: exactly the default
    xb = x.to(torch.bfloat16)
    assert torch.equal(r.scores(xb), _router(E=8, K=2, router_dtype=torch.bfloat16).scores(xb))
    xd = x.double()
    want = torch.softmax((xd @ r.weight.double().t()).float(), dim=-1)
    assert torch.equal(r.scores(xd), want)


def test_default_router_dtype_keeps_fp32_logits_for_bf16_input():
    r = _router(E=8, K=2)
    xb = torch.randn(20, M).to(torch.bfloat16)
    assert torch.equal(r.scores(xb), torch.softmax(xb.float() @ r.weight.t(), dim=-1))


def test_router_dtype_bf16_gradient_reaches_the_fp32_weight():
    r = _router(E=8, K=2, router_dtype=torch.bfloat16, aux_loss_coef=0.0)
    x = torch.randn(10, M, requires_grad=True)
    r(x).weights.sum().backward()
    assert r.weight.grad is not None and r.weight.grad.dtype == torch.float32 and r.weight.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.dtype == torch.float32


@pytest.mark.parametrize("kwargs, error, param", [
    (dict(routed_scaling_factor=0.0), ValueError, "routed_scaling_factor"),
    (dict(routed_scaling_factor=-1.0), ValueError, "routed_scaling_factor"),
    (dict(routed_scaling_factor=float("nan")), ValueError, "routed_scaling_factor"),
    (dict(routed_scaling_factor=float("inf")), ValueError, "routed_scaling_factor"),
    (dict(routed_scaling_factor="2.5"), TypeError, "routed_scaling_factor"),
    (dict(routed_scaling_factor=True), TypeError, "routed_scaling_factor"),
    (dict(routed_scaling_factor=None), TypeError, "routed_scaling_factor"),
    (dict(router_dtype="bf16"), TypeError, "router_dtype"),
    (dict(router_dtype=float), TypeError, "router_dtype"),
    (dict(router_dtype=torch.int32), ValueError, "router_dtype"),
    (dict(router_dtype=torch.bool), ValueError, "router_dtype"),
    (dict(router_dtype=torch.complex64), ValueError, "router_dtype"),
])
def test_new_options_reject_bad_values_by_name(kwargs, error, param):
    with pytest.raises(error) as ei:
        Router(M, 8, 2, **kwargs)
    assert param in str(ei.value)


def test_routed_scaling_factor_accepts_an_int():
    assert Router(M, 8, 2, routed_scaling_factor=2).routed_scaling_factor == 2.0
