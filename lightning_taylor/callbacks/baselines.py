"""Reference points for the results table, on the same machinery as ITA / IEL.

- :class:`SequentialFineTuning`: one delta trained through every task in turn, evaluated alone
  (``θ0 + τ``): the classic catastrophic-forgetting baseline.
- :class:`LinearProbe`: no delta at all; evaluation uses the pre-tuned head ``h̃`` on the frozen
  pre-trained backbone θ0 (docs/method.md §5's probing and alignment alone): what the pre-trained features give.

Unregularised task arithmetic is ``ITA(alpha=0)``; joint training is ITA on a one-task stream.
"""

from __future__ import annotations

from typing import Any

import lightning as L

from lightning_taylor.callbacks.second_order import ITA
from lightning_taylor.deltas import TaskDeltas


class SequentialFineTuning(ITA):
    """One delta, never reset or banked per task, trained on each task in turn without a penalty.

    No task boundary pass (no pre-tuning, no curvature) and no penalty: the optimiser step is only guarded.

    Args:
        **kwargs: see :class:`~lightning_taylor.callbacks.SecondOrder` (``alpha`` is fixed to 0).
    """

    regularised = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(alpha=0.0, **kwargs)

    def begin_delta(self, deltas: TaskDeltas, task: int) -> None:
        if deltas.current_task < 0:
            deltas.begin_task(0)  # the single delta, started once
        self.head_curvature = {}

    def training_composition(self, task: int) -> dict[int, float]:
        return {0: 1.0}

    def evaluation_composition(self, deltas: TaskDeltas) -> dict[int, float] | None:
        return {0: 1.0} if deltas.current_task >= 0 else None


class LinearProbe(ITA):
    """Evaluate the pre-tuned head ``h̃`` on θ0 (no delta); training still runs but is not evaluated.

    Args:
        **kwargs: see :class:`~lightning_taylor.callbacks.SecondOrder` (the Fisher is not needed: use
            ``fisher_estimator: empirical`` to make it cheap).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(alpha=0.0, **kwargs)
        self._trained_head: dict | None = None

    def evaluation_composition(self, deltas: TaskDeltas) -> dict[int, float] | None:
        return {} if deltas.tasks else None  # θ0 alone

    def _compose_for_evaluation(self, pl_module: L.LightningModule) -> None:
        super()._compose_for_evaluation(pl_module)
        head = self.model(pl_module).head
        self._trained_head = {k: v.detach().clone() for k, v in head.state_dict().items()}
        head.load_state_dict({k: v.to(head.weight) for k, v in self.pretuned_head.items()})

    def _restore_head(self, pl_module: L.LightningModule) -> None:
        if self._trained_head is not None:
            self.model(pl_module).head.load_state_dict(self._trained_head)
            self._trained_head = None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_head(pl_module)
        super().on_validation_epoch_end(trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_head(pl_module)
