"""Cost of the non-finite guard: an ITA training step with the guard against the same step without it.

Run from the repository root (about a minute on 2 CPU cores):

    HF_HUB_OFFLINE=1 python benchmarks/guard.py --threads 1

In one process, on the embedded tiny ViT and task 1 of the embedded digits stream (so the ITA penalty is
active), it runs ``--rounds`` pairs of short fits (tasks 0 and 1, 3 epochs each), alternating guard on /
guard off (the guard's checks replaced by no-ops), and times every optimiser step (``on_train_batch_start``
→ ``on_train_batch_end``: forward, backward, penalty, guard, AdamW) of task 1 after ``--warmup`` steps of
each epoch, with the step timer of ``benchmarks/step_overhead.py``. It prints

- the median step time with and without the guard, and their ratio (noisy on a shared machine);
- the guard's own time (its ``check_step`` and ``add_loss`` calls, timed inside the guarded fits) as a
  fraction of the guarded step: the robust figure (target ≤ 2 %).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from lightning_taylor.callbacks import ITA, PreTuning  # noqa: E402
from lightning_taylor.data import TaskStreamDataModule  # noqa: E402
from lightning_taylor.model.module import IncrementalViT  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_overhead import StepTimer, timed  # noqa: E402 (the same step timing as the overhead benchmark)


EPOCHS = 3  # per task


def one_fit(guarded: bool, warmup: int, save_dir: str) -> tuple[list[float], float]:
    """Tasks 0 and 1 of the digits stream; step times of task 1 and the guard's total time in them."""
    L.seed_everything(0, verbose=False)
    data = TaskStreamDataModule("digits", num_tasks=5, epochs_per_task=EPOCHS, batch_size=32)
    model = IncrementalViT(epochs_per_task=EPOCHS, num_classes=10, classes_per_task=2)
    ita = ITA(alpha=100.0, lambda_fisher=1.0, rank=4, fisher_estimator="mc",
              pretuning=PreTuning(probe_epochs=1, align_epochs=1, align_epochs_per_task=0, samples_per_class=32),
              save_dir=save_dir)
    guard_time: list[float] = []
    if guarded:
        ita.guard.check_step = timed(ita.guard.check_step, guard_time)
        ita.guard.add_loss = timed(ita.guard.add_loss, guard_time)
    else:
        ita.guard.check_step = lambda *args, **kwargs: True
        ita.guard.add_loss = lambda loss: None
    timer = StepTimer(EPOCHS, warmup, guard_time)  # task 1 starts at epoch EPOCHS
    trainer = L.Trainer(max_epochs=2 * EPOCHS, reload_dataloaders_every_n_epochs=1,
                        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[ita, timer])
    trainer.fit(model, data)
    return timer.times, sum(timer.hook_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="fits per setting, alternating")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each epoch of task 1")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with_guard, without, guard_total, guarded_total = [], [], 0.0, 0.0
    with tempfile.TemporaryDirectory() as save_dir:  # the fits' saved deltas are not wanted
        for _ in range(args.rounds):
            times, spent = one_fit(True, args.warmup, save_dir)
            with_guard += times
            guard_total, guarded_total = guard_total + spent, guarded_total + sum(times)
            without += one_fit(False, args.warmup, save_dir)[0]
    on, off = statistics.median(with_guard), statistics.median(without)
    print(f"ITA step (embedded ViT, digits task 1, batch 32, {args.threads} thread(s), "
          f"{len(with_guard)} steps each):")
    print(f"  median with the guard    {1e3 * on:8.2f} ms")
    print(f"  median without the guard {1e3 * off:8.2f} ms")
    print(f"  ratio with / without     {on / off:8.3f}")
    print(f"  guard's own time / guarded step: {100 * guard_total / guarded_total:.2f} %")


if __name__ == "__main__":
    main()
