"""Cotangents on the logits that define every Fisher estimator, shared by the diagonal Fisher and KFAC.

With softmax outputs ``p`` over ``C`` classes, ``∂ log p_c / ∂z = e_c − p``; an estimator is a set of ``K``
cotangents ``v`` per example whose outer products sum to (an estimate of) ``diag(p) − p pᵀ``
(:mod:`lightning_taylor.curvature.diagonal` has the table of estimators, their bias and cost):

- ``exact`` / ``topk``: ``√p_c (e_c − p)`` for every class ``c`` (for the ``k`` chosen classes);
- ``mc``: ``(e_y − p) / √S`` for ``S`` labels ``y ~ p`` drawn by inverse-CDF sampling from uniforms, so the
  same uniforms give the same labels whatever the batching;
- ``empirical``: ``e_y − p`` for the true label ``y``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_taylor.errors import expected


def probabilities(logits: Tensor) -> Tensor:
    """Softmax in at least float32, returned in the logits' dtype (float64 stays float64)."""
    return logits.detach().to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1).to(logits.dtype)


def topk_classes(probs: Tensor, top_k: int) -> Tensor:
    """The reference's truncation: the ``top_k`` classes most often among the examples' ``top_k`` most
    probable classes (ties: lower class index first)."""
    top = probs.topk(min(top_k, probs.shape[1]), dim=1).indices
    counts = torch.bincount(top.reshape(-1), minlength=probs.shape[1])
    return counts.argsort(descending=True, stable=True)[:top_k]


def cotangents(
    probs: Tensor, estimator: str, classes: Tensor | None, uniforms: Tensor | None, labels: Tensor | None
) -> Tensor:
    """The estimator's cotangents on the logits, ``K × B × C`` (see the module docstring)."""
    num_classes = probs.shape[1]
    if estimator in ("exact", "topk"):
        chosen = torch.arange(num_classes, device=probs.device) if classes is None else classes.to(probs.device)
        onehot = F.one_hot(chosen, num_classes).to(probs.dtype)                     # K × C
        return probs[:, chosen].T.sqrt().unsqueeze(-1) * (onehot.unsqueeze(1) - probs)  # K × B × C
    if estimator == "mc":
        # Inverse-CDF sampling from uniforms drawn per batch: the same draws whatever the micro-batching.
        cdf = probs.double().cumsum(dim=1)
        sampled = torch.searchsorted(cdf, uniforms.to(probs.device), right=True).clamp_(max=num_classes - 1)
        onehot = F.one_hot(sampled.T, num_classes).to(probs.dtype)                  # S × B × C
        return (onehot - probs) / math.sqrt(sampled.shape[1])
    labels = labels.to(probs.device)
    if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
        raise expected("batches", f"labels in [0, {num_classes})", labels.tolist())
    return (F.one_hot(labels, num_classes).to(probs.dtype) - probs).unsqueeze(0)
