"""The guard against silently ignored targets: one forward checks that every target's delta reaches the output.

A delta acts by adding ``x τᵀ`` to its layer's output, inside the layer's forward. A model that applies the
layer's weight without calling the layer (``F.linear(x, layer.weight)``), or that discards the layer's
output, would train that delta for nothing. :func:`check_reach` runs one forward of a probe batch with a
zero ``z_l`` (shape: the layer's output features) added to every target output and back-propagates the sum of
the model's outputs: a target whose layer was not called, or whose ``z_l`` gets no gradient (no path to
the output), is an error naming it and the model family.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from lightning_taylor.deltas.presets import family
from lightning_taylor.errors import expected


def probe_input(model: nn.Module, batch_size: int = 2) -> Tensor:
    """A deterministic probe batch ``batch_size × C × H × W`` for an image model, on its device and dtype.

    The size is read from ``model.patch_embed`` (``img_size`` and the projection's input channels, as in timm's
    ViTs and Swins), else from timm's ``pretrained_cfg["input_size"]``.
    """
    size = None
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    channels = getattr(getattr(patch_embed, "proj", None), "in_channels", None)
    if img_size is not None and channels is not None:
        height, width = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        size = (channels, height, width)
    elif isinstance(getattr(model, "pretrained_cfg", None), dict) and "input_size" in model.pretrained_cfg:
        size = tuple(model.pretrained_cfg["input_size"])
    if size is None:
        raise expected("probe", f"an input batch for {family(model)}", None,
                       "Its input size cannot be read from `patch_embed` or `pretrained_cfg`: pass a probe batch.")
    reference = next(model.parameters())
    generator = torch.Generator().manual_seed(0)  # leaves the global random state alone
    probe = torch.randn((batch_size, *size), generator=generator, dtype=torch.float64)
    return probe.to(device=reference.device, dtype=reference.dtype)


def _tensors(output: object) -> list[Tensor]:
    """The floating-point tensors in a model output (a tensor, or tuples / lists / dicts of them)."""
    if isinstance(output, Tensor):
        return [output] if output.is_floating_point() else []
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    return [t for value in values for t in _tensors(value)]


def check_reach(model: nn.Module, names: Sequence[str], probe: Tensor | Sequence | None = None) -> None:
    """Raise a ``ValueError`` naming the first target layer in ``names`` whose output does not reach ``model``'s.

    ``probe`` is the input of ``model`` (a tensor, or a tuple of positional arguments); ``None``: a random
    image batch of the model's input size (:func:`probe_input`). The model runs once in eval mode (its mode
    is restored) with gradients towards the probes ``z_l`` only: no parameter gets a ``.grad``.
    """
    if probe is None:
        probe = probe_input(model)
    args = (probe,) if isinstance(probe, Tensor) else tuple(probe)
    zeros: dict[str, Tensor] = {}

    def hook(name: str):
        def add_zero(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
            z = torch.zeros(output.shape[-1], device=output.device, dtype=output.dtype, requires_grad=True)
            zeros.setdefault(name, z)
            return output + zeros[name]
        return add_zero

    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in names]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            total = sum(t.sum() for t in _tensors(model(*args)) if t.requires_grad)
            reached = dict(zip(zeros, torch.autograd.grad(total, list(zeros.values()), allow_unused=True))) \
                if zeros and isinstance(total, Tensor) else {}
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    for name in names:
        if name not in zeros:
            raise expected("targets", f"layers whose forward runs in {family(model)}'s forward", name,
                           "The model applies this layer's weight without calling the layer (e.g. "
                           "`F.linear(x, layer.weight)`), so its delta would be ignored; choose other `targets`.")
        if reached.get(name) is None:
            raise expected("targets", f"layers whose output reaches {family(model)}'s output", name,
                           "The layer runs, but its output does not influence the model's output, so its "
                           "delta would be ignored; choose other `targets`.")
