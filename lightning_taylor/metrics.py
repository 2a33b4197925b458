"""Continual-learning evaluation: per-task accuracy (class-IL and task-IL) and the accuracy matrix.

Two pieces, for two lifetimes:

- :class:`ContinualAccuracy` (a ``torchmetrics.Metric``) counts correct predictions per task during one
  evaluation pass; its states are sums, reduced across processes with ``dist_reduce_fx="sum"``, so the
  accuracies are exact micro-averages over the whole (sharded) test set.
- :class:`AccuracyMatrix` keeps the resulting rows across the stream, ``R[t, j]`` = accuracy on task ``j``
  after training task ``t`` (``j ≤ t``), and derives average accuracy and forgetting. It holds plain
  Python values, for a callback's checkpoint state. Use one instance per scenario (class-IL, task-IL).

Accuracies are fractions in ``[0, 1]`` everywhere; only the text table and the heatmap show percentages.
"""

from __future__ import annotations

import csv
import io
import math
import os
from typing import Any, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_taylor._atomic import write_bytes, write_text
from lightning_taylor._checks import check_non_negative_int, check_positive_int
from lightning_taylor.errors import expected


def _task_sizes(classes_per_task: int | Sequence[int], num_tasks: int) -> list[int]:
    """Classes of each task: ``classes_per_task`` for every task, or the given list of ``num_tasks`` sizes."""
    if isinstance(classes_per_task, int) and not isinstance(classes_per_task, bool):
        check_positive_int("classes_per_task", classes_per_task)
        return [classes_per_task] * num_tasks
    sizes = list(classes_per_task) if isinstance(classes_per_task, (list, tuple)) else None
    if (sizes is None or len(sizes) != num_tasks
            or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes)):
        raise expected("classes_per_task", f"an int >= 1 or a list of {num_tasks} such ints (classes of each task)",
                       classes_per_task)
    return sizes


def continual_accuracy_counts(
    logits: Tensor, target: Tensor, seen_tasks: int, classes_per_task: int | Sequence[int], num_tasks: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-task counts of correct class-IL and task-IL predictions, and of samples (each of length ``num_tasks``).

    Task ``t`` owns the contiguous labels ``[s_t, s_t + n_t)``, ``n_t`` its number of classes:
    ``classes_per_task`` for every task (``s_t = t · k``, the task of a sample is ``target // k``), or the
    list of every task's ``n_t`` for a stream whose tasks differ in size. Class-IL predicts the argmax over
    the classes of the seen tasks (``< s_seen``; logits of unseen classes never win); task-IL predicts the
    argmax within the sample's own task's classes. Counts are sums over the batch (int64).

    Args:
        logits: ``B × C`` with ``C ≥`` the classes of the seen tasks (extra columns are unseen classes).
        target: ``B`` class labels of the seen tasks.
    """
    check_positive_int("seen_tasks", seen_tasks)
    if seen_tasks > num_tasks:
        raise expected("seen_tasks", f"an int in [1, {num_tasks}] (num_tasks)", seen_tasks)
    sizes = _task_sizes(classes_per_task, num_tasks)
    seen_classes, all_classes = sum(sizes[:seen_tasks]), sum(sizes)
    if logits.ndim != 2 or not seen_classes <= logits.shape[1] <= all_classes:
        raise expected("logits", f"a (B, C) tensor with {seen_classes} <= C <= {all_classes}",
                       tuple(logits.shape), "C counts the classes of the seen tasks (and optionally unseen ones).")
    if target.ndim != 1 or target.shape[0] != logits.shape[0]:
        raise expected("target", f"a 1-D tensor of {logits.shape[0]} labels (one per logits row)", tuple(target.shape))
    if target.is_floating_point() or target.is_complex():
        raise expected("target", "an integer tensor", target.dtype)
    target = target.to(device=logits.device, dtype=torch.long)
    if target.numel() and (target.min() < 0 or target.max() >= seen_classes):
        bad = target[(target < 0) | (target >= seen_classes)]
        raise expected("target", f"labels of the seen tasks' classes [0, {seen_classes})", sorted(set(bad.tolist())),
                       "Evaluate only on tasks seen so far, or raise `seen_tasks`.")
    sizes_t = torch.tensor(sizes, device=target.device)
    starts = torch.cumsum(sizes_t, 0) - sizes_t
    task = torch.repeat_interleave(torch.arange(num_tasks, device=target.device), sizes_t)[target]
    seen = logits[:, :seen_classes]
    class_il = seen.argmax(dim=1) == target
    # Each row's own task's columns, the others at −inf: the argmax within the task (the first on ties, as
    # within a block of the uniform case).
    columns = torch.arange(seen_classes, device=target.device)
    own = (columns >= starts[task][:, None]) & (columns < (starts + sizes_t)[task][:, None])
    task_il = torch.where(own, seen, torch.tensor(float("-inf"), dtype=seen.dtype, device=seen.device)
                          ).argmax(dim=1) == target
    # Sums of one-hot rows rather than bincount: deterministic on every device, also under
    # torch.use_deterministic_algorithms (Lightning's deterministic=True).
    one_hot = torch.nn.functional.one_hot(task, num_tasks)
    return (one_hot * class_il[:, None]).sum(dim=0), (one_hot * task_il[:, None]).sum(dim=0), one_hot.sum(dim=0)


class ContinualAccuracy(Metric):
    """Per-task class-IL and task-IL accuracy, micro-averaged within each task.

    States (``num_tasks`` int64 counts each, summed across processes): ``class_il_correct``,
    ``task_il_correct`` and ``total``. :meth:`compute` returns ``correct / total`` per task, NaN for a task
    without samples. See :func:`continual_accuracy_counts` for the two predictions.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    class_il_correct: Tensor
    task_il_correct: Tensor
    total: Tensor

    def __init__(self, num_tasks: int, classes_per_task: int | Sequence[int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_positive_int("num_tasks", num_tasks)
        _task_sizes(classes_per_task, num_tasks)  # checked here, used per batch
        self.num_tasks = num_tasks
        self.classes_per_task = classes_per_task
        for name in ("class_il_correct", "task_il_correct", "total"):
            self.add_state(name, default=torch.zeros(num_tasks, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor, seen_tasks: int) -> None:
        """Add a batch: ``logits`` (B × C), ``target`` (B), ``seen_tasks`` = tasks trained so far (≥ 1)."""
        class_il, task_il, total = continual_accuracy_counts(
            logits.detach(), target, seen_tasks, self.classes_per_task, self.num_tasks
        )
        self.class_il_correct += class_il.to(self.class_il_correct.device)
        self.task_il_correct += task_il.to(self.task_il_correct.device)
        self.total += total.to(self.total.device)

    def compute(self) -> dict[str, Tensor]:
        """``{"class_il": correct / total, "task_il": correct / total}`` per task, NaN where ``total = 0``.

        float64 (float32 on MPS, which has no float64), so that 4 / 5 reaches an :class:`AccuracyMatrix` or a
        CSV file as 0.8 and not as 0.800000011920929.
        """
        dtype = torch.float32 if self.total.device.type == "mps" else torch.float64
        total = self.total.to(dtype)
        return {
            "class_il": self.class_il_correct.to(dtype) / total,
            "task_il": self.task_il_correct.to(dtype) / total,
        }


class AccuracyMatrix:
    """``R[t, j]``: accuracy (fraction) on task ``j`` after training task ``t``, for ``j ≤ t``.

    - average accuracy after task ``t``: ``A_t = (1 / (t + 1)) Σ_{j ≤ t} R[t, j]`` (a NaN entry makes it NaN);
    - forgetting after task ``t`` (Chaudhry et al., 2018): ``F_t = (1 / t) Σ_{j < t} (max_{l ∈ [j, t−1]} R[l, j]
      − R[t, j])``. It is **NaN at t = 0** (nothing can have been forgotten yet, and 0 would claim a
      measurement); it can be negative (backward transfer).
    """

    def __init__(self, name: str = "class_il") -> None:
        self.name = name
        self._rows: list[list[float]] = []

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def rows(self) -> list[list[float]]:
        """A copy of the rows: row ``t`` has ``t + 1`` accuracies."""
        return [list(row) for row in self._rows]

    def add_row(self, task: int, accuracies: Sequence[float] | Tensor) -> None:
        """Set row ``task`` from ``accuracies[:task + 1]`` (fractions in [0, 1] or NaN).

        Entries after ``task + 1`` are ignored, so :meth:`ContinualAccuracy.compute`'s per-task vectors (NaN
        for unseen tasks) can be passed directly. ``task`` is the next row, or the last one again, which
        replaces it (re-evaluating the current task, e.g. after a resume, is idempotent).
        """
        check_non_negative_int("task", task)
        if task not in (len(self._rows) - 1, len(self._rows)):
            raise expected("task", f"the next task {len(self._rows)} (or the last one to replace it)", task)
        values = [float(v) for v in (accuracies.tolist() if isinstance(accuracies, Tensor) else accuracies)]
        if len(values) < task + 1:
            raise expected("accuracies", f"at least {task + 1} values (tasks 0..{task})", len(values))
        row = values[: task + 1]
        if any(not (math.isnan(v) or 0.0 <= v <= 1.0) for v in row):
            raise expected("accuracies", "fractions in [0, 1] (or NaN)", row, "Divide percentages by 100.")
        if task == len(self._rows):
            self._rows.append(row)
        else:
            self._rows[task] = row

    def _task(self, t: int | None) -> int:
        if not self._rows:
            raise expected("matrix", "at least one row (call add_row first)", "no rows")
        if t is None:
            return len(self._rows) - 1
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < len(self._rows):
            raise expected("t", f"a task index in [0, {len(self._rows) - 1}]", t)
        return t

    def average_accuracy(self, t: int | None = None) -> float:
        """``A_t``: mean of ``R[t, :t+1]`` (last row by default)."""
        row = self._rows[self._task(t)]
        return sum(row) / len(row)

    def forgetting(self, t: int | None = None) -> float:
        """``F_t``: mean over ``j < t`` of ``max_{l ∈ [j, t−1]} R[l, j] − R[t, j]``; NaN at ``t = 0``."""
        t = self._task(t)
        if t == 0:
            return math.nan
        drops = [max(self._rows[l][j] for l in range(j, t)) - self._rows[t][j] for j in range(t)]
        return sum(drops) / t

    def to_tensor(self) -> Tensor:
        """``R`` as a ``T × T`` float64 tensor, NaN above the diagonal (``j > t``)."""
        size = len(self._rows)
        matrix = torch.full((size, size), math.nan, dtype=torch.float64)
        for t, row in enumerate(self._rows):
            matrix[t, : t + 1] = torch.tensor(row, dtype=torch.float64)
        return matrix

    def to_csv(self, path: str | os.PathLike) -> None:
        """Write ``after_task, task_0 .. task_{T−1}, average_accuracy, forgetting`` (fractions, ``repr`` precision).

        Cells with ``j > t`` are empty; NaN is written as ``nan``.
        """
        size = len(self._rows)
        text = io.StringIO(newline="")
        writer = csv.writer(text)
        writer.writerow(["after_task", *(f"task_{j}" for j in range(size)), "average_accuracy", "forgetting"])
        for t, row in enumerate(self._rows):
            cells = [repr(v) for v in row] + [""] * (size - t - 1)
            writer.writerow([t, *cells, repr(self.average_accuracy(t)), repr(self.forgetting(t))])
        write_text(path, text.getvalue(), f"the {self.name} accuracy matrix")  # whole or not at all

    def format_table(self) -> str:
        """A fixed-width text table of ``R`` in percent, with average accuracy and forgetting columns."""
        size = len(self._rows)
        header = f"{'after':>5} |" + "".join(f"{f'task {j}':>8}" for j in range(size)) + f" |{'avg':>8}{'forget':>8}"
        lines = [f"{self.name} accuracy (%)", header, "-" * len(header)]
        for t, row in enumerate(self._rows):
            cells = "".join(_percent(v) for v in row) + " " * 8 * (size - t - 1)
            lines.append(f"{t:>5} |{cells} |{_percent(self.average_accuracy(t))}{_percent(self.forgetting(t))}")
        return "\n".join(lines)

    def figure(self, title: str | None = None):  # noqa: ANN201 (a matplotlib Figure)
        """A heatmap of ``R`` in percent (cells annotated), rows = after task ``t``, columns = task ``j``.

        Drawn on a standalone Agg canvas, so no pyplot state or interactive backend is involved.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        size = len(self._rows)
        if size == 0:
            raise expected("matrix", "at least one row (call add_row first)", "no rows")
        values = self.to_tensor().mul(100).numpy()
        side = 1.5 + 0.7 * size
        figure = Figure(figsize=(side + 1.2, side))
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        image = axes.imshow(values, vmin=0.0, vmax=100.0, cmap="viridis")  # NaN cells are left blank
        for t, row in enumerate(self._rows):
            for j, value in enumerate(row):
                colour = "black" if not math.isnan(value) and value > 0.6 else "white"
                axes.text(j, t, _percent(value).strip(), ha="center", va="center", color=colour, fontsize=8)
        axes.set_xticks(range(size), [str(j) for j in range(size)])
        axes.set_yticks(range(size), [str(t) for t in range(size)])
        axes.set_xlabel("evaluated task j")
        axes.set_ylabel("after training task t")
        axes.set_title(title if title is not None else f"{self.name} accuracy (%)")
        figure.colorbar(image, ax=axes, label="accuracy (%)")
        figure.tight_layout()
        return figure

    def to_png(self, path: str | os.PathLike, title: str | None = None) -> None:
        """Save :meth:`figure` as a PNG."""
        image = io.BytesIO()
        self.figure(title).savefig(image, dpi=100, format="png")
        write_bytes(path, image.getvalue(), f"the {self.name} accuracy plot")  # whole or not at all

    def table(self) -> tuple[list[str], list[list[float | None]]]:
        """``(columns, rows)`` of ``R`` in percent for loggers' tables (``None`` above the diagonal)."""
        size = len(self._rows)
        columns = ["after_task", *(f"task_{j}" for j in range(size)), "average_accuracy", "forgetting"]
        data = [[t, *(100 * v for v in row), *([None] * (size - t - 1)), 100 * self.average_accuracy(t),
                 100 * self.forgetting(t)] for t, row in enumerate(self._rows)]
        return columns, data

    def state_dict(self) -> dict[str, Any]:
        """Plain values only (a string and lists of floats), for a callback's checkpoint state."""
        return {"name": self.name, "rows": self.rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.name = str(state["name"])
        self._rows = [[float(v) for v in row] for row in state["rows"]]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, tasks={len(self._rows)})"


def _percent(value: float) -> str:
    """An 8-wide percentage cell, ``-`` for NaN."""
    return f"{'-':>8}" if math.isnan(value) else f"{100.0 * value:>8.2f}"
