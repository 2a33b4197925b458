"""Checks shared by the head's training and Fisher: which head rows, which labels, which features."""

from __future__ import annotations

import operator
from typing import Sequence

import torch
from torch import Tensor, nn

from lightning_taylor.errors import expected


def class_list(name: str, classes: Sequence[int]) -> list[int]:
    """``classes`` as a non-empty list of distinct ints >= 0."""
    raw = list(classes.tolist() if isinstance(classes, Tensor) else classes)
    if not raw:
        raise expected(name, "a non-empty sequence of class labels", raw)
    try:  # ints and int-like scalars (numpy integers), never bools or floats
        values = [operator.index(c) for c in raw if not isinstance(c, bool)]
    except TypeError:
        values = []
    if len(values) != len(raw) or min(values) < 0:
        raise expected(name, "class labels (ints >= 0)", raw)
    if len(set(values)) != len(values):
        raise expected(name, "distinct class labels", values)
    return values


def row_index(head: nn.Linear, classes: Sequence[int]) -> Tensor:
    """The head rows of ``classes`` as an index tensor on the head's device."""
    if not isinstance(head, nn.Linear):
        raise TypeError(f"Expected `head` to be an nn.Linear, but got {type(head).__name__}.")
    values = class_list("classes", classes)
    if max(values) >= head.out_features:
        raise expected("classes", f"rows of the head (< {head.out_features})", values)
    return torch.tensor(values, dtype=torch.long, device=head.weight.device)


def check_features_labels(features: Tensor, labels: Tensor) -> None:
    if features.ndim != 2:
        raise expected("features", "a 2-D tensor (N × D)", tuple(features.shape))
    if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise expected("labels", f"a 1-D tensor of {features.shape[0]} labels (one per feature row)",
                       tuple(labels.shape))
    if labels.is_floating_point() or labels.is_complex():
        raise expected("labels", "an integer tensor", labels.dtype)
    if features.shape[0] == 0:
        raise expected("features", "at least one row", tuple(features.shape))


def local_labels(labels: Tensor, classes: range) -> Tensor:
    """Positions of ``labels`` in ``classes`` (``y − classes.start`` for a unit-step range)."""
    values = class_list("classes", classes)
    lookup = torch.full((max(values) + 1,), -1, dtype=torch.long)
    lookup[torch.tensor(values)] = torch.arange(len(values))
    cpu = labels.detach().cpu().long()
    outside = (cpu < 0) | (cpu > max(values))
    local = torch.where(outside, -1, lookup[cpu.clamp(0, max(values))])
    if (local < 0).any():
        bad = sorted(set(cpu[local < 0].tolist()))
        raise expected("labels", f"labels of `classes` {classes}", bad)
    return local.to(labels.device)
