"""The curvature of the method, one strategy per kind, behind one small interface.

A strategy owns its accumulator (sums and counts across tasks, :mod:`lightning_taylor.curvature.accumulators`)
and answers four things for :class:`~lightning_taylor.callbacks.SecondOrder`:

- :meth:`~CurvatureStrategy.estimate`: the task's sums at θ0 with the pre-tuned head, on this process's shard,
  then summed across processes (every rank reaches the collective);
- :meth:`~CurvatureStrategy.penalty`: the current slot's penalty and its gradients (ITA: the past tasks'
  curvature; IEL: the tasks so far, docs/method.md §3–4);
- :meth:`~CurvatureStrategy.artifact`: the file written at the end of ``fit``, its tensors and metadata;
- :meth:`~CurvatureStrategy.state_dict` / :meth:`~CurvatureStrategy.load_state_dict`: the checkpointed sums.

:class:`DiagonalCurvature` is the paper's diagonal Fisher; :class:`KFACCurvature` its Kronecker-factored
follow-up (``curvature: kfac``).
"""

from __future__ import annotations

import json
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from torch import Tensor

from lightning_taylor.callbacks._boundary import BACKBONE_PREFIX, CurvaturePass
from lightning_taylor.callbacks._settings import CurvatureSettings
from lightning_taylor.console import show
from lightning_taylor.curvature import (
    FisherAccumulator,
    FisherSums,
    KroneckerAccumulator,
    KroneckerSums,
    check_factor_memory,
    diagonal_fisher,
    kronecker_sums,
)
from lightning_taylor.deltas import TaskDeltas
from lightning_taylor.penalties import (
    Algorithm,
    delta_penalty,
    kfac_delta_penalty,
    prepare_curvature,
)


class CurvatureStrategy:
    """The interface of the module docstring; ``accumulator`` is checkpointed through :meth:`state_dict`."""

    accumulator: FisherAccumulator | KroneckerAccumulator

    def __init__(self, settings: CurvatureSettings) -> None:
        self.settings = settings
        self._prepared: Any = None  # derived from the accumulator on the device, once per task

    def estimate(self, trainer: L.Trainer, deltas: TaskDeltas, task: int, data: CurvaturePass, prefix: str
                 ) -> FisherSums | KroneckerSums:
        """Task ``task``'s sums over ``data``, reduced across processes; ``prefix`` (``[ITA]``) starts the message."""
        raise NotImplementedError

    def set_task(self, task: int, sums: FisherSums | KroneckerSums) -> None:
        """Record ``task``'s reduced sums (the previous task's join the past)."""
        self.accumulator.set_task(task, sums)
        self._prepared = None

    def penalty(self, deltas: TaskDeltas, algorithm: Algorithm, strength: float, device: torch.device
                ) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def artifact(self) -> tuple[str, dict[str, Tensor], dict[str, str]]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return self.accumulator.get_extra_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accumulator.set_extra_state(state)
        self._prepared = None


def _strip(sums: dict[str, Any]) -> dict[str, Any]:
    return {name[len(BACKBONE_PREFIX):]: value for name, value in sums.items()}


class DiagonalCurvature(CurvatureStrategy):
    """The diagonal Fisher ``F̄`` (docs/method.md §3), saved as ``fisher.safetensors``."""

    def __init__(self, settings: CurvatureSettings) -> None:
        super().__init__(settings)
        self.accumulator = FisherAccumulator(settings.prior)

    def estimate(self, trainer: L.Trainer, deltas: TaskDeltas, task: int, data: CurvaturePass, prefix: str
                 ) -> FisherSums:
        names = [f"{BACKBONE_PREFIX}{name}.weight" for name in deltas.names]
        config = self.settings.estimator_config
        # A progress bar on rank zero when the trainer shows bars (a long pass: C backward rows per example).
        bar = None
        if trainer.is_global_zero and trainer.progress_bar_callback is not None:
            bar = Tqdm(total=len(data.shard.sampler), desc=f"Fisher ({config['estimator']})", leave=False,
                       unit="img", dynamic_ncols=True)
        try:
            fisher = diagonal_fisher(data.classifier, data.batches, names, **config, generator=data.generator,
                                     progress=None if bar is None else (lambda n: bar.update(n - bar.n)))
        finally:
            if bar is not None:
                bar.close()
        fisher.all_reduce()  # every rank reaches this collective; sums and counts, divided later
        fisher.sums = _strip(fisher.sums)
        show(trainer, f"{prefix} Fisher ({fisher.estimator}) over {fisher.count} examples")
        return fisher

    def mean(self, algorithm: Algorithm, device: torch.device) -> dict[str, Tensor]:
        """``F̄_<t`` (ITA) or ``F̄_≤t`` (IEL) on ``device``."""
        if self._prepared is None or next(iter(self._prepared.values())).device != device:
            mean = self.accumulator.curvature(include_current=algorithm == "iel")
            self._prepared = {k: v.to(device) for k, v in mean.items()}
        return self._prepared

    def penalty(self, deltas: TaskDeltas, algorithm: Algorithm, strength: float, device: torch.device
                ) -> tuple[Tensor, dict[str, Tensor]]:
        return delta_penalty(deltas, self.mean(algorithm, device), algorithm, strength)

    def artifact(self) -> tuple[str, dict[str, Tensor], dict[str, str]]:
        """``fisher.safetensors``: the mean diagonal Fisher over all tasks, prior included."""
        accumulator = self.accumulator
        return "fisher.safetensors", accumulator.curvature(include_current=True), {
            "kind": "mean diagonal Fisher at θ0 over all tasks, prior included",
            "estimators": ",".join(accumulator.estimators), "prior": str(self.settings.prior),
            "examples": str(accumulator.past_count + accumulator.current_count),
            **self.settings.estimator_record()}


class KFACCurvature(CurvatureStrategy):
    """Per target layer ``Ā ⊗ Ḡ`` (docs/method.md §8, :mod:`lightning_taylor.curvature.kfac`), saved as
    ``kfac.safetensors``; the penalty in Kronecker form (:mod:`lightning_taylor.penalties.kfac`)."""

    def __init__(self, settings: CurvatureSettings) -> None:
        super().__init__(settings)
        self.accumulator = KroneckerAccumulator(settings.kfac_tasks)

    def estimate(self, trainer: L.Trainer, deltas: TaskDeltas, task: int, data: CurvaturePass, prefix: str
                 ) -> KroneckerSums:
        self._check_memory(deltas, task)
        settings = self.settings
        sums = kronecker_sums(data.classifier, data.batches, [f"{BACKBONE_PREFIX}{name}" for name in deltas.names],
                              settings.estimator, settings.kfac_approx, settings.samples, data.generator)
        sums.all_reduce()  # every rank reaches this collective; sums and counts, divided later
        sums.inputs, sums.grads, sums.tokens = _strip(sums.inputs), _strip(sums.grads), _strip(sums.tokens)
        show(trainer, f"{prefix} KFAC ({sums.approx}, {sums.estimator}) over {sums.count} examples")
        return sums

    def _check_memory(self, deltas: TaskDeltas, task: int) -> None:
        """Refuse, before computing them, factors that would not fit the device (``InputError`` on ``curvature``).

        A task adds its sums and the penalty's means; merged, a transient pooled pair (3 pairs), per task,
        one mean pair per task (``task + 2`` pairs).
        """
        weights = [linear.weight for _, _, linear in deltas.layers()]
        shapes = {name: tuple(linear.weight.shape) for name, _, linear in deltas.layers()}
        pairs = 3 if self.settings.kfac_tasks == "merged" else task + 2
        check_factor_memory(shapes, pairs, weights[0].dtype, weights[0].device, self.settings.kfac_tasks)

    def penalty(self, deltas: TaskDeltas, algorithm: Algorithm, strength: float, device: torch.device
                ) -> tuple[Tensor, dict[str, Tensor]]:
        if self._prepared is None:  # once per task (reset at every boundary and on load): C, M, the means
            factors = self.accumulator.factors(include_current=algorithm == "iel")
            self._prepared = prepare_curvature(deltas, factors, algorithm, self.settings.prior, device)
        return kfac_delta_penalty(deltas, self._prepared, algorithm, strength)

    def artifact(self) -> tuple[str, dict[str, Tensor], dict[str, str]]:
        """``kfac.safetensors``: the per-example means ``<layer>.A`` (Ā, in × in) and ``<layer>.G`` (Ḡ, out × out)
        of the pooled tasks (``merged``), or ``<layer>.A.task<t>`` / ``<layer>.G.task<t>`` per task (``per_task``:
        the curvature is ``Σ_t (n_t / N) Ā_t ⊗ Ḡ_t`` with the counts ``n_t`` of the metadata); no prior; the token
        count of every layer as JSON (:mod:`lightning_taylor.curvature.kfac_file`, read by ``load_kfac``)."""
        accumulator, settings = self.accumulator, self.settings
        stored = accumulator.stored()
        tasks = [str(r["task"]) for r in accumulator.records]
        tensors: dict[str, Tensor] = {}
        for task, sums in zip(tasks if settings.kfac_tasks == "per_task" else [None], stored):
            suffix = "" if task is None else f".task{task}"
            for name, (a, g) in sums.factors().items():
                tensors[f"{name}.A{suffix}"], tensors[f"{name}.G{suffix}"] = a, g
        return "kfac.safetensors", tensors, {
            "kind": f"KFAC factors (per-example means) at θ0, {settings.kfac_tasks}; prior not included",
            "approximation": settings.kfac_approx, "tasks_combined": settings.kfac_tasks,
            "prior": str(settings.prior), "estimators": ",".join(r["estimator"] for r in accumulator.records),
            "tasks": ",".join(tasks), "counts": ",".join(str(r["count"]) for r in accumulator.records),
            "examples": str(accumulator.count), "tokens": json.dumps(stored[0].tokens), **settings.estimator_record()}


def curvature_strategy(settings: CurvatureSettings) -> CurvatureStrategy:
    """The strategy of ``settings.kind``."""
    return {"diagonal": DiagonalCurvature, "kfac": KFACCurvature}[settings.kind](settings)
