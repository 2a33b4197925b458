"""The run's artifacts, written at the end of ``fit``: deltas, curvature and pre-tuned head, as safetensors.

- ``deltas.safetensors``: the banked per-task deltas with the method's name and strength
  (:func:`~lightning_taylor.deltas.save_deltas`);
- the curvature file of the strategy (``fisher.safetensors`` or ``kfac.safetensors``) with its metadata;
- ``pretuned_head.safetensors``: the pre-tuned head ``h̃_t`` of every boundary, keyed ``task<t>.weight`` /
  ``task<t>.bias`` (:mod:`lightning_taylor.head.pretuned_file`); not written when no head was pre-tuned.

Every tensor is checked finite before anything is written: a non-finite one writes nothing. The files are
committed together (:func:`lightning_taylor._atomic.commit_files`): each is written to a temporary name first,
and only when all are on disk are they renamed into place, followed by ``artifacts.json`` listing them. A full
disk or a kill leaves the previous set (or none) and no partial file; ``load_run`` / ``edit`` report a folder
whose manifest is missing or disagrees as incomplete.
"""

from __future__ import annotations

from typing import Mapping

from torch import Tensor

from lightning_taylor._atomic import commit_files, tensor_bytes
from lightning_taylor.deltas import TaskDeltas
from lightning_taylor.deltas.io import deltas_content
from lightning_taylor.finite import check_finite

#: The files a run's artifacts may consist of (present without ``artifacts.json``: an interrupted commit).
ARTIFACT_FILES = ("deltas.safetensors", "fisher.safetensors", "kfac.safetensors", "pretuned_head.safetensors")


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
    files = [("deltas.safetensors", tensor_bytes(*deltas_content(deltas, meta)), "the deltas")]
    if curvature is not None:
        name, tensors, metadata = curvature
        files.append((name, tensor_bytes(tensors, metadata), f"the {name} curvature"))
    if pretuned_head:
        files.append(("pretuned_head.safetensors", tensor_bytes(pretuned_head, dict(pretuned_metadata or {})),
                      "the pre-tuned heads"))
    commit_files(directory, files, lambda: _intact(directory))


def _intact(directory: str) -> str:
    """What a failed commit leaves: the folder's files as before, and the checkpoints."""
    return (f"No artifact in {directory} was replaced and no partial file is left; the run's checkpoints hold the "
            "same state.")
