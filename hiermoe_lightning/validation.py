"""Argument checks shared by the library and the command line (pure; run before any collective)."""

from __future__ import annotations

import math

__all__ = ["check_int", "check_flag", "check_positive_int", "check_bool_arg", "check_number_arg"]


def check_int(value: object, what: str, low: int) -> int:
    """``value`` as an int >= ``low`` (not a bool); else a TypeError (type) or ValueError (value) naming ``what`` and
    what is allowed."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int >= {low}, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{what} must be an int >= {low}, got {value}")
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


# the callbacks' checks (HierMoECallback, DedupMonitor): the type and the allowed values in one message
def check_bool_arg(name: str, value: object) -> bool:
    """``value`` as a bool (1 and "yes" are not): TypeError naming ``name``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def check_number_arg(name: str, value: object, *, low: float, low_open: bool = False, high: float | None = None,
                     allow_none: str | None = None) -> float | None:
    """``value`` as a finite float in ``[low, high]`` (``(low, high]`` with ``low_open``), or None when
    ``allow_none`` (its meaning) is given: TypeError / ValueError naming ``name`` and the allowed values."""
    allowed = f"{'(' if low_open else '['}{low:g}, {'inf)' if high is None else f'{high:g}]'}"
    allowed = f"a number in {allowed}" + (f" or None ({allow_none})" if allow_none else "")
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be {allowed}, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < low or (low_open and v == low) or (high is not None and v > high):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return v
