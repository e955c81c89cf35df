"""The MoE router: scores, (group-limited) top-k, auxiliary loss and the aux-loss-free selection bias.

The gate's logits are computed in ``router_dtype`` (fp32 by default, whatever the input dtype; ``None``: the input's
dtype, as Hugging Face's Qwen/Mixtral/OLMoE gates do), and the scores (softmax or sigmoid) always in fp32. The
selection bias ``expert_bias`` (DeepSeek-V3's ``e_score_correction_bias``: learned by the aux-loss-free update, or
fixed, loaded from a checkpoint) is always added to the scores for selection; it changes which experts are picked,
never the weights the outputs are mixed with. The weights may be scaled by ``routed_scaling_factor`` (DeepSeek-V3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .experts import _normal, derive_seed
from .validation import check_choice, check_int, check_number

__all__ = ["Router", "RouterOutput", "SCORE_FUNCS", "ROUTER_DTYPES", "check_router_dtype"]

SCORE_FUNCS = ("softmax", "sigmoid")
ROUTER_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_router_dtype(router_dtype: object) -> torch.dtype | None:
    """``router_dtype`` if it is a floating ``torch.dtype`` or None; TypeError for another type, ValueError for a
    non-floating dtype, both naming ``router_dtype``."""
    allowed = f"one of {', '.join(map(str, ROUTER_DTYPES))} or None (the input's dtype)"
    if router_dtype is not None and not isinstance(router_dtype, torch.dtype):
        raise TypeError(f"router_dtype must be {allowed}, got {type(router_dtype).__name__} {router_dtype!r}")
    if router_dtype is not None and router_dtype not in ROUTER_DTYPES:
        raise ValueError(f"router_dtype must be {allowed}, got {router_dtype}")
    return router_dtype


@dataclass
class RouterOutput:
    """``expert_ids`` ``[T, K]`` int64, ``weights`` ``[T, K]`` fp32, ``aux_loss`` 0-dim, ``tokens_per_expert`` ``[E]``."""

    expert_ids: torch.Tensor
    weights: torch.Tensor
    aux_loss: torch.Tensor
    tokens_per_expert: torch.Tensor


class Router(nn.Module):
    """Linear gate ``[E, M]`` + top-k.

    Args:
        score_func: ``"softmax"`` (probabilities over experts) or ``"sigmoid"`` (independent affinities).
        norm_topk_prob: renormalise the K chosen weights to sum to 1.
        num_expert_groups / topk_groups: group-limited routing: experts form ``num_expert_groups`` contiguous groups,
            a group scores the sum of its top-2 scores (its max when groups have one expert), and only experts of the
            best ``topk_groups`` groups can be chosen.
        aux_loss_coef: coefficient of the Switch/GShard load-balancing loss ``E * sum_e f_e * P_e``.
        bias_update_rate: step of the aux-loss-free bias update (0 disables the update):
            ``bias += rate * sign(mean - load)``. The bias itself (the ``expert_bias`` buffer, zeros at construction,
            in the state dict) is always used for selection, whatever the rate: a fixed bias loaded from a checkpoint
            counts too.
        routed_scaling_factor: a number > 0 the routed weights are multiplied by, after the optional top-k
            renormalisation (DeepSeek-V3's ``routed_scaling_factor``; 1.0: unchanged).
        router_dtype: the dtype the gate's logits ``x @ weight.T`` are computed in (input and weight cast to it), a
            floating ``torch.dtype`` or ``None`` (the input's dtype). The scores are then computed in fp32 from
            those logits. The ``weight`` parameter is stored in fp32 either way.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        *,
        score_func: str = "softmax",
        norm_topk_prob: bool = True,
        num_expert_groups: int = 1,
        topk_groups: int | None = None,
        aux_loss_coef: float = 1e-3,
        bias_update_rate: float = 0.0,
        routed_scaling_factor: float = 1.0,
        router_dtype: torch.dtype | None = torch.float32,
        seed: int = 0,
    ):
        super().__init__()
        check_choice(score_func, "score_func", SCORE_FUNCS)
        check_int(num_expert_groups, "num_expert_groups", 1)
        if num_experts % num_expert_groups != 0:
            raise ValueError(
                f"num_expert_groups ({num_expert_groups}) must divide num_experts ({num_experts})"
            )
        topk_groups = num_expert_groups if topk_groups is None else topk_groups
        check_int(topk_groups, "topk_groups (at most num_expert_groups)", 1, num_expert_groups)
        if topk_groups * (num_experts // num_expert_groups) < top_k:
            raise ValueError(
                f"topk_groups ({topk_groups}) x experts per group ({num_experts // num_expert_groups}) "
                f"must be >= top_k ({top_k})"
            )
        check_number(aux_loss_coef, "aux_loss_coef", low=0.0)
        check_number(bias_update_rate, "bias_update_rate", low=0.0)
        routed_scaling_factor = check_number(routed_scaling_factor, "routed_scaling_factor", low=0.0, low_open=True)
        check_router_dtype(router_dtype)
        self.num_experts, self.top_k = num_experts, top_k
        self.score_func, self.norm_topk_prob = score_func, norm_topk_prob
        self.num_expert_groups, self.topk_groups = num_expert_groups, topk_groups
        self.aux_loss_coef, self.bias_update_rate = float(aux_loss_coef), float(bias_update_rate)
        self.routed_scaling_factor, self.router_dtype = routed_scaling_factor, router_dtype
        self.weight = nn.Parameter(_normal((num_experts, hidden_size), hidden_size**-0.5, derive_seed(seed, "router"), torch.float32))
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        # check_finite: remember whether any logits since the last take_nonfinite() held a NaN/Inf (a 0-dim bool on
        # the logits' device: no host sync here; HierMoEStrategy reads it once per optimizer step)
        self.check_finite = False
        self._nonfinite: torch.Tensor | None = None

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[T, M]`` -> fp32 scores ``[T, E]`` (logits in ``router_dtype``, scores in fp32)."""
        dtype = x.dtype if self.router_dtype is None else self.router_dtype
        # fp32 (the default): x.float() @ weight.t(), as before (.to() of an fp32 weight is the weight itself)
        logits = (x.to(dtype) @ self.weight.to(dtype).t()).float()
        if self.check_finite:
            bad = ~torch.isfinite(logits.detach()).all()
            self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad
        return logits.softmax(dim=-1) if self.score_func == "softmax" else logits.sigmoid()

    def take_nonfinite(self) -> torch.Tensor | bool:
        """Whether logits held a NaN/Inf since the last call (0-dim bool tensor, or False), and reset."""
        bad, self._nonfinite = self._nonfinite, None
        return False if bad is None else bad

    def forward(self, x: torch.Tensor) -> RouterOutput:
        scores = self.scores(x)
        T, E = scores.shape
        # always honoured (zeros by default: x + 0.0 == x, so an unbiased router selects exactly as without it)
        select = scores.detach() + self.expert_bias
        if self.topk_groups < self.num_expert_groups:
            select = self._mask_groups(select)
        expert_ids = select.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, expert_ids)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        if self.routed_scaling_factor != 1.0:
            weights = weights * self.routed_scaling_factor
        tokens_per_expert = torch.bincount(expert_ids.flatten(), minlength=E)
        return RouterOutput(expert_ids, weights, self._aux_loss(scores, tokens_per_expert, T), tokens_per_expert)

    def _mask_groups(self, select: torch.Tensor) -> torch.Tensor:
        T, E = select.shape
        grouped = select.view(T, self.num_expert_groups, E // self.num_expert_groups)
        top = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)  # [T, groups]
        keep = torch.zeros_like(top, dtype=torch.bool).scatter_(1, top.topk(self.topk_groups, dim=-1).indices, True)
        return grouped.masked_fill(~keep[..., None], float("-inf")).view(T, E)

    def _aux_loss(self, scores: torch.Tensor, tokens_per_expert: torch.Tensor, num_tokens: int) -> torch.Tensor:
        if self.aux_loss_coef == 0 or num_tokens == 0:
            return scores.new_zeros(())
        probs = scores if self.score_func == "softmax" else scores / scores.sum(-1, keepdim=True).clamp_min(1e-20)
        f = tokens_per_expert.float() / (num_tokens * self.top_k)
        return self.aux_loss_coef * self.num_experts * (f * probs.mean(0)).sum()

    @torch.no_grad()
    def update_bias(self, tokens_per_expert: torch.Tensor) -> None:
        """Aux-loss-free balancing: raise the bias of under-loaded experts, lower it for over-loaded ones.

        ``tokens_per_expert`` ``[E]`` must be the same on every rank (sum it over the data-parallel group first).
        """
        if self.bias_update_rate == 0:
            return
        load = tokens_per_expert.float()
        self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)
