"""argparse `type=` functions for numeric flags: each accepts only what its name says and otherwise raises
argparse.ArgumentTypeError, which argparse turns into one line naming the flag and exit status 2.

    p.add_argument("--seed", type=non_negative_int)
    p.add_argument("--group-size", type=positive_int)
    p.add_argument("--bits", type=int_choice(4, 8))
    p.add_argument("--lr", type=finite_float(low=0.0, low_open=True))
    p.add_argument("--top-p", type=finite_float(0.0, 1.0, low_open=True))

Integers are written as integers ("1e12" and "3.0" are refused: a count given as a float is a mistake);
they are also capped at MAX_INT so that no flag can ask for an allocation no machine has.
"""
from __future__ import annotations

import argparse
import math

MAX_INT = 2**53  # beyond this no count, size or seed is meaningful, and floats stop being exact


def _parse_int(text: str) -> int:
    try:
        value = int(str(text).strip().replace("_", ""), 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if abs(value) > MAX_INT:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range (at most {MAX_INT})")
    return value


def int_range(low: int | None = None, high: int | None = None):
    """An integer in [low, high] (either end may be None: unbounded up to MAX_INT)."""
    def parse(text: str) -> int:
        value = _parse_int(text)
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {value}")
        return value
    parse.__name__ = "integer"  # argparse names the type in its message: "invalid integer value: ..."
    return parse


def non_negative_int(text: str) -> int:
    """An integer >= 0 (seeds, counts that may be zero)."""
    return int_range(0)(text)


def positive_int(text: str) -> int:
    """An integer >= 1 (sizes, token counts, steps)."""
    return int_range(1)(text)


def int_choice(*choices: int):
    """One of the given integers (e.g. quantisation bits)."""
    allowed = tuple(choices)

    def parse(text: str) -> int:
        value = _parse_int(text)
        if value not in allowed:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(map(str, allowed))}, got {value}")
        return value
    parse.__name__ = "integer"
    return parse


def finite_float(low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False):
    """A finite float in the range [low, high]; low_open / high_open exclude that end."""
    def parse(text: str) -> float:
        try:
            value = float(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if low is not None and (value < low or (low_open and value == low)):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low}, got {value}")
        if high is not None and (value > high or (high_open and value == high)):
            raise argparse.ArgumentTypeError(f"must be {'<' if high_open else '<='} {high}, got {value}")
        return value
    parse.__name__ = "number"
    return parse


def non_negative_float(text: str) -> float:
    """A finite float >= 0."""
    return finite_float(0.0)(text)


def positive_float(text: str) -> float:
    """A finite float > 0."""
    return finite_float(0.0, low_open=True)(text)
