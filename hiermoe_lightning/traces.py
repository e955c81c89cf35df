"""Routing traces: generated (``uniform``, ``zipf:S``) or loaded from a file (``trace:PATH``).

A trace is an int64 tensor ``[world_size, tokens_per_rank, top_k]``: the expert ids that each token of each source
rank chose (see ``docs/contract.md``, "Routing traces"). A value ``-1`` marks a dropped (token, expert) pair; the
cost model ignores it. Generated routings never contain ``-1``.

* ``uniform``: every token draws ``K`` distinct experts uniformly at random (drawn exactly like ``zipf:0``).
* ``zipf:S``: expert ``e`` has weight ``1 / (e + 1) ** S`` (expert 0 most popular) and every token draws ``K``
  distinct experts with ``torch.multinomial(weights, K, replacement=False)``.

Both use one ``torch.Generator().manual_seed(seed)`` for all draws, so a seed fixes the trace.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from .validation import check_int

__all__ = ["RoutingSpec", "parse_routing", "generate_routing", "load_trace", "check_trace"]

ALLOWED_ROUTINGS = "'uniform', 'zipf:S' (S a number >= 0, e.g. 'zipf:1.2') or 'trace:PATH' (a .pt or .npy file)"

# Tokens drawn per multinomial call: bounds the [chunk, E] matrix torch materialises.
_CHUNK = 16384


@dataclass(frozen=True)
class RoutingSpec:
    """A parsed ``--routing`` value: ``kind`` is ``uniform``, ``zipf`` (with ``exponent``) or ``trace`` (with ``path``)."""

    kind: str
    exponent: float | None = None
    path: str | None = None

    def __str__(self) -> str:
        if self.kind == "zipf":
            return f"zipf:{self.exponent:g}"
        if self.kind == "trace":
            return f"trace:{self.path}"
        return self.kind


def parse_routing(text: "str | RoutingSpec") -> RoutingSpec:
    """``"uniform"`` / ``"zipf:1.2"`` / ``"trace:run.pt"`` -> :class:`RoutingSpec`; anything else is a ``ValueError``."""
    if isinstance(text, RoutingSpec):
        return text
    if not isinstance(text, str):
        raise TypeError(f"routing must be a string, one of {ALLOWED_ROUTINGS}; got {text!r}")
    value = text.strip()
    if value == "uniform":
        return RoutingSpec("uniform")
    if value.startswith("zipf:"):
        raw = value[len("zipf:"):]
        try:
            s = float(raw)
        except ValueError:
            s = float("nan")
        if not math.isfinite(s) or s < 0:
            raise ValueError(f"routing {text!r}: the zipf exponent must be a finite number >= 0, got {raw!r}; "
                             f"allowed: {ALLOWED_ROUTINGS}")
        return RoutingSpec("zipf", exponent=s)
    if value.startswith("trace:"):
        path = value[len("trace:"):]
        if not path:
            raise ValueError(f"routing {text!r} names no file; allowed: {ALLOWED_ROUTINGS}")
        return RoutingSpec("trace", path=path)
    raise ValueError(f"routing {text!r} is not valid; allowed: {ALLOWED_ROUTINGS}")


def generate_routing(
    spec: "str | RoutingSpec",
    world_size: int,
    tokens_per_rank: int,
    num_experts: int,
    top_k: int,
    seed: int = 0,
) -> torch.Tensor:
    """Draw a routing: int64 ``[world_size, tokens_per_rank, top_k]``, each token with ``top_k`` distinct experts.

    ``spec`` is ``uniform`` or ``zipf:S`` (``trace:PATH`` is loaded with :func:`load_trace`, not generated).
    Deterministic in ``seed``.
    """
    routing = parse_routing(spec)
    G = check_int(world_size, "world_size", 1)
    T = check_int(tokens_per_rank, "tokens_per_rank", 1)
    E = check_int(num_experts, "num_experts", 1)
    K = check_int(top_k, "top_k (distinct experts per token, at most num_experts)", 1, E)
    check_int(seed, "seed")
    if routing.kind == "trace":
        raise ValueError(f"routing {str(routing)!r} is a file: load it with load_trace, generate_routing takes "
                         "'uniform' or 'zipf:S'")
    gen = torch.Generator().manual_seed(seed)
    N = G * T
    exponent = 0.0 if routing.kind == "uniform" else routing.exponent
    return _draw_ids(N, _expert_weights(E, exponent), K, gen).reshape(G, T, K)


def _expert_weights(num_experts: int, exponent: float) -> torch.Tensor:
    """``[E]`` float32 weights ``1 / (e + 1) ** S`` (all ones for ``S = 0``, the uniform routing)."""
    return 1.0 / (torch.arange(num_experts, dtype=torch.float32) + 1.0) ** exponent


def _draw_ids(num_tokens: int, weights: torch.Tensor, top_k: int, gen: torch.Generator) -> torch.Tensor:
    """``[N, K]`` int64: per token ``torch.multinomial(weights, K, replacement=False)``.

    Drawn in chunks of tokens to bound the ``[chunk, E]`` matrix; the result equals one
    ``torch.multinomial(weights.expand(N, E), K, replacement=False, generator=gen)`` call.
    """
    num_experts = weights.numel()
    out = torch.empty(num_tokens, top_k, dtype=torch.long)
    for start in range(0, num_tokens, _CHUNK):
        stop = min(start + _CHUNK, num_tokens)
        out[start:stop] = torch.multinomial(
            weights.expand(stop - start, num_experts), top_k, replacement=False, generator=gen
        )
    return out


def check_trace(ids: torch.Tensor, num_experts: int | None = None, where: str = "trace") -> torch.Tensor:
    """Validate a routing tensor and return it as int64 ``[G, T, K]``.

    Rules: 3-D, integer dtype, non-empty, ids in ``-1 .. num_experts-1`` (``-1`` = dropped pair; without
    ``num_experts`` only ``>= -1`` is checked), and no expert twice in one token. ``where`` names the source in errors.
    """
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{where} must hold a tensor of expert ids, got {type(ids).__name__}")
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"{where} must hold integer expert ids, got dtype {ids.dtype}")
    if ids.dim() != 3:
        raise ValueError(f"{where} must have shape [world_size, tokens_per_rank, top_k] (3-D), got shape "
                         f"{list(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError(f"{where} is empty (shape {list(ids.shape)})")
    ids = ids.to(torch.long)
    low, high = int(ids.min()), int(ids.max())
    if low < -1 or (num_experts is not None and high >= num_experts):
        allowed = "-1 .. num_experts-1" if num_experts is None else f"-1 .. {num_experts - 1}"
        raise ValueError(f"{where} has expert ids out of range: min {low}, max {high}; allowed {allowed} "
                         "(-1 marks a dropped pair)")
    s = ids.sort(dim=2).values
    if bool(((s[..., 1:] == s[..., :-1]) & (s[..., 1:] >= 0)).any()):
        raise ValueError(f"{where} has a token that lists the same expert twice; top-k experts must be distinct")
    return ids


def load_trace(path: "str | os.PathLike", num_experts: int | None = None) -> torch.Tensor:
    """Load a ``.pt`` (``torch.save`` of the tensor) or ``.npy`` trace as int64 ``[G, T, K]``, validated by :func:`check_trace`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"trace file {path!r} does not exist")
    where = f"trace file {path!r}"
    if path.endswith(".pt"):
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling problem is a bad file for the user
            raise ValueError(f"{where} could not be read as a torch tensor: {str(e).splitlines()[0]}") from None
    elif path.endswith(".npy"):
        import numpy as np

        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{where} could not be read as a numpy array: {str(e).splitlines()[0]}") from None
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{where} must hold integer expert ids, got dtype {arr.dtype}")
        data = torch.from_numpy(arr.astype(np.int64, copy=False))
    else:
        raise ValueError(f"trace file {path!r} has an unknown extension; allowed: .pt (torch.save) or .npy")
    return check_trace(data, num_experts, where)

