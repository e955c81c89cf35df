"""Tiny random Hugging Face MoE models built from config dicts, with weights re-drawn at ~1/sqrt(fan_in) (HF's own
init, std 0.02, would make every difference trivially small)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

ATTENTION = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=2)

CONFIGS = {
    "qwen3_moe": dict(ATTENTION, head_dim=8, intermediate_size=64, moe_intermediate_size=16, num_experts=8,
                      num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1),
    "mixtral": dict(ATTENTION, head_dim=8, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2),
    "olmoe": dict(ATTENTION, intermediate_size=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
    "qwen2_moe": dict(ATTENTION, intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                      num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1),
    "deepseek_v3": dict(ATTENTION, num_key_value_heads=4, intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8, n_group=2,
                        topk_group=1, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=0,
                        q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8),
    # a family MoELayer cannot express yet (refused by name)
    "gpt_oss": dict(ATTENTION, head_dim=8, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                    layer_types=["full_attention", "full_attention"]),
}
SUPPORTED = ("qwen3_moe", "mixtral", "olmoe", "qwen2_moe", "deepseek_v3")
BLOCK_CLASS = {"qwen3_moe": "Qwen3MoeSparseMoeBlock", "mixtral": "MixtralSparseMoeBlock", "olmoe": "OlmoeSparseMoeBlock",
               "qwen2_moe": "Qwen2MoeSparseMoeBlock", "deepseek_v3": "DeepseekV3MoE", "gpt_oss": "GptOssMLP"}


def config(model_type: str, **overrides):
    return AutoConfig.for_model(model_type, **dict(CONFIGS[model_type], **overrides))


@torch.no_grad()
def redraw_(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Matrices and 3-D expert tensors ~ N(0, 1/fan_in) (fan_in: the last dimension, as HF multiplies by it), norm
    weights 1 + N(0, 0.1^2), biases N(0, 0.1^2); DeepSeek-V3's selection bias ``e_score_correction_bias`` (a buffer)
    N(0, 0.1^2), so that it changes which experts are picked."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
        elif "norm" in name:
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model


def build(model_type: str, seed: int = 1, **overrides) -> torch.nn.Module:
    """A tiny random HF causal LM of ``model_type`` in eval mode, fp32, eager attention, re-drawn weights."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config(model_type, **overrides), attn_implementation="eager")
    return redraw_(model, seed).eval()


def token_ids(batch: int = 2, seq: int = 12, seed: int = 2) -> torch.Tensor:
    return torch.randint(3, 100, (batch, seq), generator=torch.Generator().manual_seed(seed))
