"""Helpers to run a function on N local gloo ranks (tests, benchmarks, examples)."""

from .launch import (Deadline, RankFailure, RanksInterrupted, RanksTimeout, failure_log_path, free_port, run_ranks,
                     stop_on_signals)

__all__ = ["free_port", "run_ranks", "RankFailure", "RanksTimeout", "RanksInterrupted", "Deadline", "stop_on_signals",
           "failure_log_path"]
