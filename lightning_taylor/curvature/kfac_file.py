"""``kfac.safetensors``, the KFAC curvature a fit with ``curvature: kfac`` leaves: what it holds and how to read it.

Tensors, per target layer (no prior; ``ε`` is in the metadata):

- ``kfac_tasks: merged``: ``<layer>.A`` (``Ā``, in × in) and ``<layer>.G`` (``Ḡ``, out × out), the per-example
  means of the pooled tasks; the curvature is ``Ā ⊗ Ḡ``;
- ``kfac_tasks: per_task``: ``<layer>.A.task<t>`` and ``<layer>.G.task<t>`` for every task ``t``; the curvature
  is ``Σ_t (n_t / N) Ā_t ⊗ Ḡ_t`` with the counts ``n_t`` of the metadata.

Metadata (strings): ``approximation`` (``expand`` / ``reduce``), ``tasks_combined``, ``tasks`` and ``counts``
(comma-separated, task order), ``examples`` (``N``), ``estimators``, ``prior``, and ``tokens``: the token count
``T`` of every layer (the ``expand`` divisor, :mod:`lightning_taylor.curvature.kfac`) as a JSON object
``{"<layer>": T}``. Files written before per-layer counts hold one number there, read as every layer's ``T``.

:func:`load_kfac` reads a file back, checking what it can; a file it cannot interpret is an ``InputError``
naming the file and the entry. :meth:`KFACFile.sums` turns the means back into
:class:`~lightning_taylor.curvature.kfac.KroneckerSums` (``A = Ā·n·s``, ``G = Ḡ·n``; ``s`` needs each layer's
``T``), the state a :class:`~lightning_taylor.curvature.accumulators.KroneckerAccumulator` keeps.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Mapping

from torch import Tensor

from lightning_taylor._safetensors import read_tensors
from lightning_taylor.curvature.kfac import KroneckerSums
from lightning_taylor.errors import expected
from lightning_taylor.finite import check_finite

#: ``{layer: [(Ā_t, Ḡ_t), …]}`` per layer, one pair (merged) or one per task (per_task), in task order.
FilePairs = dict[str, list[tuple[Tensor, Tensor]]]


@dataclass
class KFACFile:
    """The contents of a ``kfac.safetensors`` (module docstring), checked.

    Attributes:
        pairs: ``{layer: [(Ā, Ḡ)]}``: one pair (``merged``) or one per task of ``tasks`` (``per_task``).
        tasks: the tasks the factors cover, in order.
        counts: examples of each task (``n_t``).
        tokens: ``{layer: T}``, the token count per layer.
        approx: ``expand`` or ``reduce``.
        tasks_combined: ``merged`` or ``per_task``.
        metadata: the file's metadata as written.
    """

    pairs: FilePairs
    tasks: list[int]
    counts: list[int]
    tokens: dict[str, int]
    approx: str
    tasks_combined: str
    metadata: dict[str, str]

    def sums(self) -> list[KroneckerSums]:
        """The Kronecker sums behind the means: one (``merged``, over all examples) or one per task."""
        groups = [sum(self.counts)] if self.tasks_combined == "merged" else self.counts
        estimators = self.metadata.get("estimators", "").split(",")
        out = []
        for k, count in enumerate(groups):
            scale = {name: self.tokens[name] if self.approx == "expand" else 1 for name in self.pairs}
            out.append(KroneckerSums({n: p[k][0] * (count * scale[n]) for n, p in self.pairs.items()},
                                     {n: p[k][1] * count for n, p in self.pairs.items()}, count, dict(self.tokens),
                                     estimators[min(k, len(estimators) - 1)] or "exact", self.approx))
        return out


def load_kfac(path: str | os.PathLike) -> KFACFile:
    """Read ``path`` (a ``kfac.safetensors``); an ``InputError`` names the file and what cannot be interpreted."""
    path = os.fspath(path)
    tensors, metadata = read_tensors(path, "KFAC factors")

    def bad(key: str, what: str, got: object) -> Exception:
        return expected(f"{key}` of `{path}", what, got, "The file cannot be read as KFAC factors.")

    approx = metadata.get("approximation")
    if approx not in ("expand", "reduce"):
        raise bad("approximation", "'expand' or 'reduce' in the metadata", approx)
    combined = metadata.get("tasks_combined")
    if combined not in ("merged", "per_task"):
        raise bad("tasks_combined", "'merged' or 'per_task' in the metadata", combined)
    tasks, counts = _integers(metadata.get("tasks"), "tasks", bad), _integers(metadata.get("counts"), "counts", bad)
    if len(tasks) != len(counts) or not tasks or min(counts) < 1:
        raise bad("counts", f"one positive example count per task of {tasks}", metadata.get("counts"))
    suffixes = [""] if combined == "merged" else [f".task{t}" for t in tasks]
    first = f".A{suffixes[0]}"
    layers = sorted(key[: -len(first)] for key in tensors if key.endswith(first))
    pairs: FilePairs = {}
    for name in layers:
        for suffix in suffixes:
            a, g = tensors.get(f"{name}.A{suffix}"), tensors.get(f"{name}.G{suffix}")
            if a is None or g is None or a.ndim != 2 or g.ndim != 2 or a.shape[0] != a.shape[1] \
                    or g.shape[0] != g.shape[1]:
                raise bad(f"{name}.A{suffix}", "a square Ā with its square Ḡ", "missing or not square")
            pairs.setdefault(name, []).append((a, g))
    extra = sorted(set(tensors) - {f"{n}.{f}{s}" for n in layers for f in "AG" for s in suffixes})
    if extra or not layers:
        raise bad("tensors", f"<layer>.A / <layer>.G pairs of {combined} tasks", extra[:3] or "no tensors")
    check_finite(tensors, f"the KFAC factors in {path}")
    return KFACFile(pairs, tasks, counts, _tokens(metadata.get("tokens"), layers, bad), approx, combined, metadata)


def _integers(text: str | None, key: str, bad) -> list[int]:  # noqa: ANN001
    try:
        return [int(part) for part in (text or "").split(",")]
    except ValueError:
        raise bad(key, "comma-separated integers in the metadata", text) from None


def _tokens(text: str | None, layers: list[str], bad) -> dict[str, int]:  # noqa: ANN001
    """``{layer: T}`` from a JSON object, or from one number (files written before per-layer counts)."""
    try:
        value = json.loads(text) if text is not None else None
    except json.JSONDecodeError:
        value = None
    if isinstance(value, int) and not isinstance(value, bool):
        value = {name: value for name in layers}
    if not isinstance(value, Mapping) or set(value) != set(layers) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 1 for t in value.values()):
        raise bad("tokens", f"a positive token count, or a JSON object of one per layer of {layers}", text)
    return dict(value)
