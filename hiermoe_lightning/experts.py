"""SwiGLU experts stored as stacked slot tensors, each expert initialised from its own seed.

Slots, not experts, own the storage: ``w_gate[s]`` is the expert that the layer's placement puts in slot ``s`` of
this rank. A swap rewrites slot contents in place, so the optimizer's Parameter objects stay valid.

Built on the ``meta`` device (``device="meta"``, or inside ``with torch.device("meta")``) nothing is allocated or
drawn: the bank records which expert each slot will hold and its seed, and :meth:`ExpertBank.materialize_` later
draws exactly the values a normal build gives, for the slots it still holds (after :meth:`ExpertBank.keep_slots`,
only this rank's).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ExpertBank", "SwiGLU", "derive_seed", "init_expert_weights", "resolve_device"]

# True while MoELayer.materialize_ builds a twin of a layer for its non-expert tensors: ExpertBanks then stay on meta
_EXPERTS_ON_META: contextvars.ContextVar[bool] = contextvars.ContextVar("hiermoe_experts_on_meta", default=False)


@contextlib.contextmanager
def experts_on_meta() -> Iterator[None]:
    """Inside, every :class:`ExpertBank` is built on the meta device (nothing drawn), whatever the device asked."""
    token = _EXPERTS_ON_META.set(True)
    try:
        yield
    finally:
        _EXPERTS_ON_META.reset(token)


def resolve_device(device: "torch.device | str | None") -> torch.device:
    """``device``, or (None) the current default device: the innermost ``with torch.device(...)`` block or
    ``torch.set_default_device``, else the CPU."""
    return torch.get_default_device() if device is None else torch.device(device)


def derive_seed(seed: int, *names: object) -> int:
    """A deterministic 63-bit seed for ``(seed, *names)``: the same on every rank and every run."""
    text = ":".join(str(x) for x in (seed, *names)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def _normal(shape: Sequence[int], std: float, seed: int, dtype: torch.dtype,
            device: "torch.device | str | None" = None) -> torch.Tensor:
    """N(0, std^2) of ``shape`` from its own CPU generator seeded ``seed`` (the same values on every device), on
    ``device`` (None: the current default device). On ``meta``: an empty meta tensor, nothing drawn."""
    device = resolve_device(device)
    if device.type == "meta":
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    g = torch.Generator().manual_seed(seed)
    out = (torch.randn(*shape, generator=g, dtype=torch.float32, device="cpu") * std).to(dtype)
    return out if device.type == "cpu" else out.to(device)


def _expert_specs(seed: int, expert_id: int, hidden_size: int, ffn_hidden_size: int):
    """``(shape, std, seed)`` of expert ``expert_id``'s ``w_gate``, ``w_up``, ``w_down``."""
    s = derive_seed(seed, "expert", expert_id)
    return (
        ((hidden_size, ffn_hidden_size), hidden_size**-0.5, s + 1),
        ((hidden_size, ffn_hidden_size), hidden_size**-0.5, s + 2),
        ((ffn_hidden_size, hidden_size), ffn_hidden_size**-0.5, s + 3),
    )


def init_expert_weights(seed: int, expert_id: int, hidden_size: int, ffn_hidden_size: int, dtype: torch.dtype,
                        device: "torch.device | str | None" = "cpu"):
    """Expert ``expert_id``'s ``(w_gate [M, F], w_up [M, F], w_down [F, M])``, identical on every rank (drawn on the
    CPU, then moved to ``device``)."""
    return tuple(_normal(shape, std, s, dtype, device)
                 for shape, std, s in _expert_specs(seed, expert_id, hidden_size, ffn_hidden_size))


class ExpertBank(nn.Module):
    """``num_slots`` SwiGLU experts: ``w_gate``/``w_up`` ``[S, M, F]``, ``w_down`` ``[S, F, M]``.

    ``expert_ids`` (``[S]``) says which global expert each slot holds at construction; every slot is initialised
    from that expert's own seed, so an unsharded bank and any shard of it agree exactly.

    ``device``: where the slots live (None: the current default device). ``"meta"`` allocates and draws nothing;
    :meth:`materialize_` fills the slots later with the values a normal build gives (:attr:`init_expert_ids`
    remembers which expert each slot was built for).
    """

    def __init__(
        self,
        expert_ids: Sequence[int],
        hidden_size: int,
        ffn_hidden_size: int,
        *,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: "torch.device | str | None" = None,
    ):
        super().__init__()
        self.hidden_size, self.ffn_hidden_size = hidden_size, ffn_hidden_size
        self.seed, self.init_dtype = seed, dtype
        self.init_expert_ids: list[int] = [int(e) for e in expert_ids]  # the expert each slot was built for
        device = torch.device("meta") if _EXPERTS_ON_META.get() else resolve_device(device)
        if device.type == "meta":
            S, M, F_ = len(self.init_expert_ids), hidden_size, ffn_hidden_size
            self.w_gate = nn.Parameter(torch.empty(S, M, F_, dtype=dtype, device=device))
            self.w_up = nn.Parameter(torch.empty(S, M, F_, dtype=dtype, device=device))
            self.w_down = nn.Parameter(torch.empty(S, F_, M, dtype=dtype, device=device))
            return
        weights = [init_expert_weights(seed, e, hidden_size, ffn_hidden_size, dtype, device)
                   for e in self.init_expert_ids]
        self.w_gate = nn.Parameter(torch.stack([w[0] for w in weights]))
        self.w_up = nn.Parameter(torch.stack([w[1] for w in weights]))
        self.w_down = nn.Parameter(torch.stack([w[2] for w in weights]))

    @property
    def is_meta(self) -> bool:
        """Whether the slots are still on the meta device (built without memory, not materialised yet)."""
        return any(p.is_meta for p in self.slot_parameters())

    @torch.no_grad()
    def materialize_(self, device: "torch.device | str | None" = None) -> None:
        """Fill a meta-built bank: each slot gets the values of the expert it was built for (its own seed, drawn on
        the CPU one matrix at a time and copied into its slot, so the peak is the bank plus one matrix), as new
        Parameters on ``device`` (None: the current default device; the CPU under a meta default). A bank that is
        not on meta is left as it is."""
        if not self.is_meta:
            return
        device = resolve_device(device)
        if device.type == "meta":
            device = torch.device("cpu")
        names = ("w_gate", "w_up", "w_down")
        filled = {n: torch.empty(getattr(self, n).shape, dtype=getattr(self, n).dtype, device=device) for n in names}
        for slot, expert in enumerate(self.init_expert_ids):
            for name, (shape, std, s) in zip(names, _expert_specs(self.seed, expert, self.hidden_size,
                                                                  self.ffn_hidden_size)):
                filled[name][slot].copy_(_normal(shape, std, s, filled[name].dtype, "cpu"))
        for name in names:
            old = getattr(self, name)
            setattr(self, name, nn.Parameter(filled[name], requires_grad=old.requires_grad))

    @property
    def num_slots(self) -> int:
        return self.w_gate.shape[0]

    def slot_parameters(self) -> list[nn.Parameter]:
        """The parameters whose first dimension is the slot (what a migration moves)."""
        return [self.w_gate, self.w_up, self.w_down]

    def keep_slots(self, slots: torch.Tensor) -> None:
        """Shrink to the given slots (``[S']`` indices), with new Parameters (call before building the optimizer).
        On a meta bank this allocates nothing: it only narrows what :meth:`materialize_` will draw."""
        index = torch.as_tensor(slots, dtype=torch.long, device="cpu")
        self.init_expert_ids = [self.init_expert_ids[int(s)] for s in index.tolist()]
        for name in ("w_gate", "w_up", "w_down"):
            old = getattr(self, name)
            if old.is_meta:
                new = torch.empty((len(index), *old.shape[1:]), dtype=old.dtype, device=old.device)
            else:
                new = old.detach()[slots].clone()
            setattr(self, name, nn.Parameter(new, requires_grad=old.requires_grad))

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

    def __init__(self, hidden_size: int, ffn_hidden_size: int, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: "torch.device | str | None" = None):
        super().__init__()
        s = derive_seed(seed, "shared")
        self.w_gate = nn.Parameter(_normal((hidden_size, ffn_hidden_size), hidden_size**-0.5, s + 1, dtype, device))
        self.w_up = nn.Parameter(_normal((hidden_size, ffn_hidden_size), hidden_size**-0.5, s + 2, dtype, device))
        self.w_down = nn.Parameter(_normal((ffn_hidden_size, hidden_size), ffn_hidden_size**-0.5, s + 3, dtype, device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.silu(x @ self.w_gate) * (x @ self.w_up)) @ self.w_down
