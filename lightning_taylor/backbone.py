"""Building the pre-trained timm backbone: from the hub, from a local file, or the embedded tiny ViT.

``pretrained`` selects the weights:

- ``True``: ``timm.create_model(name, pretrained=True)`` (needs the hub or its cache);
- ``False``: random initialisation (tests, debugging);
- ``"embedded"``: the tiny ViT shipped with this package, pre-trained on Fashion-MNIST by
  ``scripts/pretrain_backbone.py``; its model name and constructor arguments come from the file's metadata;
- a path: a ``.safetensors``, ``.pth`` or ``.bin`` state dict (or a checkpoint holding ``state_dict``) for
  ``model_name``, loaded through timm's ``pretrained_cfg_overlay=dict(file=...)`` so timm's own filtering
  (e.g. of a classifier of another size) applies.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import timm
import torch
from safetensors import safe_open
from torch import nn

from lightning_taylor._checks import expected

log = logging.getLogger(__name__)

EMBEDDED = "embedded"


def embedded_weights() -> Path:
    """Path of the shipped tiny ViT (package data, found by editable and regular installs alike)."""
    return Path(str(resources.files("lightning_taylor") / "weights" / "vit_fmnist_tiny.safetensors"))


def embedded_metadata() -> dict[str, str]:
    with safe_open(str(embedded_weights()), framework="pt") as f:
        return dict(f.metadata() or {})


def resolve_model(model_name: str | None, pretrained: bool | str,
                  model_kwargs: Mapping[str, Any] | None) -> tuple[str, dict]:
    """The timm model name and constructor arguments, taking them from the metadata for ``"embedded"``."""
    kwargs = dict(model_kwargs or {})
    if pretrained == EMBEDDED:
        meta = embedded_metadata()
        return meta["model_name"], {**json.loads(meta["model_kwargs"]), **kwargs}
    if not isinstance(model_name, str) or not model_name:
        raise expected("model_name", f"a timm model name for pretrained={pretrained!r}", model_name,
                       "Only `pretrained: embedded` takes its model from the weights file.")
    return model_name, kwargs


def create_backbone(
    model_name: str | None,
    pretrained: bool | str,
    num_classes: int,
    model_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> nn.Module:
    """A timm ViT with the pre-trained weights and a fresh ``num_classes`` head (trunc-normal 0.02, zero bias)."""
    name, kwargs = resolve_model(model_name, pretrained, model_kwargs)
    kwargs["num_classes"] = num_classes
    if pretrained == EMBEDDED or isinstance(pretrained, str):
        path = embedded_weights() if pretrained == EMBEDDED else Path(pretrained)
        if not path.is_file():
            raise expected("pretrained", "True, False, 'embedded' or the path of an existing weights file", pretrained)
        overlay: dict[str, Any] = {"file": str(path)}
        if "in_chans" in kwargs and isinstance(kwargs.get("img_size"), int):
            # Describe the file's real input, so timm does not warn about (or adapt) the stem's channels.
            overlay["input_size"] = (kwargs["in_chans"], kwargs["img_size"], kwargs["img_size"])
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    elif isinstance(pretrained, bool):
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    else:
        raise expected("pretrained", "True, False, 'embedded' or a path", pretrained)
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise expected("model_name", "a timm model whose classifier is one nn.Linear", name, f"Got {type(head).__name__}.")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight = torch.empty(head.weight.shape, dtype=torch.float32)
        nn.init.trunc_normal_(weight, std=0.02, a=-0.04, b=0.04, generator=generator)
        head.weight.copy_(weight)
        if head.bias is not None:
            head.bias.zero_()
    log.info("Backbone %s (pretrained=%s) with a %d-class head", name, pretrained, num_classes)
    return model
