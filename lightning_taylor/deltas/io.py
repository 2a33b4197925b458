"""Saving banked deltas and exporting merged models as safetensors.

Banked deltas are stored under ``<layer>.<slot tensor>_task<t>`` (e.g. ``blocks.0.attn.qkv.lora_A_task0``)
with the delta configuration in the file's metadata, so a file documents itself and is refused by a
``TaskDeltas`` of another style or rank. An exported model is the plain ``state_dict`` of the merged
network plus the timm model name and constructor arguments: it loads with torch, timm and safetensors
alone.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from lightning_taylor.deltas.task_deltas import TaskDeltas
from lightning_taylor.editing import Composition

FORMAT = "lightning-taylor/deltas/1"


def _config(deltas: TaskDeltas) -> dict[str, str]:
    return {
        "format": FORMAT,
        "style": deltas.style,
        "rank": str(deltas.rank),
        "qkv_rank_factor": str(deltas.qkv_rank_factor),
        "layers": json.dumps(deltas.names),
    }


def save_deltas(deltas: TaskDeltas, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Write every banked task delta (not the live slot: call ``deltas.bank()`` first to include it)."""
    tensors = {
        f"{name}.{key}_task{task}": value.detach().contiguous().cpu()
        for name, delta, _ in deltas.layers()
        for task in delta.banked_tasks
        for key, value in delta.task_state(task).items()
    }
    meta = {**_config(deltas), "tasks": json.dumps(deltas.banked_tasks), **dict(metadata or {})}
    save_file(tensors, os.fspath(path), metadata=meta)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    with safe_open(os.fspath(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_deltas(deltas: TaskDeltas, path: str | os.PathLike) -> list[int]:
    """Bank the task deltas stored in ``path`` into ``deltas`` (same style, rank and layers); returns the tasks."""
    meta = read_metadata(path)
    mine = _config(deltas)
    for key in ("format", "style", "rank", "qkv_rank_factor", "layers"):
        if meta.get(key) != mine[key]:
            raise ValueError(
                f"Expected the deltas file {os.fspath(path)!r} to have {key}={mine[key]!r} like this TaskDeltas, "
                f"but got {key}={meta.get(key)!r}."
            )
    _, unexpected = deltas.load_state_dict(load_file(os.fspath(path)), strict=False)
    if unexpected:
        raise ValueError(f"Unexpected tensors in {os.fspath(path)!r}: {unexpected[:5]}.")
    return json.loads(meta["tasks"])


def merged_state_dict(model: nn.Module, deltas: TaskDeltas, composition: Composition | Mapping[int, float]) -> dict:
    """The ``state_dict`` of ``model`` with ``composition`` merged into its weights (``model`` is not modified).

    Leaves ``deltas`` composed with ``composition``.
    """
    deltas.compose(composition)
    if deltas.merged:
        raise RuntimeError("Deltas are merged into the model already: call `unmerge()` first.")
    deltas.check_finite()
    merged = deltas.merged_weights()
    return {key: merged.get(key, value).detach().clone().contiguous().cpu() for key, value in model.state_dict().items()}


def export_merged(
    model: nn.Module,
    deltas: TaskDeltas,
    path: str | os.PathLike,
    composition: Composition | Mapping[int, float],
    model_name: str,
    model_kwargs: Mapping[str, Any] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Save the merged network for ``timm.create_model(model_name, **model_kwargs)``.

    Load it back without this package::

        meta = safetensors.safe_open(path, "pt").metadata()
        model = timm.create_model(meta["model_name"], **json.loads(meta["model_kwargs"]))
        model.load_state_dict(safetensors.torch.load_file(path))
    """
    state = merged_state_dict(model, deltas, composition)
    comp = composition if isinstance(composition, Composition) else Composition(dict(composition))
    meta = {
        "format": "lightning-taylor/merged/1",
        "model_name": model_name,
        "model_kwargs": json.dumps(dict(model_kwargs or {})),
        "composition": json.dumps({str(t): w for t, w in comp.weights.items()}),
        "layer_factors": json.dumps([[p, {str(t): m for t, m in f.items()}] for p, f in comp.layer_factors]),
        **dict(metadata or {}),
    }
    save_file(state, os.fspath(path), metadata=meta)


def load_merged(path: str | os.PathLike, **overrides: Any) -> nn.Module:
    """Build the timm model described by an exported file's metadata and load its weights."""
    import timm

    meta = read_metadata(path)
    kwargs = {**json.loads(meta["model_kwargs"]), **overrides}
    model = timm.create_model(meta["model_name"], pretrained=False, **kwargs)
    model.load_state_dict(load_file(os.fspath(path)))
    return model


__all__ = ["save_deltas", "load_deltas", "read_metadata", "merged_state_dict", "export_merged", "load_merged"]
