"""Calibrate ``LinkCosts`` on the live process groups: time each phase kind's primitives and fit the cost model.

Per phase kind, on its live process groups (all groups of the phase at once, as in a real dispatch):

* the payload exchange (``dispatch.comm.all_to_all_rows``, the engine's call) at several sizes -> ``(alpha, beta)``;
* the count exchange (``dispatch.comm.exchange_counts`` of a ``[peers, 2]`` int64 tensor) -> ``sync_ms``;

and on every rank at once, the local copies of a hop (gather of ``m`` rows into a fresh buffer, fresh zero-filled fp32
accumulator, ``index_add_``) at a few sizes -> ``copy_beta``, and the first touch of freshly mapped buffers above the
allocator's mmap threshold -> ``fault_beta``. Never the dispatch itself.

Byte count ``n`` follows the cost model (``docs/cost-model.md``): :func:`~hiermoe_lightning.cost.model.phase_load_bytes`
of the calibration exchange's own ``[G, G]`` rows matrix, with the ``duplex`` and ``level1_link`` chosen here. With the
defaults (``"full"``, ``"rank"``) it is the busiest rank's ``max(bytes sent, bytes received)`` excluding the rows it
keeps: every rank sends ``c`` bytes to each of the ``P`` ranks of its phase group (itself included), so
``n = (P - 1) * c``. See ``docs/calibration.md``.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist

from ..dispatch.comm import all_to_all_rows, exchange_counts, sizes_ride_along
from ..dispatch.spec import all_phases, phase_groups
from .link_costs import DUPLEX_MODES, LEVEL1_LINK_MODES, LinkCosts, PhaseCost
from .model import phase_load_bytes

__all__ = ["fit_alpha_beta", "calibrate", "calibration_bytes", "measure_copy_beta", "DEFAULT_SIZES",
           "DEFAULT_COPY_ROWS", "ROW_ELEMENTS", "ROW_BYTES", "COPY_ROW_ELEMENTS", "ENGINE_PAIR_BYTES",
           "measure_fault_beta", "mmap_threshold", "GLIBC_MMAP_THRESHOLD_MAX"]

# float32 rows of 256 elements: 1 KiB per row
ROW_ELEMENTS = 256
ROW_BYTES = ROW_ELEMENTS * 4

# 64 KiB .. 32 MiB per rank (8 geometric points): the range real dispatches move, so the fit interpolates
DEFAULT_SIZES: tuple[int, ...] = tuple(int(round(65536 * 512 ** (k / 7))) for k in range(8))

# local copies: rows of 1024 float32 (4 KiB, a hidden-1024 fp32 token); 1 .. 24 MiB per buffer, the range a hop copies
# below the mmap threshold (buffers above it pay fault_beta on top, measured separately)
COPY_ROW_ELEMENTS = 1024
DEFAULT_COPY_ROWS: tuple[int, ...] = (256, 1024, 3072, 6144)

# glibc malloc: a request of at least M_MMAP_THRESHOLD bytes is mapped fresh from the kernel (and unmapped on free),
# so its pages fault on first touch at every allocation. The threshold starts at 128 KiB and rises to the size of any
# mapped chunk freed, up to DEFAULT_MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * sizeof(long) on 64-bit systems (mallopt(3));
# a steady training / benchmark loop therefore sits at the maximum. MALLOC_MMAP_THRESHOLD_ in the environment fixes it.
GLIBC_MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * 8

# bytes of pair metadata per (token, expert) pair in the engine's payload exchange: (row within the block, expert id,
# fp32 weight bits) as three int32 (dispatch/engine.py pack_pairs); a property of the engine's format, not a fitted
# number
ENGINE_PAIR_BYTES = 12


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
    return [str(p) for p in all_phases(num_levels)]  # plain str: they key the fitted LinkCosts


def _payload_ms(x: torch.Tensor, splits: list[int], peers, counts: torch.Tensor) -> float:
    """One payload exchange as a hop of the engine runs it: the count exchange first (untimed: ``sync_ms`` is timed
    on its own; it absorbs the ranks' skew after the barrier, as in a dispatch), then the timed payload."""
    exchange_counts(counts, peers)
    return _ms(lambda: all_to_all_rows(x, splits, splits, peers))


def _ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _rows_per_peer(size_bytes: float, peers: int) -> int:
    """Rows sent to each peer so that ``(peers - 1) * rows * ROW_BYTES`` is close to ``size_bytes`` (at least 1 row)."""
    return max(1, int(round(size_bytes / ((peers - 1) * ROW_BYTES))))


def calibration_bytes(topology, phase: str, rows_per_peer: int, row_bytes: int = ROW_BYTES, duplex: str = "full",
                      level1_link: str = "rank") -> float:
    """The cost-model ``n`` of one calibration exchange: every rank sends ``rows_per_peer`` rows to every rank of its
    ``phase`` group (itself included), all groups at once; ``n`` = :func:`phase_load_bytes` of that rows matrix.

    Defaults: ``(P - 1) * rows_per_peer * row_bytes``.
    """
    G = topology.world_size
    rows = torch.zeros(G, G, dtype=torch.long)
    for members in phase_groups(topology, phase):
        idx = torch.tensor(members)
        rows[idx[:, None], idx[None, :]] = int(rows_per_peer)
    return phase_load_bytes(topology, rows, row_bytes, duplex=duplex, level1_link=level1_link)


class _CopyBench:
    """The local copies of a hop's round trip for ``m`` rows (see :func:`measure_copy_beta`), ready to time."""

    def __init__(self, copy_rows: Sequence[int], seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.rows = [int(m) for m in copy_rows]
        top = max(self.rows)
        self.x = torch.randn(top, COPY_ROW_ELEMENTS, generator=gen)
        self.idx = [torch.randint(0, top, (m,), generator=gen) for m in self.rows]
        self.held = [max(1, m // 2) for m in self.rows]
        self.acc_idx = [torch.randint(0, h, (m,), generator=gen) for m, h in zip(self.rows, self.held)]

    def bytes(self) -> list[int]:
        return [2 * m * COPY_ROW_ELEMENTS * 4 for m in self.rows]

    def sample(self, j: int) -> float:
        m = self.rows[j]
        t0 = time.perf_counter()
        g = self.x[self.idx[j]]  # the dispatch's gather of the rows it sends (a fresh buffer)
        acc = torch.zeros(self.held[j], COPY_ROW_ELEMENTS, dtype=torch.float32).index_add_(0, self.acc_idx[j], g)
        elapsed_ms = (time.perf_counter() - t0) * 1e3
        del g, acc
        return elapsed_ms


def _fault_sample(size: int) -> float:
    """First touch minus second touch of a fresh ``size``-byte buffer, in ms."""
    buf = torch.empty(size // 4, dtype=torch.float32)
    t0 = time.perf_counter()
    buf.fill_(1.0)
    t1 = time.perf_counter()
    buf.fill_(2.0)
    t2 = time.perf_counter()
    del buf
    return max(0.0, (t1 - t0) - (t2 - t1)) * 1e3


def _fault_sizes(threshold: int, factors: Sequence[float]) -> list[int]:
    sizes = [int(round(f * threshold / 4096)) * 4096 for f in factors]
    if len(set(sizes)) < 2 or min(sizes) < threshold:
        raise ValueError(f"fault sizes need at least two distinct sizes >= the threshold {threshold}, got {sizes}")
    return sizes


def _timed_rounds(slots: list, repeats: int, warmup: int, group) -> list[float]:
    """Run ``warmup + repeats`` rounds over ``slots`` (``(barrier_groups, fn)``: barriers, then ``fn() -> ms``),
    interleaved so that a burst of load on a shared machine touches every slot alike; per slot the median over the
    repeats of the slowest rank of ``group`` (all-reduce MAX per repeat)."""
    collective = dist.is_available() and dist.is_initialized()
    samples = torch.zeros((len(slots), repeats), dtype=torch.float64)
    for it in range(warmup + repeats):
        for k, (barriers, fn) in enumerate(slots):
            if collective:
                for g in barriers:
                    dist.barrier(group=g)
            elapsed = fn()
            if it >= warmup:
                samples[k, it - warmup] = elapsed
    if collective and slots:
        dist.all_reduce(samples, op=dist.ReduceOp.MAX, group=group)
    return [float(np.median(row)) for row in samples.numpy()] if repeats else []


def measure_copy_beta(copy_rows: "Sequence[int]" = DEFAULT_COPY_ROWS, repeats: int = 5, warmup: int = 1,
                      group=None, seed: int = 0) -> tuple[float, float | None, list[float]]:
    """``copy_beta`` (ms per byte) from the local work of a hop, timed on every rank at once; returns
    ``(copy_beta, r2, medians_ms)``.

    For each ``m`` in ``copy_rows`` (rows of ``COPY_ROW_ELEMENTS`` float32), after a barrier on ``group`` (all ranks
    at once: they share the CPU as in a dispatch), every rank times the round trip's copies of a hop that sends
    ``S = m`` rows: ``g = x[idx]`` (the dispatch's gather into a fresh buffer) and
    ``torch.zeros(m // 2, M).index_add_(0, idx, g)`` (the combine's fp32 accumulator and sum; a hop holds fewer rows
    than it sends, ``S / H`` = 1.5 .. 4 for the top-4 .. 8 dispatches of ``docs/calibration.md``, so ``H = S / 2``). A repeat's time is the
    slowest rank's, a size's the median over repeats; ``copy_beta`` is the slope of the line fitted to these medians
    against the ``2 * m * row_bytes`` bytes gathered and accumulated (the model charges ``copy_beta * S * row_bytes``
    one way). Keep the buffers below the allocator's mmap threshold (:func:`mmap_threshold`): above it the first
    touch is ``fault_beta``'s. Collective over ``group`` when torch.distributed is initialised.
    """
    rows = [int(m) for m in copy_rows]
    if len(set(rows)) < 2 or min(rows) < 1:
        raise ValueError(f"copy sizes need at least two distinct row counts >= 1, got {rows}")
    bench = _CopyBench(rows, seed)
    barrier = [group]
    medians = _timed_rounds([(barrier, lambda j=j: bench.sample(j)) for j in range(len(rows))], repeats, warmup, group)
    fit = fit_alpha_beta(bench.bytes(), medians)
    return fit.beta, fit.r2, medians


def mmap_threshold() -> int:
    """The allocation size (bytes) from which this process's allocator maps buffers fresh: glibc's steady-state
    ``M_MMAP_THRESHOLD`` (``MALLOC_MMAP_THRESHOLD_`` when set, else ``GLIBC_MMAP_THRESHOLD_MAX``); 0 when the C
    library is not glibc (no fault term is modelled)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return 0
    env = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    if env is not None:
        try:
            return max(0, int(env))
        except ValueError:
            pass
    return GLIBC_MMAP_THRESHOLD_MAX


def measure_fault_beta(threshold: int, repeats: int = 5, warmup: int = 1, group=None,
                       factors: Sequence[float] = (1.25, 1.5, 2.0)) -> tuple[float, float | None, list[float]]:
    """``fault_beta`` (ms per byte): the first-touch cost of buffers the allocator maps fresh; returns
    ``(fault_beta, r2, medians_ms)``.

    For each size ``f * threshold`` (``f`` in ``factors``), after a barrier on ``group`` (all ranks at once, as in a
    dispatch), every rank allocates a float32 buffer of that size and times ``fill_`` twice: the first touch pays the
    page faults, the second only the memory writes; their difference is the fault cost. A repeat's time is the
    slowest rank's, a size's the median; ``fault_beta`` = the slope of the line fitted to the medians.
    """
    sizes = _fault_sizes(threshold, factors)
    medians = _timed_rounds([([group], lambda n=n: _fault_sample(n)) for n in sizes], repeats, warmup, group)
    fit = fit_alpha_beta(sizes, medians)
    return fit.beta, fit.r2, medians


def calibrate(expert_parallel, sizes: "Sequence[float] | None" = DEFAULT_SIZES, repeats: int = 5, warmup: int = 1,
              phases: "Sequence[str] | None" = None, name: str = "calibrated", duplex: str = "full",
              level1_link: str = "rank", copy_sizes: "Sequence[int] | None" = DEFAULT_COPY_ROWS,
              sync: bool = True, pair_bytes: float | None = None, faults: bool = True,
              report: dict | None = None) -> LinkCosts:
    """Measure every phase kind of ``expert_parallel``'s topology and fit the cost model's terms.

    Collective: every rank of the expert-parallel world must call it with the same arguments. Every rank returns the
    same ``LinkCosts`` (the fits run on medians all-reduced over the expert-parallel world).

    For each phase (``a2a``, ``inter<i>``, ``intra<i>``; or ``phases``):

    * payload: for each size ``n`` in ``sizes`` (cost-model bytes per rank, default ``DEFAULT_SIZES`` = 64 KiB ..
      32 MiB), every rank of each phase group sends ``rows = round(n / ((P - 1) * 1 KiB))`` float32 rows of 256
      elements to each of the ``P`` ranks of its group with ``all_to_all_rows`` (the engine's call: receive-first
      point-to-point on gloo); the fitted byte count is :func:`calibration_bytes` of that exchange (with the defaults
      the exact ``(P - 1) * rows * 1 KiB``). ``(alpha, beta)`` = :func:`fit_alpha_beta`.
    * ``sync_ms`` (``sync=True``): the median time of ``exchange_counts`` of a ``[P, 2]`` int64 tensor (the count
      exchange before every payload).

    Each exchange starts after a barrier (on the whole expert-parallel world, so the groups of one phase run
    concurrently as in a real dispatch, then on the phase group); a payload, as in a hop of the engine, right after
    an (untimed) count exchange, so that its ``alpha`` does not count the ranks' skew after the barrier a second time
    (``sync_ms`` holds it). Everything is measured in ``warmup + repeats``
    interleaved rounds (each round times every slot once: every phase's count exchange and payload sizes, the copies,
    the faults), so a burst of load from other jobs on a shared machine touches all points alike instead of bending
    one; a repeat's time is the slowest rank of the world, a point's time the median over the repeats.

    ``copy_beta`` (``copy_sizes`` not None/empty): :func:`measure_copy_beta` over the expert-parallel world.
    ``fault_beta`` (``faults=True`` and a glibc allocator, :func:`mmap_threshold`): :func:`measure_fault_beta`, with
    ``fault_threshold`` = that threshold; the payload sizes of each phase are then capped so that the receive buffer
    (``P * rows`` rows) stays below the threshold (sizes above it collapse onto the cap): ``(alpha, beta)`` price the
    exchange on recycled memory, and the model adds the faults of the buffers that reach the threshold itself.
    ``pair_bytes``: metadata bytes per pair the engine sends with the rows (default ``ENGINE_PAIR_BYTES`` when
    ``copy_sizes`` or ``sync`` are measured, i.e. whenever the engine's hop is modelled; else 0).
    ``duplex`` / ``level1_link``: how ``n`` is counted (stored in the result; see ``docs/cost-model.md``).

    Phases whose groups have a single rank move nothing: they get ``alpha = beta = 0`` and ``r2 = None``.

    ``report``: a dict to fill with the raw medians (``{"phases": {phase: {"bytes": [...], "ms": [...], "sync_ms":
    ..}}, "copy": {"bytes": [...], "ms": [...], "r2": ..}}``), e.g. to print or plot them.
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
    if duplex not in DUPLEX_MODES:
        raise ValueError(f"duplex must be one of {DUPLEX_MODES}, got {duplex!r}")
    if level1_link not in LEVEL1_LINK_MODES:
        raise ValueError(f"level1_link must be one of {LEVEL1_LINK_MODES}, got {level1_link!r}")
    copy_rows = [] if copy_sizes is None else [int(m) for m in copy_sizes]
    if copy_rows and (len(set(copy_rows)) < 2 or min(copy_rows) < 1):
        raise ValueError(f"copy_sizes need at least two distinct row counts >= 1, got {copy_rows}")
    if pair_bytes is None:
        pair_bytes = float(ENGINE_PAIR_BYTES) if (copy_rows or sync or faults) else 0.0
    topology = expert_parallel.topology
    available = _phase_names(topology.num_levels)
    if phases is None:
        selected = available
    else:
        if isinstance(phases, str):
            phases = [phases]
        selected = list(dict.fromkeys(phases))
        unknown = [p for p in selected if p not in available]
        if unknown or not selected:
            raise ValueError(f"cannot calibrate phases {unknown or selected!r}: topology "
                             f"{topology} has phases {available}")

    # Everything below is deterministic in the arguments, so every rank takes the same path through the collectives.
    world = expert_parallel.peer_group("a2a")
    threshold = mmap_threshold() if faults else 0
    if faults and dist.is_available() and dist.is_initialized():
        agreed = torch.tensor([threshold], dtype=torch.long)  # the same slots on every rank, whatever its allocator
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=world.group)
        threshold = int(agreed)
    measured: list[tuple[str, object, list[int]]] = []
    for phase in selected:
        peers = expert_parallel.peer_group(phase)
        if peers.is_local:
            continue
        rows = [_rows_per_peer(s, peers.size) for s in sizes_arr]
        if threshold > 0:
            # keep the receive buffer (P * rows rows) below the mmap threshold: the line prices the exchange on
            # recycled memory, and the model adds fault_beta for the buffers of a hop that reach the threshold
            cap = max(1, (threshold - 1) // (peers.size * ROW_BYTES))
            rows = list(dict.fromkeys(min(r, cap) for r in rows))
        if len(set(rows)) < 2:
            raise ValueError(
                f"calibration sizes {sizes_arr.tolist()} give fewer than two distinct message sizes for phase "
                f"{phase!r} "
                f"({peers.size} ranks, rows of {ROW_BYTES} bytes): use a wider range"
            )
        measured.append((phase, peers, rows))

    # One list of timed slots, run in interleaved rounds (see _timed_rounds): per phase its count exchange and each
    # payload size (after a barrier on the world, so all groups of the phase run at once, then on the phase group),
    # the local copies and the fresh-buffer faults (after a barrier on the world: every rank at once).
    slots: list = []
    index: dict = {}
    buffer = None
    if measured:
        max_rows = max(max(r) * p.size for _, p, r in measured)
        buffer = torch.zeros((max_rows, ROW_ELEMENTS), dtype=torch.float32)
    for i, (phase, peers, rows) in enumerate(measured):
        barriers = ([world.group] if peers.group is not world.group else []) + [peers.group]
        if sync:
            counts = torch.zeros((peers.size, 2), dtype=torch.long)
            index[("sync", i)] = len(slots)
            slots.append((barriers, lambda c=counts, p=peers: _ms(lambda: exchange_counts(c, p))))
        counts = torch.zeros((peers.size, 2), dtype=torch.long)
        for j, r in enumerate(rows):
            splits, x = [r] * peers.size, buffer[: r * peers.size]
            index[("payload", i, j)] = len(slots)
            slots.append((barriers, lambda x=x, s=splits, p=peers, c=counts: _payload_ms(x, s, p, c)))
    copy_bench = _CopyBench(copy_rows) if copy_rows else None
    for j in range(len(copy_rows)):
        index[("copy", j)] = len(slots)
        slots.append(([world.group], lambda j=j: copy_bench.sample(j)))
    fault_sizes = _fault_sizes(threshold, (1.25, 1.5, 2.0)) if threshold > 0 else []
    for j, n in enumerate(fault_sizes):
        index[("fault", j)] = len(slots)
        slots.append(([world.group], lambda n=n: _fault_sample(n)))
    medians = _timed_rounds(slots, repeats, warmup, world.group)  # slowest rank of the world per repeat

    copy_beta = 0.0
    if copy_rows:
        copy_ms = [medians[index[("copy", j)]] for j in range(len(copy_rows))]
        fit = fit_alpha_beta(copy_bench.bytes(), copy_ms)
        copy_beta = fit.beta
        if report is not None:
            report["copy"] = {"bytes": copy_bench.bytes(), "ms": copy_ms, "r2": fit.r2}
    fault_beta = 0.0
    if fault_sizes:
        fault_ms = [medians[index[("fault", j)]] for j in range(len(fault_sizes))]
        fit = fit_alpha_beta(fault_sizes, fault_ms)
        fault_beta = fit.beta
        if report is not None:
            report["fault"] = {"threshold": threshold, "bytes": fault_sizes, "ms": fault_ms, "r2": fit.r2}

    fitted: dict[str, PhaseCost] = {}
    by_phase = {phase: (i, peers, rows) for i, (phase, peers, rows) in enumerate(measured)}
    for phase in selected:
        if phase not in by_phase:
            fitted[phase] = PhaseCost(0.0, 0.0, None)
            continue
        i, peers, rows = by_phase[phase]
        nbytes = [calibration_bytes(topology, phase, r, ROW_BYTES, duplex, level1_link) for r in rows]
        times = [medians[index[("payload", i, j)]] for j in range(len(rows))]
        line = fit_alpha_beta(nbytes, times)
        sync_ms = medians[index[("sync", i)]] if sync else 0.0
        fitted[phase] = PhaseCost(line.alpha, line.beta, line.r2, sync_ms,
                                  shared_memory=sizes_ride_along(peers, buffer))
        if report is not None:
            report.setdefault("phases", {})[phase] = {"bytes": nbytes, "ms": times,
                                                      "sync_ms": sync_ms if sync else None}
    return LinkCosts(fitted, name=name, copy_beta=copy_beta, pair_bytes=pair_bytes, duplex=duplex,
                     level1_link=level1_link, fault_beta=fault_beta, fault_threshold=float(threshold if fault_beta else 0))
