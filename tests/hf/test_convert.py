"""HF -> hiermoe: a converted model computes the HF model's function (logits, router logits, aux loss, gradients)."""

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from hiermoe_lightning import MoELayer, hf  # noqa: E402
from tests.hf.tiny import BLOCK_CLASS, SUPPORTED, build, token_ids  # noqa: E402

EXACT = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_converted_logits_equal_hf_logits(model_type):
    model = build(model_type)
    ids = token_ids()
    with torch.no_grad():
        reference = model(ids).logits
        # re-drawn weights: the MoE blocks move the hidden states by O(1), so equal logits are not trivially equal
        block = model.model.layers[0].mlp
        assert type(block).__name__ == BLOCK_CLASS[model_type]
        assert block(torch.randn(1, 5, 32)).abs().mean() > 0.05
    names = hf.convert_(model)
    assert names == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for layer in model.model.layers:
        assert isinstance(layer.mlp, hf.HFMoEBlock) and isinstance(layer.mlp.moe, MoELayer)
        assert layer.mlp.family == model_type and layer.mlp.hf_class == BLOCK_CLASS[model_type]
    with torch.no_grad():
        converted = model(ids).logits
    torch.testing.assert_close(converted, reference, **EXACT)


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_output_router_logits_and_aux_loss_equal_hf(model_type):
    """HF 5.x collects router logits with hooks on its router class; a converted block hands them in itself."""
    model = build(model_type)
    ids = token_ids()
    with torch.no_grad():
        reference = model(ids, labels=ids, output_router_logits=True)
        hf.convert_(model)
        converted = model(ids, labels=ids, output_router_logits=True)
    assert len(converted.router_logits) == len(reference.router_logits) == 2
    for ours, theirs in zip(converted.router_logits, reference.router_logits):
        torch.testing.assert_close(ours, theirs, **EXACT)
    torch.testing.assert_close(converted.aux_loss, reference.aux_loss, **EXACT)
    torch.testing.assert_close(converted.loss, reference.loss, **EXACT)


def test_gradients_equal_hf_gradients():
    """Training through a converted block: the loss and every MoE gradient equal HF's (mapped to HF's layout)."""
    reference = build("qwen3_moe").train()
    model = build("qwen3_moe").train()
    hf.convert_(model)
    ids = token_ids()
    ref_out = reference(ids, labels=ids, output_router_logits=True)
    out = model(ids, labels=ids, output_router_logits=True)
    torch.testing.assert_close(out.loss, ref_out.loss, **EXACT)
    ref_out.loss.backward()
    out.loss.backward()
    for ref_layer, layer in zip(reference.model.layers, model.model.layers):
        theirs, ours = ref_layer.mlp, layer.mlp.moe
        ffn = ours.ffn_hidden_size
        torch.testing.assert_close(ours.router.weight.grad, theirs.gate.weight.grad, **EXACT)
        gate_up = theirs.experts.gate_up_proj.grad
        torch.testing.assert_close(ours.experts.w_gate.grad, gate_up[:, :ffn].transpose(1, 2), **EXACT)
        torch.testing.assert_close(ours.experts.w_up.grad, gate_up[:, ffn:].transpose(1, 2), **EXACT)
        torch.testing.assert_close(ours.experts.w_down.grad, theirs.experts.down_proj.grad.transpose(1, 2), **EXACT)
        torch.testing.assert_close(layer.self_attn.q_proj.weight.grad, ref_layer.self_attn.q_proj.weight.grad, **EXACT)


def test_mixtral_router_jitter_in_training():
    """Mixtral multiplies the block input by U(1-j, 1+j) noise in training: the converted block draws the same."""
    reference, model = build("mixtral", router_jitter_noise=0.1).train(), build("mixtral", router_jitter_noise=0.1)
    hf.convert_(model.train())
    assert model.model.layers[0].mlp.jitter_noise == pytest.approx(0.1)
    ids = token_ids()
    torch.manual_seed(5)
    expected = reference(ids).logits
    torch.manual_seed(5)
    torch.testing.assert_close(model(ids).logits, expected, **EXACT)
    with torch.no_grad():
        assert (model.eval()(ids).logits - expected).abs().max() > 1e-3  # the noise did something


def test_converting_twice_is_a_noop():
    model = build("qwen3_moe")
    ids = token_ids()
    hf.convert_(model)
    blocks = [layer.mlp for layer in model.model.layers]
    with torch.no_grad():
        before = model(ids).logits
    assert hf.convert_(model) == []
    assert [layer.mlp for layer in model.model.layers] == blocks
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


def test_dense_layers_stay_dense():
    """Qwen3-MoE's mlp_only_layers are dense MLPs: not MoE blocks, left alone."""
    model = build("qwen3_moe", mlp_only_layers=[0])
    ids = token_ids()
    with torch.no_grad():
        reference = model(ids).logits
    assert hf.convert_(model) == ["model.layers.1.mlp"]
    assert type(model.model.layers[0].mlp).__name__ == "Qwen3MoeMLP"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference, **EXACT)


class WeirdSparseMoe(nn.Module):
    """A sparse-MoE block of a family hiermoe has no adapter for."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(32, 4, bias=False)
        self.experts = nn.ModuleList(nn.Linear(32, 32) for _ in range(4))

    def forward(self, x):
        return x


def test_unsupported_block_raises_type_error_naming_its_class_and_changes_nothing():
    model = build("qwen3_moe")
    model.model.layers[1].mlp = WeirdSparseMoe()
    with pytest.raises(TypeError, match=r"WeirdSparseMoe \(at 'model.layers.1.mlp'\).*no adapter.*Qwen3MoeSparseMoeBlock"):
        hf.convert_(model)
    assert type(model.model.layers[0].mlp).__name__ == "Qwen3MoeSparseMoeBlock"  # checked before any change


def test_gpt_oss_raises_type_error_naming_what_moelayer_lacks():
    model = build("gpt_oss")
    with pytest.raises(TypeError, match=r"GptOssMLP \(at 'model.layers.0.mlp', family gpt_oss\) cannot be converted: "
                                        r".*router bias, expert biases.*clamped GLU"):
        hf.convert_(model)
    assert type(model.model.layers[0].mlp).__name__ == "GptOssMLP"


def test_deepseek_v3_selection_bias_and_scaling_are_honoured():
    """The loaded e_score_correction_bias picks other experts (HF's logits change without it), and the converted
    model picks the same ones; routed_scaling_factor and group-limited top-k come along."""
    model = build("deepseek_v3", routed_scaling_factor=1.7)
    ids = token_ids()
    with torch.no_grad():
        reference = model(ids).logits
        gate = model.model.layers[0].mlp.gate
        bias = gate.e_score_correction_bias.clone()
        gate.e_score_correction_bias.zero_()
        assert (model(ids).logits - reference).abs().max() > 1e-2
        gate.e_score_correction_bias.copy_(bias)
        hf.convert_(model)
        router = model.model.layers[0].mlp.moe.router
        torch.testing.assert_close(router.expert_bias, bias, rtol=0, atol=0)
        assert (router.score_func, router.routed_scaling_factor, router.num_expert_groups, router.topk_groups) == (
            "sigmoid", pytest.approx(1.7), 2, 1)
        torch.testing.assert_close(model(ids).logits, reference, **EXACT)


def test_qwen2_moe_shared_expert_gate_is_converted():
    model = build("qwen2_moe")
    ids = token_ids()
    with torch.no_grad():
        reference = model(ids).logits
        hf.convert_(model)
        moe = model.model.layers[0].mlp.moe
        assert moe.shared_expert_gate is not None and moe.shared_experts is not None
        torch.testing.assert_close(model(ids).logits, reference, **EXACT)
        moe.shared_expert_gate.weight.zero_()  # sigmoid(0) = 1/2: the gate is in the function
        assert (model(ids).logits - reference).abs().max() > 1e-2


def test_a_non_silu_activation_is_refused():
    model = build("qwen3_moe", hidden_act="gelu")
    with pytest.raises(TypeError, match=r"Qwen3MoeSparseMoeBlock .*activation GELUActivation"):
        hf.convert_(model)


def test_convert_takes_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        hf.convert_("model")
