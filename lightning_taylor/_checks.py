"""Argument checks with one error template: "Expected `name` to be <what>, but got <value>." plus a hint."""

from __future__ import annotations

import math
from typing import Any, Iterable


class InputError(ValueError):
    """A bad argument, file or setting: the message says which, its value and what was expected.

    The ``lightning-taylor`` command prints these as one line (no traceback) and exits with status 2.
    """


def expected(name: str, what: str, got: Any, hint: str = "") -> InputError:
    """Build the project's standard error for a bad argument."""
    message = f"Expected `{name}` to be {what}, but got {got!r}."
    return InputError(f"{message} {hint}".rstrip())


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise expected(name, f"one of {choices}", value)


def check_non_negative(name: str, value: float) -> None:
    """A finite float >= 0 (``inf`` passes ``>= 0`` but makes every update non-finite, so it is refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 and math.isfinite(value)):
        raise expected(name, "a finite float >= 0", value)


def check_finite(name: str, value: float) -> None:
    """A finite float (edit factors, coefficients)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise expected(name, "a finite float", value)


def check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise expected(name, "an int >= 1", value)


def check_non_negative_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise expected(name, "an int >= 0", value)
