"""Semantic drift compensation of class mixtures: move old classes' feature statistics with the backbone.

A class mixture (:class:`~lightning_taylor.head.mixtures.ClassMixtures`) describes a class's features under the
backbone of the moment it was fitted. When a later task changes the deployed backbone (a new delta joins the
composition), the features of the old classes move, but their images are gone. Semantic drift compensation
(Yu et al., "Semantic Drift Compensation for Class-Incremental Learning", CVPR 2020) estimates that move
from the images that *are* available: the new task's, embedded by the backbone before and after the change.

With ``b_i`` and ``a_i`` the features of image ``i`` before and after, each component mean ``μ`` of an old
class moves by the kernel-weighted mean drift of the images near it::

    μ ← μ + Σ_i w_i (a_i − b_i),      w_i = softmax_i( −‖b_i − μ‖² / (2 σ_c²) ),
    σ_c² = bandwidth · median_{k, i} ‖b_i − μ_k‖²     (over class c's components k and all images i)

The kernel width is relative to each class's own distances, so it needs no absolute feature scale; a large
``bandwidth`` tends to the plain mean drift (every image weighs the same), a small one to the drift of the
image nearest to ``μ``. Component weights and variances are kept (the compensation moves means only).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_taylor.errors import expected
from lightning_taylor.head.mixtures import ClassMixtures

#: Kernel width relative to the median squared distance; measured on the MNIST stream (docs/learning_quality.md).
DEFAULT_BANDWIDTH = 0.25


@torch.no_grad()
def compensate_drift(
    mixtures: ClassMixtures, before: Tensor, after: Tensor, bandwidth: float = DEFAULT_BANDWIDTH
) -> ClassMixtures:
    """A copy of ``mixtures`` with every component mean moved by the drift ``after − before`` (module docstring).

    Args:
        mixtures: the classes to move (fitted under the backbone that gave ``before``).
        before: ``N × D`` features of the available images under the old backbone.
        after: ``N × D`` features of the same images, in the same order, under the new backbone.
        bandwidth: ``σ_c²`` as a fraction of the class's median squared distance (``> 0``).

    Returns:
        New mixtures with the same classes, weights and variances; the means in their stored dtype.
    """
    if before.ndim != 2 or before.shape[0] == 0:
        raise expected("before", "a non-empty N × D feature tensor", tuple(before.shape))
    if after.shape != before.shape:
        raise expected("after", f"features of the same images as `before`, shape {tuple(before.shape)}",
                       tuple(after.shape))
    if mixtures.feature_dim is not None and before.shape[1] != mixtures.feature_dim:
        raise expected("before", f"features of dimension {mixtures.feature_dim} (the mixtures')", before.shape[1])
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float)) or not bandwidth > 0:
        raise expected("bandwidth", "a float > 0", bandwidth)
    before, drift = before.double(), (after.double() - before.double())
    moved = ClassMixtures()
    for label in mixtures.classes:
        weights, means, variances = mixtures.components(label)
        squared = torch.cdist(means.double(), before).square()  # K × N
        # A class whose components all sit on images (median 0) falls back to the nearest image's drift.
        scale = 2 * bandwidth * squared.median().clamp_min(torch.finfo(torch.float64).tiny)
        kernel = torch.softmax(-squared / scale, dim=1)
        moved.add(label, weights, (means.double() + kernel @ drift).to(means.dtype), variances)
    return moved
