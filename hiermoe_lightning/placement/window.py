"""A bounded, deterministic, exponentially weighted window of routing traces: the planner's statistics.

Every step the gathered routing ``[G, T, K]`` (the experts each token of each rank chose) is ingested. Old tokens'
weights are multiplied by ``decay`` (an exponential moving average), the new tokens weigh 1, and when the window holds
more than ``capacity_tokens_per_rank`` tokens per rank the oldest are dropped first. A single step larger than the
capacity keeps an evenly spaced subset of its tokens, each weighing ``T / kept`` so the step keeps its total weight.

:meth:`RoutingWindow.trace` returns the tokens and their weights for
:func:`hiermoe_lightning.placement.planner.plan_swaps`. By default the weights are normalised so that each rank's
weights sum to the tokens per rank of the last step: the weighted routing is then an EMA estimate of one step's
routing, and a predicted saving is a saving per step (what migration cost is amortised against).

The state is plain tensors (``state_dict`` / ``load_state_dict``), so Lightning checkpoints loaded with
``weights_only=True`` can hold it.
"""

from __future__ import annotations

import math

import torch

__all__ = ["RoutingWindow"]


class RoutingWindow:
    """EMA window of routing traces: ``ingest([G, T, K])`` each step; ``trace()`` gives
    ``(ids [G, N, K], weights [G, N])``."""

    def __init__(self, capacity_tokens_per_rank: int = 4096, decay: float = 0.9, num_experts: int | None = None):
        if isinstance(capacity_tokens_per_rank, bool) or not isinstance(capacity_tokens_per_rank, int):
            raise TypeError(f"capacity_tokens_per_rank must be an int, got {capacity_tokens_per_rank!r}")
        if capacity_tokens_per_rank < 1:
            raise ValueError(f"capacity_tokens_per_rank must be >= 1, got {capacity_tokens_per_rank}")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)):
            raise TypeError(f"decay must be a number in (0, 1], got {decay!r}")
        if not (math.isfinite(float(decay)) and 0.0 < float(decay) <= 1.0):
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        if num_experts is not None and (isinstance(num_experts, bool) or not isinstance(num_experts, int)
                                        or num_experts < 1):
            raise ValueError(f"num_experts must be a positive int or None, got {num_experts!r}")
        self.capacity_tokens_per_rank = capacity_tokens_per_rank
        self.decay = float(decay)
        self.num_experts = num_experts
        self._ids: torch.Tensor | None = None  # [G, N, K] int64
        self._weights: torch.Tensor | None = None  # [G, N] float64
        self.steps = 0
        self.last_tokens_per_rank = 0

    # ------------------------------------------------------------------ ingest
    def ingest(self, expert_ids: torch.Tensor) -> None:
        """Add one step's gathered routing ``[G, T, K]`` (int, ``-1`` = dropped pair)."""
        if not isinstance(expert_ids, torch.Tensor):
            raise TypeError(f"expert_ids must be a tensor [world_size, tokens_per_rank, top_k], got "
                            f"{type(expert_ids).__name__}")
        if expert_ids.dtype == torch.bool or expert_ids.is_floating_point() or expert_ids.is_complex():
            raise TypeError(f"expert_ids must be an integer tensor, got dtype {expert_ids.dtype}")
        if expert_ids.dim() != 3 or 0 in expert_ids.shape:
            raise ValueError(f"expert_ids must have shape [world_size >= 1, tokens_per_rank >= 1, top_k >= 1], got "
                             f"{list(expert_ids.shape)}")
        ids = expert_ids.detach().to("cpu", torch.long)
        if ids.numel() and int(ids.min()) < -1:
            raise ValueError(f"expert_ids must be >= -1 (-1 = dropped pair), got {int(ids.min())}")
        if self.num_experts is not None and ids.numel() and int(ids.max()) >= self.num_experts:
            raise ValueError(f"expert_ids must be < num_experts={self.num_experts}, got {int(ids.max())}")
        G, T, K = ids.shape
        if self._ids is not None and (self._ids.shape[0] != G or self._ids.shape[2] != K):
            raise ValueError(f"expert_ids shape {list(ids.shape)} does not match the window's "
                             f"[world_size={self._ids.shape[0]}, *, top_k={self._ids.shape[2]}]")
        cap = self.capacity_tokens_per_rank
        weight = 1.0
        if T > cap:  # an evenly spaced, deterministic subset that keeps the step's total weight
            keep = torch.div(torch.arange(cap) * T, cap, rounding_mode="floor")
            ids = ids[:, keep]
            weight = T / cap
        new_w = torch.full(ids.shape[:2], weight, dtype=torch.float64)
        if self._ids is None:
            self._ids, self._weights = ids.clone(), new_w
        else:
            self._ids = torch.cat([self._ids, ids], dim=1)
            self._weights = torch.cat([self._weights * self.decay, new_w], dim=1)
        if self._ids.shape[1] > cap:  # drop the oldest tokens first
            self._ids = self._ids[:, -cap:].contiguous()
            self._weights = self._weights[:, -cap:].contiguous()
        self.steps += 1
        self.last_tokens_per_rank = T

    # ------------------------------------------------------------------ read
    def __len__(self) -> int:
        """Tokens per rank held."""
        return 0 if self._ids is None else self._ids.shape[1]

    @property
    def empty(self) -> bool:
        return self._ids is None

    @property
    def world_size(self) -> int | None:
        """``G`` of the routing held (None when empty), without copying it as :meth:`trace` does."""
        return None if self._ids is None else self._ids.shape[0]

    def trace(self, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(expert_ids [G, N, K] int64, token_weights [G, N] float64)`` (copies).

        ``normalize=True``: weights scaled so each rank's sum equals the last step's tokens per rank (an EMA
        estimate of one step); ``False``: the raw weights (1 for the newest step, ``decay ** age`` before it).
        """
        if self._ids is None:
            raise ValueError("the routing window is empty: ingest at least one step first")
        w = self._weights
        if normalize:
            total = float(w[0].sum())
            w = w * (self.last_tokens_per_rank / total) if total > 0 else w
        return self._ids.clone(), w.clone()

    def expert_load(self, num_experts: int | None = None, normalize: bool = True) -> torch.Tensor:
        """``[E]`` float64: weighted (token, expert) pairs per expert (weights as in :meth:`trace`)."""
        E = num_experts if num_experts is not None else self.num_experts
        if self._ids is None:
            if E is None:
                raise ValueError("the routing window is empty and num_experts is unknown")
            return torch.zeros(E, dtype=torch.float64)
        ids, w = self.trace(normalize)
        if E is None:
            E = int(ids.max()) + 1 if ids.numel() else 0
        valid = ids >= 0
        if valid.any() and int(ids.max()) >= E:
            raise ValueError(f"num_experts={E} is smaller than the largest expert id {int(ids.max())} in the window")
        vals = (w[..., None] * valid).reshape(-1)
        return torch.zeros(E, dtype=torch.float64).index_add_(0, ids.clamp_min(0).reshape(-1), vals)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors only (loadable with ``torch.load(..., weights_only=True)``)."""
        ids = self._ids if self._ids is not None else torch.zeros(0, 0, 0, dtype=torch.long)
        w = self._weights if self._weights is not None else torch.zeros(0, 0, dtype=torch.float64)
        return {
            "expert_ids": ids.clone(),
            "token_weights": w.clone(),
            "capacity_tokens_per_rank": torch.tensor(self.capacity_tokens_per_rank, dtype=torch.long),
            "decay": torch.tensor(self.decay, dtype=torch.float64),
            "steps": torch.tensor(self.steps, dtype=torch.long),
            "last_tokens_per_rank": torch.tensor(self.last_tokens_per_rank, dtype=torch.long),
            "num_experts": torch.tensor(-1 if self.num_experts is None else self.num_experts, dtype=torch.long),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; the capacity and decay of the saved window win."""
        required = ("expert_ids", "token_weights", "capacity_tokens_per_rank", "decay", "steps", "last_tokens_per_rank")
        if not isinstance(state, dict):
            raise TypeError(f"routing window state must be a dict, got {type(state).__name__}")
        missing = [k for k in required if k not in state]
        if missing:
            raise ValueError(f"routing window state lacks {missing}")
        ids = torch.as_tensor(state["expert_ids"]).to(torch.long)
        w = torch.as_tensor(state["token_weights"]).to(torch.float64)
        if ids.numel() and (ids.dim() != 3 or w.shape != ids.shape[:2]):
            raise ValueError(f"routing window state: expert_ids {list(ids.shape)} and token_weights "
                             f"{list(w.shape)} do not match")
        self.capacity_tokens_per_rank = int(state["capacity_tokens_per_rank"])
        self.decay = float(state["decay"])
        self.steps = int(state["steps"])
        self.last_tokens_per_rank = int(state["last_tokens_per_rank"])
        ne = int(state.get("num_experts", torch.tensor(-1)))
        self.num_experts = None if ne < 0 else ne
        if ids.numel() == 0:
            self._ids = self._weights = None
        else:
            self._ids, self._weights = ids.clone(), w.clone()
