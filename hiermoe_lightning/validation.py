"""Argument checks shared by the library and the command line (pure; run before any collective)."""

from __future__ import annotations

__all__ = ["check_int", "check_flag", "check_positive_int"]


def check_int(value: object, what: str, low: int) -> int:
    """``value`` as an int >= ``low``; else a TypeError/ValueError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{what} must be >= {low}, got {value}")
    return value


def check_flag(value: object, what: str) -> bool:
    """``value`` as a bool; else a ValueError naming ``what`` (1 and "yes" are not flags)."""
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be True or False, got {value!r}")
    return value


def check_positive_int(value: object, what: str) -> int:
    """``value`` as an int >= 1 (not a bool); else a ValueError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return value
