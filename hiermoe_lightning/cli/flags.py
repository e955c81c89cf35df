"""Small validators shared by the command-line subcommands (run in the parent, before any rank starts)."""

from __future__ import annotations

__all__ = ["int_flag"]


def int_flag(value: object, flag: str, low: int) -> int:
    """``value`` as an int >= ``low``; else a TypeError/ValueError naming ``flag``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{flag} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{flag} must be >= {low}, got {value}")
    return value
