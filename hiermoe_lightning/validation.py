"""Argument checks shared by the library and the command line (pure; run before any collective)."""

from __future__ import annotations

__all__ = ["check_int"]


def check_int(value: object, what: str, low: int) -> int:
    """``value`` as an int >= ``low``; else a TypeError/ValueError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{what} must be >= {low}, got {value}")
    return value
