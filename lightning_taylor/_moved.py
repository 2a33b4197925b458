"""Module paths of release 0.1 that moved in 0.2: they still import, for one release, with a DeprecationWarning.

``import lightning_taylor.fisher`` (say) gives a module whose names are looked up in the new homes listed in
:data:`MOVED`, in order; the warning names the new path. Paths that kept their names (``lightning_taylor.
callbacks``, ``.data``, ``.deltas``, ``.loggers``, ``.metrics``, ``.penalties``, ``.cli``) need nothing here,
so every config and recorded ``config.yaml`` works unchanged.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings
from typing import Any

#: old module -> the modules that now hold its names (the first is the one the warning names)
MOVED: dict[str, tuple[str, ...]] = {
    "lightning_taylor.alignment": ("lightning_taylor.head.mixtures", "lightning_taylor.head.probing",
                                   "lightning_taylor.head.fisher"),
    "lightning_taylor.backbone": ("lightning_taylor.model.backbone",),
    "lightning_taylor.module": ("lightning_taylor.model.module",),
    "lightning_taylor.drift_compensation": ("lightning_taylor.head.drift",),
    "lightning_taylor.callbacks.pretuning": ("lightning_taylor.head.pretuning",),
    "lightning_taylor.fisher": ("lightning_taylor.curvature.diagonal", "lightning_taylor.curvature.accumulators"),
    "lightning_taylor.kfac": ("lightning_taylor.curvature.kfac", "lightning_taylor.curvature.memory"),
    "lightning_taylor.kfac_accumulator": ("lightning_taylor.curvature.accumulators",
                                          "lightning_taylor.curvature.memory"),
    "lightning_taylor.kfac_penalties": ("lightning_taylor.penalties.kfac",),
    "lightning_taylor.editing": ("lightning_taylor.deltas.composition",),
    "lightning_taylor.evaluation": ("lightning_taylor.runs.evaluate",),
    "lightning_taylor.run": ("lightning_taylor.runs.load",),
    "lightning_taylor.edit": ("lightning_taylor.runs.edit", "lightning_taylor.runs.evaluate",
                              "lightning_taylor.runs.load", "lightning_taylor.cli.edit"),
    "lightning_taylor.edit_cli": ("lightning_taylor.cli.edit",),
    "lightning_taylor.threads": ("lightning_taylor.cli.threads",),
}


class _MovedModule(types.ModuleType):
    """A stand-in for a moved module: attribute look-ups go to its new homes."""

    def __init__(self, name: str, homes: tuple[str, ...]) -> None:
        super().__init__(name, f"Moved to {homes[0]} (this path is kept for one release).")
        self._homes = homes

    def __getattr__(self, attribute: str) -> Any:
        for home in self._homes:
            module = importlib.import_module(home)
            if hasattr(module, attribute):
                return getattr(module, attribute)
        raise AttributeError(f"module {self.__name__!r} (moved to {self._homes[0]}) has no attribute {attribute!r}")

    def __dir__(self) -> list[str]:
        return sorted({name for home in self._homes for name in dir(importlib.import_module(home))})


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        homes = MOVED[spec.name]
        warnings.warn(f"`{spec.name}` moved to `{homes[0]}` in lightning-taylor 0.2; the old path will be removed "
                      "in 0.3.", DeprecationWarning, stacklevel=2)
        return _MovedModule(spec.name, homes)

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def install() -> None:
    """Make the old paths importable (idempotent)."""
    if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
