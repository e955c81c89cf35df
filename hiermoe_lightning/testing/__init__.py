"""Helpers to run a function on N local gloo ranks (tests, benchmarks, examples)."""

from .launch import free_port, run_ranks

__all__ = ["free_port", "run_ranks"]
