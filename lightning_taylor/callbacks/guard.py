"""The non-finite guard of the ITA / IEL training step: stop (or skip the step) before anything breaks.

Once per optimiser step (after gradient accumulation, before the penalty is applied and the optimiser
moves), the guard tests, in one fused check (:func:`lightning_taylor.finite.all_finite`, one device sync):

- the losses of the step (every micro-batch's, recorded by ``on_before_backward``),
- the gradients of the trainable tensors (the current delta's slot and the head),
- the penalty's gradients,
- the trainable tensors themselves.

With ``on_non_finite="raise"`` (the default) a failed check raises :class:`~lightning_taylor.finite.NonFiniteError`
naming the task, the optimiser step and the first non-finite tensor. Because it is raised inside the step,
nothing of the broken step is saved: Lightning writes no checkpoint on an exception, and the callbacks'
``on_save_checkpoint`` refuses to write a non-finite state in any case, so the last checkpoint stays the last
good one.

With ``"skip_step"`` a step whose loss or gradients are non-finite is dropped: every gradient is set to
``None``, so the optimiser leaves the parameters *and its moments* untouched, and the penalty is not applied;
a warning counts the skipped steps. A non-finite trainable tensor is an error in both modes (no later step
can repair it).

Under mixed precision with a gradient scaler (``precision="16-mixed"``) inf gradients are expected and the
scaler already skips those steps, so the guard leaves the losses and gradients to it and checks the rest.
Under DDP the decision is all-reduced, so every process raises or skips together.
"""

from __future__ import annotations

import logging
from typing import Literal, Mapping, get_args

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_taylor._checks import check_choice
from lightning_taylor.finite import NonFiniteError, all_finite, first_non_finite

log = logging.getLogger(__name__)

OnNonFinite = Literal["raise", "skip_step"]


class StepGuard:
    """Per-step finiteness check (see the module docstring); plain state, nothing to checkpoint but a count."""

    def __init__(self, mode: OnNonFinite = "raise") -> None:
        check_choice("on_non_finite", mode, get_args(OnNonFinite))
        self.mode = mode
        self.skipped = 0
        self._losses: list[Tensor] = []

    def add_loss(self, loss: Tensor) -> None:
        """Record a micro-batch's loss (``on_before_backward``); cleared at every optimiser step."""
        self._losses.append(loss.detach())

    def check_step(self, trainer: L.Trainer, label: str, params: Mapping[str, nn.Parameter],
                   penalty_grads: Mapping[str, Tensor]) -> bool:
        """True when the step may go on; False to skip it (``skip_step``); raises otherwise.

        Args:
            label: names the run's place in messages, e.g. ``"[ITA] task 2"``.
            params: the trainable tensors by name (their ``.grad`` is checked too).
            penalty_grads: the penalty's gradients by name.
        """
        losses, self._losses = self._losses, []
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        step: list[tuple[str, Tensor]] = []
        if not scaled:
            step += [(f"loss (micro-batch {i})", loss) for i, loss in enumerate(losses)]
            step += [(f"{name}.grad", p.grad) for name, p in params.items() if p.grad is not None]
        step += [(f"penalty gradient of {name}", grad) for name, grad in penalty_grads.items()]
        state = list(params.items())
        finite = all_finite(t for _, t in state + step)
        if trainer.world_size > 1:  # every process takes the same decision
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            return True
        where = f"{label}, optimiser step {trainer.global_step}"
        bad_state = first_non_finite(state)
        if bad_state is not None:
            name, description = bad_state
            raise NonFiniteError(f"{where}: the trainable tensor `{name}` is non-finite ({description}); the fit is "
                                 "stopped before anything is saved (the last checkpoint is the last good state).")
        if self.mode == "skip_step":
            self.skipped += 1
            for p in params.values():
                p.grad = None  # the optimiser skips tensors without a gradient: parameters and moments stay
            rank_zero_warn(f"{where}: non-finite loss or gradient, step skipped ({self.skipped} so far).")
            return False
        bad = first_non_finite(step)
        name, description = bad if bad is not None else ("a tensor of another process", "non-finite values")
        raise NonFiniteError(
            f"{where}: `{name}` is non-finite ({description}). The fit is stopped before anything is saved (the last "
            "checkpoint is the last good state). Usual causes: a learning rate or strength too large, non-finite "
            "inputs; `on_non_finite: skip_step` drops such steps instead.")

