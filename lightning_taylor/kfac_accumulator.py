"""KFAC factors across the tasks of a stream, and the memory they need (the ``curvature: kfac`` option).

Task ``s`` contributes its Kronecker sums ``(A_s, G_s)`` over ``n_s`` examples (:class:`~lightning_taylor.kfac.
KroneckerSums`, reduced across processes). The curvature of a set ``S`` of tasks (``s < t`` for ITA,
``s ≤ t`` for IEL, as for the diagonal Fisher, docs/method.md §3), per example over ``N = Σ_{s∈S} n_s``:

    exact sum:  F̄ = Σ_{s∈S} (n_s / N) Ā_s ⊗ Ḡ_s                      (``tasks="per_task"``: T pairs kept)
    merged:     F̄ ≈ (Σ_s A_s / (N·k)) ⊗ (Σ_s G_s / N)                 (``tasks="merged"``: one pair kept)

``k`` the token scale of :class:`KroneckerSums`. ``merged`` is KFAC of the pooled examples, i.e. the
example-weighted mean of the ``Ā_s`` times the summed ``G_s`` (of the summed loss) per example: TAK's choice,
constant memory; it equals the exact sum when the tasks share one ``Ā`` or one ``Ḡ``. ``per_task`` keeps
one pair per task and costs one Kronecker product per task in every penalty step. The prior ``ε`` is not
part of the factors: the penalties add ``ε ‖τ‖²`` (:mod:`lightning_taylor.kfac_penalties`).

:class:`KroneckerAccumulator` keeps the sums and counts (never the means: a resumed run and one process
against N give the same factors) and checkpoints them as plain tensors and numbers.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any, Literal, Mapping

import torch
from torch import Tensor, nn

from lightning_taylor._checks import check_choice, check_non_negative, expected
from lightning_taylor.kfac import KroneckerSums, factor_memory

KFACTasks = Literal["merged", "per_task"]

#: ``{layer: [(Ā_k, Ḡ_k), …]}``: the curvature ``Σ_k Ā_k ⊗ Ḡ_k`` of each layer (weights folded into ``Ā_k``).
Factors = dict[str, list[tuple[Tensor, Tensor]]]


class KroneckerAccumulator(nn.Module):
    """Kronecker sums and counts across tasks; ``factors(include_current)`` gives the curvature of the module docstring.

    ``terms`` holds the finished tasks' sums — one pooled :class:`KroneckerSums` (``merged``) or one per task
    (``per_task``) — and ``current`` the current task's. ``records`` keeps, per task, how its factors were
    made: ``{"task", "estimator", "approx", "count"}``.
    """

    def __init__(self, tasks: KFACTasks = "merged") -> None:
        super().__init__()
        check_choice("kfac_tasks", tasks, ("merged", "per_task"))
        self.tasks = tasks
        self.terms: list[KroneckerSums] = []
        self.current: KroneckerSums | None = None
        self.current_task = -1
        self.records: list[dict[str, Any]] = []

    def set_task(self, task: int, sums: KroneckerSums) -> None:
        """Record task ``task``'s sums; the previous task's move into ``terms`` (pooled when ``merged``)."""
        if task <= self.current_task:
            raise expected("task", f"an index after the last recorded task {self.current_task}", task)
        if self.current is not None:
            if self.tasks == "merged" and self.terms:
                self.terms = [_pooled([self.terms[0], self.current])]
            else:
                self.terms.append(self.current)
        self.current = _detached(sums)
        self.current_task = task
        self.records.append({"task": task, "estimator": sums.estimator, "approx": sums.approx, "count": sums.count})

    @property
    def count(self) -> int:
        """Examples of every recorded task."""
        return sum(t.count for t in self._included(True))

    def _included(self, include_current: bool) -> list[KroneckerSums]:
        return self.terms + ([self.current] if include_current and self.current is not None else [])

    def factors(self, include_current: bool) -> Factors:
        """``{layer: [(Ā_k, Ḡ_k)]}``: one pair (merged), one per task (per_task), none before any task (ITA's t = 0)."""
        included = self._included(include_current)
        if not included:
            return {name: [] for name in (self.current.inputs if self.current is not None else {})}
        if self.tasks == "merged":
            return {name: [pair] for name, pair in _pooled(included).factors().items()}
        total = sum(t.count for t in included)
        out: Factors = {}
        for sums in included:
            for name, (a, g) in sums.factors().items():
                out.setdefault(name, []).append((a * (sums.count / total), g))
        return out

    def stored(self) -> list[KroneckerSums]:
        """Every recorded task's sums: pooled into one (``merged``), or one per task in task order (``per_task``)."""
        included = self._included(True)
        return [_pooled(included)] if self.tasks == "merged" and included else included

    def get_extra_state(self) -> dict[str, Any]:
        return {"tasks": self.tasks, "terms": [asdict(t) for t in self.terms],
                "current": None if self.current is None else asdict(self.current),
                "current_task": self.current_task, "records": self.records}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.tasks, self.current_task, self.records = state["tasks"], state["current_task"], state["records"]
        self.terms = [KroneckerSums(**t) for t in state["terms"]]
        self.current = None if state["current"] is None else KroneckerSums(**state["current"])

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, current_task={self.current_task}, terms={len(self.terms)}"


def _detached(sums: KroneckerSums) -> KroneckerSums:
    return KroneckerSums({k: v.detach().clone() for k, v in sums.inputs.items()},
                         {k: v.detach().clone() for k, v in sums.grads.items()},
                         sums.count, sums.tokens, sums.estimator, sums.approx)


def _pooled(parts: list[KroneckerSums]) -> KroneckerSums:
    """The sums and counts of ``parts`` added (KFAC of their pooled examples)."""
    first = parts[0]
    for part in parts[1:]:
        if (part.tokens, part.approx) != (first.tokens, first.approx):
            raise expected("kfac_approx", f"one approximation and token count over the tasks "
                           f"({first.approx}, {first.tokens} tokens)", (part.approx, part.tokens))
    return KroneckerSums({k: sum(p.inputs[k] for p in parts) for k in first.inputs},
                         {k: sum(p.grads[k] for p in parts) for k in first.grads},
                         sum(p.count for p in parts), first.tokens, first.estimator, first.approx)


# -- memory ---------------------------------------------------------------------------------------------
def available_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on ``device``: CUDA's free memory, else the host's available RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:  # MemAvailable counts reclaimable page cache, unlike sysconf's free pages
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_factor_memory(shapes: Mapping[str, tuple[int, int]], pairs: int, dtype: torch.dtype,
                        device: torch.device, tasks: str) -> None:
    """Refuse, before computing, factors that would not fit: ``pairs · Σ (in² + out²)`` numbers of ``dtype``.

    ``pairs`` counts the factor pairs the next task adds (its sums, the penalty's means; ``per_task`` adds
    one more stored pair per task).
    """
    check_non_negative("pairs", pairs)
    needed = pairs * factor_memory(shapes) * torch.empty((), dtype=dtype).element_size()
    free = available_memory(device)
    if needed > free:
        hint = ("`kfac_tasks: merged` keeps one pair whatever the number of tasks; " if tasks == "per_task" else "")
        raise expected("curvature", f"a curvature whose factors fit in {device} ({free / 2**30:.2f} GiB free)",
                       "kfac", f"The KFAC factors of this task need {needed / 2**30:.2f} GiB ({pairs} pairs of "
                       f"{factor_memory(shapes):,} numbers, {dtype}). {hint}Use `curvature: diagonal`, fewer "
                       "`targets`, or a device with more memory.")
