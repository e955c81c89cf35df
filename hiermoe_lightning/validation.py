"""Argument checks shared by the library and the command line (pure; run before any collective).

The one place the package checks its arguments (contract, "Errors"). Every checker is called as
``check_x(value, name, ...)``, returns the value (normalised where said) and raises

* ``TypeError`` when ``value`` has the wrong type (``True`` is not an int, ``1`` is not a flag, ``"3"`` is not a number),
* ``ValueError`` when it has the right type but is not allowed (out of range, not one of the choices),

with a message ``"<name> must be <the allowed values>, got <the value>"``. ``name`` is what the user wrote: a
parameter (``"top_k"``) or a command-line flag (``"--top-k"``).

Old names kept for callers that still use them: :func:`check_flag` and :func:`check_positive_int` (they used to raise
ValueError for a wrong type: now :class:`ArgumentTypeError`, which is both), :func:`check_bool_arg` and
:func:`check_number_arg` (name first: thin aliases of :func:`check_bool` and :func:`check_number`).
"""

from __future__ import annotations

import math
from typing import Iterable, TypeVar

__all__ = [
    "ArgumentTypeError",
    "check_int", "check_bool", "check_number", "check_choice",
    # old names (backward compatibility)
    "check_flag", "check_positive_int", "check_bool_arg", "check_number_arg",
]

T = TypeVar("T")


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type, raised where a ValueError was raised for it before.

    A TypeError, as the contract asks of a wrong type; also a ValueError, only for backward compatibility: the old
    checkers :func:`check_flag` and :func:`check_positive_int` raised ValueError for any bad argument, wrong type
    included, and callers (and tests) catch ``ValueError`` for ``shared_memory="yes"``. Same idea as numpy's
    ``AxisError(ValueError, IndexError)``. New code raises plain TypeError; do not raise this elsewhere.
    """


def _type_name(value: object) -> str:
    return f"{type(value).__name__} {value!r}"


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    left = "(-inf" if low is None else f"{'(' if low_open else '['}{low:g}"
    right = "inf)" if high is None else f"{high:g}{')' if high_open else ']'}"
    return f"{left}, {right}"


def check_int(value: object, name: str, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]`` (either bound may be None: unbounded); a bool is not an int.

    TypeError for a non-int, ValueError out of range; both messages name ``name`` and the allowed range
    (``"top_k must be an int >= 1, got 0"``, ``"rank must be an int in [0, 3], got 4"``).
    """
    if low is None and high is None:
        allowed = "an int"
    elif high is None:
        allowed = f"an int >= {low}"
    elif low is None:
        allowed = f"an int <= {high}"
    else:
        allowed = f"an int in [{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {allowed}, got {_type_name(value)}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be {allowed}, got {value}")
    return value


def check_bool(value: object, name: str) -> bool:
    """``value`` as a bool: TypeError naming ``name`` for anything else (``1``, ``"yes"`` and None are not flags)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {_type_name(value)}")
    return value


def check_number(value: object, name: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, allow_none: str | None = None) -> float | None:
    """``value`` as a finite float in ``[low, high]`` (``low_open`` / ``high_open`` exclude the bound; a None bound is
    unbounded), or None when ``allow_none`` (what None means, shown in the message) is given.

    TypeError for a non-number (a bool is not a number), ValueError for NaN, inf or out of range; both messages name
    ``name`` and the allowed values (``"lr must be a number in (0, inf), got 0.0"``).
    """
    allowed = f"a number in {_interval(low, high, low_open, high_open)}"
    if allow_none:
        allowed += f" or None ({allow_none})"
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be {allowed}, got {_type_name(value)}")
    v = float(value)
    if (not math.isfinite(v) or (low is not None and (v < low or (low_open and v == low)))
            or (high is not None and (v > high or (high_open and v == high)))):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return v


def check_choice(value: T, name: str, choices: Iterable[T]) -> T:
    """``value`` if it is one of ``choices``; else a ValueError naming ``name`` and every choice (a TypeError when
    ``value`` is not even of a choice's type, e.g. None or 3 where names are expected)."""
    choices = tuple(choices)
    kin = [c for c in choices if isinstance(value, type(c)) and isinstance(value, bool) == isinstance(c, bool)]
    if any(value == c for c in kin):
        return value
    allowed = ", ".join(repr(c) for c in choices)
    error = ValueError if kin else TypeError
    raise error(f"{name} must be one of {allowed}, got {value!r}")


# ------------------------------------------------------------------------------------------------------ old names
def check_flag(value: object, name: str) -> bool:
    """Old name of :func:`check_bool`; a non-bool raises :class:`ArgumentTypeError` (TypeError and, as before,
    ValueError)."""
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be True or False, got {_type_name(value)}")
    return value


def check_positive_int(value: object, name: str) -> int:
    """Old name of ``check_int(value, name, 1)``; a non-int raises :class:`ArgumentTypeError` (TypeError and, as
    before, ValueError), 0 or less a ValueError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"{name} must be an int >= 1, got {_type_name(value)}")
    return check_int(value, name, 1)


def check_bool_arg(name: str, value: object) -> bool:
    """Old name of :func:`check_bool`, name first."""
    return check_bool(value, name)


def check_number_arg(name: str, value: object, **bounds) -> float | None:
    """Old name of :func:`check_number`, name first."""
    return check_number(value, name, **bounds)
