"""A test helper callback: sleeps before every training batch after the first epoch while the environment
variable ``SLOW_BATCHES_SECONDS`` is set, so that a signal sent to a subprocess fit lands mid-epoch."""

import os
import time

import lightning as L


class SlowBatches(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        seconds = float(os.environ.get("SLOW_BATCHES_SECONDS", "0"))
        if seconds and trainer.current_epoch >= 1:
            time.sleep(seconds)
