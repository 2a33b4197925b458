"""Checkpoints written whole or not at all: :class:`AtomicCheckpointIO`, a Lightning ``CheckpointIO`` plugin.

Lightning's ``TorchCheckpointIO`` calls ``torch.save`` on the final path: a full disk or a kill mid-write leaves
a truncated ``epoch=…-step=….ckpt`` that does not load, and ``torch.save`` reports the failed write as a
``RuntimeError`` without its cause. This plugin writes to a hidden temporary name in the same folder, fsyncs and
renames (:mod:`lightning_taylor._atomic`), and turns the OS error into a
:class:`~lightning_taylor.errors.WriteError` that names the checkpoint and the last good one in its folder.
``ModelCheckpoint`` removes an older checkpoint only after the new one is saved, so a failed save never costs
the last good checkpoint.

The ``lightning-taylor`` command uses it by default; in another LightningCLI::

    trainer:
      plugins:
        - class_path: lightning_taylor.checkpoint_io.AtomicCheckpointIO

or ``L.Trainer(plugins=[AtomicCheckpointIO()])``. Remote paths (``s3://``, ...) go to Lightning's plugin
unchanged: an object store writes an object whole anyway.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_taylor._atomic import write_atomic


def last_good_checkpoint(folder: str | os.PathLike, exclude: str | os.PathLike | None = None) -> Path | None:
    """The newest loadable-looking ``.ckpt`` in ``folder`` (``last.ckpt`` resolved), other than ``exclude``."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    skip = Path(exclude).resolve() if exclude is not None else None
    found = []
    for path in folder.glob("*.ckpt"):
        try:
            real = path.resolve(strict=True)
            if real != skip and real.stat().st_size > 0:
                found.append((real.stat().st_mtime, path))
        except OSError:
            continue  # a dangling link
    return max(found)[1] if found else None


def intact_note(path: str | os.PathLike) -> str:
    """"The last good checkpoint is …" for a failed save of ``path`` (its folder is searched)."""
    good = last_good_checkpoint(Path(path).parent, exclude=path)
    existing = Path(path)
    if good is None and existing.is_file():
        good = existing  # a failed overwrite leaves the file as it was
    if good is None:
        return "No checkpoint of this run is on disk yet."
    return f"The last good checkpoint is {good}; nothing else was changed."


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes every checkpoint to a temporary name, fsyncs it and renames it.

    A failed save leaves no partial file and raises :class:`~lightning_taylor.errors.WriteError` naming the
    file, the reason (ENOSPC, EFBIG, EACCES, EROFS, ENOTDIR, ...) and the last good checkpoint.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("`AtomicCheckpointIO.save_checkpoint` takes no `storage_options`, but got "
                            f"{storage_options!r}; pass a plugin of your own to use them.")
        if not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path)
            return
        write_atomic(path, lambda handle: torch.save(checkpoint, handle), "the checkpoint",
                     lambda: intact_note(path))


__all__ = ["AtomicCheckpointIO", "intact_note", "last_good_checkpoint"]
