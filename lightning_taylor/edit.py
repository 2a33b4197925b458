"""Editing a finished run: unlearn, specialise or reweight its task deltas, evaluate, export (docs/method.md §7).

A run is its Lightning checkpoint (``checkpoints/last.ckpt``): the backbone θ0, the trained head and the
banked task deltas, plus the hyper-parameters of the module and the data module. On top of it:

- :func:`load_run` rebuilds :class:`~lightning_taylor.module.IncrementalViT` with its
  :class:`~lightning_taylor.deltas.TaskDeltas` (style and rank read from the saved tensors' shapes) and the
  :class:`~lightning_taylor.data.TaskStreamDataModule`, loading with ``weights_only=True``; optionally the
  deltas are taken from a ``deltas.safetensors`` file instead;
- an :class:`Edit` (drop tasks, keep tasks, per-task and per-layer factors) turns the run's tasks into a
  :class:`~lightning_taylor.editing.Composition` ``θ0 + Σ_s (m_s / T) τ_s``, starting from the uniform one;
- :func:`evaluate` gives the per-task class-IL / task-IL accuracy of a composition on every seen task's test
  set, optionally with some classes masked (logit −∞, never predicted); :func:`apply_edit` does it before
  (uniform composition) and after the edit, and :class:`EditResult` prints and saves both;
- :func:`export` writes the merged composition as a plain timm ``state_dict`` (safetensors) whose metadata
  names the timm model, its constructor arguments and the head layout; it loads with torch, timm and
  safetensors alone (see :func:`lightning_taylor.deltas.load_merged` for the three lines it takes).

The head is never edited by a composition. Masking the removed tasks' classes is a separate, explicit
option: at evaluation their logits are set to −∞; in an exported model their head rows become weight 0 and
bias −∞, which gives the same logits.

The command line front end is ``lightning-taylor edit`` (:func:`main`)::

    lightning-taylor edit runs/digits/ita/version_0 --drop 1 --mask-removed --export ita_without_1.safetensors
    lightning-taylor edit RUN --keep 0 2                    # specialise to tasks 0 and 2 (uniform over them)
    lightning-taylor edit RUN --factor 0=0.5 3=2            # per-task factors m_s
    lightning-taylor edit RUN --layer-factor 'blocks.0.*:1=0'   # m_1 = 0 in the layers matching blocks.0.*

``RUN`` is a run directory (its ``checkpoints/last.ckpt`` is used) or a ``.ckpt`` file. The per-task
accuracies before and after are printed and written to ``edit_accuracy.csv`` and ``edit.json`` in
``--output-dir`` (default ``<run dir>/edits/<edit>``).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_taylor._checks import expected
from lightning_taylor.backbone import resolve_model
from lightning_taylor.data import TaskStreamDataModule
from lightning_taylor.deltas import TaskDeltas, export_merged, load_deltas
from lightning_taylor.deltas.io import read_metadata
from lightning_taylor.editing import Composition, reweight, specialise, uniform, unlearn
from lightning_taylor.metrics import ContinualAccuracy
from lightning_taylor.module import IncrementalViT

log = logging.getLogger(__name__)

_SLOTS = {"lora_A": "lora", "delta": "full", "scale": "ia3"}
_PREFIX = "task_deltas."


# --------------------------------------------------------------------------------------------- loading
@dataclass
class Run:
    """A finished (or interrupted) run, rebuilt from its checkpoint.

    Attributes:
        model: the module in eval mode, with ``model.task_deltas`` attached and loaded.
        datamodule: the run's task stream (set up lazily when data is first needed).
        deltas: ``model.task_deltas``.
        checkpoint: the checkpoint file read.
        run_dir: the run's log directory (the checkpoint's ``checkpoints/`` parent).
        model_name: timm model name of the backbone.
        model_kwargs: ``timm.create_model`` arguments of the backbone, ``num_classes`` included.
        info: what is known about training: ``algorithm`` (``ita`` / ``iel``), ``strength``, ... (strings).
    """

    model: IncrementalViT
    datamodule: TaskStreamDataModule
    deltas: TaskDeltas
    checkpoint: Path
    run_dir: Path
    model_name: str
    model_kwargs: dict[str, Any]
    info: dict[str, str] = field(default_factory=dict)

    @property
    def tasks(self) -> list[int]:
        """Tasks that have a delta (banked, or the live slot's task)."""
        return self.deltas.tasks

    @property
    def classes_per_task(self) -> int:
        return int(self.model.hparams.classes_per_task)

    @property
    def label(self) -> str:
        """A short name for tables, e.g. ``ita (strength 1.0)``."""
        algorithm = self.info.get("algorithm", "run")
        strength = self.info.get("strength")
        return algorithm if strength is None else f"{algorithm} (strength {strength})"


def find_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` itself if it is a file, else ``<path>/checkpoints/last.ckpt`` or the newest ``.ckpt`` there."""
    path = Path(path)
    if path.is_file():
        return path
    folder = path / "checkpoints"
    if (folder / "last.ckpt").is_file():
        return folder / "last.ckpt"
    found = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    if not found:
        raise expected("run", "a checkpoint file or a run directory with checkpoints/*.ckpt", os.fspath(path))
    return found[-1]


def _delta_config(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """Style, rank, target layers and qkv rank factor of ``TaskDeltas``, from its slot tensors in ``state``."""
    layers: dict[str, tuple[str, Tensor]] = {}
    for key, value in state.items():
        if key.startswith(_PREFIX):
            name, _, slot = key[len(_PREFIX):].rpartition(".")
            if slot in _SLOTS:
                layers[name] = (_SLOTS[slot], value)
    if not layers:
        raise expected("checkpoint", "a run with task deltas (an ITA / IEL callback)", "no `task_deltas.*` tensors")
    styles = {style for style, _ in layers.values()}
    if len(styles) != 1:
        raise expected("checkpoint", "task deltas of one style", sorted(styles))
    style = styles.pop()
    config: dict[str, Any] = {"style": style, "targets": tuple(layers), "rank": 1, "qkv_rank_factor": 1}
    if style == "lora":
        ranks = {name: int(a.shape[0]) for name, (_, a) in layers.items()}
        other = [r for n, r in ranks.items() if not n.endswith("qkv")]
        qkv = [r for n, r in ranks.items() if n.endswith("qkv")]
        rank = other[0] if other else qkv[0]
        factor = qkv[0] // rank if qkv and other else 1
        if any(r != rank for r in other) or any(r != rank * factor for r in qkv):
            raise expected("checkpoint", "LoRA deltas of one rank (qkv: a multiple of it)", sorted(set(ranks.values())))
        config.update(rank=rank, qkv_rank_factor=factor)
    return config


def _info(checkpoint: Mapping[str, Any], deltas_file: Path | None) -> dict[str, str]:
    info: dict[str, str] = {}
    for key in checkpoint.get("callbacks", {}):
        if key in ("ITA", "IEL"):
            info["algorithm"] = key.lower()
    if deltas_file is not None and deltas_file.is_file():
        meta = read_metadata(deltas_file)
        info.update({k: meta[k] for k in ("algorithm", "strength", "penalty_mode") if k in meta})
    return info


def load_run(
    path: str | os.PathLike,
    deltas: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    data_overrides: Mapping[str, Any] | None = None,
    datamodule: TaskStreamDataModule | None = None,
) -> Run:
    """Rebuild a run from its checkpoint (loaded with ``weights_only=True``).

    Args:
        path: a run directory (``checkpoints/last.ckpt`` is used) or a checkpoint file.
        deltas: a ``deltas.safetensors`` written by the ITA / IEL callback, to use instead of the deltas in
            the checkpoint (backbone and head still come from the checkpoint).
        device: where the model goes.
        data_overrides: arguments of :class:`TaskStreamDataModule` that replace the saved ones (e.g. ``root``
            of CIFAR-100 on another machine, ``eval_batch_size``).
        datamodule: the stream to evaluate on, instead of one rebuilt from the checkpoint's
            ``datamodule_hyper_parameters`` (needed when the run used another DataModule).
    """
    checkpoint_path = find_checkpoint(path)
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
    if "model_name" not in hparams:
        raise expected("checkpoint", "a checkpoint of IncrementalViT (with its hyper-parameters)", os.fspath(checkpoint_path))
    # θ0 is in the checkpoint's state: rebuild the architecture without fetching any weights.
    model_name, model_kwargs = resolve_model(hparams["model_name"], hparams.get("pretrained", False),
                                             hparams.get("model_kwargs"))
    hparams.update(model_name=model_name, pretrained=False, model_kwargs=model_kwargs)
    model = IncrementalViT(**hparams)
    state = checkpoint["state_dict"]
    config = _delta_config(state)
    model.task_deltas = TaskDeltas(model.backbone, **config)
    model.load_state_dict(state)
    model.eval().requires_grad_(False)

    run_dir = checkpoint_path.parent.parent if checkpoint_path.parent.name == "checkpoints" else checkpoint_path.parent
    deltas_file = Path(deltas) if deltas is not None else run_dir / "deltas.safetensors"
    if deltas is not None:
        _load_deltas_file(model.task_deltas, deltas_file)

    if datamodule is None:
        data_hparams = checkpoint.get("datamodule_hyper_parameters")
        if data_hparams is None:
            raise expected("checkpoint", "a run of TaskStreamDataModule (with its hyper-parameters)",
                           os.fspath(checkpoint_path), "Pass `datamodule=` to evaluate on another stream.")
        data_hparams = {k: v for k, v in data_hparams.items() if not k.startswith("_")}
        datamodule = TaskStreamDataModule(**{**data_hparams, **dict(data_overrides or {})})
    if (datamodule.num_classes, datamodule.classes_per_task) != (hparams["num_classes"], hparams["classes_per_task"]):
        raise expected("data", f"a stream of {hparams['num_classes']} classes in tasks of {hparams['classes_per_task']}",
                       f"{datamodule.num_classes} classes in tasks of {datamodule.classes_per_task}")
    info = _info(checkpoint, deltas_file)
    log.info("Loaded %s: tasks %s, %s deltas", checkpoint_path, model.task_deltas.tasks, config["style"])
    return Run(model.to(device), datamodule, model.task_deltas, checkpoint_path, run_dir, model_name,
               {**model_kwargs, "num_classes": hparams["num_classes"]}, info)


@torch.no_grad()
def _load_deltas_file(deltas: TaskDeltas, path: Path) -> None:
    tasks = load_deltas(deltas, path)
    current = deltas.current_task
    if current in tasks:  # the slot's task enters the forward through the slot: give it the file's values
        for _, delta, _ in deltas.layers():
            for name, value in delta.task_state(current).items():
                delta.slot_state()[name].copy_(value)
    missing = sorted(set(deltas.tasks) - set(tasks))
    if missing:
        log.warning("%s has no delta for tasks %s; the checkpoint's are used for them", path, missing)


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
        if self.layer_factors:
            parts.append(f"layers{len(self.layer_factors)}")
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


def task_classes(tasks: Sequence[int], classes_per_task: int) -> list[int]:
    """The (remapped) class indices owned by ``tasks``."""
    return [c for t in sorted(tasks) for c in range(t * classes_per_task, (t + 1) * classes_per_task)]


# ---------------------------------------------------------------------------------------- evaluation
def mask_logits(logits: Tensor, classes: Sequence[int]) -> Tensor:
    """A copy of ``logits`` (B × C) with the columns ``classes`` set to −∞ (never predicted)."""
    logits = logits.clone()
    if len(classes):
        logits[:, list(classes)] = -math.inf
    return logits


@torch.no_grad()
def predict(model: IncrementalViT, loader: Any, composition: Composition | Mapping[int, float] | None = None,
            mask_classes: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """Logits (float32, on the CPU) and targets of ``model`` over ``loader``, with ``composition`` set first."""
    model.eval()
    if composition is not None:
        model.task_deltas.compose(composition)
    device = next(model.parameters()).device
    logits, targets = [], []
    for x, y in loader:
        logits.append(model(x.to(device)).float().cpu())
        targets.append(y)
    out = torch.cat(logits)
    return (mask_logits(out, mask_classes) if mask_classes else out), torch.cat(targets)


def accuracies(logits: Tensor, targets: Tensor, num_tasks: int, classes_per_task: int,
               mask_classes: Sequence[int] = ()) -> dict[str, list[float]]:
    """Per-task class-IL and task-IL accuracy (fractions) over the tasks present in ``targets``.

    Class-IL: argmax over every class of the seen tasks; task-IL: within the example's own task. ``mask_classes``
    are masked first; task-IL is NaN for a task all of whose classes are masked (it has no prediction).
    """
    seen = int(targets.max()) // classes_per_task + 1
    metric = ContinualAccuracy(num_tasks, classes_per_task)
    metric.update(mask_logits(logits, mask_classes), targets, seen)
    result = {name: [float(v) for v in values.reshape(-1)[:seen]] for name, values in metric.compute().items()}
    masked = set(mask_classes)
    for task in range(seen):
        if set(range(task * classes_per_task, (task + 1) * classes_per_task)) <= masked:
            result["task_il"][task] = math.nan
    return result


def eval_loader(datamodule: TaskStreamDataModule, seen_tasks: int) -> DataLoader:
    """One loader over the test sets of tasks ``0 .. seen_tasks − 1`` (test-time transforms, not shuffled)."""
    dataset = datamodule.tasks_dataset(range(seen_tasks), "test")
    return DataLoader(dataset, batch_size=datamodule.eval_batch_size, num_workers=datamodule.num_workers)


def evaluate(model: IncrementalViT, datamodule: TaskStreamDataModule,
             composition: Composition | Mapping[int, float] | None = None,
             mask_classes: Sequence[int] | None = None) -> dict[str, list[float]]:
    """Per-task accuracy of ``composition`` (default: uniform over the model's tasks) on every seen task's test set.

    The seen tasks are ``0 .. max task with a delta``. Returns ``{"class_il": [...], "task_il": [...]}``.
    """
    deltas = model.task_deltas
    composition = composition if composition is not None else uniform(deltas.tasks)
    logits, targets = predict(model, eval_loader(datamodule, max(deltas.tasks) + 1), composition)
    return accuracies(logits, targets, datamodule.num_tasks, datamodule.classes_per_task, mask_classes or ())


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
        directory.mkdir(parents=True, exist_ok=True)
        rows = self.rows()
        with open(directory / "edit_accuracy.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows([{k: repr(v) if isinstance(v, float) else v for k, v in r.items()} for r in rows])
        summary = {"edit": self.edit.to_dict(),
                   "composition": {str(t): float(w) for t, w in sorted(self.composition.weights.items())},
                   "layer_factors": [[p, {str(t): m for t, m in f.items()}] for p, f in self.composition.layer_factors],
                   "removed_tasks": self.removed, "masked_classes": self.masked_classes,
                   "before": self.before, "after": self.after, **dict(extra or {})}
        (directory / "edit.json").write_text(json.dumps(summary, indent=2, allow_nan=True))
        return directory / "edit_accuracy.csv"


def apply_edit(run: Run, edit: Edit) -> EditResult:
    """Evaluate ``run`` before (uniform composition) and after ``edit``; leaves the edit composed."""
    composition = edit.composition(run.tasks)
    removed = removed_tasks(composition, run.deltas.names)
    masked = task_classes(removed, run.classes_per_task) if edit.mask_removed else []
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

    The metadata holds ``model_name`` and ``model_kwargs`` (``num_classes`` included) for
    ``timm.create_model``, the composition, and the head layout: ``num_tasks``, ``classes_per_task``,
    ``head_layout`` (the head rows ``[start, stop)`` of each task), ``class_names`` (head row order),
    ``masked_classes`` (rows with weight 0 and bias −∞), and the
    preprocessing (``image_size``, ``mean``, ``std``).
    """
    composition = composition if composition is not None else uniform(run.tasks)
    if not isinstance(composition, Composition):
        composition = Composition(dict(composition))
    data, masked = run.datamodule, sorted(mask_classes or [])
    meta = {
        "num_tasks": str(data.num_tasks),
        "classes_per_task": str(data.classes_per_task),
        "num_classes": str(data.num_classes),
        "head_layout": json.dumps({"task_rows": [[t * data.classes_per_task, (t + 1) * data.classes_per_task]
                                                 for t in range(data.num_tasks)]}),
        "class_names": json.dumps(list(data.class_names)),
        "masked_classes": json.dumps(masked),
        "image_size": str(data.image_size),
        "mean": json.dumps(list(data.mean)),
        "std": json.dumps(list(data.std)),
        "source": os.fspath(run.checkpoint),
        **{k: str(v) for k, v in run.info.items()},
        **dict(metadata or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _masked_head(run.model.head, masked):
        export_merged(run.model.backbone, run.deltas, path, composition, run.model_name, run.model_kwargs, meta)
    log.info("Exported the merged %s to %s", _weights(composition), path)
    return path


# ---------------------------------------------------------------------------------------------- CLI
def _parse_factors(specs: Sequence[str], what: str) -> dict[int, float]:
    factors = {}
    for spec in specs:
        for item in str(spec).split(","):
            task, sep, value = item.partition("=")
            try:
                factors[int(task)] = float(value)
            except ValueError:
                raise expected(what, "TASK=FACTOR pairs such as 0=0.5 (comma-separated or repeated)", spec) from None
            if not sep:
                raise expected(what, "TASK=FACTOR pairs such as 0=0.5", spec)
    return factors


def _parse_layer_factors(specs: Sequence[str]) -> tuple[tuple[str, dict[int, float]], ...]:
    parsed = []
    for spec in specs:
        pattern, sep, factors = str(spec).rpartition(":")
        if not sep or not pattern:
            raise expected("--layer-factor", "PATTERN:TASK=FACTOR[,TASK=FACTOR...] such as 'blocks.0.*:1=0'", spec)
        parsed.append((pattern, _parse_factors([factors], "--layer-factor")))
    return tuple(parsed)


def build_parser():  # noqa: ANN201 (a jsonargparse.ArgumentParser)
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="lightning-taylor edit", description=__doc__.split("\n\n")[0],
                            epilog="Accuracies before (uniform composition) and after are printed and saved as "
                                   "edit_accuracy.csv / edit.json in --output-dir.")
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file with these options")
    parser.add_argument("run", type=str, help="run directory (uses checkpoints/last.ckpt) or checkpoint file")
    parser.add_argument("--deltas", type=str | None, default=None,
                        help="a deltas.safetensors to use instead of the checkpoint's deltas")
    parser.add_argument("--drop", type=int, nargs="+", default=[], help="tasks to unlearn (m_k = 0)")
    parser.add_argument("--keep", type=int, nargs="+", default=[], help="tasks to specialise to (uniform over them)")
    parser.add_argument("--renormalise", action="store_true",
                        help="after --drop, rescale the kept tasks so that the coefficients keep their sum")
    parser.add_argument("--factor", type=str, nargs="+", default=[], help="per-task factors TASK=M, e.g. 0=0.5 3=2")
    parser.add_argument("--layer-factor", type=str, nargs="+", default=[],
                        help="per-layer factors PATTERN:TASK=M[,TASK=M], e.g. 'blocks.0.*:1=0'")
    parser.add_argument("--mask-removed", action="store_true",
                        help="mask the classes of removed tasks (logit -inf), in the evaluation and the export")
    parser.add_argument("--export", type=str | None, default=None,
                        help="write the merged edited model here (safetensors, loads with plain timm)")
    parser.add_argument("--output-dir", type=str | None, default=None, help="default: <run dir>/edits/<edit>")
    parser.add_argument("--device", type=str, default="cpu")
    parser.add_argument("--data-root", type=str | None, default=None, help="override the data module's root")
    parser.add_argument("--eval-batch-size", type=int | None, default=None)
    return parser


def main(args: Sequence[str] | None = None) -> EditResult:
    """``lightning-taylor edit``: load a run, apply an edit, print and save the accuracies, optionally export."""
    parser = build_parser()
    cfg = parser.parse_args(args)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    edit = Edit(drop=tuple(cfg.drop), keep=tuple(cfg.keep), factors=_parse_factors(cfg.factor, "--factor"),
                layer_factors=_parse_layer_factors(cfg.layer_factor), renormalise=cfg.renormalise,
                mask_removed=cfg.mask_removed)
    overrides = {k: v for k, v in (("root", cfg.data_root), ("eval_batch_size", cfg.eval_batch_size)) if v is not None}
    run = load_run(cfg.run, deltas=cfg.deltas, device=cfg.device, data_overrides=overrides)
    result = apply_edit(run, edit)
    print(result.format_table())  # noqa: T201 (the CLI's output)
    output = Path(cfg.output_dir) if cfg.output_dir else run.run_dir / "edits" / edit.name
    extra = {"checkpoint": os.fspath(run.checkpoint), "run": run.info}
    if cfg.export:
        export(run, cfg.export, result.composition, result.masked_classes, {"edit": json.dumps(edit.to_dict())})
        extra["export"] = os.fspath(cfg.export)
        print(f"Merged model written to {cfg.export}")  # noqa: T201
    csv_path = result.save(output, extra)
    print(f"Accuracies written to {csv_path} and {output / 'edit.json'}")  # noqa: T201
    return result


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


__all__ = [
    "Edit",
    "EditResult",
    "Run",
    "accuracies",
    "apply_edit",
    "evaluate",
    "export",
    "find_checkpoint",
    "load_run",
    "main",
    "mask_logits",
    "predict",
    "removed_tasks",
    "task_classes",
    "eval_loader",
]
