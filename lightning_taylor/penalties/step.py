"""How a penalty enters training: the algorithm, the size of IEL's composition, the decoupled step.

- ``Algorithm``: ``"ita"`` or ``"iel"``;
- :func:`iel_members`: ``T``, the members of the uniform composition (``T = 2`` at task 0: θ0 is a phantom
  second member, as in the reference);
- :func:`decoupled_step`: the reference's penalty step, applied once per optimiser step before the optimiser's
  own update, like decoupled weight decay (docs/method.md §4).
"""

from __future__ import annotations

from typing import Literal, Mapping

import torch
from torch import Tensor, nn

from lightning_taylor._checks import check_non_negative_int

Algorithm = Literal["ita", "iel"]


def iel_members(task_index: int) -> int:
    """``T``: the number of members of the uniform composition at ``task_index`` (2 at task 0)."""
    check_non_negative_int("task_index", task_index)
    return max(task_index + 1, 2)


@torch.no_grad()
def decoupled_step(
    parameters: Mapping[str, nn.Parameter], grads: Mapping[str, Tensor], lr_factor: float, max_norm: float = 100.0
) -> None:
    """``θ ← θ − s · clip(∂R/∂θ)``: the reference's decoupled penalty step, like decoupled weight decay.

    ``s`` is the learning-rate schedule's current factor (1.0 at a task's start), not the learning rate;
    each tensor's gradient is clipped to L2 norm ``max_norm`` on its own.
    """
    for key, grad in grads.items():
        norm = grad.norm()
        if norm > max_norm:
            grad = grad * (max_norm / norm)
        parameters[key].sub_(lr_factor * grad)
