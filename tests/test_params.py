"""The `check_*` field validators shared by every params dataclass."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from scratchgpt.plumbing.params import check_bool, check_choice, check_int, check_number, check_ratio, check_str


@pytest.mark.parametrize(
    ("value", "minimum", "message"),
    [
        (-1, 0, "n must be a non-negative integer, got -1"),
        (0, 1, "n must be a positive integer, got 0"),
        (2, 3, "n must be an integer >= 3, got 2"),
        (1.0, 0, "n must be a non-negative integer, got 1.0"),
        (True, 0, "n must be a non-negative integer, got True"),
        ("3", 0, "n must be a non-negative integer, got '3'"),
    ],
)
def test_check_int_refuses_naming_field_and_value(value, minimum, message):
    with pytest.raises(ValueError) as info:
        check_int(SimpleNamespace(n=value), "n", minimum)
    assert str(info.value) == message


def test_check_int_accepts_the_minimum():
    check_int(SimpleNamespace(n=3), "n", 3)


@pytest.mark.parametrize(
    ("value", "kwargs", "message"),
    [
        ("fast", {}, "x must be a finite number, got 'fast'"),
        (float("nan"), {}, "x must be a finite number, got nan"),
        (False, {}, "x must be a finite number, got False"),
        (0, {"minimum": 0, "exclusive": True}, "x must be a positive number, got 0"),
        (-0.5, {"minimum": 0}, "x must be a non-negative number, got -0.5"),
        (1.5, {"minimum": 2}, "x must be a number >= 2, got 1.5"),
    ],
)
def test_check_number_refuses_naming_field_and_value(value, kwargs, message):
    with pytest.raises(ValueError) as info:
        check_number(SimpleNamespace(x=value), "x", **kwargs)
    assert str(info.value) == message


def test_check_number_accepts_ints_floats_and_the_inclusive_bound():
    for value in (0, 0.0, 1e-8, 7):
        check_number(SimpleNamespace(x=value), "x", 0)
    check_number(SimpleNamespace(x=-3.5), "x")


def test_check_ratio_open_and_half_open():
    check_ratio(SimpleNamespace(r=0.5), "r")
    check_ratio(SimpleNamespace(r=0), "r", zero=True)
    for value in (0, 1, 1.5, "0.5", True):
        with pytest.raises(ValueError, match=r"^r must be a number in \(0, 1\), got "):
            check_ratio(SimpleNamespace(r=value), "r")
    with pytest.raises(ValueError, match=r"^r must be a number in \[0, 1\), got 1.0$"):
        check_ratio(SimpleNamespace(r=1.0), "r", zero=True)


def test_check_choice_bool_and_str():
    check_choice(SimpleNamespace(c="a"), "c", ("a", "b"))
    with pytest.raises(ValueError, match=r"^c must be one of \['a', 'b'\], got 'z'$"):
        check_choice(SimpleNamespace(c="z"), "c", ("a", "b"))
    check_bool(SimpleNamespace(b=False), "b")
    with pytest.raises(ValueError, match="^b must be true or false, got 1$"):
        check_bool(SimpleNamespace(b=1), "b")
    check_str(SimpleNamespace(s="x"), "s")
    for value in ("", "  ", None):
        with pytest.raises(ValueError, match="^s must be a non-empty string, got "):
            check_str(SimpleNamespace(s=value), "s")


def test_params_module_stays_light():
    """params.py is imported by every dataclass module: it must not pull in torch."""
    code = "import sys, scratchgpt.plumbing.params; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
