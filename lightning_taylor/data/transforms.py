"""Training and test-time transforms of the task streams (torchvision ``transforms.v2``).

Every pipeline ends in ``Normalize(mean, std)`` and a plain float tensor (``ToPureTensor``), so batches
collate to ``torch.Tensor`` whatever the source (PIL image or tensor). The paper's protocol uses
``mean = std = 0.5`` for the ImageNet-21k ViT (METHOD.md §6).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torchvision.transforms import v2

Transform = Callable[..., torch.Tensor]


def digits_transforms(mean: Sequence[float], std: Sequence[float]) -> tuple[Transform, Transform]:
    """``(train, test)`` transforms for digits images already stored as ``[0, 1]`` float tensors.

    Training adds a mild random affine jitter (±10°, ±10 % shift). The fill is 0, the digits' blank
    background, because normalisation comes after the jitter. No flips: a mirrored digit is another glyph.
    """
    normalise = v2.Normalize(list(mean), list(std))
    train = v2.Compose([v2.RandomAffine(degrees=10, translate=(0.1, 0.1), fill=0.0), normalise, v2.ToPureTensor()])
    test = v2.Compose([normalise, v2.ToPureTensor()])
    return train, test


def image_transforms(image_size: int, mean: Sequence[float], std: Sequence[float]) -> tuple[Transform, Transform]:
    """``(train, test)`` transforms for natural RGB images (PIL), as used for CIFAR-100 and image folders.

    Training: random resized crop to ``image_size`` (80–100 % of the area), horizontal flip. Test: resize
    the short side to ``image_size`` and centre-crop a square (a no-op crop for square images such as
    CIFAR's, and a square output for any image-folder photo).
    """
    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std)),
                 v2.ToPureTensor()]
    train = v2.Compose([
        v2.RandomResizedCrop(image_size, scale=(0.8, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        *to_tensor,
    ])
    test = v2.Compose([v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size), *to_tensor])
    return train, test
