"""The project's two kinds of error, and the one template their messages follow.

- :class:`InputError`: a bad argument, file or setting. Messages read "Expected `name` to be <what>, but got
  <value>." plus a hint (:func:`expected`). The ``lightning-taylor`` command prints one line and exits 2.
- :class:`NonFiniteError`: a loss, gradient, delta, curvature or loaded tensor holds NaN or ±inf
  (:mod:`lightning_taylor.finite` finds and names it). The command prints one line and exits 1.

Both keep their standard bases (``ValueError``, ``FloatingPointError``), so code that catches those still works.
"""

from __future__ import annotations

from typing import Any


class InputError(ValueError):
    """A bad argument, file or setting: the message says which, its value and what was expected."""


class NonFiniteError(FloatingPointError):
    """A loss, gradient, delta, curvature or loaded tensor holds NaN or ±inf; the message names it and where."""


def expected(name: str, what: str, got: Any, hint: str = "") -> InputError:
    """The project's standard error for a bad argument: "Expected `name` to be what, but got got." + hint."""
    message = f"Expected `{name}` to be {what}, but got {got!r}."
    return InputError(f"{message} {hint}".rstrip())
