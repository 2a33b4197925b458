"""Class-incremental split: a fixed class order, labels remapped to positions in it, contiguous tasks.

The original classes are put in a fixed order ``order`` (a seeded permutation, or ``0..C-1``), and every
label ``c`` is remapped to its position in that order, ``order.index(c)``. The **class partition** then
cuts the remapped labels ``0..C-1`` into ``T`` contiguous ranges, one per task: task ``t`` owns
``task_ranges[t] = range(s_t, s_t + n_t)`` with ``n_t`` its number of classes. It is the stream's one
source of truth for which task owns which labels. The common case is uniform (``n_t = k = C / T`` for every
task, so task ``t`` owns ``[t·k, (t+1)·k)`` and the task of a label is ``y // k``); a benchmark may be
uneven (Stanford Cars: 9 tasks of 20 classes and one of 16). The head and the metrics rely on the
contiguity (one head slice per task).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor

from lightning_taylor._checks import check_non_negative_int, check_positive_int
from lightning_taylor.errors import expected


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


def task_ranges(task_sizes: Sequence[int]) -> tuple[range, ...]:
    """The contiguous label range of every task, given each task's number of classes (in task order)."""
    ranges, start = [], 0
    for size in task_sizes:
        ranges.append(range(start, start + size))
        start += size
    return tuple(ranges)


def classes_of(tasks: Iterable[int], ranges: Sequence[range]) -> list[int]:
    """The labels owned by ``tasks`` (in task order), given every task's label range (:func:`task_ranges`)."""
    return [c for t in sorted(tasks) for c in ranges[t]]


def uniform_size(task_sizes: Sequence[int]) -> int | None:
    """The classes of every task when all tasks have as many, else ``None`` (an uneven partition)."""
    return task_sizes[0] if len(set(task_sizes)) == 1 else None


def check_task_sizes(task_sizes: Sequence[int], num_classes: int) -> tuple[int, ...]:
    """``task_sizes`` as a tuple, if it is a list of ints >= 1 that sum to ``num_classes``."""
    sizes = tuple(task_sizes) if isinstance(task_sizes, (list, tuple)) else None
    if (not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes)
            or sum(sizes) != num_classes):
        raise expected("task_sizes", f"a non-empty list of ints >= 1 (classes of each task) summing to the "
                       f"{num_classes} classes", task_sizes)
    return sizes


class ClassIncrementalSplit:
    """A fixed class order and the class partition into tasks (pure bookkeeping, no data).

    Args:
        num_classes: number of classes ``C`` in the data set.
        num_tasks: number of tasks ``T``; must divide ``C`` unless ``task_sizes`` is given.
        order: original class at each remapped label (a permutation of ``0..C-1``), e.g. from
            :func:`class_order`.
        task_sizes: classes of each task in task order (``T`` ints summing to ``C``, e.g. ``[20] * 9 + [16]``);
            ``None``: ``T`` tasks of ``C / T`` classes.
    """

    def __init__(self, num_classes: int, num_tasks: int, order: Sequence[int],
                 task_sizes: Sequence[int] | None = None) -> None:
        check_positive_int("num_classes", num_classes)
        if task_sizes is None:
            if (isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1
                    or num_classes % num_tasks):
                raise expected("num_tasks", f"an int >= 1 that divides the {num_classes} classes", num_tasks)
            task_sizes = (num_classes // num_tasks,) * num_tasks
        sizes = check_task_sizes(task_sizes, num_classes)
        if num_tasks != len(sizes):
            raise expected("num_tasks", f"the number of tasks of the class partition {list(sizes)}", num_tasks)
        order = [int(c) for c in order]
        if sorted(order) != list(range(num_classes)):
            raise expected("order", f"a permutation of 0..{num_classes - 1}", order)
        self.num_classes = num_classes
        self.num_tasks = num_tasks
        self.task_sizes: tuple[int, ...] = sizes
        self.task_ranges: tuple[range, ...] = task_ranges(sizes)
        #: task owning each remapped label (a lookup table, so uneven partitions cost what uniform ones do)
        self.label_task = torch.repeat_interleave(torch.arange(num_tasks), torch.tensor(sizes))
        self.order: tuple[int, ...] = tuple(order)
        # position[c] = remapped label of original class c (the inverse permutation).
        self.position = torch.empty(num_classes, dtype=torch.long)
        self.position[torch.tensor(order, dtype=torch.long)] = torch.arange(num_classes)

    @property
    def uniform(self) -> bool:
        """Whether every task has the same number of classes."""
        return uniform_size(self.task_sizes) is not None

    @property
    def classes_per_task(self) -> int:
        """Classes of every task ``k = C / T``; only defined for a uniform partition (see :attr:`task_sizes`)."""
        if not self.uniform:
            raise expected("classes_per_task", "defined, i.e. a stream whose tasks all have as many classes",
                           f"the uneven class partition {list(self.task_sizes)}",
                           "Read the partition from `task_sizes` / `task_ranges` instead.")
        return self.task_sizes[0]

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
        """The remapped labels owned by ``task`` (``range(task·k, (task+1)·k)`` when uniform)."""
        return self.task_ranges[self.check_task(task)]

    def task_of_label(self, label: int | Tensor) -> int | Tensor:
        """Task owning a remapped label (``label // k`` when uniform); works elementwise on tensors."""
        if isinstance(label, Tensor):
            return self.label_task.to(label.device)[label]
        check_non_negative_int("label", label)
        if label >= self.num_classes:
            raise expected("label", f"a remapped label in 0..{self.num_classes - 1}", label)
        return int(self.label_task[label])

    def task_indices(self, labels: Tensor, tasks: Iterable[int]) -> Tensor:
        """Positions in ``labels`` (remapped) whose task is one of ``tasks``, in increasing order."""
        wanted = torch.zeros(self.num_tasks, dtype=torch.bool)
        for task in tasks:
            wanted[self.check_task(task)] = True
        return torch.nonzero(wanted[self.task_of_label(labels)], as_tuple=True)[0]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_classes={self.num_classes}, num_tasks={self.num_tasks}, "
                f"task_sizes={list(self.task_sizes)}, order={list(self.order)})")
