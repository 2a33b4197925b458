"""Building the pre-trained timm backbone: from the hub, from a local file, or the embedded tiny ViT.

``pretrained`` selects the weights:

- ``True``: ``timm.create_model(name, pretrained=True)`` (needs the hub or its cache);
- ``False``: random initialisation (tests, debugging);
- ``"embedded"``: the tiny ViT shipped with this package, pre-trained on Fashion-MNIST by
  ``scripts/pretrain_backbone.py``; its model name and constructor arguments come from the file's metadata;
- ``"embedded:glyphs"``: the shipped tiny ViT pre-trained on 1,000 rendered letter classes by
  ``scripts/glyphs/pretrain.py`` (the backbone of the ``glyphs`` stream), likewise from its metadata;
- a path: a ``.safetensors``, ``.pth`` or ``.bin`` state dict (or a checkpoint holding ``state_dict``) for
  ``model_name``.

A weights file (the embedded one too) must cover every parameter of the backbone, the classifier excepted:
a shallower or otherwise different model is refused with its first missing and unexpected keys rather than
loaded partly (:func:`load_weights`). Every error names the file. ``True`` without the hub or its cache is
one error naming the model and the two ways out.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file as load_safetensors
from timm.models import adapt_input_conv
from torch import Tensor, nn

from lightning_taylor.errors import expected

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
#: ``pretrained`` values naming a weights file shipped in ``lightning_taylor/weights/``.
EMBEDDED_WEIGHTS: dict[str, str] = {
    EMBEDDED: "vit_fmnist_tiny.safetensors",        # Fashion-MNIST, 10 classes (the default)
    "embedded:glyphs": "vit_glyphs_tiny.safetensors",  # 1,000 rendered letters of 53 scripts
}


def embedded_weights(name: str = EMBEDDED) -> Path:
    """Path of a shipped tiny ViT (package data, found by editable and regular installs alike)."""
    if name not in EMBEDDED_WEIGHTS:
        raise expected("pretrained", f"one of the embedded weights {tuple(EMBEDDED_WEIGHTS)}", name)
    return Path(str(resources.files("lightning_taylor") / "weights" / EMBEDDED_WEIGHTS[name]))


def embedded_metadata(name: str = EMBEDDED) -> dict[str, str]:
    with safe_open(str(embedded_weights(name)), framework="pt") as f:
        return dict(f.metadata() or {})


def is_embedded(pretrained: object) -> bool:
    return isinstance(pretrained, str) and pretrained in EMBEDDED_WEIGHTS


def resolve_model(model_name: str | None, pretrained: bool | str,
                  model_kwargs: Mapping[str, Any] | None) -> tuple[str, dict]:
    """The timm model name and constructor arguments, taking them from the metadata for embedded weights.

    With ``"embedded"`` (or another key of :data:`EMBEDDED_WEIGHTS`) the file decides the model: ``model_name`` must be ``None`` or the file's own name
    (a different name would be silently ignored otherwise); ``model_kwargs`` override the file's arguments.
    """
    kwargs = dict(model_kwargs or {})
    if is_embedded(pretrained):
        meta = embedded_metadata(pretrained)
        if model_name is not None and model_name != meta["model_name"]:
            raise expected("model_name", f"None or {meta['model_name']!r} (the model in the embedded weights) with "
                           f"pretrained={pretrained!r}", model_name,
                           "The embedded file holds that one model. For another, pass `pretrained: true` (timm hub) or "
                           "the path of a weights file of it.")
        return meta["model_name"], {**json.loads(meta["model_kwargs"]), **kwargs}
    if not isinstance(model_name, str) or not model_name:
        raise expected("model_name", f"a timm model name for pretrained={pretrained!r}", model_name,
                       "Only `pretrained: embedded` takes its model from the weights file.")
    return model_name, kwargs


def input_size(model: nn.Module) -> tuple[int, int, int] | None:
    """``(C, H, W)`` a timm ViT expects, from its patch embedding: ``proj.in_channels`` and ``img_size``.

    The first submodule with a ``patch_embed`` is used, so this also works on a module that holds a timm
    model. ``None`` when there is none or it takes any size (``img_size=None``).
    """
    for module in model.modules():
        embed = getattr(module, "patch_embed", None)
        proj, size = getattr(embed, "proj", None), getattr(embed, "img_size", None)
        if isinstance(proj, nn.Conv2d) and size is not None:
            height, width = size if isinstance(size, (tuple, list)) else (size, size)
            return int(proj.in_channels), int(height), int(width)
    return None


# ------------------------------------------------------------------------------------------ weights files


def read_weights(path: Path) -> dict[str, Tensor]:
    """The state dict in ``path``: safetensors, or ``torch.load(weights_only=True)`` of a ``.pth`` / ``.bin``.

    A checkpoint holding the state dict under ``state_dict_ema``, ``model_ema``, ``state_dict`` or ``model``
    (first found; timm's own order) gives that one; a ``module.`` prefix (a DDP-wrapped model) is dropped.
    Every failure names the file.
    """
    if not path.is_file():
        raise expected("pretrained", "True, False, 'embedded' or the path of an existing weights file", str(path))
    try:
        if path.suffix == ".safetensors":
            content: Any = load_safetensors(str(path))
        else:
            content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors' header errors, unpickling and zip errors, ...: all mean "not weights"
        raise expected("pretrained", "a readable weights file (.safetensors, or a .pth / .bin state dict that "
                       "torch.load(weights_only=True) reads)", str(path), f"Reading it failed: {type(err).__name__}: "
                       f"{err}") from err
    if isinstance(content, Mapping):
        key = next((k for k in ("state_dict_ema", "model_ema", "state_dict", "model")
                    if isinstance(content.get(k), Mapping)), None)
        content = content[key] if key else content
    if isinstance(content, Mapping):
        odd = next(((k, v) for k, v in content.items() if not (isinstance(k, str) and isinstance(v, Tensor))), None)
        found = "an empty mapping" if not content else None if odd is None else (
            f"a mapping with {odd[0]!r}: {type(odd[1]).__name__}")
    else:
        found = f"a {type(content).__name__}"
    if found is not None:
        raise expected("pretrained", "a weights file holding a state dict (parameter names to tensors), or a "
                       "checkpoint holding one under `state_dict` or `model`", str(path), f"It holds {found}.")
    return {k.removeprefix("module."): v for k, v in content.items()}


def _first(what: str, keys: Sequence[str], limit: int = 5) -> str:
    """``"<what> 24 (a, b, ...)"``, or ``""`` when there are none."""
    if not keys:
        return ""
    return f"{what} {len(keys)} ({', '.join(keys[:limit])}{', ...' if len(keys) > limit else ''}); "


def load_weights(model: nn.Module, path: Path) -> None:
    """Load the file's weights into every parameter and buffer of ``model`` except its classifier, strictly.

    The state dict goes through the model family's timm ``checkpoint_filter_fn`` when it has one (for ViTs:
    other checkpoint layouts, position embeddings resampled to ``img_size``), and a stem of other channels
    is adapted by ``timm.models.adapt_input_conv``, as timm's own pre-trained loading does. The classifier
    is left out on both sides (a file of another head size, or with none, loads; the head is replaced
    anyway). Anything else missing, unexpected or of another shape is refused, listing the first keys.
    """
    state = read_weights(path)
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if callable(filter_fn):
        try:
            state = filter_fn(state, model)
        except Exception as err:  # the family's conversion failed: this file is not a checkpoint of it
            raise expected("pretrained", f"weights of a {type(model).__name__}", str(path),
                           f"timm's checkpoint conversion failed: {type(err).__name__}: {err}") from err
    classifier = next((name for name, module in model.named_modules() if module is model.get_classifier()), "head")
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(f"{classifier}.")}
    state = {k: v for k, v in state.items() if not k.startswith(f"{classifier}.")}
    first_conv = f"{(getattr(model, 'pretrained_cfg', None) or {}).get('first_conv') or 'patch_embed.proj'}.weight"
    weight = state.get(first_conv)
    if weight is not None and first_conv in own and weight.ndim == 4 and weight.shape[1] != own[first_conv].shape[1]:
        log.info("Adapting %s of %s from %d to %d input channels", first_conv, path, weight.shape[1],
                 own[first_conv].shape[1])
        state[first_conv] = adapt_input_conv(own[first_conv].shape[1], weight, base_chans=weight.shape[1])
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                  if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        raise expected("pretrained", f"weights for every backbone parameter of the {type(model).__name__} that "
                       "`model_name` and `model_kwargs` describe (the classifier excepted)", str(path),
                       f"{_first('missing keys', missing)}{_first('unexpected keys', unexpected)}"
                       f"{_first('other shapes (file vs model)', mismatched, 3)}Check `model_name` and `model_kwargs` "
                       "(depth, embed_dim, patch_size, ...) against the file.")
    model.load_state_dict(state, strict=False)  # only the classifier is left as initialised


# ---------------------------------------------------------------------------------------------- creation


def _from_hub(name: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """``timm.create_model(name, pretrained=True)``; a hub or cache miss becomes one clear error."""
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except OSError as err:  # huggingface_hub's offline / not-cached / HTTP errors and urllib's are all OSErrors
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise expected(
            "pretrained", f"weights that timm can load for model_name={name!r}", True,
            f"They are not in the local cache and the hub could not provide them ({reason}). Either pass a local "
            "weights file of this model (`--model.pretrained PATH`, a .safetensors or .pth state dict), or fill the "
            f"cache once where the network is reachable (`python -c \"import timm; timm.create_model('{name}', "
            "pretrained=True)\"`) and point HF_HOME (or HF_HUB_CACHE) at it; weights that timm fetches from a plain "
            "URL are cached under TORCH_HOME.") from err


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
    if isinstance(pretrained, bool):
        model = _from_hub(name, kwargs) if pretrained else timm.create_model(name, pretrained=False, **kwargs)
    elif isinstance(pretrained, (str, os.PathLike)):
        path = embedded_weights(pretrained) if is_embedded(pretrained) else Path(pretrained)
        model = timm.create_model(name, pretrained=False, **kwargs)
        load_weights(model, path)
    else:
        raise expected("pretrained", f"True, False, one of {tuple(EMBEDDED_WEIGHTS)} or a path", pretrained)
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
