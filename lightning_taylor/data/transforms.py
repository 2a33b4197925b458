"""Training and test-time transforms of the task streams (torchvision ``transforms.v2``).

Every pipeline starts by converting the image to the channels the model takes (:class:`ToChannels`) and
ends in ``Normalize(mean, std)`` and a plain float tensor (``ToPureTensor``), so batches collate to
``torch.Tensor`` whatever the source (PIL image or tensor). The paper's protocol uses ``mean = std = 0.5``
for the ImageNet-21k ViT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch
from PIL import Image
from torchvision.transforms import v2

from lightning_taylor.errors import expected

Transform = Callable[..., torch.Tensor]


class ToChannels:
    """An image with ``in_chans`` (1 or 3) channels.

    A PIL image is converted to mode ``"L"`` or ``"RGB"`` (grey to RGB repeats the channel; colour to grey is
    PIL's luminance ``L = 0.299 R + 0.587 G + 0.114 B``; palette and alpha images become plain RGB). A
    ``(…, C, H, W)`` tensor with 1 channel is repeated, one with 3 channels takes the same luminance
    (torchvision's ``rgb_to_grayscale``); an image that already has ``in_chans`` channels is returned as is.
    """

    def __init__(self, in_chans: int) -> None:
        if in_chans not in (1, 3):
            raise expected("in_chans", "1 or 3", in_chans)
        self.in_chans = in_chans

    def __call__(self, image: Any) -> Any:
        if isinstance(image, Image.Image):
            mode = "L" if self.in_chans == 1 else "RGB"
            return image if image.mode == mode else image.convert(mode)
        channels = image.shape[-3]
        if channels == self.in_chans:
            return image
        if channels == 1:
            return image.expand(*image.shape[:-3], self.in_chans, *image.shape[-2:]).clone()
        if channels == 3:
            return v2.functional.rgb_to_grayscale(image)
        raise expected("image", "an image with 1 or 3 channels", f"a tensor of shape {tuple(image.shape)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(in_chans={self.in_chans})"


def digits_transforms(mean: Sequence[float], std: Sequence[float], in_chans: int = 1) -> tuple[Transform, Transform]:
    """``(train, test)`` transforms for digits images already stored as ``[0, 1]`` float tensors.

    Training adds a mild random affine jitter (±10°, ±10 % shift). The fill is 0, the digits' blank
    background, because normalisation comes after the jitter. No flips: a mirrored digit is another glyph.
    ``in_chans=3`` repeats the grey channel (for an RGB model).
    """
    channels, normalise = ToChannels(in_chans), v2.Normalize(list(mean), list(std))
    train = v2.Compose([channels, v2.RandomAffine(degrees=10, translate=(0.1, 0.1), fill=0.0), normalise,
                        v2.ToPureTensor()])
    test = v2.Compose([channels, normalise, v2.ToPureTensor()])
    return train, test


def image_transforms(image_size: int, mean: Sequence[float], std: Sequence[float], in_chans: int = 3
                     ) -> tuple[Transform, Transform]:
    """``(train, test)`` transforms for natural images (PIL), as used for CIFAR-100 and image folders.

    First to ``in_chans`` channels (:class:`ToChannels`). Training: random resized crop to ``image_size``
    (80–100 % of the area), horizontal flip. Test: resize the short side to ``image_size`` and centre-crop a
    square (a no-op crop for square images such as CIFAR's, and a square output for any image-folder photo).
    """
    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std)),
                 v2.ToPureTensor()]
    channels = ToChannels(in_chans)
    train = v2.Compose([
        channels,
        v2.RandomResizedCrop(image_size, scale=(0.8, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        *to_tensor,
    ])
    test = v2.Compose([channels, v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size), *to_tensor])
    return train, test


@dataclass(frozen=True)
class Recipe:
    """A benchmark's training and test transforms as its reference framework states them, at 224 px.

    Sizes are given for 224-pixel images and scaled by ``image_size / 224`` when the model takes another
    size, so the crops keep the reference's proportions. An int size resizes the short side (aspect ratio
    kept), a pair resizes to that ``(height, width)``. Interpolation is bicubic, as in the reference.

    Attributes:
        train: ``"random_resized_crop"`` (area ``crop_scale``, then flip), ``"resize_random_crop"`` (resize
            to ``train_resize``, random crop, flip) or ``"resize_center_crop"`` (resize to ``train_resize``,
            centre crop, flip).
        train_resize: the resize before the crop of the last two kinds.
        crop_scale: the area range of the random resized crop.
        test_resize: the resize before the test-time centre crop.
    """

    train: Literal["random_resized_crop", "resize_random_crop", "resize_center_crop"]
    train_resize: int | tuple[int, int] = 224
    crop_scale: tuple[float, float] = (0.08, 1.0)
    test_resize: int | tuple[int, int] = 224


def _scaled(size: int | tuple[int, int], image_size: int) -> int | list[int]:
    if isinstance(size, int):
        return round(size * image_size / 224)
    return [round(s * image_size / 224) for s in size]


def recipe_transforms(recipe: Recipe, image_size: int, mean: Sequence[float], std: Sequence[float],
                      in_chans: int = 3) -> tuple[Transform, Transform]:
    """``(train, test)`` transforms of a benchmark's :class:`Recipe` at ``image_size``, to ``in_chans`` channels.

    Test: resize to ``test_resize`` and centre-crop a square of ``image_size``; training as ``recipe.train``
    says, always with a horizontal flip. Both end in ``Normalize(mean, std)`` and a plain tensor.
    """
    bicubic = v2.InterpolationMode.BICUBIC
    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std)),
                 v2.ToPureTensor()]
    channels = ToChannels(in_chans)
    if recipe.train == "random_resized_crop":
        crop = [v2.RandomResizedCrop(image_size, scale=recipe.crop_scale, interpolation=bicubic, antialias=True)]
    else:
        resize = v2.Resize(_scaled(recipe.train_resize, image_size), interpolation=bicubic, antialias=True)
        cropper = v2.RandomCrop if recipe.train == "resize_random_crop" else v2.CenterCrop
        crop = [resize, cropper(image_size)]
    train = v2.Compose([channels, *crop, v2.RandomHorizontalFlip(), *to_tensor])
    test = v2.Compose([channels, v2.Resize(_scaled(recipe.test_resize, image_size), interpolation=bicubic,
                                           antialias=True), v2.CenterCrop(image_size), *to_tensor])
    return train, test
