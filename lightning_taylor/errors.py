"""The project's two kinds of error, and the one template their messages follow.

- :class:`InputError`: a bad argument, file or setting. Messages read "Expected `name` to be <what>, but got
  <value>." plus a hint (:func:`expected`). The ``lightning-taylor`` command prints one line and exits 2.
- :class:`NonFiniteError`: a loss, gradient, delta, curvature or loaded tensor holds NaN or ±inf
  (:mod:`lightning_taylor.finite` finds and names it). The command prints one line and exits 1.
- :class:`WriteError`: a file could not be written (disk full, file too large, permission, read-only, a file
  where a folder should be); the message names the path, what was being written and what is intact
  (:mod:`lightning_taylor._atomic`). The command prints it briefly and exits 1.

They keep their standard bases (``ValueError``, ``FloatingPointError``, ``OSError``), so code that catches those still works.
"""

from __future__ import annotations

from typing import Any


class InputError(ValueError):
    """A bad argument, file or setting: the message says which, its value and what was expected."""


class NonFiniteError(FloatingPointError):
    """A loss, gradient, delta, curvature or loaded tensor holds NaN or ±inf; the message names it and where."""


class WriteError(OSError):
    """A file could not be written; ``errno`` is the operating system's, the message says what is intact."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno

    def __str__(self) -> str:
        return str(self.args[0])


def expected(name: str, what: str, got: Any, hint: str = "") -> InputError:
    """The project's standard error for a bad argument: "Expected `name` to be what, but got got." + hint."""
    message = f"Expected `{name}` to be {what}, but got {got!r}."
    return InputError(f"{message} {hint}".rstrip())
