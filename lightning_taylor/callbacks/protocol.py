"""What the callbacks need from a LightningModule and its data: a small protocol with defaults for timm.

The callbacks run on any LightningModule (ours, :class:`~lightning_taylor.model.module.IncrementalViT`, or a
user's own) that holds:

- **a backbone**: a timm ViT, or any ``nn.Module`` whose ``nn.Linear`` layers match the delta targets. The
  attribute named by the callback's ``backbone=`` (dotted paths allowed); by default ``pl_module.backbone``,
  else the module's only child that looks like a timm model (it has ``forward_features``).
- **a head**: one ``nn.Linear`` over all ``C`` classes of the stream, task ``t`` owning the rows
  ``[t·k, (t+1)·k)`` (or, for a stream whose tasks differ in size, the rows of its ``task_sizes``). The
  attribute named by ``head=``; by default the backbone's own classifier
  (``backbone.get_classifier()``, a timm model created with ``num_classes=C``), else ``pl_module.head`` (over a
  backbone created with ``num_classes=0``). Logits are ``backbone(x)`` in the first case, ``head(backbone(x))``
  in the second.

The callbacks freeze the backbone, keep the head trainable and attach the deltas as ``pl_module.task_deltas``
in ``setup`` — before Lightning builds the optimisers and wraps the model for DDP — so a
``configure_optimizers`` over ``[p for p in self.parameters() if p.requires_grad]`` (or over all parameters:
frozen ones get no gradient and are skipped) trains the deltas and the head.

The stream is read, for each name, from the DataModule (``trainer.datamodule``), else the LightningModule
(an attribute or a hyper-parameter), else the callback's argument of the same name:

- ``current_task``: the task being trained (one ``fit`` per task: set it before each ``fit``); without it,
  ``trainer.current_epoch // epochs_per_task`` (one ``fit`` over the stream);
- ``classes_per_task`` (``k``), ``num_tasks`` and ``epochs_per_task``; for a stream whose tasks differ in
  size (Cars-196: 9 × 20 + 1 × 16), ``task_sizes`` (the classes of each task, in order) instead of
  ``classes_per_task`` (:func:`task_classes`, :func:`partition`);
- the data of a task boundary (pre-tuning features, Fisher): ``datamodule.task_dataloader(task, "train",
  batch_size=…)`` when the DataModule has it, else the dataset of the trainer's current training loader, in order.

Batches are ``(x, y, …)`` sequences with ``y`` the stream-wide label in ``[0, C)``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_taylor.data.split import task_ranges, uniform_size
from lightning_taylor.errors import expected


class Classifier(nn.Module):
    """The model as the callbacks see it: ``logits = head(features(x))`` over all classes.

    Args:
        backbone: the network with the delta targets.
        head: the linear head; ``None`` when it is the backbone's own classifier (``get_classifier()``).
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear | None = None) -> None:
        super().__init__()
        self.backbone, self.separate_head = backbone, head

    @property
    def head(self) -> nn.Linear:
        return self.backbone.get_classifier() if self.separate_head is None else self.separate_head

    def features(self, x: Tensor) -> Tensor:
        """Pre-logits features: timm's ``forward_head(pre_logits=True)``, or the backbone's output."""
        if self.separate_head is None:
            return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x) if self.separate_head is None else self.separate_head(self.backbone(x))


def _attribute(pl_module: nn.Module, path: str, argument: str) -> Any:
    value = pl_module
    for part in path.split("."):
        if not hasattr(value, part):
            children = [name for name, _ in pl_module.named_children()]
            raise expected(argument, f"an attribute of {type(pl_module).__name__}", path,
                           f"Its child modules: {children}.")
        value = getattr(value, part)
    return value


def resolve_classifier(pl_module: nn.Module, backbone: str | None = None, head: str | None = None) -> Classifier:
    """The backbone and head of ``pl_module`` by the protocol above (attribute paths, or the defaults)."""
    if backbone is not None:
        net = _attribute(pl_module, backbone, "backbone")
    elif isinstance(getattr(pl_module, "backbone", None), nn.Module):
        net = pl_module.backbone
    else:
        candidates = [name for name, child in pl_module.named_children() if hasattr(child, "forward_features")]
        if len(candidates) != 1:
            raise expected("backbone", f"the attribute of {type(pl_module).__name__} that holds the ViT", None,
                           f"Found {len(candidates)} timm-like child modules ({candidates}): name one, e.g. "
                           "`ITA(backbone='model')`.")
        net = getattr(pl_module, candidates[0])
    if not isinstance(net, nn.Module):
        raise expected("backbone", "the name of an nn.Module attribute", backbone)
    if head is not None:
        linear = _attribute(pl_module, head, "head")
        if not isinstance(linear, nn.Linear):
            raise expected("head", "the name of an nn.Linear attribute over all classes", head,
                           f"`{head}` is a {type(linear).__name__}.")
        return Classifier(net, linear)
    own = net.get_classifier() if hasattr(net, "get_classifier") else None
    if isinstance(own, nn.Linear):
        return Classifier(net)
    if isinstance(getattr(pl_module, "head", None), nn.Linear):
        return Classifier(net, pl_module.head)
    raise expected("head", f"the attribute of {type(pl_module).__name__} that holds the nn.Linear head", None,
                   "The backbone has no linear classifier (`get_classifier()`) and there is no `head` attribute.")


def stream_value(trainer: L.Trainer, pl_module: L.LightningModule, name: str,
                 argument: int | None = None) -> int | None:
    """``name`` from the DataModule, else the LightningModule (attribute or hyper-parameter), else ``argument``.

    A value given as ``argument`` that differs from the one the data or the module states is refused.
    """
    found = None
    for source in (getattr(trainer, "datamodule", None), pl_module):
        if source is not None and getattr(source, name, None) is not None:
            found = getattr(source, name)
            break
        hparams = getattr(source, "hparams", None) if source is not None else None
        if hparams is not None and hparams.get(name) is not None:
            found = hparams[name]
            break
    if found is None:
        return argument
    if argument is not None and int(argument) != int(found):
        raise expected(name, f"{found} (what the stream's DataModule or LightningModule says)", argument)
    return int(found)


def require(trainer: L.Trainer, pl_module: L.LightningModule, name: str, argument: int | None = None) -> int:
    """:func:`stream_value`, with an error that says where the value may come from when none is found."""
    value = stream_value(trainer, pl_module, name, argument)
    if value is None:
        raise expected(name, "known to the callback", None,
                       f"Give it as the callback's `{name}=`, or as an attribute of your DataModule or "
                       "LightningModule.")
    return value


def stated_task_sizes(trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[int, ...] | None:
    """The class partition ``task_sizes`` that the DataModule, else the LightningModule (attribute or
    hyper-parameter), states; ``None`` if neither does."""
    for source in (getattr(trainer, "datamodule", None), pl_module):
        if source is None:
            continue
        sizes = getattr(source, "task_sizes", None)
        if sizes is None and getattr(source, "hparams", None) is not None:
            sizes = source.hparams.get("task_sizes")
        if sizes is not None:
            return tuple(int(n) for n in sizes)
    return None


def uneven_task_sizes(trainer: L.Trainer, pl_module: L.LightningModule,
                      classes_per_task: int | None = None) -> tuple[int, ...] | None:
    """The stated partition when its tasks differ in size (then ``classes_per_task`` must not be given),
    else ``None``: the stream is read through ``classes_per_task`` as before."""
    sizes = stated_task_sizes(trainer, pl_module)
    if sizes is None or uniform_size(sizes) is not None:
        return None
    if classes_per_task is not None:
        raise expected("classes_per_task", f"None: the stream's tasks differ in size (task_sizes={list(sizes)})",
                       classes_per_task)
    return sizes


def task_classes(trainer: L.Trainer, pl_module: L.LightningModule, task: int,
                 classes_per_task: int | None = None) -> range:
    """The labels (head rows) of ``task``: ``[t·k, (t+1)·k)``, or its range of an uneven ``task_sizes``."""
    sizes = uneven_task_sizes(trainer, pl_module, classes_per_task)
    if sizes is None:
        k = require(trainer, pl_module, "classes_per_task", classes_per_task)
        return range(task * k, (task + 1) * k)
    if not 0 <= task < len(sizes):
        raise expected("task", f"a task index in 0..{len(sizes) - 1}", task)
    return task_ranges(sizes)[task]


def partition(trainer: L.Trainer, pl_module: L.LightningModule, num_tasks: int,
              classes_per_task: int | None = None) -> tuple[int, ...]:
    """Classes of each of the ``num_tasks`` tasks: the uneven ``task_sizes``, else ``(k,) * num_tasks``."""
    sizes = uneven_task_sizes(trainer, pl_module, classes_per_task)
    if sizes is None:
        return (require(trainer, pl_module, "classes_per_task", classes_per_task),) * num_tasks
    if len(sizes) != num_tasks:
        raise expected("num_tasks", f"{len(sizes)}, the tasks of task_sizes={list(sizes)}", num_tasks)
    return sizes


def current_task(trainer: L.Trainer, pl_module: L.LightningModule, epochs_per_task: int | None = None) -> int:
    """The task being trained: ``current_task`` of the data or module, else ``current_epoch // epochs_per_task``."""
    task = stream_value(trainer, pl_module, "current_task")
    if task is not None:
        return task
    epochs = stream_value(trainer, pl_module, "epochs_per_task", epochs_per_task)
    if epochs is None:
        raise expected("current_task", "known to the callback", None,
                       "Set `current_task` on your DataModule or LightningModule before each fit (one fit per "
                       "task), or give the callback `epochs_per_task=` (one fit over the stream).")
    return int(trainer.current_epoch) // epochs


def last_epoch_of_task(trainer: L.Trainer, pl_module: L.LightningModule, epochs_per_task: int | None = None) -> bool:
    """Whether the epoch being trained is its task's last: ``(epoch + 1) % epochs_per_task == 0`` when the stream
    (or the argument) states ``epochs_per_task``, else the fit's last epoch (one ``fit`` per task)."""
    epochs = stream_value(trainer, pl_module, "epochs_per_task", epochs_per_task)
    if epochs is not None:
        return (int(trainer.current_epoch) + 1) % epochs == 0
    return trainer.max_epochs is not None and int(trainer.current_epoch) == trainer.max_epochs - 1


def task_loader(trainer: L.Trainer, task: int, batch_size: int) -> DataLoader:
    """Task ``task``'s training data for a task-boundary pass, in order, without a distributed sampler."""
    datamodule = getattr(trainer, "datamodule", None)
    if hasattr(datamodule, "task_dataloader"):
        return datamodule.task_dataloader(task, "train", batch_size=batch_size)
    loader = trainer.train_dataloader
    if not isinstance(loader, DataLoader):
        raise expected("the training data", "one DataLoader (for the task-boundary passes)", type(loader).__name__,
                       "Or give your DataModule a `task_dataloader(task, split, batch_size=...)` method.")
    return DataLoader(loader.dataset, batch_size=batch_size, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn)


def check_launcher(trainer: L.Trainer, callback: str) -> None:
    """Refuse ``ddp_spawn`` / ``ddp_fork`` / ``ddp_notebook``: the callback's state would die with the workers."""
    if isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher):
        raise expected(
            "Trainer(strategy=...)", f"'ddp' (processes launched by a script, torchrun or SLURM) for {callback}",
            type(trainer.strategy).__name__ + " with a spawn / fork launcher",
            f"{callback} keeps the Fisher, the pre-tuned head and the task index in the callback; with "
            "ddp_spawn / ddp_fork / ddp_notebook that state lives in worker processes and is lost when `fit` "
            "returns, so a later `fit` (the next task) or `test` would run without it.")
