"""Editing a finished run: unlearn, specialise or reweight its task deltas, evaluate, export.

On top of a :class:`~lightning_taylor.runs.load.Run` (:func:`~lightning_taylor.runs.load.load_run`):

- an :class:`Edit` (drop tasks, keep tasks, per-task and per-layer factors, all finite) turns the run's
  tasks into a :class:`~lightning_taylor.deltas.composition.Composition` ``θ0 + Σ_s (m_s / T) τ_s``, starting from the
  uniform one;
- :func:`apply_edit` evaluates the run before (uniform composition) and after the edit on every seen task's
  test set (:func:`~lightning_taylor.runs.evaluate.evaluate`), optionally with the removed tasks' classes
  masked (logit −∞); :class:`EditResult` formats and saves both;
- :func:`export` writes the merged composition as a plain timm ``state_dict`` (safetensors) whose metadata
  names the timm model, its constructor arguments and the head layout; it loads with torch, timm and
  safetensors alone (:func:`lightning_taylor.deltas.load_merged` shows the three lines it takes).

The head is never edited by a composition. Masking the removed tasks' classes is a separate, explicit
option: at evaluation their logits are set to −∞; in an exported model their head rows become weight 0 and
bias −∞, which gives the same logits.

The command line front end is ``lightning-taylor edit`` (:mod:`lightning_taylor.cli.edit`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from lightning_taylor._atomic import write_text
from lightning_taylor.data.split import classes_of, uniform_size
from lightning_taylor.deltas import export_merged
from lightning_taylor.deltas.composition import (
    Composition,
    check_layer_patterns,
    reweight,
    specialise,
    uniform,
    unlearn,
)
from lightning_taylor.errors import expected
from lightning_taylor.runs.evaluate import evaluate
from lightning_taylor.runs.load import Run


# ----------------------------------------------------------------------------------------------- edits
@dataclass(frozen=True)
class Edit:
    """An edit of the uniform composition ``(1/T) Σ_s τ_s`` of a run's ``T`` tasks, applied in this order:

    1. ``keep``: specialise to these tasks (``m_s = T/|S|`` on ``S``, 0 elsewhere);
    2. ``drop``: unlearn these tasks (``m_k = 0``; with ``renormalise`` the rest keep the coefficients' sum);
    3. ``factors``: multiply task ``s``'s coefficient by ``factors[s]`` in every layer;
    4. ``layer_factors``: ``(pattern, {s: m_s})`` pairs, the factors applied only in the layers whose name
       matches the glob ``pattern`` (e.g. ``blocks.0.*``).

    ``mask_removed`` masks (logit −∞) the classes of every task whose coefficient ends up 0 in every layer.
    """

    drop: tuple[int, ...] = ()
    keep: tuple[int, ...] = ()
    factors: Mapping[int, float] = field(default_factory=dict)
    layer_factors: tuple[tuple[str, Mapping[int, float]], ...] = ()
    renormalise: bool = False
    mask_removed: bool = False

    def composition(self, tasks: Sequence[int]) -> Composition:
        comp = uniform(tasks)
        if self.keep:
            comp = specialise(comp, self.keep)
        if self.drop:
            comp = unlearn(comp, self.drop, renormalise=self.renormalise)
        if self.factors:
            comp = reweight(comp, self.factors)
        for pattern, factors in self.layer_factors:
            comp = reweight(comp, factors, layers=pattern)
        return comp

    @property
    def name(self) -> str:
        """A file-system friendly description, e.g. ``drop1_mask``."""
        parts = []
        if self.keep:
            parts.append("keep" + "-".join(map(str, sorted(self.keep))))
        if self.drop:
            parts.append("drop" + "-".join(map(str, sorted(self.drop))) + ("_renorm" if self.renormalise else ""))
        if self.factors:
            parts.append("factor" + "-".join(f"{t}x{m:g}" for t, m in sorted(self.factors.items())))
        if self.layer_factors:  # patterns do not fit a file name: a digest tells different ones apart
            digest = hashlib.sha1(json.dumps(self.to_dict()["layer_factors"]).encode()).hexdigest()[:8]
            parts.append(f"layers{len(self.layer_factors)}-{digest}")
        if self.mask_removed:
            parts.append("mask")
        return "_".join(parts) or "uniform"

    def to_dict(self) -> dict[str, Any]:
        return {"drop": list(self.drop), "keep": list(self.keep),
                "factors": {str(t): m for t, m in self.factors.items()},
                "layer_factors": [[p, {str(t): m for t, m in f.items()}] for p, f in self.layer_factors],
                "renormalise": self.renormalise, "mask_removed": self.mask_removed}


def removed_tasks(composition: Composition, layers: Sequence[str]) -> list[int]:
    """Tasks whose coefficient is 0 in every one of ``layers``."""
    per_layer = [composition.for_layer(name) for name in layers]
    return [t for t in composition.tasks if all(weights[t] == 0 for weights in per_layer)]


@dataclass
class EditResult:
    """Per-task accuracy before (uniform composition) and after an edit."""

    edit: Edit
    composition: Composition
    removed: list[int]
    masked_classes: list[int]
    before: dict[str, list[float]]
    after: dict[str, list[float]]

    def rows(self) -> list[dict[str, Any]]:
        """One row per task (and an ``average`` row): coefficient, class-IL and task-IL before / after."""
        rows = []
        for task, (b, a) in enumerate(zip(self.before["class_il"], self.after["class_il"])):
            rows.append({"task": task, "coefficient": self.composition.weights.get(task, 0.0),
                         "removed": task in self.removed, "class_il_before": b, "class_il_after": a,
                         "task_il_before": self.before["task_il"][task], "task_il_after": self.after["task_il"][task]})
        mean = {key: _nanmean([r[key] for r in rows]) for key in
                ("class_il_before", "class_il_after", "task_il_before", "task_il_after")}
        rows.append({"task": "average", "coefficient": sum(self.composition.weights.values()), "removed": "", **mean})
        return rows

    def format_table(self) -> str:
        """The rows as a text table, accuracies in percent."""
        header = f"{'task':>7} {'coef':>7} | {'class-IL before':>15} {'after':>7} {'change':>7} | " \
                 f"{'task-IL before':>14} {'after':>7}"
        lines = [f"Edit {self.edit.name}: composition {_weights(self.composition)}"
                 + (f", layer factors {self.edit.layer_factors}" if self.composition.layer_factors else "")
                 + (f", masked classes {self.masked_classes}" if self.masked_classes else ""), header, "-" * len(header)]
        for r in self.rows():
            name = f"{r['task']}{'*' if r['removed'] is True else ''}"
            lines.append(f"{name:>7} {r['coefficient']:>7.3f} | {_pct(r['class_il_before']):>15} "
                         f"{_pct(r['class_il_after']):>7} {_pct(r['class_il_after'] - r['class_il_before'], True):>7} | "
                         f"{_pct(r['task_il_before']):>14} {_pct(r['task_il_after']):>7}")
        if self.removed:
            lines.append("* removed (coefficient 0 in every layer)")
        return "\n".join(lines)

    def save(self, directory: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
        """Write ``edit_accuracy.csv`` (the rows, fractions) and ``edit.json`` (edit, composition, accuracies)."""
        directory = Path(directory)
        rows = self.rows()
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([{k: repr(v) if isinstance(v, float) else v for k, v in r.items()} for r in rows])
        write_text(directory / "edit_accuracy.csv", text.getvalue(), "the edit's accuracies")  # whole or absent
        summary = {"edit": self.edit.to_dict(),
                   "composition": {str(t): float(w) for t, w in sorted(self.composition.weights.items())},
                   "layer_factors": [[p, {str(t): m for t, m in f.items()}] for p, f in self.composition.layer_factors],
                   "removed_tasks": self.removed, "masked_classes": self.masked_classes,
                   "before": self.before, "after": self.after, **dict(extra or {})}
        write_text(directory / "edit.json", json.dumps(summary, indent=2, allow_nan=True), "the edit's summary")
        return directory / "edit_accuracy.csv"


def apply_edit(run: Run, edit: Edit) -> EditResult:
    """Evaluate ``run`` before (uniform composition) and after ``edit``; leaves the edit composed.

    A per-layer factor whose pattern matches none of the run's delta layers is refused before evaluating.
    """
    composition = edit.composition(run.tasks)
    check_layer_patterns(composition, run.deltas.names)
    removed = removed_tasks(composition, run.deltas.names)
    masked = classes_of(removed, run.task_ranges) if edit.mask_removed else []
    before = evaluate(run.model, run.datamodule, uniform(run.tasks))
    after = evaluate(run.model, run.datamodule, composition, masked)
    return EditResult(edit, composition, removed, masked, before, after)


# -------------------------------------------------------------------------------------------- export
@contextmanager
def _masked_head(head: torch.nn.Linear, classes: Sequence[int]) -> Iterator[None]:
    """Temporarily give ``classes`` weight 0 and bias −∞ in ``head`` (their logits are −∞)."""
    if not classes:
        yield
        return
    if head.bias is None:
        raise expected("head", "a linear head with a bias (to mask classes in an export)", "bias=None")
    saved = head.weight.detach().clone(), head.bias.detach().clone()
    try:
        with torch.no_grad():
            head.weight[list(classes)] = 0.0
            head.bias[list(classes)] = -math.inf
        yield
    finally:
        with torch.no_grad():
            head.weight.copy_(saved[0])
            head.bias.copy_(saved[1])


def export(run: Run, path: str | os.PathLike, composition: Composition | Mapping[int, float] | None = None,
           mask_classes: Sequence[int] | None = None, metadata: Mapping[str, str] | None = None) -> Path:
    """Write the merged ``composition`` (default: uniform) of ``run`` as a plain timm model (safetensors).

    Nothing is written unless every merged tensor is finite (the masked head rows' bias −∞ excepted). The
    metadata holds ``model_name`` and ``model_kwargs`` (``num_classes`` included) for
    ``timm.create_model``, the composition, and the head layout: ``num_tasks``, ``classes_per_task`` (``null``
    when the tasks differ in size), ``task_sizes``, ``head_layout`` (the head rows ``[start, stop)`` of each
    task), ``class_names`` (head row order),
    ``masked_classes`` (rows with weight 0 and bias −∞), and the
    preprocessing (``image_size``, ``mean``, ``std``).
    """
    composition = composition if composition is not None else uniform(run.tasks)
    if not isinstance(composition, Composition):
        composition = Composition(dict(composition))
    check_layer_patterns(composition, run.deltas.names)
    data, masked = run.datamodule, sorted(mask_classes or [])
    meta = {
        "num_tasks": str(data.num_tasks),
        "classes_per_task": str(uniform_size(data.task_sizes) or "null"),
        "task_sizes": json.dumps(list(data.task_sizes)),
        "num_classes": str(data.num_classes),
        "head_layout": json.dumps({"task_rows": [[r.start, r.stop] for r in data.task_ranges]}),
        "class_names": json.dumps(list(data.class_names)),
        "masked_classes": json.dumps(masked),
        "image_size": str(data.image_size),
        "mean": json.dumps(list(data.mean)),
        "std": json.dumps(list(data.std)),
        "source": os.fspath(run.checkpoint),
        **({"deltas_file": os.fspath(run.deltas_file)} if run.deltas_file is not None else {}),
        **{k: str(v) for k, v in run.info.items()},
        **dict(metadata or {}),
    }
    path = Path(path)
    head = run.model.head
    bias = [f"{name}.bias" for name, module in run.model.backbone.named_modules() if module is head]
    # export_merged writes whole or not at all and reports a failed write as a WriteError (path, reason).
    with _masked_head(head, masked):
        export_merged(run.model.backbone, run.deltas, path, composition, run.model_name, run.model_kwargs, meta,
                      neg_inf_ok=bias if masked else ())
    return path


# ------------------------------------------------------------------------------------------- helpers
def _weights(composition: Composition) -> dict[str, float]:
    return {str(t): round(float(w), 6) for t, w in sorted(composition.weights.items())}


def _nanmean(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def _pct(value: float, signed: bool = False) -> str:
    if math.isnan(value):
        return "-"
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"

