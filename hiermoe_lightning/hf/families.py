"""One small adapter per Hugging Face MoE family: which HF block classes it serves, the ``MoELayer`` that computes
the same function, and the weights both ways.

A family plugs in as one more :class:`FamilyAdapter` passed to :func:`register_family`. An adapter that can only
refuse (a family ``MoELayer`` cannot express yet) is a :class:`Refusal`: converting such a block raises a
``TypeError`` naming the class and what is missing, before any block of the model is changed.

transformers 5.x stores a block's experts fused: ``experts.gate_up_proj`` ``[E, 2F, M]`` (gate rows first) and
``experts.down_proj`` ``[E, M, F]``; the router is ``gate.weight`` ``[E, M]``. ``MoELayer`` holds ``router.weight``
``[E, M]``, ``experts.w_gate``/``w_up`` ``[S, M, F]`` and ``w_down`` ``[S, F, M]`` (slot ``s`` = expert ``s`` unsharded).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..layer import MoELayer

__all__ = ["FamilyAdapter", "FusedSwiGLUAdapter", "Refusal", "register_family", "adapter_for_class", "family", "supported_block_classes",
           "FAMILIES", "BLOCK_CLASSES"]

FAMILIES: dict[str, "FamilyAdapter"] = {}  # family name -> adapter
BLOCK_CLASSES: dict[str, "FamilyAdapter"] = {}  # HF block class name -> adapter


class FamilyAdapter:
    """How one HF family's sparse-MoE block maps onto a :class:`MoELayer`.

    Subclasses set ``name`` (the HF ``model_type``) and ``block_classes`` (HF class names) and implement
    :meth:`layer_kwargs`, :meth:`load_` and :meth:`hf_state`; :meth:`missing` says what ``MoELayer`` lacks for a
    given block (``None``: convertible).
    """

    name: str = ""
    block_classes: tuple[str, ...] = ()

    def missing(self, block: nn.Module, config: Any) -> str | None:
        return None

    def hidden_size(self, block: nn.Module) -> int:
        raise NotImplementedError

    def layer_kwargs(self, block: nn.Module, config: Any) -> dict:
        """``MoELayer(**kwargs)`` computing the block's function (weights are loaded by :meth:`load_`)."""
        raise NotImplementedError

    def jitter_noise(self, block: nn.Module) -> float:
        return 0.0

    def load_(self, moe: MoELayer, block: nn.Module) -> None:
        """Copy the HF block's weights into ``moe`` (unsharded, same device and dtypes as built)."""
        raise NotImplementedError

    def hf_state(self, moe: MoELayer) -> dict[str, torch.Tensor]:
        """The HF block's state dict (keys relative to the block) from an unsharded ``moe``."""
        raise NotImplementedError

    def load_checkpoint_(self, moe: MoELayer, tensors: Any, prefix: str) -> None:
        """Fill ``moe`` (materialised, sharded or not) from a Hugging Face checkpoint: the block's dense tensors
        whole, of the experts only those ``moe.local_expert_ids()`` puts in its slots. ``tensors`` is a
        :class:`~hiermoe_lightning.hf.loading.SafetensorsCheckpoint`, ``prefix`` the block's module name."""
        raise NotImplementedError(f"family {self.name!r} cannot load from a checkpoint (no load_checkpoint_)")


class Refusal(FamilyAdapter):
    """A family ``MoELayer`` cannot express yet: converting it raises ``TypeError`` with ``reason``."""

    def __init__(self, name: str, block_classes: tuple[str, ...], reason: str):
        self.name, self.block_classes, self.reason = name, block_classes, reason

    def missing(self, block: nn.Module, config: Any) -> str | None:
        return self.reason


def _experts_by_id(moe: MoELayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(w_gate, w_up, w_down)`` of an unsharded layer with slot ``e`` = expert ``e`` (whatever its placement)."""
    if moe.is_sharded:
        raise ValueError("the MoELayer is sharded: export from an unsharded model (or a full checkpoint)")
    order = torch.argsort(moe.local_expert_ids().to(moe.experts.w_gate.device))
    e = moe.experts
    return e.w_gate.detach()[order], e.w_up.detach()[order], e.w_down.detach()[order]


def _check_shape(value: torch.Tensor, shape: tuple, key: str) -> None:
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{key}: shape {list(value.shape)} does not fit the model's {list(shape)}")


def _copy(target: torch.Tensor, value: torch.Tensor, key: str) -> None:
    """``target.copy_(value)`` after checking the shapes (a copy would broadcast some mismatches silently)."""
    _check_shape(value, target.shape, key)
    with torch.no_grad():
        target.copy_(value)


def _is_silu(act: nn.Module) -> bool:
    return type(act).__name__ in ("SiLUActivation", "SiLU")


def _swiglu_missing(mlp: nn.Module | None, what: str) -> str | None:
    if mlp is None or not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
        return f"expected a dense SwiGLU {what} (gate_proj, up_proj, down_proj): another transformers layout"
    if any(getattr(mlp, n).bias is not None for n in ("gate_proj", "up_proj", "down_proj")):
        return f"biases in the {what} (MoELayer's shared experts have none)"
    act = getattr(mlp, "act_fn", None)
    if act is not None and not _is_silu(act):
        return f"{what} activation {type(act).__name__} (MoELayer's shared experts are SwiGLU)"
    return None


class FusedSwiGLUAdapter(FamilyAdapter):
    """transformers 5.x's common layout: ``gate`` (``weight`` ``[E, M]``, softmax over experts, top-k), fused
    SiLU-gated ``experts`` (``gate_up_proj`` ``[E, 2F, M]``, ``down_proj`` ``[E, M, F]``), and optionally a dense
    SwiGLU shared expert (the block's ``shared_expert`` attribute, ``gate_proj``/``up_proj``/``down_proj``), itself
    optionally gated per token (``shared_expert_gate``, ``Linear(M, 1)``).

    ``norm_topk_prob``: ``None`` reads the router's ``norm_topk_prob`` attribute; a bool is the family's fixed rule.
    ``router_dtype``: the gate's logits dtype (``None``: the model's, as HF's Qwen/Mixtral/OLMoE gates compute them).
    """

    norm_topk_prob: bool | None = None
    router_dtype: torch.dtype | None = None
    shared_expert: str | None = None
    shared_expert_gate: str | None = None
    # checkpoints on disk (what save_pretrained writes, and older layouts): each fused expert key may instead be
    # stored per expert as experts.{e}.<name>.weight (gate_up_proj: the gate then the up rows), and the block may
    # sit under another attribute name than the model's (Mixtral: block_sparse_moe)
    expert_checkpoint_names: dict[str, tuple[str, ...]] = {"experts.gate_up_proj": ("gate_proj", "up_proj"),
                                                           "experts.down_proj": ("down_proj",)}
    checkpoint_block_names: tuple[str, ...] = ()
    load_chunk: int = 8  # experts copied at a time when loading

    def missing(self, block, config):
        experts, gate = getattr(block, "experts", None), getattr(block, "gate", None)
        if experts is None or gate is None or not hasattr(experts, "gate_up_proj") or not hasattr(experts, "down_proj"):
            return "expected a 'gate' router and fused 'experts' (gate_up_proj, down_proj): another transformers layout"
        if getattr(experts, "gate_up_proj_bias", None) is not None or getattr(experts, "down_proj_bias", None) is not None:
            return "expert biases (MoELayer experts have none)"
        if getattr(gate, "bias", None) is not None:
            return "a router bias (MoELayer's router has none)"
        act = getattr(experts, "act_fn", None)
        if act is not None and not _is_silu(act):
            return f"activation {type(act).__name__} (MoELayer experts are SiLU-gated: SwiGLU)"
        if self.shared_expert is not None:
            missing = _swiglu_missing(getattr(block, self.shared_expert, None), self.shared_expert)
            if missing is not None:
                return missing
        if self.shared_expert_gate is not None:
            sg = getattr(block, self.shared_expert_gate, None)
            if not isinstance(sg, nn.Linear) or sg.out_features != 1 or sg.bias is not None:
                return f"expected {self.shared_expert_gate} to be Linear(hidden, 1, bias=False)"
        return None

    def hidden_size(self, block):
        return block.gate.weight.shape[1]

    def _norm(self, block) -> bool:
        return bool(block.gate.norm_topk_prob) if self.norm_topk_prob is None else self.norm_topk_prob

    def router_kwargs(self, block) -> dict:
        """The family's routing rule as MoELayer options."""
        return dict(score_func="softmax", norm_topk_prob=self._norm(block), router_dtype=self.router_dtype)

    def layer_kwargs(self, block, config):
        num_experts, hidden = block.gate.weight.shape
        ffn = block.experts.down_proj.shape[2]
        kwargs = dict(hidden_size=hidden, ffn_hidden_size=ffn, num_experts=num_experts, top_k=int(block.gate.top_k),
                      dtype=block.experts.down_proj.dtype, **self.router_kwargs(block))
        if self.shared_expert is not None:
            kwargs.update(num_shared_experts=1,
                          shared_ffn_hidden_size=getattr(block, self.shared_expert).gate_proj.out_features,
                          shared_expert_gate=self.shared_expert_gate is not None)
        # the layer's own loss has HF's coefficient; a family whose config has none (DeepSeek-V3) trains without one
        kwargs["aux_loss_coef"] = float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)
        return kwargs

    def load_(self, moe, block):
        state = dict(block.named_parameters())
        state.update(block.named_buffers())
        self._fill_(moe, lambda key, experts=None: (state[key].detach() if experts is None
                                                    else state[key].detach()[torch.as_tensor(experts)]))

    def load_checkpoint_(self, moe, tensors, prefix):
        prefix = tensors.block_prefix(prefix, self.checkpoint_block_names, probe="gate.weight")

        def get(key, experts=None):
            if experts is None:
                return tensors.tensor(f"{prefix}.{key}")
            return tensors.expert_rows(f"{prefix}.{key}", experts,
                                       [f"{prefix}.experts.{{e}}.{n}.weight" for n in self.expert_checkpoint_names[key]])

        self._fill_(moe, get)

    @torch.no_grad()
    def _fill_(self, moe: MoELayer, get) -> None:
        """Copy the HF block's tensors into ``moe`` (materialised; same names as :meth:`hf_state`). ``get(key)``:
        the tensor of block-relative HF key ``key``; ``get(key, experts)`` for the fused expert keys: the rows of
        those expert ids, in that order. The experts come a few slots at a time (the slots hold
        ``moe.local_expert_ids()``), so the transient memory is a few experts, not the layer."""
        _copy(moe.router.weight, get("gate.weight"), "gate.weight")
        experts = [int(e) for e in moe.local_expert_ids().tolist()]
        bank, ffn = moe.experts, moe.ffn_hidden_size
        for start in range(0, len(experts), self.load_chunk):
            ids = experts[start:start + self.load_chunk]
            slots = slice(start, start + len(ids))
            gate_up, down = get("experts.gate_up_proj", ids), get("experts.down_proj", ids)
            _check_shape(gate_up, (len(ids), 2 * ffn, moe.hidden_size), "experts.gate_up_proj")
            _check_shape(down, (len(ids), moe.hidden_size, ffn), "experts.down_proj")
            bank.w_gate[slots].copy_(gate_up[:, :ffn, :].transpose(1, 2))
            bank.w_up[slots].copy_(gate_up[:, ffn:, :].transpose(1, 2))
            bank.w_down[slots].copy_(down.transpose(1, 2))
            del gate_up, down
        if self.shared_expert is not None:
            p, shared = self.shared_expert, moe.shared_experts
            for name, w in (("gate_proj", shared.w_gate), ("up_proj", shared.w_up), ("down_proj", shared.w_down)):
                _copy(w, get(f"{p}.{name}.weight").t(), f"{p}.{name}.weight")
        if self.shared_expert_gate is not None:
            key = f"{self.shared_expert_gate}.weight"
            _copy(moe.shared_expert_gate.weight, get(key), key)

    def hf_state(self, moe):
        w_gate, w_up, w_down = _experts_by_id(moe)
        state = {
            "gate.weight": moe.router.weight.detach().clone(),
            "experts.gate_up_proj": torch.cat([w_gate.transpose(1, 2), w_up.transpose(1, 2)], dim=1).contiguous(),
            "experts.down_proj": w_down.transpose(1, 2).contiguous(),
        }
        if self.shared_expert is not None:
            shared, p = moe.shared_experts, self.shared_expert
            state[f"{p}.gate_proj.weight"] = shared.w_gate.detach().t().contiguous()
            state[f"{p}.up_proj.weight"] = shared.w_up.detach().t().contiguous()
            state[f"{p}.down_proj.weight"] = shared.w_down.detach().t().contiguous()
        if self.shared_expert_gate is not None:
            state[f"{self.shared_expert_gate}.weight"] = moe.shared_expert_gate.weight.detach().clone()
        return state


class Qwen3MoeAdapter(FusedSwiGLUAdapter):
    """Qwen3-MoE: softmax router, top-k renormalised when ``config.norm_topk_prob``."""

    name, block_classes = "qwen3_moe", ("Qwen3MoeSparseMoeBlock",)


class MixtralAdapter(FusedSwiGLUAdapter):
    """Mixtral: softmax router, top-k always renormalised; ``router_jitter_noise`` in training."""

    name, block_classes = "mixtral", ("MixtralSparseMoeBlock",)
    norm_topk_prob = True
    expert_checkpoint_names = {"experts.gate_up_proj": ("w1", "w3"), "experts.down_proj": ("w2",)}
    checkpoint_block_names = ("block_sparse_moe",)

    def jitter_noise(self, block):
        return float(getattr(block, "jitter_noise", 0.0) or 0.0)


class OlmoeAdapter(FusedSwiGLUAdapter):
    """OLMoE: softmax router, top-k renormalised when ``config.norm_topk_prob`` (off by default)."""

    name, block_classes = "olmoe", ("OlmoeSparseMoeBlock",)


class Qwen2MoeAdapter(FusedSwiGLUAdapter):
    """Qwen2-MoE: softmax router (``norm_topk_prob``, off by default), one shared expert gated per token by
    ``sigmoid(shared_expert_gate(x))``."""

    name, block_classes = "qwen2_moe", ("Qwen2MoeSparseMoeBlock",)
    shared_expert, shared_expert_gate = "shared_expert", "shared_expert_gate"


class DeepseekV3Adapter(FusedSwiGLUAdapter):
    """DeepSeek-V3: sigmoid scores in fp32; experts selected on ``scores + e_score_correction_bias`` within the best
    ``topk_group`` of ``n_group`` groups (a group scores its top-2 sum); weighted by the unbiased scores,
    renormalised when ``norm_topk_prob``, times ``routed_scaling_factor``; ungated shared experts
    (``moe_intermediate_size * n_shared_experts`` wide). The bias is loaded as the router's fixed selection bias
    (``router.expert_bias``); set ``router.bias_update_rate`` to learn it aux-loss-free."""

    name, block_classes = "deepseek_v3", ("DeepseekV3MoE",)
    router_dtype = torch.float32
    shared_expert = "shared_experts"

    def missing(self, block, config):
        gate = getattr(block, "gate", None)
        for attr in ("e_score_correction_bias", "num_group", "topk_group", "routed_scaling_factor", "norm_topk_prob"):
            if not hasattr(gate, attr):
                return f"expected the router to have {attr}: another transformers layout"
        return super().missing(block, config)

    def router_kwargs(self, block):
        gate = block.gate
        return dict(score_func="sigmoid", norm_topk_prob=bool(gate.norm_topk_prob), num_expert_groups=int(gate.num_group),
                    topk_groups=int(gate.topk_group), routed_scaling_factor=float(gate.routed_scaling_factor),
                    router_dtype=self.router_dtype)

    @torch.no_grad()
    def _fill_(self, moe, get):
        super()._fill_(moe, get)
        _copy(moe.router.expert_bias, get("gate.e_score_correction_bias"), "gate.e_score_correction_bias")

    def hf_state(self, moe):
        state = super().hf_state(moe)
        state["gate.e_score_correction_bias"] = moe.router.expert_bias.detach().clone()
        return state


def register_family(adapter: FamilyAdapter) -> FamilyAdapter:
    """Serve ``adapter.block_classes`` with ``adapter`` (replacing an earlier adapter of the same classes)."""
    if not adapter.name or not adapter.block_classes:
        raise ValueError("a FamilyAdapter needs a name and at least one HF block class name")
    FAMILIES[adapter.name] = adapter
    for cls in adapter.block_classes:
        BLOCK_CLASSES[cls] = adapter
    return adapter


def adapter_for_class(class_name: str) -> FamilyAdapter | None:
    return BLOCK_CLASSES.get(class_name)


def supported_block_classes() -> list[str]:
    """The HF block classes :func:`~hiermoe_lightning.hf.convert_` converts (not the refused ones)."""
    return sorted(cls for cls, adapter in BLOCK_CLASSES.items() if not isinstance(adapter, Refusal))


def family(name: str) -> FamilyAdapter:
    """The adapter registered as ``name``; KeyError naming the known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"no Hugging Face family {name!r}; known: {sorted(FAMILIES)}") from None


for _adapter in (Qwen3MoeAdapter(), MixtralAdapter(), OlmoeAdapter(), Qwen2MoeAdapter(), DeepseekV3Adapter()):
    register_family(_adapter)

# A family MoELayer cannot express today (an adapter replaces the refusal when MoELayer gains what is named).
register_family(Refusal(
    "gpt_oss", ("GptOssMLP",),
    "gpt-oss needs a router bias, expert biases (gate_up_proj_bias, down_proj_bias) and a clamped GLU "
    "(swiglu_limit, swiglu_alpha, interleaved gate/up, (up + 1) * glu); MoELayer has none of them"))
