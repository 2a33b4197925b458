"""Per-task accuracy of a composition of task deltas on the test sets of the seen tasks.

- :func:`predict`: logits and targets of a model over a loader, with a composition set first and some
  classes optionally masked (logit −∞, never predicted);
- :func:`accuracies`: per-task class-IL accuracy (argmax over every seen class) and task-IL accuracy
  (argmax within the example's own task), as fractions;
- :func:`evaluate`: both over :func:`eval_loader`, one loader over the test sets of tasks ``0 .. T − 1``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_taylor.data import TaskStreamDataModule
from lightning_taylor.data.split import task_ranges
from lightning_taylor.deltas.composition import Composition, uniform
from lightning_taylor.metrics import ContinualAccuracy
from lightning_taylor.model.module import IncrementalViT


def mask_logits(logits: Tensor, classes: Sequence[int]) -> Tensor:
    """A copy of ``logits`` (B × C) with the columns ``classes`` set to −∞ (never predicted)."""
    logits = logits.clone()
    if len(classes):
        logits[:, list(classes)] = -math.inf
    return logits


@torch.no_grad()
def predict(model: IncrementalViT, loader: Any, composition: Composition | Mapping[int, float] | None = None,
            mask_classes: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """Logits (float32, on the CPU) and targets of ``model`` over ``loader``, with ``composition`` set first.

    Non-finite logits (before masking) are an error: an overflowing composition must not pass as a result.
    """
    model.eval()
    if composition is not None:
        model.task_deltas.compose(composition)
    device = next(model.parameters()).device
    logits, targets = [], []
    for x, y in loader:
        logits.append(model(x.to(device)).float().cpu())
        targets.append(y)
    out = torch.cat(logits)
    if not torch.isfinite(out).all():
        raise ValueError(f"The logits of the composition {_describe(composition)} have NaN or inf values "
                         "(a factor too large for the weights' precision?).")
    return (mask_logits(out, mask_classes) if mask_classes else out), torch.cat(targets)


def _describe(composition: Composition | Mapping[int, float] | None) -> str:
    if composition is None:
        return "set on the model"
    weights = composition.weights if isinstance(composition, Composition) else composition
    return str({int(t): float(w) for t, w in sorted(weights.items())})


def accuracies(logits: Tensor, targets: Tensor, num_tasks: int, classes_per_task: int | Sequence[int],
               mask_classes: Sequence[int] = ()) -> dict[str, list[float]]:
    """Per-task class-IL and task-IL accuracy (fractions) over the tasks present in ``targets``.

    ``classes_per_task``: the classes of every task, or the list of each task's (the stream's ``task_sizes``).
    Class-IL: argmax over every class of the seen tasks; task-IL: within the example's own task. ``mask_classes``
    are masked first; task-IL is NaN for a task all of whose classes are masked (it has no prediction).
    """
    sizes = [classes_per_task] * num_tasks if isinstance(classes_per_task, int) else list(classes_per_task)
    ranges = task_ranges(sizes)
    seen = next(t for t, r in enumerate(ranges) if int(targets.max()) in r) + 1
    metric = ContinualAccuracy(num_tasks, classes_per_task)
    metric.update(mask_logits(logits, mask_classes), targets, seen)
    result = {name: [float(v) for v in values.reshape(-1)[:seen]] for name, values in metric.compute().items()}
    masked = set(mask_classes)
    for task in range(seen):
        if set(ranges[task]) <= masked:
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
    return accuracies(logits, targets, datamodule.num_tasks, list(datamodule.task_sizes), mask_classes or ())


__all__ = ["accuracies", "eval_loader", "evaluate", "mask_logits", "predict"]
