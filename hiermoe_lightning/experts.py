"""SwiGLU experts stored as stacked slot tensors, each expert initialised from its own seed.

Slots, not experts, own the storage: ``w_gate[s]`` is the expert that the layer's placement puts in slot ``s`` of
this rank. A swap rewrites slot contents in place, so the optimizer's Parameter objects stay valid.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ExpertBank", "SwiGLU", "derive_seed"]


def derive_seed(seed: int, *names: object) -> int:
    """A deterministic 63-bit seed for ``(seed, *names)``: the same on every rank and every run."""
    text = ":".join(str(x) for x in (seed, *names)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def _normal(shape: Sequence[int], std: float, seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float32) * std).to(dtype)


def init_expert_weights(seed: int, expert_id: int, hidden_size: int, ffn_hidden_size: int, dtype: torch.dtype):
    """Expert ``expert_id``'s ``(w_gate [M, F], w_up [M, F], w_down [F, M])``, identical on every rank."""
    s = derive_seed(seed, "expert", expert_id)
    return (
        _normal((hidden_size, ffn_hidden_size), hidden_size**-0.5, s + 1, dtype),
        _normal((hidden_size, ffn_hidden_size), hidden_size**-0.5, s + 2, dtype),
        _normal((ffn_hidden_size, hidden_size), ffn_hidden_size**-0.5, s + 3, dtype),
    )


class ExpertBank(nn.Module):
    """``num_slots`` SwiGLU experts: ``w_gate``/``w_up`` ``[S, M, F]``, ``w_down`` ``[S, F, M]``.

    ``expert_ids`` (``[S]``) says which global expert each slot holds at construction; every slot is initialised
    from that expert's own seed, so an unsharded bank and any shard of it agree exactly.
    """

    def __init__(
        self,
        expert_ids: Sequence[int],
        hidden_size: int,
        ffn_hidden_size: int,
        *,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.hidden_size, self.ffn_hidden_size = hidden_size, ffn_hidden_size
        weights = [init_expert_weights(seed, int(e), hidden_size, ffn_hidden_size, dtype) for e in expert_ids]
        self.w_gate = nn.Parameter(torch.stack([w[0] for w in weights]))
        self.w_up = nn.Parameter(torch.stack([w[1] for w in weights]))
        self.w_down = nn.Parameter(torch.stack([w[2] for w in weights]))

    @property
    def num_slots(self) -> int:
        return self.w_gate.shape[0]

    def slot_parameters(self) -> list[nn.Parameter]:
        """The parameters whose first dimension is the slot (what a migration moves)."""
        return [self.w_gate, self.w_up, self.w_down]

    def keep_slots(self, slots: torch.Tensor) -> None:
        """Shrink to the given slots (``[S']`` indices), with new Parameters (call before building the optimizer)."""
        for name in ("w_gate", "w_up", "w_down"):
            old = getattr(self, name)
            setattr(self, name, nn.Parameter(old.detach()[slots].clone(), requires_grad=old.requires_grad))

    def forward(self, x_sorted: torch.Tensor, rows_per_slot: Sequence[int], scale: torch.Tensor | None = None) -> torch.Tensor:
        """``x_sorted`` ``[N, M]`` with rows grouped by slot (``rows_per_slot[s]`` rows for slot ``s``) -> ``[N, M]``.

        ``scale`` ``[N]`` (optional) multiplies each row's output (the router weight); it is applied to the ``[N, F]``
        hidden activations before the down projection, which is the same by linearity and cheaper when F < M.
        Loops over the local slots only (never over tokens); empty slots are skipped.
        """
        outs = []
        chunks = torch.split(x_sorted, list(rows_per_slot))
        scales = torch.split(scale, list(rows_per_slot)) if scale is not None else [None] * len(chunks)
        for s, (chunk, sc) in enumerate(zip(chunks, scales)):
            if chunk.shape[0] == 0:
                continue
            h = F.silu(chunk @ self.w_gate[s]) * (chunk @ self.w_up[s])
            if sc is not None:
                h = h * sc.to(h.dtype).unsqueeze(1)
            outs.append(h @ self.w_down[s])
        if not outs:
            # no rows here: stay connected to the inputs and weights anyway, so this rank's backward still runs the
            # dispatch's mirror collectives (its peers wait for them) and every weight gets a (zero) gradient
            out = x_sorted * 0 + 0 * (self.w_gate.sum() + self.w_up.sum() + self.w_down.sum())
            return out if scale is None else out + 0 * scale.sum()
        return outs[0] if len(outs) == 1 else torch.cat(outs)


class SwiGLU(nn.Module):
    """A dense SwiGLU MLP (shared experts), seeded like the routed ones."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, *, seed: int = 0, dtype: torch.dtype = torch.float32):
        super().__init__()
        s = derive_seed(seed, "shared")
        self.w_gate = nn.Parameter(_normal((hidden_size, ffn_hidden_size), hidden_size**-0.5, s + 1, dtype))
        self.w_up = nn.Parameter(_normal((hidden_size, ffn_hidden_size), hidden_size**-0.5, s + 2, dtype))
        self.w_down = nn.Parameter(_normal((ffn_hidden_size, hidden_size), ffn_hidden_size**-0.5, s + 3, dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.silu(x @ self.w_gate) * (x @ self.w_up)) @ self.w_down
