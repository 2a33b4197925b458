"""The run's artifacts, written at the end of ``fit``: deltas, curvature and pre-tuned head, as safetensors.

- ``deltas.safetensors``: the banked per-task deltas with the method's name and strength
  (:func:`~lightning_taylor.deltas.save_deltas`);
- the curvature file of the strategy (``fisher.safetensors`` or ``kfac.safetensors``) with its metadata;
- ``pretuned_head.safetensors``: the pre-tuned head ``h̃_t`` of every boundary, keyed ``task<t>.weight`` /
  ``task<t>.bias`` (:mod:`lightning_taylor.head.pretuned_file`); not written when no head was pre-tuned.

Every tensor is checked finite before anything is written: a non-finite one writes nothing.
"""

from __future__ import annotations

import os
from typing import Mapping

from safetensors.torch import save_file
from torch import Tensor

from lightning_taylor.deltas import TaskDeltas, save_deltas
from lightning_taylor.finite import check_finite


def save_artifacts(directory: str, deltas: TaskDeltas, meta: Mapping[str, str],
                   curvature: tuple[str, dict[str, Tensor], dict[str, str]] | None,
                   pretuned_head: dict[str, Tensor], pretuned_metadata: Mapping[str, str] | None = None) -> None:
    """Write the artifacts into ``directory`` (created if needed); ``curvature`` is ``(file, tensors, metadata)``,
    ``pretuned_head`` the pre-tuned heads' tensors with their ``pretuned_metadata``."""
    parts = [(deltas.state_dict(), "the deltas"), (pretuned_head, "the pre-tuned head")]
    if curvature is not None:
        parts.insert(1, (curvature[1], f"the {curvature[0]} curvature"))
    for tensors, what in parts:
        check_finite(tensors, f"{what} to be saved in {directory}", "Nothing was written.")
    os.makedirs(directory, exist_ok=True)
    save_deltas(deltas, os.path.join(directory, "deltas.safetensors"), metadata=dict(meta))
    if curvature is not None:
        name, tensors, metadata = curvature
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, os.path.join(directory, name),
                  metadata=metadata)
    if pretuned_head:
        save_file({k: v.contiguous() for k, v in pretuned_head.items()},
                  os.path.join(directory, "pretuned_head.safetensors"), metadata=dict(pretuned_metadata or {}))
