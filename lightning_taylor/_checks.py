"""Argument checks; each failure is :func:`lightning_taylor.errors.expected`'s one-line error naming the argument."""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, Mapping

from lightning_taylor.errors import expected


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise expected(name, f"one of {choices}", value)


def check_non_negative(name: str, value: float) -> None:
    """A finite float >= 0 (``inf`` passes ``>= 0`` but makes every update non-finite, so it is refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 and math.isfinite(value)):
        raise expected(name, "a finite float >= 0", value)


def check_finite_numbers(name: str, values: Mapping[Any, Any]) -> None:
    """A mapping ``key -> finite number`` (composition coefficients, edit factors); names the offending key."""
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise expected(name, "finite numbers (no NaN or inf)", dict(values), f"Task {key} has {value!r}.")


def check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise expected(name, "an int >= 1", value)


def check_non_negative_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise expected(name, "an int >= 0", value)
