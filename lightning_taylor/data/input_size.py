"""Which images a task stream serves: the channels and size the model takes, else the data set's defaults.

The model is the one place that states its input: :class:`~lightning_taylor.model.module.IncrementalViT` and any
LightningModule with an ``input_size = (C, H, W)`` say it directly; otherwise the patch embedding of a timm
ViT inside the module does (:func:`lightning_taylor.model.backbone.input_size`). The stream converts channels and
resizes to it, so a setting given on the data side only has to agree; one that disagrees is refused,
naming both settings (it would otherwise surface later as a raw convolution error).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from torch import nn

from lightning_taylor.errors import expected
from lightning_taylor.model.backbone import input_size as backbone_input_size

log = logging.getLogger(__name__)

InputSize = tuple[int, int, int]


def model_input_size(module: Any) -> tuple[InputSize, str] | None:
    """``((C, H, W), source)`` that ``module`` expects, ``source`` saying where it was read; ``None`` if unknown.

    Its ``input_size`` attribute or property when that is three ints, else a timm patch embedding inside it.
    """
    stated = getattr(module, "input_size", None)
    if (isinstance(stated, Sequence) and len(stated) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in stated)):
        return (int(stated[0]), int(stated[1]), int(stated[2])), f"{type(module).__name__}.input_size"
    if stated is not None:  # e.g. an MLP's flat input size: not ours to interpret
        log.debug("Ignoring %s.input_size=%r: not (C, H, W)", type(module).__name__, stated)
    found = backbone_input_size(module) if isinstance(module, nn.Module) else None
    return None if found is None else (found, f"the patch embedding of {type(module).__name__}")


def resolve_input(in_chans: int | None, image_size: int | None, default: tuple[int, int],
                  model: tuple[InputSize, str] | None) -> tuple[int, int]:
    """``(channels, side)`` of the served images.

    Each of ``in_chans`` / ``image_size`` that is ``None`` follows ``model`` (what :func:`model_input_size`
    returns) when known, else ``default`` (the data set's); an explicit value must equal the model's.
    """
    if model is None:
        return (default[0] if in_chans is None else in_chans), (default[1] if image_size is None else image_size)
    (channels, height, width), source = model
    where = f"{source} = {(channels, height, width)}"
    if height != width:
        raise expected(source, "a square input size (C, H, H): the stream serves square images", (channels, height, width),
                       "Build the model with one int `img_size`.")
    if channels not in (1, 3):
        raise expected(source, "an input of 1 or 3 channels (the stream serves grey or RGB images)",
                       (channels, height, width))
    if image_size is not None and image_size != height:
        raise expected("image_size", f"None or {height}, the model's input size ({where})", image_size,
                       f"Leave `data.image_size` unset to follow the model, or build the model for {image_size}-pixel "
                       f"images (IncrementalViT: `model.model_kwargs.img_size: {image_size}`).")
    if in_chans is not None and in_chans != channels:
        raise expected("in_chans", f"None or {channels}, the model's input channels ({where})", in_chans,
                       "Leave `data.in_chans` unset to follow the model (images are converted), or build the model "
                       f"for {in_chans} channels (IncrementalViT: `model.model_kwargs.in_chans: {in_chans}`).")
    return channels, height
