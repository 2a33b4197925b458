"""What an ITA / IEL checkpoint belongs to, recorded in it and checked when a fit resumes from it.

A resumed fit continues a stream with a method. Resuming with another stream (more tasks, another class
order) would silently redefine the tasks and give a wrong accuracy matrix; another strength or estimator
would mix two methods in one run. So the callback's checkpoint state holds a *record*:

- the stream: ``dataset``, ``num_classes``, ``class_names``, ``class_order``, ``num_tasks``,
  ``classes_per_task`` (``task_sizes`` instead when the tasks differ in size), ``epochs_per_task`` (each as
  far as the DataModule / LightningModule state it);
- the method: ``algorithm``, ``strength``, ``style``, ``rank``, ``qkv_rank_factor``, ``targets``,
  ``fisher_estimator`` (with its ``fisher_samples`` / ``fisher_top_k`` where they matter), ``penalty_mode``, ``head_init``,
  ``curvature`` (with ``kfac_approx`` and ``kfac_tasks`` for KFAC).

:func:`check_record` refuses a resume whose record differs, naming the field and both values; a changed
``strength`` alone is accepted when the callback was built with ``allow_strength_change=True``.

The delta layout (style, rank, target layers) is also visible in the module's ``state_dict``, which Lightning
loads *before* the callbacks' state: :func:`check_delta_layout` runs as a load-state-dict pre-hook of
``task_deltas`` and names the differing setting before PyTorch's wall of missing / unexpected keys.
"""

from __future__ import annotations

from typing import Any, Mapping

import lightning as L
from torch import Tensor, nn

from lightning_taylor.callbacks.protocol import stream_value, uneven_task_sizes
from lightning_taylor.errors import expected

STREAM_FIELDS = ("dataset", "num_classes", "class_names", "class_order", "num_tasks", "classes_per_task",
                 "epochs_per_task")
_RESUME_HINT = ("Resume with the settings the run was trained with, or start a new run (another "
                "`trainer.default_root_dir` or logger version).")
#: Method fields added after the first checkpoints were written, with the value those were trained with.
_RECORD_DEFAULTS = {"curvature": "diagonal", "head_init": "random", "head_alignment": "none"}
_SLOT_STYLES = {"lora_A": "lora", "lora_B": "lora", "delta": "full", "scale": "ia3"}


def _plain(value: Any) -> Any:
    """Checkpoint-safe plain values (``weights_only=True``): tuples become lists, numbers stay numbers."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def stream_record(trainer: L.Trainer, pl_module: L.LightningModule,
                  arguments: Mapping[str, int | None]) -> dict[str, Any]:
    """The stream as the DataModule / LightningModule / callback arguments state it (unknown fields left out)."""
    record: dict[str, Any] = {}
    datamodule = getattr(trainer, "datamodule", None)
    uneven = uneven_task_sizes(trainer, pl_module, arguments.get("classes_per_task"))
    if uneven is not None:  # tasks that differ in size: the partition stands where classes_per_task would
        record["task_sizes"] = list(uneven)
    for name in STREAM_FIELDS:
        if name == "classes_per_task" and uneven is not None:
            continue
        if name in ("num_tasks", "classes_per_task", "epochs_per_task"):
            value = stream_value(trainer, pl_module, name, arguments.get(name))
        else:
            value = getattr(datamodule, name, None)
        if isinstance(value, (str, int, list, tuple)) and not isinstance(value, bool):
            record[name] = _plain(value)
    return record


def check_record(recorded: Mapping[str, Any], current: Mapping[str, Any], allow_strength_change: bool,
                 checkpoint: str | None) -> None:
    """Refuse a resume whose stream or method differs from the recorded one (fields known to both)."""
    source = f"checkpoint {checkpoint}" if checkpoint else "the checkpoint"
    for name, value in {**_RECORD_DEFAULTS, **recorded}.items():
        if name not in current or _plain(current[name]) == value:
            continue
        if name == "strength" and allow_strength_change:
            continue
        hint = _RESUME_HINT
        if name == "strength":
            hint += " To change the strength of a resumed run on purpose, pass `allow_strength_change=True`."
        raise expected(name, f"{value!r} (what {source} was trained with)", _plain(current[name]), hint)


def _slot_layout(state: Mapping[str, Tensor], prefix: str) -> dict[str, dict[str, tuple[int, ...]]]:
    """``{layer: {slot tensor: shape}}`` of the trainable slots under ``prefix`` (banks and counters left out)."""
    layout: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        layer, _, slot = key[len(prefix):].rpartition(".")
        if slot in _SLOT_STYLES:
            layout.setdefault(layer, {})[slot] = tuple(value.shape)
    return layout


def check_delta_layout(module: nn.Module, state: Mapping[str, Tensor], prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook of ``TaskDeltas``: the checkpoint's deltas must have this run's layout."""
    theirs, ours = _slot_layout(state, prefix), _slot_layout(module.state_dict(prefix=prefix), prefix)
    if not theirs or theirs == ours:
        return  # no deltas in the checkpoint at all: PyTorch's own missing-keys error says so
    style = {_SLOT_STYLES[s] for slots in theirs.values() for s in slots}
    if style != {module.style}:
        raise expected("style", f"{sorted(style)[0]!r} (the style of the checkpoint's deltas)", module.style,
                       _RESUME_HINT)
    if set(theirs) != set(ours):
        only_theirs, only_ours = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
        raise expected("targets", "the target layers of the checkpoint's deltas", list(module.targets),
                       f"Layers only in the checkpoint: {only_theirs[:5]}; only in this run: {only_ours[:5]}. "
                       + _RESUME_HINT)
    layer = next(name for name in ours if theirs[name] != ours[name])
    raise expected("rank", f"the rank of the checkpoint's deltas (layer {layer}: {theirs[layer]})", module.rank,
                   f"This run's slot shapes there: {ours[layer]}. " + _RESUME_HINT)
