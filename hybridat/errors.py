"""The one exception the CLI turns into a one-line error message, and the checks that raise it."""

from __future__ import annotations

import math
from typing import Iterable


class HybridatError(Exception):
    """Bad input: a missing or corrupt file, an unknown name, an impossible value."""


def check_number(name: str, value, low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
                 integer: bool = False):
    """`value` if it is a finite number (an int where `integer`) in [low, high] ((low, high] where low_open);
    NaN, infinity, booleans and strings are refused with one line naming the option."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise HybridatError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise HybridatError(f"{name} must be a finite number, got {value}")
    if value < low or value > high or (low_open and value == low):
        lo = "(" if low_open else "["
        raise HybridatError(f"{name} must be in {lo}{_num(low)}, {_num(high)}], got {value}")
    return value


def _num(x: float) -> str:
    return "inf" if x == math.inf else "-inf" if x == -math.inf else f"{x:g}"


def check_choice(value, choices: Iterable[str], what: str) -> str:
    """`value` if it is one of `choices`; else one line listing the valid names."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise HybridatError(f"unknown {what} {value!r}; choose one of: {', '.join(choices)}")
    return value
