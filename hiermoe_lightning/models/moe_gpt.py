"""MoEGPT: a small decoder-only MoE transformer as a LightningModule (the model behind ``hiermoe fit``).

Shapes: ``B`` batch, ``S`` sequence, ``M`` hidden size, ``H`` heads, ``D = M / H`` head size, ``V`` vocabulary.

Block ``i`` (pre-norm)::

    x = x + Attention(RMSNorm(x))            # causal, rotary positions, F.scaled_dot_product_attention
    x = x + FFN_i(RMSNorm(x))                # dense SwiGLU for i < dense_layers, else MoELayer

then a final RMSNorm and an *untied* LM head (``lm_head [V, M]`` separate from ``tok_emb [V, M]``: the embedding
and head of a byte model are tiny, and untied weights keep each parameter's gradient from a single use).

Every parameter is initialised from ``seed`` alone, each tensor with its own ``torch.Generator`` seeded by
``derive_seed(seed, name...)``: building the model neither reads nor advances the global RNG, so every rank builds
identical weights. MoE layer ``i`` gets ``seed=derive_seed(seed, "moe", i) % 2**31``.

Built on the meta device (``with torch.device("meta")``, or ``trainer.init_module(empty_init=True)`` under
:class:`~hiermoe_lightning.HierMoEStrategy`), nothing is allocated or drawn; every dense module (the model itself for
``tok_emb`` and ``lm_head``, the norms, the attentions, the dense FFNs) has a ``reset_parameters()`` that re-draws its
own tensors from the same seeds, so the strategy's dense rule (``to_empty`` + ``reset_parameters``) and the MoE layers'
``shard_`` / ``materialize_`` give exactly the values of a normal build. The validation/test metrics are never built
on meta (they hold no parameters, only small CPU states).
"""

import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from ..balancing import update_routing_biases
from ..experts import SwiGLU, derive_seed
from ..layer import MoELayer
from ..validation import check_choice, check_int, check_number
from .clustered_routing import DEFAULT_STRENGTH, ClusteredMoELayer, check_clusters, layer_cluster_seed
from .lm_metrics import TokenMetrics
from .optim import OPTIMIZERS, make_optimizer

__all__ = ["MoEGPT", "PRESETS", "OPTIMIZERS"]


# Plain dicts of MoEGPT keyword arguments. "tiny" = the constructor defaults (CPU-sized). The full-size ones copy the
# MoE dimensions of the public models for planning (`hiermoe plan`, cost estimates); attention is plain multi-head
# (no MLA / GQA), so attention parameter counts are approximate. Never instantiate them on a small machine.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=256, seq_len=128, num_layers=2, hidden_size=64, num_heads=4, ffn_hidden_size=128,
        num_experts=8, top_k=2, num_shared_experts=0, score_func="softmax", num_expert_groups=1, topk_groups=None,
        aux_loss_coef=1e-3, bias_update_rate=0.0, capacity_factor=None, dense_layers=0,
        lr=3e-3, weight_decay=0.0, optimizer="adamw", momentum=0.0, warmup_steps=0, seed=0,
    ),
    "deepseek-v3-like": dict(
        vocab_size=129280, seq_len=4096, num_layers=61, hidden_size=7168, num_heads=128, ffn_hidden_size=2048,
        num_experts=256, top_k=8, num_shared_experts=1, score_func="sigmoid", num_expert_groups=8, topk_groups=4,
        aux_loss_coef=1e-4, bias_update_rate=1e-3, capacity_factor=None, dense_layers=3, dense_ffn_hidden_size=18432,
        lr=2.2e-4, weight_decay=0.1, optimizer="adamw", momentum=0.0, warmup_steps=2000, seed=0,
    ),
    "qwen3-30b-a3b-like": dict(
        vocab_size=151936, seq_len=4096, num_layers=48, hidden_size=2048, num_heads=32, ffn_hidden_size=768,
        num_experts=128, top_k=8, num_shared_experts=0, score_func="softmax", num_expert_groups=1, topk_groups=None,
        aux_loss_coef=1e-3, bias_update_rate=0.0, capacity_factor=None, dense_layers=0,
        lr=3e-4, weight_decay=0.1, optimizer="adamw", momentum=0.0, warmup_steps=2000, seed=0,
    ),
}


def _seeded_normal(shape: tuple[int, ...], std: float, seed: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A ``shape`` CPU tensor of N(0, std^2) drawn from its own generator (the global RNG is untouched), in ``dtype``
    (None: the default dtype)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype, device="cpu") * std


@torch.no_grad()
def _fill_normal_(param: torch.Tensor, std: float, seed: int) -> None:
    """``param`` := ``_seeded_normal(param.shape, std, seed)`` drawn in its dtype (the values a build with that
    default dtype draws), wherever it lives; a meta tensor is left alone (nothing to fill)."""
    if not param.is_meta:
        param.copy_(_seeded_normal(tuple(param.shape), std, seed, param.dtype))


class RMSNorm(nn.Module):
    """``x [..., M]`` -> ``x / rms(x) * weight`` (weight initialised to ones)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``weight`` := ones."""
        if not self.weight.is_meta:
            self.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rotary(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding of ``x [B, H, S, D]`` (D even), positions ``0..S-1``; same shape out."""
    S, D = x.shape[-2], x.shape[-1]
    inv_freq = base ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)  # [D/2]
    angles = torch.arange(S, device=x.device, dtype=torch.float32)[:, None] * inv_freq  # [S, D/2]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with rotary positions: ``[B, S, M]`` -> ``[B, S, M]``."""

    def __init__(self, hidden_size: int, num_heads: int, *, seed: int, out_std: float):
        super().__init__()
        self.num_heads, self.seed, self.out_std = num_heads, seed, out_std
        self.w_qkv = nn.Parameter(torch.empty(3 * hidden_size, hidden_size))
        self.w_out = nn.Parameter(torch.empty(hidden_size, hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``w_qkv`` ~ N(0, 1/M) and ``w_out`` ~ N(0, out_std^2), each from its own seed (derived from ``seed``)."""
        _fill_normal_(self.w_qkv, self.w_qkv.shape[1] ** -0.5, derive_seed(self.seed, "qkv"))
        _fill_normal_(self.w_out, self.out_std, derive_seed(self.seed, "out"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, M = x.shape
        qkv = F.linear(x, self.w_qkv).view(B, S, 3, self.num_heads, M // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, S, D]
        y = F.scaled_dot_product_attention(rotary(q), rotary(k), v, is_causal=True)  # [B, H, S, D]
        return F.linear(y.transpose(1, 2).reshape(B, S, M), self.w_out)


class DenseSwiGLU(SwiGLU):
    """The dense FFN of the first ``dense_layers`` blocks: a :class:`~hiermoe_lightning.experts.SwiGLU` (same
    tensors, same seeded values) that can also be materialised from meta by ``reset_parameters()``."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, *, seed: int = 0):
        super().__init__(hidden_size, ffn_hidden_size, seed=seed)
        self.seed = seed

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-draw ``w_gate``, ``w_up``, ``w_down``: the values of ``SwiGLU(..., seed)`` (built on the CPU, copied)."""
        hidden_size, ffn_hidden_size = self.w_gate.shape
        fresh = SwiGLU(hidden_size, ffn_hidden_size, seed=self.seed, dtype=self.w_gate.dtype, device="cpu")
        for name, tensor in fresh.named_parameters():
            target = getattr(self, name)
            if not target.is_meta:
                target.copy_(tensor)


class Block(nn.Module):
    """Pre-norm transformer block; ``ffn`` is a ``MoELayer`` or a dense ``SwiGLU``. ``[B, S, M]`` -> ``[B, S, M]``."""

    def __init__(self, attn: CausalSelfAttention, ffn: nn.Module, hidden_size: int):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(hidden_size), attn
        self.ffn_norm, self.ffn = RMSNorm(hidden_size), ffn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.ffn(self.ffn_norm(x))


def _token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32) of ``logits`` ``[B, S, V]`` against ``targets`` ``[B, S]``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


class MoEGPT(pl.LightningModule):
    """Decoder-only byte-level MoE language model.

    ``forward(inputs [B, S] int64) -> logits [B, S, V]``. Batches are ``(inputs [B, S], targets [B, S])`` int64;
    the training loss is the mean token cross-entropy plus the sum of the MoE layers' ``aux_loss``.

    Beyond the MoE options of ``MoELayer``: ``dense_layers`` makes the first N blocks dense SwiGLU
    (``dense_ffn_hidden_size``, default ``ffn_hidden_size * top_k``: the routed FFN width a token activates), as in
    DeepSeek-V3. With ``bias_update_rate > 0`` the model runs the aux-loss-free bias update of every MoE layer after
    each training batch (token counts summed over the default process group when one exists).

    ``router_clusters`` (0: off, the usual init) gives every MoE layer a clustered gate
    (:mod:`~hiermoe_lightning.models.clustered_routing`): experts ``e`` with the same ``e % router_clusters`` share a
    gate direction of norm ``router_cluster_strength`` (relative to the ~1 norm of a normally initialised gate row),
    so tokens route mostly inside one cluster, as trained MoE routers co-activate experts in clusters. MoE layer ``j``
    (counted without the dense blocks) gets ``layer_cluster_seed(seed, j)``: the same gates as
    ``cluster_routers_(MoEGPT(seed=seed), router_clusters, router_cluster_strength, seed)``, on meta too.
    """

    def __init__(
        self,
        vocab_size: int = 256,
        seq_len: int = 128,
        num_layers: int = 2,
        hidden_size: int = 64,
        num_heads: int = 4,
        ffn_hidden_size: int = 128,
        num_experts: int = 8,
        top_k: int = 2,
        num_shared_experts: int = 0,
        score_func: str = "softmax",
        num_expert_groups: int = 1,
        topk_groups: int | None = None,
        aux_loss_coef: float = 1e-3,
        bias_update_rate: float = 0.0,
        capacity_factor: float | None = None,
        dense_layers: int = 0,
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        optimizer: str = "adamw",
        momentum: float = 0.0,
        warmup_steps: int = 0,
        seed: int = 0,
        norm_topk_prob: bool = True,
        shared_ffn_hidden_size: int | None = None,
        dense_ffn_hidden_size: int | None = None,
        drop_policy: str = "probs",
        router_clusters: int = 0,
        router_cluster_strength: float = DEFAULT_STRENGTH,
    ):
        super().__init__()
        for name, value, minimum in (
            ("vocab_size", vocab_size, 1), ("seq_len", seq_len, 1), ("num_layers", num_layers, 1),
            ("hidden_size", hidden_size, 1), ("num_heads", num_heads, 1), ("ffn_hidden_size", ffn_hidden_size, 1),
            ("dense_layers", dense_layers, 0), ("warmup_steps", warmup_steps, 0), ("seed", seed, 0),
        ):
            check_int(value, name, minimum)
        if hidden_size % num_heads or (hidden_size // num_heads) % 2:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be num_heads ({num_heads}) x an even head size (rotary positions)"
            )
        check_int(dense_layers, "dense_layers (at most num_layers)", 0, num_layers)
        check_choice(optimizer, "optimizer", OPTIMIZERS)
        check_number(lr, "lr", low=0.0, low_open=True)
        check_number(weight_decay, "weight_decay", low=0.0)
        check_number(momentum, "momentum", low=0.0)
        if dense_ffn_hidden_size is not None:
            check_int(dense_ffn_hidden_size, "dense_ffn_hidden_size", 1)
        check_int(num_experts, "num_experts", 1)
        check_clusters(router_clusters, num_experts, "router_clusters", allow_zero=True, hidden_size=hidden_size)
        check_number(router_cluster_strength, "router_cluster_strength", low=0.0)
        self.save_hyperparameters()
        self._init_seed = seed  # reset_parameters' seed (hparams can be edited or absent in a subclass)

        out_std = hidden_size**-0.5 / math.sqrt(2 * num_layers)  # residual projections shrink with depth
        self.tok_emb = nn.Parameter(torch.empty(vocab_size, hidden_size))
        blocks = []
        for i in range(num_layers):
            attn = CausalSelfAttention(hidden_size, num_heads, seed=derive_seed(seed, "attn", i), out_std=out_std)
            if i < dense_layers:
                ffn: nn.Module = DenseSwiGLU(hidden_size, dense_ffn_hidden_size or ffn_hidden_size * top_k,
                                             seed=derive_seed(seed, "dense", i) % (2**31))
            else:
                # router_clusters > 0: the same layer with a clustered gate (clustered_routing.py), also when built
                # on meta (the layer clusters its gate when materialize_ gives it storage)
                clustered = dict(router_clusters=router_clusters, router_cluster_strength=router_cluster_strength,
                                 router_cluster_seed=layer_cluster_seed(seed, i - dense_layers))
                ffn = (ClusteredMoELayer if router_clusters else MoELayer)(
                    hidden_size, ffn_hidden_size, num_experts, top_k, seed=derive_seed(seed, "moe", i) % (2**31),
                    score_func=score_func, norm_topk_prob=norm_topk_prob, num_expert_groups=num_expert_groups,
                    topk_groups=topk_groups, aux_loss_coef=aux_loss_coef, bias_update_rate=bias_update_rate,
                    num_shared_experts=num_shared_experts, shared_ffn_hidden_size=shared_ffn_hidden_size,
                    capacity_factor=capacity_factor, drop_policy=drop_policy, **(clustered if router_clusters else {}),
                )
            blocks.append(Block(attn, ffn, hidden_size))
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = RMSNorm(hidden_size)
        self.lm_head = nn.Parameter(torch.empty(vocab_size, hidden_size))
        self.reset_parameters()
        self.val_metrics, self.test_metrics = TokenMetrics(vocab_size), TokenMetrics(vocab_size)  # never on meta

    def reset_parameters(self) -> None:
        """Re-draw the model's *own* tensors from ``seed``: ``tok_emb`` ~ N(0, 1) and ``lm_head`` ~ N(0, 0.02^2),
        each from its own generator. Torch's convention: the submodules (norms, attentions, FFNs, MoE layers) have
        their own, and this one does not recurse into them. Called by the constructor (a no-op on meta) and by the
        strategy's dense rule when the model was built on meta."""
        seed = self._init_seed
        _fill_normal_(self.tok_emb, 1.0, derive_seed(seed, "tok_emb"))
        _fill_normal_(self.lm_head, 0.02, derive_seed(seed, "lm_head"))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "MoEGPT":
        """Build the model of ``PRESETS[name]`` with ``overrides`` applied (full-size presets need real memory)."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
        return cls(**{**PRESETS[name], **overrides})

    def moe_layers(self) -> list[MoELayer]:
        """The ``MoELayer`` modules, in block order (dense blocks are skipped)."""
        return [block.ffn for block in self.blocks if isinstance(block.ffn, MoELayer)]

    # ------------------------------------------------------------------ forward and losses
    @override
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """``inputs [B, S]`` int64 token ids -> ``logits [B, S, V]``."""
        if not isinstance(inputs, torch.Tensor) or inputs.dim() != 2 or inputs.is_floating_point():
            raise ValueError(f"inputs must be an integer tensor [batch, seq], got {getattr(inputs, 'shape', inputs)!r}")
        x = F.embedding(inputs, self.tok_emb)  # [B, S, M]
        for block in self.blocks:
            x = block(x)
        return F.linear(self.final_norm(x), self.lm_head)  # [B, S, V]

    def aux_loss(self) -> torch.Tensor:
        """0-dim sum of the MoE layers' ``aux_loss`` from the last forward."""
        return sum((layer.aux_loss for layer in self.moe_layers()), self.lm_head.new_zeros(()))

    def loss_terms(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lm_loss, aux_loss)`` of a batch ``(inputs [B, S], targets [B, S])``, both 0-dim."""
        inputs, targets = batch
        return _token_loss(self(inputs), targets), self.aux_loss()

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], metrics: TokenMetrics, prefix: str) -> torch.Tensor:
        """Loss of a validation/test batch, logged as ``{prefix}/loss``; perplexity and accuracy accumulate in
        ``metrics`` and are logged for the epoch (``{prefix}/perplexity``, ``{prefix}/accuracy``)."""
        inputs, targets = batch
        logits = self(inputs)
        lm_loss = _token_loss(logits, targets)
        metrics.update(logits, targets)
        self.log(f"{prefix}/loss", lm_loss, prog_bar=prefix == "val", sync_dist=True)
        metrics.log(self, prefix)
        return lm_loss

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int = 0) -> torch.Tensor:
        lm_loss, aux = self.loss_terms(batch)
        self.log("train/loss", lm_loss, prog_bar=True)
        self.log("train/aux_loss", aux)
        return lm_loss + aux

    @override
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int = 0) -> torch.Tensor:
        return self._evaluate(batch, self.val_metrics, "val")

    @override
    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int = 0) -> torch.Tensor:
        return self._evaluate(batch, self.test_metrics, "test")

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Aux-loss-free balancing: update every MoE layer's selection bias after each training batch (no-op when the
        rate is 0).

        Under :class:`~hiermoe_lightning.strategy.HierMoEStrategy` this hook does nothing: the strategy updates the
        biases of every model's layers itself, after each optimizer step that was taken
        (``HierMoEStrategy._update_routing_biases``), so a model is never updated twice. Both go through the same
        function, :func:`~hiermoe_lightning.balancing.update_routing_biases`. Without that strategy (one process, or
        another strategy), the update runs here as it always has: after every batch (so, with gradient accumulation,
        after every micro-batch, where the strategy updates once per optimizer step).
        """
        from ..strategy import HierMoEStrategy  # here: strategy.py imports the layers, not the models

        if self._trainer is not None and isinstance(self._trainer.strategy, HierMoEStrategy):
            return
        if self.hparams.bias_update_rate > 0:
            self.update_routing_biases()

    def update_routing_biases(self, group: Any = None) -> None:
        """:func:`~hiermoe_lightning.balancing.update_routing_biases` on every MoE layer (one all-reduce for all);
        ``group`` defaults to WORLD when distributed is up."""
        if group is None and torch.distributed.is_available() and torch.distributed.is_initialized():
            group = torch.distributed.group.WORLD
        update_routing_biases(self.moe_layers(), group)

    @override
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        opt = make_optimizer(self.parameters(), hp.optimizer, lr=hp.lr, weight_decay=hp.weight_decay,
                             momentum=hp.momentum)
        if hp.warmup_steps == 0:
            return opt
        warmup = hp.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
