"""What the run prints: messages that do not collide with progress bars, and Lightning's noise kept out.

:func:`show` prints a message on rank zero through the active progress bar when there is one (tqdm's
``write``, so the message gets a line of its own instead of being glued to the bar), else through
Lightning's rank-zero logging. :func:`quiet_lightning` is used by the ``lightning-taylor`` command only (a library does not
filter its user's warnings): it drops Lightning's advertising tips and a deprecation warning that a
Lightning release repeats at every epoch with recent PyTorch.
"""

from __future__ import annotations

import logging
import warnings

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info


def show(trainer: L.Trainer, message: str) -> None:
    """Show ``message`` on rank zero, on its own line even while a progress bar is drawn."""
    if not trainer.is_global_zero:
        return
    bar = trainer.progress_bar_callback
    if isinstance(bar, TQDMProgressBar) and bar.is_enabled:
        bar.print(message)
    else:
        rank_zero_info(message)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


def quiet_lightning() -> None:
    """Drop Lightning's tips and its per-epoch ``LeafSpec`` deprecation warning (the command line only)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=Warning)
