"""How many chunks an overlapped layer should run (``overlap_chunks="auto"``): pure arithmetic, no communication.

A layer's step is communication ``A`` (its all-to-alls, forward and backward) and expert compute ``B``. Run as one
pipeline of ``C`` chunks (:mod:`~hiermoe_lightning.dispatch.overlap`), the longer of the two sets the pace and only
one chunk's share of the shorter one is left exposed (the pipeline's fill and drain), while every chunk beyond the
first adds its exchanges' fixed costs ``o``::

    T(1) = A + B
    T(C) = max(A, B) + min(A, B) / C + (C - 1) * o        (C > 1)

``o`` is the latency of one chunk's exchanges: per phase of the dispatch, a count exchange and a payload exchange
(``2 * alpha``), for the dispatch and the combine, forward and backward (``x 4``). The count minimising ``T`` among
the candidates is chosen, the smallest on ties (fewer exchanges for the same predicted time).
"""

from __future__ import annotations

from typing import Iterable, Sequence

from .link_costs import LinkCosts

__all__ = ["OVERLAP_CANDIDATES", "choose_overlap_chunks", "chunk_overhead_ms", "predict_overlapped_ms"]

OVERLAP_CANDIDATES = (1, 2, 3, 4, 6, 8)


def predict_overlapped_ms(comm_ms: float, compute_ms: float, chunks: int, chunk_overhead: float) -> float:
    """``T(C)`` of the module doc: the predicted time of a layer's communication ``comm_ms`` and expert compute
    ``compute_ms`` run as ``chunks`` pipelined chunks, each beyond the first costing ``chunk_overhead`` ms."""
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    if chunks == 1:
        return comm_ms + compute_ms
    return max(comm_ms, compute_ms) + min(comm_ms, compute_ms) / chunks + (chunks - 1) * chunk_overhead


def choose_overlap_chunks(comm_ms: float, compute_ms: float, chunk_overhead: float,
                          candidates: Iterable[int] = OVERLAP_CANDIDATES) -> int:
    """The candidate chunk count with the smallest :func:`predict_overlapped_ms` (the smallest count on ties)."""
    options = sorted(set(candidates))
    if not options:
        raise ValueError("candidates must hold at least one chunk count")
    return min(options, key=lambda c: (predict_overlapped_ms(comm_ms, compute_ms, c, chunk_overhead), c))


def chunk_overhead_ms(link_costs: LinkCosts, phases: Sequence[str]) -> float:
    """``o``: the fixed cost one more chunk adds, from the alphas of the dispatch's ``phases`` (count + payload
    exchange per phase, dispatch and combine, forward and backward)."""
    return sum(4 * 2 * link_costs[phase].alpha for phase in phases)
