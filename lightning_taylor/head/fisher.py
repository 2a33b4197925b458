"""The pre-tuned head's own diagonal Fisher, in closed form, for the head penalty (docs/method.md §4)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from lightning_taylor.errors import expected
from lightning_taylor.head._rows import class_list, row_index


@torch.no_grad()
def head_fisher(head: nn.Linear, features: Tensor, classes: Sequence[int]) -> tuple[Tensor, Tensor | None, int]:
    """Exact diagonal Fisher of ``head`` over the seen ``classes``, summed over ``features``, in closed form.

    With ``z = W_S h + b_S`` the logits of the seen classes ``S`` and ``p = softmax(z)``,
    ``∂ log p_c / ∂z_o = δ_co − p_o``, so ``Σ_c p_c (δ_co − p_o)² = p_o (1 − p_o)`` and

        F_W[o, i] = Σ_x p_o(x) (1 − p_o(x)) h_i(x)²,     F_b[o] = Σ_x p_o(x) (1 − p_o(x))      (o ∈ S)

    (the true Fisher ``Σ_x Σ_c p_c (∂ log p_c / ∂θ)²``, per example, summed over examples). Rows of
    classes outside ``S`` are zero. The head penalty uses ``ε + sum / count``.

    Returns:
        ``(sum_weight, sum_bias, count)``: sums of ``head.weight``'s and ``head.bias``'s shape and dtype
        (``sum_bias`` is ``None`` for a head without bias) and the number of features.
    """
    index = row_index(head, class_list("classes", classes))
    if features.ndim != 2 or features.shape[1] != head.in_features:
        raise expected("features", f"a tensor of shape (N, {head.in_features})", tuple(features.shape))
    weight = head.weight.detach()
    h = features.detach().to(device=weight.device, dtype=weight.dtype)
    logits = h @ weight[index].T
    if head.bias is not None:
        logits = logits + head.bias.detach()[index]
    # Softmax in at least float32 even for a half-precision head.
    probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1)
    curvature = (probs * (1.0 - probs)).to(weight.dtype)  # N × |S|
    sum_weight = torch.zeros_like(weight)
    sum_weight[index] = curvature.T @ h.square()
    sum_bias = None
    if head.bias is not None:
        sum_bias = torch.zeros_like(head.bias.detach())
        sum_bias[index] = curvature.sum(dim=0)
    return sum_weight, sum_bias, int(h.shape[0])
