"""validation.py: every checker, a wrong type -> TypeError, a wrong value -> ValueError, messages name the parameter
and the allowed values; the old names still behave as before."""

import math

import pytest

from hiermoe_lightning.validation import (
    ArgumentTypeError, check_bool, check_bool_arg, check_choice, check_flag, check_int, check_number,
    check_number_arg, check_positive_int,
)


# ---------------------------------------------------------------------------------------------------- check_int
@pytest.mark.parametrize("value, low, high", [(0, None, None), (-5, None, None), (3, 1, None), (1, 1, None),
                                              (0, 0, 3), (3, 0, 3), (-2, None, -1)])
def test_check_int_accepts_and_returns(value, low, high):
    assert check_int(value, "n", low, high) == value


@pytest.mark.parametrize("value", [True, False, 2.0, "3", None, [1]])
def test_check_int_wrong_type_is_type_error(value):
    with pytest.raises(TypeError, match=r"^top_k must be an int >= 1, got ") as info:
        check_int(value, "top_k", 1)
    assert not isinstance(info.value, ValueError)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("value, low, high, allowed", [
    (0, 1, None, "an int >= 1"),
    (-1, 0, None, "an int >= 0"),
    (4, 0, 3, r"an int in \[0, 3\]"),
    (-1, 0, 3, r"an int in \[0, 3\]"),
    (5, None, 4, "an int <= 4"),
])
def test_check_int_out_of_range_is_value_error(value, low, high, allowed):
    with pytest.raises(ValueError, match=rf"^rank must be {allowed}, got {value}$") as info:
        check_int(value, "rank", low, high)
    assert not isinstance(info.value, TypeError)


def test_check_int_without_bounds_names_the_type():
    with pytest.raises(TypeError, match=r"^seed must be an int, got float 1.5$"):
        check_int(1.5, "seed")


def test_bool_is_not_an_int_even_in_range():
    for checker in (lambda v: check_int(v, "n", 0, 1), lambda v: check_positive_int(v, "n")):
        with pytest.raises(TypeError, match="n must be an int"):
            checker(True)


# --------------------------------------------------------------------------------------------------- check_bool
@pytest.mark.parametrize("value", [True, False])
def test_check_bool_accepts(value):
    assert check_bool(value, "swap") is value


@pytest.mark.parametrize("value", [1, 0, "yes", "false", None, 1.0])
def test_check_bool_wrong_type_is_type_error_only(value):
    with pytest.raises(TypeError, match=r"^swap must be True or False, got ") as info:
        check_bool(value, "swap")
    assert not isinstance(info.value, ValueError)
    assert repr(value) in str(info.value)


# ------------------------------------------------------------------------------------------------- check_number
@pytest.mark.parametrize("value, kwargs, want", [
    (1, {}, 1.0),
    (-3.5, {}, -3.5),
    (0.0, {"low": 0.0}, 0.0),
    (1.0, {"low": 0.0, "low_open": True, "high": 1.0}, 1.0),
    (0.25, {"low": 0.0, "high": 0.5, "high_open": True}, 0.25),
    (None, {"low": 1.0, "allow_none": "plain max"}, None),
])
def test_check_number_accepts_and_returns_a_float(value, kwargs, want):
    got = check_number(value, "x", **kwargs)
    assert got == want and (got is None or type(got) is float)


@pytest.mark.parametrize("value", [True, "0.1", None, [0.1]])
def test_check_number_wrong_type_is_type_error(value):
    with pytest.raises(TypeError, match=r"^lr must be a number in \(0, inf\), got ") as info:
        check_number(value, "lr", low=0.0, low_open=True)
    assert not isinstance(info.value, ValueError)


@pytest.mark.parametrize("value, kwargs, allowed", [
    (0.0, {"low": 0.0, "low_open": True}, r"a number in \(0, inf\)"),
    (-0.1, {"low": 0.0}, r"a number in \[0, inf\)"),
    (0.5, {"low": 0.0, "high": 0.5, "high_open": True}, r"a number in \[0, 0.5\)"),
    (1.5, {"low": 0.0, "low_open": True, "high": 1.0}, r"a number in \(0, 1\]"),
    (2.0, {"high": 1.0}, r"a number in \(-inf, 1\]"),
    (math.nan, {}, r"a number in \(-inf, inf\)"),
    (math.inf, {"low": 0.0}, r"a number in \[0, inf\)"),
    (0.5, {"low": 1.0, "allow_none": "plain max"}, r"a number in \[1, inf\) or None \(plain max\)"),
])
def test_check_number_out_of_range_is_value_error(value, kwargs, allowed):
    with pytest.raises(ValueError, match=rf"^gamma must be {allowed}, got ") as info:
        check_number(value, "gamma", **kwargs)
    assert not isinstance(info.value, TypeError)


def test_check_number_none_needs_allow_none():
    with pytest.raises(TypeError, match=r"gamma must be a number in \[1, inf\), got NoneType None"):
        check_number(None, "gamma", low=1.0)


# ------------------------------------------------------------------------------------------------- check_choice
def test_check_choice():
    assert check_choice("probs", "drop_policy", ("probs", "position")) == "probs"
    with pytest.raises(ValueError, match=r"^drop_policy must be one of 'probs', 'position', got 'random'$") as info:
        check_choice("random", "drop_policy", ("probs", "position"))
    assert not isinstance(info.value, TypeError)
    for value in (None, 3):
        with pytest.raises(TypeError, match=r"^drop_policy must be one of 'probs', 'position', got ") as info:
            check_choice(value, "drop_policy", ["probs", "position"])
        assert not isinstance(info.value, ValueError)


def test_check_choice_takes_any_iterable_and_keeps_bool_apart_from_int():
    assert check_choice("bf16", "--dtype", {"fp32": 4, "bf16": 2}) == "bf16"
    assert check_choice(2, "n", (1, 2)) == 2
    with pytest.raises(TypeError, match="n must be one of 1, 2"):
        check_choice(True, "n", (1, 2))


# ------------------------------------------------------------------------------------------------------ old names
def test_compat_error_is_both_a_type_error_and_a_value_error():
    assert issubclass(ArgumentTypeError, TypeError) and issubclass(ArgumentTypeError, ValueError)
    assert ArgumentTypeError.__doc__ and "backward compatibility" in ArgumentTypeError.__doc__


@pytest.mark.parametrize("value", [1, "yes", None])
def test_check_flag_wrong_type_is_type_error_and_still_value_error(value):
    with pytest.raises(ArgumentTypeError, match=r"^shared_memory must be True or False, got "):
        check_flag(value, "shared_memory")
    assert check_flag(False, "shared_memory") is False


def test_check_positive_int_old_behaviour():
    assert check_positive_int(3, "auto_interval") == 3
    for value in (True, 2.0, "3"):
        with pytest.raises(ArgumentTypeError, match=r"^auto_interval must be an int >= 1, got "):
            check_positive_int(value, "auto_interval")
    with pytest.raises(ValueError, match=r"^auto_interval must be an int >= 1, got 0$") as info:
        check_positive_int(0, "auto_interval")
    assert not isinstance(info.value, TypeError)  # a wrong value is only a ValueError


def test_name_first_aliases():
    assert check_bool_arg("swap", True) is True
    with pytest.raises(TypeError, match="swap must be True or False") as info:
        check_bool_arg("swap", 1)
    assert not isinstance(info.value, ValueError)
    assert check_number_arg("window_decay", 1, low=0.0, low_open=True, high=1.0) == 1.0
    with pytest.raises(ValueError, match=r"window_decay must be a number in \(0, 1\]"):
        check_number_arg("window_decay", 0, low=0.0, low_open=True, high=1.0)
