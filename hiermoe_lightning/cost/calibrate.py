"""Calibrate ``LinkCosts`` on the live process groups: time each phase kind's all-to-all, fit ``t = alpha + beta * n``.

Byte count ``n`` follows the cost model (``docs/cost-model.md``): the busiest rank's ``max(bytes sent, bytes received)``
excluding the rows it keeps. In the calibration exchange every rank sends ``c`` bytes to each of the ``P`` ranks of its
phase group (itself included), so ``n = (P - 1) * c``. See ``docs/calibration.md``.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist

from ..dispatch.comm import all_to_all_rows
from .link_costs import LinkCosts, PhaseCost

__all__ = ["fit_alpha_beta", "calibrate", "DEFAULT_SIZES", "ROW_ELEMENTS", "ROW_BYTES"]

# float32 rows of 256 elements: 1 KiB per row
ROW_ELEMENTS = 256
ROW_BYTES = ROW_ELEMENTS * 4

# 64 KiB .. 32 MiB per rank (8 geometric points): the range real dispatches move, so the fit interpolates
DEFAULT_SIZES: tuple[int, ...] = tuple(int(round(65536 * 512 ** (k / 7))) for k in range(8))


def _as_float_array(values, what: str) -> np.ndarray:
    try:
        arr = np.asarray(list(values), dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a sequence of numbers, got {values!r}") from None
    if arr.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} must be finite, got {arr.tolist()}")
    return arr


def fit_alpha_beta(sizes_bytes: Sequence[float], times_ms: Sequence[float]) -> PhaseCost:
    """Least-squares fit of ``times_ms = alpha + beta * sizes_bytes`` (``numpy.linalg.lstsq``).

    ``alpha`` (ms) and ``beta`` (ms per byte) are clamped to ``>= 0``: when the unconstrained fit gives a negative one,
    the line is refitted with that one fixed to 0 (a negative result of the refit is clamped to 0 as well).
    ``r2`` is the coefficient of determination of the returned (possibly constrained) line; it can be negative when
    the constraint makes the line worse than the mean. Constant times fitted exactly give ``r2 = 1``.
    """
    x = _as_float_array(sizes_bytes, "sizes_bytes")
    y = _as_float_array(times_ms, "times_ms")
    if x.shape != y.shape:
        raise ValueError(f"sizes_bytes ({x.size} values) and times_ms ({y.size} values) differ in length")
    if np.any(x < 0):
        raise ValueError(f"sizes_bytes must be >= 0, got {x.tolist()}")
    if np.unique(x).size < 2:
        raise ValueError(f"fitting alpha and beta needs at least two distinct sizes, got {x.tolist()}")

    scale = float(np.max(x))  # fit on x / max(x) for conditioning, then rescale beta
    xs = x / scale
    (alpha, beta_s), *_ = np.linalg.lstsq(np.stack([np.ones_like(xs), xs], axis=1), y, rcond=None)
    if alpha < 0:
        alpha = 0.0
        beta_s = float(np.dot(xs, y) / np.dot(xs, xs))  # through the origin
    elif beta_s < 0:
        beta_s = 0.0
        alpha = float(np.mean(y))
    alpha, beta_s = max(float(alpha), 0.0), max(float(beta_s), 0.0)

    residual = y - (alpha + beta_s * xs)
    ss_res = float(np.dot(residual, residual))
    centred = y - np.mean(y)
    ss_tot = float(np.dot(centred, centred))
    if ss_tot > 0:
        r2 = 1.0 - ss_res / ss_tot
    else:
        r2 = 1.0 if ss_res <= 1e-24 * max(1.0, float(np.dot(y, y))) else 0.0
    return PhaseCost(alpha, beta_s / scale, float(r2))


def _phase_names(num_levels: int) -> list[str]:
    return ["a2a"] + [f"{k}{i}" for k in ("inter", "intra") for i in range(1, num_levels)]


def _rows_per_peer(size_bytes: float, peers: int) -> int:
    """Rows sent to each peer so that ``(peers - 1) * rows * ROW_BYTES`` is close to ``size_bytes`` (at least 1 row)."""
    return max(1, int(round(size_bytes / ((peers - 1) * ROW_BYTES))))


def calibrate(expert_parallel, sizes: "Sequence[float] | None" = DEFAULT_SIZES, repeats: int = 5, warmup: int = 1,
              phases: "Sequence[str] | None" = None, name: str = "calibrated") -> LinkCosts:
    """Measure every phase kind of ``expert_parallel``'s topology and fit ``(alpha, beta)`` per phase.

    Collective: every rank of the expert-parallel world must call it with the same arguments. Every rank returns the
    same ``LinkCosts`` (the fit runs on medians all-reduced over the expert-parallel world).

    For each phase (``a2a``, ``inter<i>``, ``intra<i>``; or ``phases``) and each size ``n`` in ``sizes`` (cost-model
    bytes per rank, default ``DEFAULT_SIZES`` = 64 KiB .. 32 MiB), every rank of each phase group sends
    ``rows = round(n / ((P - 1) * 1 KiB))`` float32 rows of 256 elements to each of the ``P`` ranks of its group with
    ``dist.all_to_all_single``; the fitted byte count is the exact ``(P - 1) * rows * 1 KiB``. Each of
    ``warmup + repeats`` exchanges starts after a barrier (on the whole expert-parallel world, so the groups of one
    phase run concurrently as in a real dispatch, then on the phase group); a repeat's time is the slowest rank of the
    group, the point's time is the median over repeats, and the slowest group of the phase counts.

    Phases whose groups have a single rank move nothing: they get ``alpha = beta = 0`` and ``r2 = None``.
    """
    if sizes is None:
        sizes = DEFAULT_SIZES
    sizes_arr = _as_float_array(sizes, "calibration sizes")
    if sizes_arr.size == 0 or np.any(sizes_arr <= 0):
        raise ValueError(f"calibration sizes must be positive byte counts, got {sizes_arr.tolist()}")
    for value, what in ((repeats, "repeats"), (warmup, "warmup")):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{what} must be an int, got {value!r}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    available = _phase_names(expert_parallel.topology.num_levels)
    if phases is None:
        selected = available
    else:
        if isinstance(phases, str):
            phases = [phases]
        selected = list(dict.fromkeys(phases))
        unknown = [p for p in selected if p not in available]
        if unknown or not selected:
            raise ValueError(f"cannot calibrate phases {unknown or selected!r}: topology "
                             f"{expert_parallel.topology} has phases {available}")

    # Everything below is deterministic in the arguments, so every rank takes the same path through the collectives.
    measured: list[tuple[str, object, list[int]]] = []
    for phase in selected:
        peers = expert_parallel.peer_group(phase)
        if peers.is_local:
            continue
        rows = [_rows_per_peer(s, peers.size) for s in sizes_arr]
        if len(set(rows)) < 2:
            raise ValueError(
                f"calibration sizes {sizes_arr.tolist()} give fewer than two distinct message sizes for phase "
                f"{phase!r} "
                f"({peers.size} ranks, rows of {ROW_BYTES} bytes): use a wider range"
            )
        measured.append((phase, peers, rows))

    world = expert_parallel.peer_group("a2a")
    medians = torch.zeros((len(measured), len(sizes_arr)), dtype=torch.float64)
    if measured:
        max_rows = max(max(r) * p.size for _, p, r in measured)
        buffer = torch.zeros((max_rows, ROW_ELEMENTS), dtype=torch.float32)
        for i, (phase, peers, rows) in enumerate(measured):
            for j, r in enumerate(rows):
                splits = [r] * peers.size
                x = buffer[: r * peers.size]
                samples = torch.empty(repeats, dtype=torch.float64)
                for it in range(warmup + repeats):
                    if peers.group is not world.group:
                        dist.barrier(group=world.group)
                    dist.barrier(group=peers.group)
                    t0 = time.perf_counter()
                    all_to_all_rows(x, splits, splits, peers)
                    elapsed_ms = (time.perf_counter() - t0) * 1e3
                    if it >= warmup:
                        samples[it - warmup] = elapsed_ms
                dist.all_reduce(samples, op=dist.ReduceOp.MAX, group=peers.group)  # slowest rank per repeat
                medians[i, j] = float(np.median(samples.numpy()))
        dist.all_reduce(medians, op=dist.ReduceOp.MAX, group=world.group)  # slowest group of the phase

    fitted: dict[str, PhaseCost] = {}
    by_phase = {phase: (peers, rows, medians[i].numpy()) for i, (phase, peers, rows) in enumerate(measured)}
    for phase in selected:
        if phase not in by_phase:
            fitted[phase] = PhaseCost(0.0, 0.0, None)
            continue
        peers, rows, times = by_phase[phase]
        nbytes = [(peers.size - 1) * r * ROW_BYTES for r in rows]
        fitted[phase] = fit_alpha_beta(nbytes, times.tolist())
    return LinkCosts(fitted, name=name)
