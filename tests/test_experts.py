"""ExpertBank / SwiGLU: per-expert seeded init, slot slicing and the grouped forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hiermoe_lightning.experts import ExpertBank, SwiGLU, derive_seed

M, FF = 8, 12


def _swiglu(x, wg, wu, wd):
    return (F.silu(x @ wg) * (x @ wu)) @ wd


def _params(bank):
    return [bank.w_gate, bank.w_up, bank.w_down]


def test_shapes():
    bank = ExpertBank(range(5), M, FF)
    assert bank.num_slots == 5
    assert bank.w_gate.shape == (5, M, FF)
    assert bank.w_up.shape == (5, M, FF)
    assert bank.w_down.shape == (5, FF, M)
    assert bank.slot_parameters() == _params(bank)
    assert all(isinstance(p, torch.nn.Parameter) for p in _params(bank))


def test_same_seed_identical_regardless_of_global_rng():
    torch.manual_seed(0)
    a = ExpertBank(range(4), M, FF, seed=7)
    torch.manual_seed(999)
    torch.randn(100)
    b = ExpertBank(range(4), M, FF, seed=7)
    for pa, pb in zip(_params(a), _params(b)):
        assert torch.equal(pa, pb)


def test_subset_bank_equals_rows_of_full_bank():
    full = ExpertBank(range(8), M, FF, seed=3)
    part = ExpertBank([3, 5], M, FF, seed=3)
    for pf, pp in zip(_params(full), _params(part)):
        assert torch.equal(pp[0], pf[3])
        assert torch.equal(pp[1], pf[5])
    rev = ExpertBank([5, 3], M, FF, seed=3)
    assert torch.equal(rev.w_gate[0], full.w_gate[5])


def test_different_seeds_and_experts_differ():
    a = ExpertBank(range(3), M, FF, seed=0)
    b = ExpertBank(range(3), M, FF, seed=1)
    for pa, pb in zip(_params(a), _params(b)):
        assert not torch.equal(pa, pb)
    # different experts of one bank differ, and the three matrices of one expert differ
    assert not torch.equal(a.w_gate[0], a.w_gate[1])
    assert not torch.equal(a.w_gate[0], a.w_up[0])


def test_init_scale():
    bank = ExpertBank(range(16), 64, 128, seed=0)
    assert float(bank.w_gate.detach().std()) == pytest.approx(64**-0.5, rel=0.05)
    assert float(bank.w_down.detach().std()) == pytest.approx(128**-0.5, rel=0.05)


def test_dtype():
    bank = ExpertBank(range(2), M, FF, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in _params(bank))
    ref = ExpertBank(range(2), M, FF)
    assert torch.equal(bank.w_gate, ref.w_gate.bfloat16())


def test_derive_seed_deterministic():
    assert derive_seed(0, "expert", 3) == derive_seed(0, "expert", 3)
    assert derive_seed(0, "expert", 3) != derive_seed(0, "expert", 4)
    assert derive_seed(0, "expert", 3) != derive_seed(1, "expert", 3)
    assert 0 <= derive_seed(123, "x") < 2**63


def test_keep_slots():
    full = ExpertBank(range(6), M, FF, seed=2)
    bank = ExpertBank(range(6), M, FF, seed=2)
    old = _params(bank)
    bank.keep_slots(torch.tensor([4, 1]))
    assert bank.num_slots == 2
    for name, pf in zip(("w_gate", "w_up", "w_down"), _params(full)):
        p = getattr(bank, name)
        assert isinstance(p, torch.nn.Parameter)
        assert p.requires_grad
        assert torch.equal(p[0], pf[4]) and torch.equal(p[1], pf[1])
    for p_old, p_new in zip(old, _params(bank)):
        assert p_new is not p_old
        assert p_new.data_ptr() != p_old.data_ptr()  # a copy, not a view into the old storage
    assert old[0].shape[0] == 6  # the old Parameter is untouched
    names = {n for n, _ in bank.named_parameters()}
    assert names == {"w_gate", "w_up", "w_down"}


def test_keep_slots_keeps_requires_grad_false():
    bank = ExpertBank(range(4), M, FF)
    bank.w_up.requires_grad_(False)
    bank.keep_slots(torch.tensor([0, 2]))
    assert not bank.w_up.requires_grad and bank.w_gate.requires_grad


def test_forward_equals_manual_swiglu_per_slot():
    bank = ExpertBank(range(4), M, FF, seed=5)
    rows_per_slot = [3, 0, 2, 4]
    x = torch.randn(sum(rows_per_slot), M)
    out = bank(x, rows_per_slot)
    assert out.shape == x.shape
    start = 0
    for s, n in enumerate(rows_per_slot):
        expected = _swiglu(x[start:start + n], bank.w_gate[s], bank.w_up[s], bank.w_down[s])
        torch.testing.assert_close(out[start:start + n], expected)
        start += n


def test_forward_gradients_match_manual():
    bank = ExpertBank(range(3), M, FF, seed=5)
    rows_per_slot = [2, 3, 1]
    x = torch.randn(6, M, requires_grad=True)
    g = torch.randn(6, M)
    (bank(x, rows_per_slot) * g).sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in _params(bank)]
    x.grad = None
    for p in _params(bank):
        p.grad = None
    outs, start = [], 0
    for s, n in enumerate(rows_per_slot):
        outs.append(_swiglu(x[start:start + n], bank.w_gate[s], bank.w_up[s], bank.w_down[s]))
        start += n
    (torch.cat(outs) * g).sum().backward()
    want = [x.grad] + [p.grad for p in _params(bank)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_all_slots_empty_but_some_rows_zero():
    bank = ExpertBank(range(3), M, FF)
    out = bank(torch.randn(0, M), [0, 0, 0])
    assert out.shape == (0, M)


def test_zero_rows_gives_zero_gradients_not_none():
    """A rank whose experts get no rows must still produce (zero) gradients for every expert weight, so every
    rank's backward touches the same parameters (DDP / gradient all-reduce need that)."""
    bank = ExpertBank(range(3), M, FF)
    x = torch.randn(0, M, requires_grad=True)
    out = bank(x, [0, 0, 0])
    out.sum().backward()
    for name in ("w_gate", "w_up", "w_down"):
        grad = getattr(bank, name).grad
        assert grad is not None, f"{name}.grad is None after a zero-row call"
        assert torch.equal(grad, torch.zeros_like(grad))


def test_some_empty_slots_give_zero_grads_for_those_slots():
    bank = ExpertBank(range(3), M, FF)
    x = torch.randn(4, M)
    bank(x, [0, 4, 0]).sum().backward()
    for p in _params(bank):
        assert p.grad is not None
        assert torch.equal(p.grad[0], torch.zeros_like(p.grad[0]))
        assert torch.equal(p.grad[2], torch.zeros_like(p.grad[2]))
        assert p.grad[1].abs().sum() > 0


def test_swiglu_shared():
    a = SwiGLU(M, FF, seed=1)
    b = SwiGLU(M, FF, seed=1)
    c = SwiGLU(M, FF, seed=2)
    assert torch.equal(a.w_gate, b.w_gate) and not torch.equal(a.w_gate, c.w_gate)
    x = torch.randn(5, M)
    torch.testing.assert_close(a(x), _swiglu(x, a.w_gate, a.w_up, a.w_down))
    # shared experts are seeded apart from routed expert 0
    bank = ExpertBank([0], M, FF, seed=1)
    assert not torch.equal(a.w_gate, bank.w_gate[0])


def test_forward_with_scale_equals_scaled_output():
    bank = ExpertBank(range(3), M, FF, seed=8)
    rows_per_slot = [2, 0, 3]
    x = torch.randn(5, M, requires_grad=True)
    scale = torch.rand(5, requires_grad=True)
    out = bank(x, rows_per_slot, scale)
    g = torch.randn(5, M)
    (out * g).sum().backward()
    got = [x.grad.clone(), scale.grad.clone()]
    x.grad = scale.grad = None
    ref = bank(x, rows_per_slot) * scale.unsqueeze(1)
    torch.testing.assert_close(out, ref)
    (ref * g).sum().backward()
    torch.testing.assert_close(got[0], x.grad)
    torch.testing.assert_close(got[1], scale.grad)
    # zero rows with a scale: still zero gradients, not None
    empty_scale = torch.rand(0, requires_grad=True)
    bank.zero_grad(set_to_none=True)
    bank(torch.randn(0, M), [0, 0, 0], empty_scale).sum().backward()
    assert empty_scale.grad is not None
    assert all(p.grad is not None for p in bank.slot_parameters())


# ------------------------------------------------------------------ built on meta, materialised later
def test_meta_bank_allocates_and_draws_nothing(monkeypatch):
    def no_draws(*a, **k):
        raise AssertionError("a meta build must not draw")

    monkeypatch.setattr(torch, "Generator", no_draws)
    bank = ExpertBank(range(6), M, FF, seed=3, device="meta")
    assert all(p.is_meta for p in _params(bank)) and bank.is_meta
    assert [tuple(p.shape) for p in _params(bank)] == [(6, M, FF), (6, M, FF), (6, FF, M)]
    with torch.device("meta"):
        ctx = ExpertBank(range(6), M, FF, seed=3)
    assert ctx.is_meta


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_meta_bank_materialises_to_the_normal_build(dtype):
    normal = ExpertBank(range(6), M, FF, seed=3, dtype=dtype)
    meta = ExpertBank(range(6), M, FF, seed=3, dtype=dtype, device="meta")
    meta.materialize_("cpu")
    assert not meta.is_meta
    for a, b in zip(_params(meta), _params(normal)):
        assert a.dtype == b.dtype == dtype and a.device.type == "cpu" and torch.equal(a, b)


def test_meta_keep_slots_then_materialise_draws_only_the_kept_experts():
    normal = ExpertBank(range(8), M, FF, seed=5)
    meta = ExpertBank(range(8), M, FF, seed=5, device="meta")
    meta.w_up.requires_grad_(False)
    meta.keep_slots(torch.tensor([6, 2]))
    assert meta.is_meta and meta.num_slots == 2 and meta.init_expert_ids == [6, 2]
    meta.materialize_()
    for a, b in zip(_params(meta), _params(normal)):
        assert a.shape[0] == 2 and a.untyped_storage().nbytes() == a.numel() * a.element_size()
        assert torch.equal(a, b.detach()[[6, 2]])
    assert not meta.w_up.requires_grad and meta.w_gate.requires_grad


def test_materialize_leaves_a_normal_bank_alone():
    bank = ExpertBank(range(4), M, FF, seed=1)
    before = _params(bank)
    bank.materialize_()
    assert all(a is b for a, b in zip(_params(bank), before))


def test_meta_swiglu_and_the_normal_one_have_the_same_shapes():
    meta, normal = SwiGLU(M, FF, seed=2, device="meta"), SwiGLU(M, FF, seed=2)
    for (n, a), (_, b) in zip(meta.named_parameters(), normal.named_parameters()):
        assert a.is_meta and a.shape == b.shape and a.dtype == b.dtype, n
