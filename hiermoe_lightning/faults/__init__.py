"""How jobs end when they do not end as planned: preemption, dead ranks, broken checkpoints, non-finite values.

* :mod:`.errors` — the exceptions users see (one line each).
* :mod:`.signals` — a SIGTERM handler that only raises a flag (no collective inside a signal handler).
* :mod:`.consensus` — one small all-reduce per optimizer step makes every rank agree on the flags.
* :mod:`.reports` — per-rank failure reports and logs, and the one-line description of how a process ended.
* :mod:`.supervisor` — the launcher of ``hiermoe fit``'s rank processes that watches them and names the one that died.
* :mod:`.checkpoint_checks` — checks a checkpoint file or directory before any rank reads it collectively.
"""

from .errors import CheckpointError, NonFiniteError, Preempted, RankDied

__all__ = ["CheckpointError", "NonFiniteError", "Preempted", "RankDied"]
