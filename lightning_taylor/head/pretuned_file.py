"""``pretuned_head.safetensors``: the pre-tuned head ``h̃_t`` of every task boundary of a fit, in one file.

At the boundary of task ``t`` the head is pre-tuned over the classes seen so far (docs/method.md §5); that
``h̃_t`` is the head the task's curvature was computed with and the head penalty's target during task ``t``.
The file keeps each boundary's, keyed by task:

    task<t>.weight   (classes × features)      task<t>.bias   (classes)

with the metadata ``format = "pretuned_heads"`` and ``tasks`` (comma-separated, in order). Rows of classes not
yet seen at ``t`` are the initial head's. Files written before per-task heads hold one head, ``weight`` and
``bias``, the last boundary's: :func:`load_pretuned_heads` reads both kinds; :attr:`PretunedHeads.last` is the
last boundary's head either way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from torch import Tensor

from lightning_taylor._safetensors import read_tensors
from lightning_taylor.errors import expected
from lightning_taylor.finite import check_finite

PRETUNED_FILE = "pretuned_head.safetensors"
FORMAT = "pretuned_heads"


def pretuned_tensors(heads: Mapping[int, Mapping[str, Tensor]]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors ``task<t>.<name>`` and the metadata of the file for ``{task: head state}``."""
    tasks = sorted(heads)
    tensors = {f"task{t}.{name}": value.detach().contiguous().cpu() for t in tasks for name, value in heads[t].items()}
    return tensors, {"format": FORMAT, "tasks": ",".join(str(t) for t in tasks)}


@dataclass
class PretunedHeads:
    """A file's heads: ``by_task`` ``{t: {"weight", "bias"}}`` (empty for a single-head file) and ``last``."""

    by_task: dict[int, dict[str, Tensor]]
    last: dict[str, Tensor]
    path: str

    def head(self, task: int) -> dict[str, Tensor]:
        """``h̃_task``; an ``InputError`` when the file does not hold it."""
        if task not in self.by_task:
            hint = ("It holds only the last boundary's head (a file written before per-task heads)."
                    if not self.by_task else "")
            raise expected("task", f"a task whose pre-tuned head {self.path} holds {sorted(self.by_task)}", task,
                           hint)
        return self.by_task[task]


def load_pretuned_heads(path: str | os.PathLike) -> PretunedHeads:
    """Read ``path`` (per-task heads, or one head of an older file); errors name the file and the entry."""
    path = os.fspath(path)
    tensors, metadata = read_tensors(path, "pre-tuned heads")
    check_finite(tensors, f"the pre-tuned heads in {path}")
    if metadata.get("format") != FORMAT:  # one head: the last boundary's
        if set(tensors) != {"weight", "bias"}:
            raise expected(f"tensors` of `{path}", "per-task heads (format metadata) or one head's weight and bias",
                           sorted(tensors)[:4])
        return PretunedHeads({}, tensors, path)
    try:
        tasks = [int(t) for t in metadata.get("tasks", "").split(",")]
    except ValueError:
        raise expected(f"tasks` of `{path}", "comma-separated task indices in the metadata",
                       metadata.get("tasks")) from None
    by_task = {t: {name: tensors.get(f"task{t}.{name}") for name in ("weight", "bias")} for t in tasks}
    missing = [f"task{t}.{n}" for t, head in by_task.items() for n, v in head.items() if v is None]
    extra = sorted(set(tensors) - {f"task{t}.{n}" for t in tasks for n in ("weight", "bias")})
    if missing or extra:
        raise expected(f"tensors` of `{path}", f"task<t>.weight and task<t>.bias for the tasks {tasks}",
                       (missing or extra)[:4])
    return PretunedHeads(by_task, by_task[tasks[-1]], path)
