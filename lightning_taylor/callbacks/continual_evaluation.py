"""Continual evaluation: the accuracy matrix after every task, logged, printed and written at the end.

After the last epoch of task ``t`` the composed model is evaluated on the test data of every seen task
``j ≤ t``; row ``t`` of the accuracy matrix holds those accuracies (micro-averaged over each task's test
examples, summed across processes by torchmetrics). Two matrices are kept:

- class-incremental: argmax over all classes seen so far;
- task-incremental: argmax within the example's own task's classes.

After every task the average accuracy and the forgetting of both settings are logged as scalars
(``val/class_il/avg_acc``, ``val/class_il/forgetting``, ...; forgetting from the second task on) through the
trainer's loggers, and the matrix goes to the loggers that take pictures or tables: a heatmap to
TensorBoard (``add_figure``) and to loggers with ``log_image`` (W&B), a table to loggers with ``log_table``
(W&B). At the end of ``fit`` both matrices are printed as tables and written to ``accuracy_class_il.csv`` /
``accuracy_class_il.png`` (and ``task_il``) in ``output_dir`` (default: the logger's directory).

The stream (``num_tasks``, ``classes_per_task``, ``current_task``, ``epochs_per_task``) is read as the ITA / IEL
callbacks read it (:mod:`~lightning_taylor.callbacks.protocol`). A validation ends a task at the last epoch
of a ``fit`` and, when ``epochs_per_task`` is known, every ``epochs_per_task`` epochs. ``validation_step`` /
``test_step`` should return ``{"logits": …, "target": …}``; otherwise the callback runs ``pl_module(x)`` on
the batch ``(x, y, …)`` itself (a second forward pass).
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import Logger

from lightning_taylor._checks import check_positive_int
from lightning_taylor.callbacks.protocol import (
    current_task,
    partition,
    require,
    stream_value,
)
from lightning_taylor.console import show
from lightning_taylor.metrics import AccuracyMatrix, ContinualAccuracy

SETTINGS = ("class_il", "task_il")


class ContinualEvaluation(L.Callback):
    """Accuracy matrix, average accuracy and forgetting of a class-incremental stream.

    Args:
        output_dir: where CSV and PNG files go; ``None`` = the logger's directory (``trainer.log_dir``).
        num_tasks: tasks of the stream, when the DataModule and LightningModule do not say.
        classes_per_task: classes per task, likewise.
        epochs_per_task: epochs per task, likewise (see the module docstring).
    """

    def __init__(self, output_dir: str | None = None, num_tasks: int | None = None,
                 classes_per_task: int | None = None, epochs_per_task: int | None = None) -> None:
        for name, value in (("num_tasks", num_tasks), ("classes_per_task", classes_per_task),
                            ("epochs_per_task", epochs_per_task)):
            if value is not None:
                check_positive_int(name, value)
        self.output_dir = output_dir
        self.num_tasks, self.classes_per_task, self.epochs_per_task = num_tasks, classes_per_task, epochs_per_task
        self.matrices = {name: AccuracyMatrix(name) for name in SETTINGS}
        self.metric: ContinualAccuracy | None = None
        self._num_tasks = num_tasks  # resolved in setup

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._num_tasks = require(trainer, pl_module, "num_tasks", self.num_tasks)
        sizes = partition(trainer, pl_module, self._num_tasks, self.classes_per_task)
        self.metric = ContinualAccuracy(self._num_tasks, list(sizes))

    def _seen_tasks(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int:
        """Tasks evaluated: those seen so far in validation; the whole stream in ``test``."""
        if trainer.testing:
            return self._num_tasks
        return min(current_task(trainer, pl_module, self.epochs_per_task), self._num_tasks - 1) + 1

    def _start(self, pl_module: L.LightningModule) -> None:
        self.metric = self.metric.to(pl_module.device)
        self.metric.reset()

    def _update(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any) -> None:
        if isinstance(outputs, dict) and "logits" in outputs:
            logits, target = outputs["logits"].detach(), outputs["target"]
        else:  # the module's step returns something else: run its forward on the batch
            with torch.no_grad():
                logits, target = pl_module(batch[0]), batch[1]
        self.metric.update(logits, target, self._seen_tasks(trainer, pl_module))

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(pl_module)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._update(trainer, pl_module, outputs, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update(trainer, pl_module, outputs, batch)

    def _end_of_task(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        """True when this validation closes a task: a standalone ``validate``, the last epoch of the ``fit``,
        or the last epoch of a task of ``epochs_per_task`` epochs."""
        epoch = trainer.current_epoch + 1
        if not trainer.training or (trainer.max_epochs is not None and epoch >= trainer.max_epochs):
            return True
        epochs = stream_value(trainer, pl_module, "epochs_per_task", self.epochs_per_task)
        return epochs is not None and epoch % epochs == 0

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._record(trainer, pl_module, "val", add_row=self._end_of_task(trainer, pl_module))

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        accuracies = self._record(trainer, pl_module, "test", add_row=False)
        for name, values in accuracies.items():
            cells = "  ".join(f"task {j}: {100 * a:.2f}" for j, a in enumerate(values))
            show(trainer, f"test {name} accuracy (%): {cells}  | avg {100 * sum(values) / len(values):.2f}")

    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str, add_row: bool) -> dict:
        seen = self._seen_tasks(trainer, pl_module)
        results = self.metric.compute()  # reduced across processes
        per_setting = {}
        for name in SETTINGS:
            accuracies = [float(a) for a in results[name].reshape(-1)[:seen]]  # torchmetrics squeezes 1 task
            pl_module.log(f"{stage}/{name}/avg_acc", sum(accuracies) / seen, sync_dist=False)
            for task, acc in enumerate(accuracies):
                pl_module.log(f"{stage}/{name}/task{task}", acc, sync_dist=False)
            matrix = self.matrices[name]
            if add_row and seen - 1 < len(matrix) - 1:
                add_row = False  # a standalone `validate` of an earlier state: report it, keep the matrix
            if add_row:
                matrix.add_row(seen - 1, accuracies)
                if seen > 1:
                    pl_module.log(f"{stage}/{name}/forgetting", matrix.forgetting(), sync_dist=False)
                if trainer.is_global_zero:
                    log_matrix(trainer.loggers, f"{stage}/{name}/accuracy_matrix", matrix, seen - 1)
            per_setting[name] = accuracies
        if add_row:
            show(trainer, f"After task {seen - 1}:\n{self.report()}")
        return per_setting

    def report(self) -> str:
        """Both accuracy matrices as text tables with average accuracy and forgetting."""
        return "\n".join(self.matrices[name].format_table() for name in SETTINGS)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        directory = self.output_dir or trainer.log_dir or trainer.default_root_dir
        if not trainer.is_global_zero or not self.matrices["class_il"].rows:
            return
        for name in SETTINGS:  # each file whole or absent; the folder is created by the first

            matrix = self.matrices[name]
            matrix.to_csv(os.path.join(directory, f"accuracy_{name}.csv"))
            matrix.to_png(os.path.join(directory, f"accuracy_{name}.png"), title=f"{name.replace('_', '-')} accuracy")
        show(trainer, f"Final accuracy matrices:\n{self.report()}\nWritten to {directory}")

    def state_dict(self) -> dict[str, Any]:
        return {name: matrix.state_dict() for name, matrix in self.matrices.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name, matrix in self.matrices.items():
            matrix.load_state_dict(state_dict[name])


def log_matrix(loggers: list[Logger], key: str, matrix: AccuracyMatrix, task: int) -> None:
    """Send the matrix after ``task`` to the loggers that take figures (TensorBoard, W&B) or tables (W&B)."""
    for logger in loggers:
        experiment = logger.experiment
        if hasattr(experiment, "add_figure"):  # TensorBoard's SummaryWriter
            experiment.add_figure(key, matrix.figure(), global_step=task)
        elif hasattr(logger, "log_image"):
            logger.log_image(key=key, images=[matrix.figure()], step=task)
        if hasattr(logger, "log_table"):
            columns, data = matrix.table()
            logger.log_table(key=f"{key}_table", columns=columns, data=data, step=task)
