"""Composition and editing algebra of task deltas (docs/method.md §1, §7), pure and Lightning-free.

A :class:`Composition` gives the coefficients of ``θ = θ0 + Σ_s w_s τ_s``. Edits are per-task factors
``m_s`` applied to those coefficients (the paper's ``θ0 + Σ_s (m_s / T) τ_s`` starting from the uniform
``w_s = 1/T``), optionally restricted to the layers whose names match a glob pattern:

- unlearning task ``k``: ``m_k = 0`` (optionally rescaling the rest so the coefficients keep their sum);
- specialisation to a subset ``S``: ``m_s = T/|S|`` on ``S``, 0 elsewhere (uniform over ``S``);
- reweighting: any ``m_s``, globally or per layer.

Classifier heads are not edited here; masking removed classes at prediction time is a separate option.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Iterable, Mapping, Sequence

from lightning_taylor._checks import check_finite_numbers
from lightning_taylor.errors import expected


@dataclass(frozen=True)
class Composition:
    """Coefficients ``w_s`` of the task deltas, with optional per-layer factors.

    The coefficient of task ``s`` in layer ``name`` is ``weights[s] × Π m_s`` over the entries
    ``(pattern, m)`` of ``layer_factors`` whose glob ``pattern`` matches ``name`` (missing ``m_s`` = 1).
    """

    weights: Mapping[int, float]
    layer_factors: tuple[tuple[str, Mapping[int, float]], ...] = field(default=())

    def __post_init__(self) -> None:
        # A NaN or infinite coefficient would make every composed or merged weight non-finite.
        check_finite_numbers("weights", self.weights)
        for pattern, factors in self.layer_factors:
            check_finite_numbers(f"layer_factors[{pattern!r}]", factors)

    @property
    def tasks(self) -> list[int]:
        return sorted(self.weights)

    def for_layer(self, name: str) -> dict[int, float]:
        """The effective coefficient of every task in the layer called ``name``."""
        weights = {int(t): float(w) for t, w in self.weights.items()}
        for pattern, factors in self.layer_factors:
            if fnmatchcase(name, pattern):
                for task, factor in factors.items():
                    if task in weights:
                        weights[task] *= float(factor)
        return weights


def check_layer_patterns(composition: Composition, layers: Sequence[str]) -> None:
    """Refuse a per-layer factor whose glob pattern matches none of ``layers`` (it would do nothing)."""
    for pattern, _ in composition.layer_factors:
        if not any(fnmatchcase(name, pattern) for name in layers):
            raise expected("layer_factors", "glob patterns that match layers with deltas", pattern,
                           f"Some of those layers: {list(layers[:8])}.")


def uniform(tasks: Iterable[int]) -> Composition:
    """Task arithmetic's default: ``w_s = 1/T`` for each of the ``T`` tasks."""
    tasks = sorted(set(int(t) for t in tasks))
    if not tasks:
        raise expected("tasks", "a non-empty collection of task indices", tasks)
    return Composition({t: 1.0 / len(tasks) for t in tasks})


def _check_tasks(name: str, tasks: Iterable[int], composition: Composition) -> list[int]:
    tasks = sorted(set(int(t) for t in tasks))
    unknown = [t for t in tasks if t not in composition.weights]
    if unknown:
        raise expected(name, f"tasks of the composition {composition.tasks}", tasks, f"Unknown: {unknown}.")
    return tasks


def reweight(composition: Composition, factors: Mapping[int, float], layers: str | None = None) -> Composition:
    """Multiply the coefficient of each task ``s`` by ``factors[s]``; only in layers matching ``layers``.

    Every factor must be finite.
    """
    _check_tasks("factors", factors, composition)
    check_finite_numbers("factors", factors)
    factors = {int(t): float(m) for t, m in factors.items()}
    if layers is not None:
        return Composition(dict(composition.weights), composition.layer_factors + ((layers, factors),))
    weights = {t: w * factors.get(t, 1.0) for t, w in composition.weights.items()}
    return Composition(weights, composition.layer_factors)


def unlearn(
    composition: Composition, tasks: Iterable[int], renormalise: bool = False, layers: str | None = None
) -> Composition:
    """Drop the deltas of ``tasks`` (``m_k = 0``).

    With ``renormalise``, the kept tasks are scaled by ``Σ_all w / Σ_kept w`` so the coefficients keep their
    sum (uniform ``1/T`` becomes uniform ``1/(T − |K|)``).
    """
    tasks = _check_tasks("tasks", tasks, composition)
    factors = {t: 0.0 for t in tasks}
    if renormalise:
        kept = sum(w for t, w in composition.weights.items() if t not in factors)
        if kept == 0:
            raise expected("tasks", "a proper subset of the composition's tasks when renormalising", tasks)
        scale = sum(composition.weights.values()) / kept
        factors.update({t: scale for t in composition.weights if t not in factors})
    return reweight(composition, factors, layers)


def specialise(composition: Composition, keep: Iterable[int], layers: str | None = None) -> Composition:
    """Keep only the tasks in ``keep``: ``m_s = T/|S|`` on ``S`` and 0 elsewhere (uniform ``1/|S|`` from uniform)."""
    keep = _check_tasks("keep", keep, composition)
    if not keep:
        raise expected("keep", "a non-empty subset of the composition's tasks", keep)
    factor = len(composition.weights) / len(keep)
    return reweight(composition, {t: (factor if t in keep else 0.0) for t in composition.weights}, layers)
