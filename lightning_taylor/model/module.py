"""The LightningModule: a pre-trained timm ViT with one linear head over every class of the stream.

The module is deliberately thin. The task-boundary work (deltas, pre-tuning, Fisher, penalties) is done by
the :mod:`lightning_taylor.callbacks`, which work on any module that follows their small protocol
(:mod:`lightning_taylor.callbacks.protocol`); this one follows it in the simplest way:

- ``backbone``: a timm ViT whose ``get_classifier()`` is the ``nn.Linear`` head over all classes; task
  ``t`` owns the head rows ``task_ranges[t]`` (``[t·k, (t+1)·k)`` for ``k`` classes per task);
- ``training_step`` trains on the current task's classes only (the other logits are left out of the
  cross-entropy, i.e. masked to −∞);
- ``validation_step`` / ``test_step`` return ``{"logits": …, "target": …}`` for the continual metrics;
- the optimiser covers every parameter that requires grad, so deltas attached by a callback in ``setup``
  (before optimisers and DDP exist) are trained.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_taylor._checks import check_non_negative, check_positive_int
from lightning_taylor.data.split import check_task_sizes, task_ranges
from lightning_taylor.errors import expected
from lightning_taylor.model.backbone import create_backbone, input_size


class TaskCosine:
    """Learning-rate factor ``½ (1 + cos(π e / E))`` at epoch ``e`` of a task of ``E`` epochs (1.0 at its start).

    A callable object (not a lambda) so ``LambdaLR`` saves it with its state, and a function of the global
    epoch only, so the schedule restarts at every task and resumes from a checkpoint by itself.
    """

    def __init__(self, epochs_per_task: int) -> None:
        self.epochs_per_task = epochs_per_task

    def __call__(self, epoch: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * (epoch % self.epochs_per_task) / self.epochs_per_task))


class IncrementalViT(L.LightningModule):
    """A timm ViT for class-incremental learning with per-task deltas (added by the ITA / IEL callbacks).

    Args:
        model_name: timm model name, e.g. ``vit_base_patch16_224.augreg_in21k``; ``None`` with
            ``pretrained="embedded"`` (the default) takes the shipped tiny ViT's name from its file.
        pretrained: ``"embedded"`` (the shipped tiny ViT, offline), ``"embedded:glyphs"`` (the shipped tiny ViT
            pre-trained on rendered letters, for the ``glyphs`` stream), ``True`` (timm hub), ``False`` or a
            weights file.
        model_kwargs: extra ``timm.create_model`` arguments (``img_size``, ``in_chans``, …).
        num_classes: classes of the whole stream (linked to the data module by the CLI).
        classes_per_task: head rows per task of a uniform stream (linked to the data module by the CLI);
            ``None`` with ``task_sizes``.
        task_sizes: head rows of each task, in task order, for a stream whose tasks differ in size (e.g.
            ``[20] * 9 + [16]``; linked to the data module's class partition by the CLI); ``None``: uniform.
        epochs_per_task: length of a task, for the per-task cosine schedule (linked to the data module).
        lr: AdamW learning rate of the deltas and the head.
        weight_decay: AdamW weight decay.
        seed: seeds the head initialisation; ``None`` follows ``seed_everything`` (``torch.initial_seed()``).
    """

    def __init__(
        self,
        model_name: str | None = None,
        pretrained: bool | str = "embedded",
        model_kwargs: dict[str, Any] | None = None,
        num_classes: int = 10,
        classes_per_task: int | None = 2,
        task_sizes: list[int] | None = None,
        epochs_per_task: int = 5,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("epochs_per_task", epochs_per_task)
        if task_sizes is not None:
            task_sizes = list(check_task_sizes(task_sizes, num_classes))
            if classes_per_task is not None and set(task_sizes) != {classes_per_task}:
                raise expected("classes_per_task", f"None or the size of every task of task_sizes={task_sizes}",
                               classes_per_task)
        else:
            check_positive_int("classes_per_task", classes_per_task)
            if num_classes % classes_per_task:
                raise expected("classes_per_task", f"a divisor of num_classes={num_classes}", classes_per_task)
        check_non_negative("lr", lr)
        check_non_negative("weight_decay", weight_decay)
        self.save_hyperparameters()
        seed = torch.initial_seed() % 2**31 if seed is None else seed
        self.backbone = create_backbone(model_name, pretrained, num_classes, model_kwargs, seed)
        self.backbone.requires_grad_(False)
        self.head.requires_grad_(True)

    @property
    def head(self) -> torch.nn.Linear:
        return self.backbone.get_classifier()

    @property
    def input_size(self) -> tuple[int, int, int] | None:
        """``(C, H, W)`` the backbone expects (its patch embedding); the task stream serves images of this size."""
        return input_size(self.backbone)

    @property
    def current_task(self) -> int:
        """The task being trained, from the attached data module (the single source of task boundaries)."""
        return int(self.trainer.datamodule.current_task)

    @property
    def task_ranges(self) -> tuple[range, ...]:
        """The head rows (remapped labels) of each task: the class partition of the stream."""
        sizes = self.hparams.task_sizes
        if sizes is None:
            k = self.hparams.classes_per_task
            sizes = [k] * (self.hparams.num_classes // k)
        return task_ranges(sizes)

    def task_classes(self, task: int) -> range:
        return self.task_ranges[task]

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        classes = self.task_classes(self.current_task)
        # Task-local cross-entropy: the logits of other tasks' classes are left out (masked to −∞).
        logits = self(x)[:, classes.start : classes.stop]
        loss = F.cross_entropy(logits, y - classes.start)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _eval_step(self, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        x, y = batch
        return {"logits": self(x), "target": y}

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step(batch)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step(batch)

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, TaskCosine(self.hparams.epochs_per_task))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}
