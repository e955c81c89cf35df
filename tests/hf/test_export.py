"""hiermoe -> HF: to_hf_state_dict gives the original HF class's state dict (keys, shapes, the trained values)."""

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from hiermoe_lightning import hf  # noqa: E402
from tests.hf.tiny import SUPPORTED, build, config, token_ids  # noqa: E402

EXACT = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_round_trip_through_a_fresh_hf_model(model_type):
    model = build(model_type)
    hf.convert_(model)
    with torch.no_grad():  # "train" the converted model: the exported values must be the new ones
        g = torch.Generator().manual_seed(7)
        for layer in model.model.layers:
            for p in layer.mlp.moe.parameters():
                p.add_(0.3 * p.abs().mean() * torch.randn(p.shape, generator=g))
        ids = token_ids()
        converted = model(ids).logits
    sd = hf.to_hf_state_dict(model)
    fresh = AutoModelForCausalLM.from_config(config(model_type), attn_implementation="eager").eval()
    expected = fresh.state_dict()
    assert list(sd) == list(expected)  # HF's keys, in HF's order
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    fresh.load_state_dict(sd, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, converted, **EXACT)
        assert (build(model_type)(ids).logits - converted).abs().max() > 1e-2  # the trained values, not the start


def test_export_of_an_unconverted_model_is_its_state_dict():
    model = build("mixtral")
    sd = hf.to_hf_state_dict(model)
    assert sd.keys() == model.state_dict().keys()


def test_export_does_not_alias_the_expert_parameters():
    model = build("olmoe")
    hf.convert_(model)
    sd = hf.to_hf_state_dict(model)
    sd["model.layers.0.mlp.experts.down_proj"].zero_()
    assert model.model.layers[0].mlp.moe.experts.w_down.abs().sum() > 0
