"""Make timm attention blocks that read ``qkv.weight`` directly call their ``qkv`` layer instead.

EVA / EVA-02, BEiT and Swin V2 keep the query and value biases outside the ``qkv`` layer (``q_bias``,
``v_bias`` and a zero ``k_bias`` buffer on the attention block; ``qkv.bias`` is ``None``) and compute

    qkv = F.linear(x, weight=self.qkv.weight, bias=cat(q_bias, k_bias, v_bias))

so ``qkv.forward`` never runs: a forward hook on ``qkv`` (a delta, the Fisher's input/output capture) would
be silently skipped. These blocks also have a branch ``qkv = self.qkv(x)`` taken when ``q_bias is None``.

The adapter lends the biases to the layer for the duration of the block's forward only: a pre-hook sets
``qkv.bias = cat(q_bias, k_bias, v_bias)`` and hides ``q_bias``, so the block takes its ``self.qkv(x)``
branch, which computes ``F.linear(x, W, cat(q_bias, k_bias, v_bias))`` — the same call, bit for bit — with
the layer's hooks running; a forward hook (also run when the forward raises) puts everything back. Outside
a forward nothing is changed: the ``state_dict`` keeps timm's keys, ``qkv.weight`` is the same parameter
(merging into it works as for any layer), and the bias stays a function of ``q_bias`` / ``v_bias``, so a
``functional_call`` that swaps them is honoured.

Adapters nest: when the biases are already lent (the deltas' adapter is active and the Fisher pass
installs its own), the inner one does nothing.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


def lends_qkv_bias(attention: nn.Module) -> bool:
    """Whether ``attention`` is a block of the split-bias form above (``qkv`` bias-free, ``q_bias`` and
    ``v_bias`` set), whose forward applies ``qkv.weight`` without calling ``qkv``."""
    qkv = getattr(attention, "qkv", None)
    return (
        isinstance(qkv, nn.Linear)
        and qkv.bias is None
        and isinstance(attention._parameters.get("q_bias"), Tensor)
        and isinstance(attention._parameters.get("v_bias"), Tensor)
    )


def split_bias_attentions(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """The split-bias attention blocks (by name) whose ``qkv`` layer is one of the target layers ``names``."""
    found = {}
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        if leaf != "qkv":
            continue
        parent = model.get_submodule(parent_name) if parent_name else model
        if lends_qkv_bias(parent):
            found[parent_name] = parent
    return found


class _LentBias:
    """Pre- and post-forward hooks of one split-bias attention block (see the module docstring)."""

    def __init__(self) -> None:
        # One entry per forward in progress: the hidden q_bias, or None when an outer adapter lent it.
        self._saved: list[Tensor | None] = []

    def pre(self, attention: nn.Module, args: tuple) -> None:
        q_bias = attention._parameters.get("q_bias")
        if q_bias is None or attention.qkv.bias is not None:  # lent already (nested adapters)
            self._saved.append(None)
            return
        k_bias = attention._buffers.get("k_bias")
        v_bias = attention._parameters["v_bias"]
        bias = torch.cat((q_bias, torch.zeros_like(q_bias) if k_bias is None else k_bias, v_bias))
        # Plain entries (not nn.Parameter): the bias is a function of q_bias / v_bias, not a new parameter.
        attention.qkv._parameters["bias"] = bias
        attention._parameters["q_bias"] = None
        self._saved.append(q_bias)

    def post(self, attention: nn.Module, args: tuple, output: object) -> None:
        q_bias = self._saved.pop()
        if q_bias is not None:
            attention._parameters["q_bias"] = q_bias
            attention.qkv._parameters["bias"] = None


def route_through_qkv(attention: nn.Module) -> list[RemovableHandle]:
    """Install the adapter on one split-bias attention block; remove the returned handles to undo it."""
    if not lends_qkv_bias(attention):
        raise TypeError(f"Expected `attention` to have a bias-free `qkv` layer and `q_bias` / `v_bias`, "
                        f"but got {type(attention).__name__}.")
    lent = _LentBias()
    return [attention.register_forward_pre_hook(lent.pre),
            attention.register_forward_hook(lent.post, always_call=True)]


@contextlib.contextmanager
def routed(model: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Inside the ``with`` block, every layer in ``names`` that a split-bias attention applies by ``F.linear``
    is called as a module instead (nothing changes for the other layers, nor for blocks adapted already)."""
    handles = [h for attention in split_bias_attentions(model, names).values() for h in route_through_qkv(attention)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
