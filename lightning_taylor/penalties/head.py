"""The head penalty of docs/method.md §4: task t's trainable head rows pulled towards the pre-tuned ``h̃_t``.

    R_head = λ_F Σ F_head ⊙ (h_t − h̃_t)²  +  λ_2 ‖h_t − h̃_t‖²          (no ½, weight and bias)

``F_head`` is the pre-tuned head's own diagonal Fisher on synthetic features (:mod:`lightning_taylor.head.fisher`).
"""

from __future__ import annotations

from torch import Tensor


def head_penalty(
    weight: Tensor,
    bias: Tensor | None,
    target_weight: Tensor,
    target_bias: Tensor | None,
    fisher_weight: Tensor,
    fisher_bias: Tensor | None,
    lambda_fisher: float,
    lambda_l2: float,
) -> Tensor:
    """``λ_F Σ F ⊙ (h − h̃)² + λ_2 ‖h − h̃‖²`` over weight and bias (no ½), differentiable in ``h``."""
    pairs = [(weight, target_weight, fisher_weight)]
    if bias is not None:
        pairs.append((bias, target_bias, fisher_bias))
    total = weight.new_zeros(())
    for value, target, fisher in pairs:
        diff = (value - target).square()
        total = total + lambda_fisher * (fisher * diff).sum() + lambda_l2 * diff.sum()
    return total
