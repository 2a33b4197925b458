"""Saving banked deltas and exporting merged models as safetensors.

Banked deltas are stored under ``<layer>.<slot tensor>_task<t>`` (e.g. ``blocks.0.attn.qkv.lora_A_task0``)
with the delta configuration in the file's metadata, so a file documents itself and is refused by a
``TaskDeltas`` of another style or rank. An exported model is the plain ``state_dict`` of the merged
network plus the timm model name and constructor arguments: it loads with torch, timm and safetensors
alone. Only a plain timm name and architecture arguments (:data:`MODEL_KWARGS`) are written and read back,
so a file cannot make ``timm.create_model`` load other weights or reach the network.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Collection, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from torch import Tensor, nn

from lightning_taylor._atomic import save_tensors
from lightning_taylor.deltas.composition import Composition
from lightning_taylor.deltas.task_deltas import TaskDeltas
from lightning_taylor.errors import expected

FORMAT = "lightning-taylor/deltas/1"
MERGED_FORMAT = "lightning-taylor/merged/1"


def _config(deltas: TaskDeltas) -> dict[str, str]:
    return {
        "format": FORMAT,
        "style": deltas.style,
        "rank": str(deltas.rank),
        "qkv_rank_factor": str(deltas.qkv_rank_factor),
        "layers": json.dumps(deltas.names),
    }


def deltas_content(deltas: TaskDeltas, metadata: Mapping[str, str] | None = None
                   ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and metadata of a deltas file: every banked task delta (not the live slot)."""
    tensors = {
        f"{name}.{key}_task{task}": value.detach().contiguous().cpu()
        for name, delta, _ in deltas.layers()
        for task in delta.banked_tasks
        for key, value in delta.task_state(task).items()
    }
    return tensors, {**_config(deltas), "tasks": json.dumps(deltas.banked_tasks), **dict(metadata or {})}


def save_deltas(deltas: TaskDeltas, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Write every banked task delta (not the live slot: call ``deltas.bank()`` first to include it), whole or not
    at all (a failed write is a :class:`~lightning_taylor.errors.WriteError` and leaves no partial file)."""
    tensors, meta = deltas_content(deltas, metadata)
    save_tensors(path, tensors, meta, "the deltas")


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


#: The ``timm.create_model`` arguments an exported file may carry: architecture hyper-parameters of timm's
#: ViT families, with plain JSON values. Nothing that makes timm read another file or go to the network
#: (``checkpoint_path``, ``pretrained_cfg_overlay``, ``cache_dir``, ...): :func:`export_merged` refuses to
#: write anything else and :func:`load_merged` refuses to pass anything else on.
MODEL_KWARGS = frozenset({
    # timm's VisionTransformer (and the families built on it: DeiT, DINOv2, CLIP, SigLIP, ...)
    "img_size", "patch_size", "in_chans", "num_classes", "global_pool", "embed_dim", "depth", "num_heads",
    "mlp_ratio", "qkv_bias", "qk_norm", "proj_bias", "init_values", "class_token", "pos_embed", "no_embed_class",
    "reg_tokens", "pre_norm", "final_norm", "fc_norm", "pool_include_prefix", "dynamic_img_size",
    "dynamic_img_pad", "drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate",
    "drop_path_rate", "weight_init", "fix_init", "scale_attn_norm", "scale_mlp_norm",
    # EVA, BEiT, Swin and SAM's encoder
    "use_abs_pos_emb", "use_rel_pos_bias", "use_shared_rel_pos_bias", "use_rot_pos_emb", "ref_feat_shape",
    "swiglu_mlp", "scale_mlp", "scale_attn_inner", "window_size", "depths", "use_rel_pos", "global_attn_indexes",
    "neck_chans",
})

#: A timm model name with an optional pretrained tag (``vit_base_patch16_224.augreg_in21k``); no
#: ``hf-hub:`` / ``local-dir:`` prefix, which would make timm fetch or read a configuration elsewhere.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?")


def _plain_value(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_plain_value(v) for v in value)
    return False


def check_model_spec(model_name: Any, model_kwargs: Any, source: str) -> None:
    """Refuse a model description that ``timm.create_model`` would not build from this package's data alone.

    ``model_name`` must be a plain registered timm name and ``model_kwargs`` a mapping of
    :data:`MODEL_KWARGS` keys to plain values; ``source`` (a file) is named in the error.
    """
    import timm

    if not isinstance(model_name, str) or not _PLAIN_NAME.fullmatch(model_name) or not timm.is_model(model_name):
        raise expected(f"model_name` of `{source}", "a timm model name such as 'vit_base_patch16_224.augreg_in21k' "
                       "(no 'hf-hub:' or 'local-dir:' prefix)", model_name)
    if not isinstance(model_kwargs, Mapping):
        raise expected(f"model_kwargs` of `{source}", "a mapping of timm constructor arguments", model_kwargs)
    for key, value in model_kwargs.items():
        if key not in MODEL_KWARGS:
            raise expected(f"model_kwargs` of `{source}", "architecture arguments of a timm ViT (img_size, patch_size, "
                           "in_chans, embed_dim, depth, num_heads, num_classes, ...)", key,
                           "The accepted keys are lightning_taylor.deltas.io.MODEL_KWARGS; arguments that load "
                           "weights or configurations are never taken from a file.")
        if not _plain_value(value):
            raise expected(f"model_kwargs[{key!r}]` of `{source}", "a plain value (number, string, bool, None or a "
                           "list of those)", value)


def _check_exportable(state: Mapping[str, Tensor], neg_inf_ok: Collection[str]) -> None:
    """No NaN or +inf anywhere; -inf only in ``neg_inf_ok`` (a masked head's bias, whose logits are -inf)."""
    for key, value in state.items():
        if not value.is_floating_point():
            continue
        bad = torch.isnan(value) | torch.isposinf(value)
        if key not in neg_inf_ok:
            bad |= torch.isneginf(value)
        if bad.any():
            raise ValueError(f"The merged tensor `{key}` has non-finite values; nothing was written.")


def export_merged(
    model: nn.Module,
    deltas: TaskDeltas,
    path: str | os.PathLike,
    composition: Composition | Mapping[int, float],
    model_name: str,
    model_kwargs: Mapping[str, Any] | None = None,
    metadata: Mapping[str, str] | None = None,
    neg_inf_ok: Collection[str] = (),
) -> None:
    """Save the merged network for ``timm.create_model(model_name, **model_kwargs)``.

    ``model_name`` must be a plain timm name and ``model_kwargs`` architecture arguments only
    (:data:`MODEL_KWARGS`), so that :func:`load_merged` takes them back. Every merged tensor must be finite,
    except ``-inf`` in the tensors named in ``neg_inf_ok`` (a masked head's bias). The file is written to a
    temporary name next to ``path`` and renamed, so a failed export leaves no partial file. Load it back
    without this package::

        meta = safetensors.safe_open(path, "pt").metadata()
        model = timm.create_model(meta["model_name"], **json.loads(meta["model_kwargs"]))
        model.load_state_dict(safetensors.torch.load_file(path))
    """
    path = os.fspath(path)
    kwargs = dict(model_kwargs or {})
    check_model_spec(model_name, kwargs, path)
    state = merged_state_dict(model, deltas, composition)
    _check_exportable(state, set(neg_inf_ok))
    comp = composition if isinstance(composition, Composition) else Composition(dict(composition))
    meta = {
        "format": MERGED_FORMAT,
        "model_name": model_name,
        "model_kwargs": json.dumps(kwargs),
        "composition": json.dumps({str(t): w for t, w in comp.weights.items()}),
        "layer_factors": json.dumps([[p, {str(t): m for t, m in f.items()}] for p, f in comp.layer_factors]),
        **dict(metadata or {}),
    }
    save_tensors(path, state, meta, "the merged model",
                 "Nothing was written" + (" (the file there is as it was)." if os.path.exists(path) else "."))


def load_merged(path: str | os.PathLike, **overrides: Any) -> nn.Module:
    """Build the timm model described by an exported file's metadata and load its weights.

    Only a plain timm ``model_name`` and the architecture arguments :func:`export_merged` writes
    (:data:`MODEL_KWARGS`) are taken from the file; anything else is refused, naming the key and the file.
    ``overrides`` are the caller's own ``timm.create_model`` arguments.
    """
    import timm

    path = os.fspath(path)
    try:
        meta = read_metadata(path)
        state = load_file(path)
    except (OSError, SafetensorError) as err:
        raise expected("path", "a safetensors file written by export_merged", path, f"Reading it failed: {err}.") from err
    if meta.get("format") != MERGED_FORMAT:
        raise expected(f"format` of `{path}", repr(MERGED_FORMAT), meta.get("format"))
    try:
        kwargs = json.loads(meta["model_kwargs"])
    except (KeyError, json.JSONDecodeError) as err:
        raise expected(f"model_kwargs` of `{path}", "a JSON object of timm constructor arguments",
                       meta.get("model_kwargs")) from err
    check_model_spec(meta.get("model_name"), kwargs, path)
    model = timm.create_model(meta["model_name"], pretrained=False, **{**kwargs, **overrides})
    model.load_state_dict(state)
    return model


__all__ = [
    "MODEL_KWARGS",
    "check_model_spec",
    "export_merged",
    "load_deltas",
    "load_merged",
    "merged_state_dict",
    "read_metadata",
    "save_deltas",
]
