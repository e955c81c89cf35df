"""HFCausalLM's auxiliary loss the Hugging Face way: HF's pooled load-balancing loss with the attention mask (padding
excluded), equal to HF's own value; padded targets count nowhere."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from hiermoe_lightning.hf import HFCausalLM  # noqa: E402
from tests.hf.test_causal_lm import TINY  # noqa: E402

CONFIG = dict(TINY, router_aux_loss_coef=0.3)


def _batch():
    g = torch.Generator().manual_seed(7)
    inputs = torch.randint(0, 256, (3, 10), generator=g)
    targets = torch.randint(0, 256, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 6:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    return inputs, targets, mask


def _hf_reference(seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(CONFIG)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))


def test_the_aux_loss_is_hf_pooled_masked_loss_times_its_coefficient():
    module = HFCausalLM(config=CONFIG, seed=2)
    reference = _hf_reference(2)
    inputs, targets, mask = _batch()
    module._loss((inputs, targets, mask))
    masked = module.aux_loss()
    hf_out = reference(input_ids=inputs, attention_mask=mask, output_router_logits=True, use_cache=False)
    torch.testing.assert_close(masked, 0.3 * hf_out.aux_loss, rtol=1e-5, atol=1e-7)
    module._loss((inputs, targets))
    unmasked = module.aux_loss()
    hf_unmasked = reference(input_ids=inputs, output_router_logits=True, use_cache=False).aux_loss
    torch.testing.assert_close(unmasked, 0.3 * hf_unmasked, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(masked, unmasked)  # the padding really is left out


def test_padded_targets_count_nowhere_and_the_layer_losses_are_the_other_choice():
    inputs, targets, mask = _batch()
    module = HFCausalLM(config=CONFIG, seed=2, aux_loss="layers")
    logits, loss, masked_targets = module._loss((inputs, targets, mask))
    keep = mask.reshape(-1).bool()
    expected = F.cross_entropy(logits.reshape(-1, 256)[keep].float(), targets.reshape(-1)[keep])
    torch.testing.assert_close(loss, expected)
    assert (masked_targets[mask == 0] == -100).all()
    from hiermoe_lightning.checkpoint import moe_layers

    layer_sum = sum(layer.aux_loss for layer in moe_layers(module.model).values())
    torch.testing.assert_close(module.aux_loss(), layer_sum)
    assert float(HFCausalLM(config=CONFIG, seed=2, aux_loss="none").aux_loss()) == 0.0
    with pytest.raises(ValueError, match="aux_loss"):
        HFCausalLM(config=CONFIG, aux_loss="switch")
