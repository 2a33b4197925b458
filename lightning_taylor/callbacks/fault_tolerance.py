"""Pre-emption and unwritable folders: :class:`FaultTolerance`, a callback any Lightning project can add.

**SIGTERM** (SLURM before a pre-emption or the time limit, Kubernetes before an eviction). Lightning notes the
signal and raises ``SIGTERMException`` at its next check (after a training or validation batch, after an
epoch); that exception is a ``SystemExit`` without a code, so the process would exit 0 and a job script
``lightning-taylor fit … && next`` would go on as if the stream had finished. This callback

- stops at the next *safe point*: after the optimiser step of a training batch it saves
  ``<checkpoints>/preempted.ckpt`` (and points ``last.ckpt`` at it, so ``--ckpt_path RUN`` resumes from it); a
  signal during the epoch's last batch or its validation lets the epoch finish, and the epoch-end checkpoint
  is the one to resume from (a mid-validation state cannot be resumed exactly);
- sets the exit status to 143 = 128 + SIGTERM, the Unix convention, on every process (under DDP the decision
  is all-reduced, so every rank saves and stops at the same batch);
- prints where the run stopped and the checkpoint to resume from.

Resuming gives the run an uninterrupted fit would have given: the mid-epoch checkpoint holds the loops'
progress, and :class:`~lightning_taylor.data.samplers.StreamSampler` skips the batches already trained.

**Output folders** are created and probed for writing in ``setup``, before the first epoch (and before the
CLI writes ``config.yaml``): ``default_root_dir``, the logger's folder, the ``save_dir`` / ``output_dir`` /
``dirpath`` of the callbacks. A folder that cannot be written is a short
:class:`~lightning_taylor.errors.WriteError`, in seconds rather than after a task.

The ``lightning-taylor`` command adds this callback to every fit; elsewhere, ``callbacks/fault_tolerance.yaml``
or ``L.Trainer(callbacks=[FaultTolerance(), ...])``.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_taylor._atomic import ensure_writable
from lightning_taylor.checkpoint_io import last_good_checkpoint
from lightning_taylor.console import show

#: The exit status of a process stopped by SIGTERM: 128 + 15.
SIGTERM_EXIT = 128 + int(signal.SIGTERM)
#: The file name of the checkpoint written at a pre-emption.
PREEMPTED = "preempted.ckpt"


class FaultTolerance(L.Callback):
    """Checkpoint and exit 143 at SIGTERM; check the output folders before training (see the module docstring).

    Args:
        check_folders: create and probe the output folders in ``setup`` (``fit`` only).
    """

    def __init__(self, check_folders: bool = True) -> None:
        self.check_folders = check_folders
        self._saved: str | None = None  # the checkpoint written at this signal
        self._deferred = False  # a signal seen during the epoch's last batch or its validation

    # -- folders ----------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._saved, self._deferred = None, False
        if stage != "fit" or not self.check_folders or not trainer.is_global_zero:
            return
        check_output_folders(trainer)

    # -- the signal -------------------------------------------------------------------------------------
    def _signalled(self, trainer: L.Trainer) -> bool:
        """Whether any process has received SIGTERM (all-reduced under DDP: every rank decides alike)."""
        received = bool(trainer.received_sigterm) or self._deferred
        if trainer.world_size > 1:
            received = bool(trainer.strategy.reduce_boolean_decision(received, all=False))
        return received

    @staticmethod
    def _set_signal(trainer: L.Trainer, value: bool) -> None:
        # Lightning raises SIGTERMException at its checks while this flag is set (`Trainer.received_sigterm`).
        trainer._signal_connector.received_sigterm = value

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._signalled(trainer):
            return
        if trainer.is_last_batch:  # validation and the epoch-end checkpoint come next: let them run
            self._deferred = True
            self._set_signal(trainer, False)
            return
        self._saved = save_preemption_checkpoint(trainer)
        self._set_signal(trainer, True)  # every rank stops at this batch

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.state.fn == TrainerFn.FITTING and self._signalled(trainer):
            self._deferred = True  # a half-run validation cannot be resumed exactly: finish the epoch first
            self._set_signal(trainer, False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._signalled(trainer):
            # Lightning raises after the epoch-end hooks, ModelCheckpoint's save included.
            self._set_signal(trainer, True)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        exception.code = SIGTERM_EXIT  # a SystemExit: the process exits 143, on every rank
        if trainer.state.fn != TrainerFn.FITTING:
            return
        path = self._saved or _epoch_end_checkpoint(trainer)
        if path is None and _epoch_completed(trainer):
            path = save_preemption_checkpoint(trainer)
        if _epoch_completed(trainer):
            where = f"the end of epoch {trainer.current_epoch - 1}"
        else:
            where = f"epoch {trainer.current_epoch}, batch {trainer.fit_loop.epoch_loop.batch_progress.current.processed}"
        if path is not None:
            message = (f"Stopped by SIGTERM at {where}; checkpoint {path} (resume: lightning-taylor fit "
                       f"--ckpt_path {path}).")
        else:
            good = last_good_checkpoint(_checkpoint_folder(trainer))
            message = (f"Stopped by SIGTERM at {where}, during validation; the last good checkpoint is "
                       f"{good or 'none (no epoch finished)'}.")
        show(trainer, message)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A finished fit no longer needs its pre-emption checkpoint (unless ``last.ckpt`` still points at it)."""
        if not trainer.is_global_zero:
            return
        folder = _checkpoint_folder(trainer)
        stale = os.path.join(folder, PREEMPTED)
        last = os.path.join(folder, ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION)
        if os.path.isfile(stale) and os.path.realpath(last) != os.path.realpath(stale):
            os.remove(stale)

    def state_dict(self) -> dict[str, Any]:
        return {}


def _checkpoint_folder(trainer: L.Trainer) -> str:
    callback = trainer.checkpoint_callback
    folder = getattr(callback, "dirpath", None)
    return os.fspath(folder) if folder else os.path.join(trainer.default_root_dir, "checkpoints")


def _epoch_completed(trainer: L.Trainer) -> bool:
    progress = trainer.fit_loop.epoch_progress.current
    return progress.completed == progress.ready  # `ready` counts the epochs begun


def _epoch_end_checkpoint(trainer: L.Trainer) -> str | None:
    """The checkpoint a ModelCheckpoint wrote at this step (the epoch end), if any."""
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint) and callback._last_global_step_saved == trainer.global_step \
            and _epoch_completed(trainer):
        return callback.last_model_path or callback.best_model_path or None
    return None


def save_preemption_checkpoint(trainer: L.Trainer) -> str:
    """Save ``<checkpoints>/preempted.ckpt`` (all ranks call it) and point the ``last`` checkpoint at it."""
    folder = _checkpoint_folder(trainer)
    path = os.path.join(folder, PREEMPTED)
    trainer.save_checkpoint(path)  # through the trainer's CheckpointIO: AtomicCheckpointIO in the CLI
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint) and callback.save_last:
        last = os.path.join(folder, callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION)
        if callback.save_last == "link":
            ModelCheckpoint._link_checkpoint(trainer, path, last)
        else:
            trainer.save_checkpoint(last)
    return path


def check_output_folders(trainer: L.Trainer) -> None:
    """Create and probe every folder of :func:`output_folders`; the first that fails is a ``WriteError``."""
    for folder, what in output_folders(trainer):
        ensure_writable(folder, what)


def output_folders(trainer: L.Trainer) -> list[tuple[str, str]]:
    """The folders a fit writes into, with what each is for (set ones only)."""
    folders = [(trainer.default_root_dir, "the trainer's default_root_dir")]
    logger = trainer.logger
    if logger is not None and getattr(logger, "save_dir", None):
        folders.append((logger.save_dir, f"the {type(logger).__name__}'s save_dir"))
    for callback in trainer.callbacks:
        for attribute in ("save_dir", "output_dir", "dirpath"):
            value = getattr(callback, attribute, None)
            if isinstance(value, (str, os.PathLike)) and value:
                folders.append((os.fspath(value), f"{type(callback).__name__}'s {attribute}"))
    seen: set[str] = set()
    unique = []
    for folder, what in folders:
        key = os.path.abspath(folder)
        if key not in seen:
            seen.add(key)
            unique.append((folder, what))
    return unique


__all__ = ["PREEMPTED", "SIGTERM_EXIT", "FaultTolerance", "check_output_folders", "output_folders", "save_preemption_checkpoint"]
