"""Curvature sums and counts across the tasks of a stream: diagonal (:class:`FisherAccumulator`) and KFAC
(:class:`KroneckerAccumulator`).

Both keep sums and example counts (never means), so a resumed run and one process against N give the same
curvature, and both checkpoint as plain tensors and numbers. The curvature of a set ``S`` of tasks is ``s < t``
for ITA and ``s ≤ t`` for IEL (docs/method.md §3).

**Diagonal.** ``F̄_S = ε + Σ_{s∈S} F_s / Σ_{s∈S} n_s`` (only ε for ITA at ``t = 0``), with the true example
counts (the reference's ITA normaliser counts task 0 twice; we do not).

**KFAC.** Task ``s`` contributes its Kronecker sums ``(A_s, G_s)`` over ``n_s`` examples
(:class:`~lightning_taylor.curvature.kfac.KroneckerSums`, reduced across processes); per example over
``N = Σ_{s∈S} n_s``:

    exact sum:  F̄ = Σ_{s∈S} (n_s / N) Ā_s ⊗ Ḡ_s                      (``tasks="per_task"``: T pairs kept)
    merged:     F̄ ≈ (Σ_s A_s / (N·k)) ⊗ (Σ_s G_s / N)                 (``tasks="merged"``: one pair kept)

``k`` the token scale of :class:`KroneckerSums`, per layer (that layer's ``T`` with ``expand``, 1 with
``reduce``; the tasks must agree on it). ``merged`` is KFAC of the pooled examples, i.e. the example-weighted
mean of the ``Ā_s`` times the summed ``G_s`` (of the summed loss) per example: TAK's choice, constant memory;
it equals the exact sum when the tasks share one ``Ā`` or one ``Ḡ``. ``per_task`` keeps one pair per task and
costs one Kronecker product per task in every penalty step. The prior ``ε`` is not part of the factors: the
penalties add ``ε ‖τ‖²`` (:mod:`lightning_taylor.penalties.kfac`).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_taylor._checks import check_choice, check_non_negative
from lightning_taylor.curvature.diagonal import FisherSums
from lightning_taylor.curvature.kfac import KroneckerSums
from lightning_taylor.errors import expected

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
            _check_compatible(self.current, sums)  # also for per_task: the saved file has one count per layer
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
                         sums.count, dict(sums.tokens), sums.estimator, sums.approx)


def _check_compatible(first: KroneckerSums, part: KroneckerSums) -> None:
    """One approximation and one token count per layer over the tasks (the tasks' images have one size)."""
    if part.approx != first.approx:
        raise expected("kfac_approx", f"one approximation over the tasks ({first.approx})", part.approx)
    differ = [n for n in first.tokens if part.tokens.get(n) != first.tokens[n]]
    if differ:
        name = differ[0]
        raise expected("tokens", f"one token count of `{name}` over the tasks ({first.tokens[name]})",
                       part.tokens.get(name), "The tasks' images must have one size.")


def _pooled(parts: list[KroneckerSums]) -> KroneckerSums:
    """The sums and counts of ``parts`` added (KFAC of their pooled examples)."""
    first = parts[0]
    for part in parts[1:]:
        _check_compatible(first, part)
    return KroneckerSums({k: sum(p.inputs[k] for p in parts) for k in first.inputs},
                         {k: sum(p.grads[k] for p in parts) for k in first.grads},
                         sum(p.count for p in parts), dict(first.tokens), first.estimator, first.approx)


class FisherAccumulator(nn.Module):
    """Fisher sums and counts across tasks: ``past`` = Σ_{s<t} (F_s, n_s) and ``current`` = (F_t, n_t).

    ITA at task t uses ``F̄_<t = ε + Σ_{s<t} F_s / Σ_{s<t} n_s`` (only ε at t = 0); IEL uses
    ``F̄_≤t = ε + Σ_{s≤t} F_s / Σ_{s≤t} n_s``. Counts are true example counts (the reference's ITA
    normaliser counts task 0 twice; we do not). The state is checkpointed as plain tensors and numbers.
    ``records`` keeps, per task, how its Fisher was made: ``{"task", "estimator", "count", "settings"}``.
    """

    def __init__(self, prior: float = 1e-5) -> None:
        super().__init__()
        check_non_negative("prior", prior)
        self.prior = prior
        self.past: dict[str, Tensor] = {}
        self.past_count = 0
        self.current: dict[str, Tensor] = {}
        self.current_count = 0
        self.current_task = -1
        self.estimators: list[str] = []
        self.records: list[dict[str, Any]] = []

    def set_task(self, task: int, fisher: FisherSums) -> None:
        """Record ``F_task``; the previous task's sums move into ``past`` first."""
        if task <= self.current_task:
            raise expected("task", f"an index after the last recorded task {self.current_task}", task)
        if self.current_task >= 0:
            for key, value in self.current.items():
                self.past[key] = self.past[key] + value if key in self.past else value.clone()
            self.past_count += self.current_count
        self.current = {k: v.detach().clone() for k, v in fisher.sums.items()}
        self.current_count = fisher.count
        self.current_task = task
        self.estimators.append(fisher.estimator)
        self.records.append({"task": task, "estimator": fisher.estimator, "count": fisher.count,
                             "settings": dict(fisher.settings)})

    def curvature(self, include_current: bool) -> dict[str, Tensor]:
        """``ε + Σ F / Σ n`` over past tasks, plus the current one when ``include_current`` (IEL)."""
        out = {}
        for key, current in self.current.items():
            total, count = self.past.get(key, torch.zeros_like(current)), self.past_count
            if include_current:
                total, count = total + current, count + self.current_count
            out[key] = self.prior + (total / count if count else torch.zeros_like(total))
        return out

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "prior": self.prior, "past": self.past, "past_count": self.past_count, "current": self.current,
            "current_count": self.current_count, "current_task": self.current_task, "estimators": self.estimators,
            "records": self.records,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def extra_repr(self) -> str:
        return (f"prior={self.prior}, current_task={self.current_task}, past_count={self.past_count}, "
                f"current_count={self.current_count}, tensors={len(self.current)}")
