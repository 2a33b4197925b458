"""Class-incremental split: a fixed class order, labels remapped to positions in it, contiguous tasks.

With ``C`` classes, ``T`` tasks and ``k = C / T`` classes per task, the original classes are put in a fixed
order ``order`` (a seeded permutation, or ``0..C-1``), and every label ``c`` is remapped to its position in
that order, ``order.index(c)``. Task ``t`` then owns exactly the contiguous remapped labels
``[t·k, (t+1)·k)``, so the task of a label is ``y // k`` and "every class seen up to task t" is
``y < (t+1)·k``. The head and the metrics rely on this contiguity (one head slice per task).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor

from lightning_taylor._checks import check_non_negative_int, check_positive_int, expected


def class_order(num_classes: int, seed: int | None = 0) -> list[int]:
    """The order in which the original classes ``0..num_classes-1`` are presented.

    Args:
        num_classes: number of classes ``C``.
        seed: seed of the permutation (``torch.randperm`` with its own generator, so the global RNG is
            untouched and the same seed gives the same order on every machine and process);
            ``None`` keeps the natural order ``0..C-1``.

    Returns:
        ``order`` such that ``order[i]`` is the original class presented at remapped label ``i``.
    """
    check_positive_int("num_classes", num_classes)
    if seed is None:
        return list(range(num_classes))
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise expected("class_order_seed", "an int or None", seed)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_classes, generator=generator).tolist()


class ClassIncrementalSplit:
    """A fixed class order and the task of every remapped label (pure bookkeeping, no data).

    Args:
        num_classes: number of classes ``C`` in the data set.
        num_tasks: number of tasks ``T``; must divide ``C``.
        order: original class at each remapped label (a permutation of ``0..C-1``), e.g. from
            :func:`class_order`.
    """

    def __init__(self, num_classes: int, num_tasks: int, order: Sequence[int]) -> None:
        check_positive_int("num_classes", num_classes)
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1 or num_classes % num_tasks:
            raise expected("num_tasks", f"an int >= 1 that divides the {num_classes} classes", num_tasks)
        order = [int(c) for c in order]
        if sorted(order) != list(range(num_classes)):
            raise expected("order", f"a permutation of 0..{num_classes - 1}", order)
        self.num_classes = num_classes
        self.num_tasks = num_tasks
        self.classes_per_task = num_classes // num_tasks
        self.order: tuple[int, ...] = tuple(order)
        # position[c] = remapped label of original class c (the inverse permutation).
        self.position = torch.empty(num_classes, dtype=torch.long)
        self.position[torch.tensor(order, dtype=torch.long)] = torch.arange(num_classes)

    def remap(self, targets: Tensor | Sequence[int]) -> Tensor:
        """Remapped labels (positions in the class order) of original ``targets``."""
        targets = torch.as_tensor(targets, dtype=torch.long)
        if targets.numel() and (targets.min() < 0 or targets.max() >= self.num_classes):
            raise expected("targets", f"original labels in 0..{self.num_classes - 1}",
                           f"values in {int(targets.min())}..{int(targets.max())}")
        return self.position[targets]

    def check_task(self, task: int, name: str = "task") -> int:
        """``task`` if it is a valid task index, else the project's ValueError."""
        check_non_negative_int(name, task)
        if task >= self.num_tasks:
            raise expected(name, f"a task index in 0..{self.num_tasks - 1}", task)
        return task

    def task_classes(self, task: int) -> range:
        """The remapped labels owned by ``task``: ``range(task·k, (task+1)·k)``."""
        k = self.classes_per_task
        self.check_task(task)
        return range(task * k, (task + 1) * k)

    def task_of_label(self, label: int | Tensor) -> int | Tensor:
        """Task owning a remapped label (``label // classes_per_task``); works elementwise on tensors."""
        if isinstance(label, Tensor):
            return torch.div(label, self.classes_per_task, rounding_mode="floor")
        check_non_negative_int("label", label)
        if label >= self.num_classes:
            raise expected("label", f"a remapped label in 0..{self.num_classes - 1}", label)
        return label // self.classes_per_task

    def task_indices(self, labels: Tensor, tasks: Iterable[int]) -> Tensor:
        """Positions in ``labels`` (remapped) whose task is one of ``tasks``, in increasing order."""
        wanted = torch.zeros(self.num_tasks, dtype=torch.bool)
        for task in tasks:
            wanted[self.check_task(task)] = True
        return torch.nonzero(wanted[self.task_of_label(labels)], as_tuple=True)[0]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_classes={self.num_classes}, num_tasks={self.num_tasks}, "
                f"classes_per_task={self.classes_per_task}, order={list(self.order)})")
