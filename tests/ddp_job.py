"""A short ITA stream on the embedded backbone for the DDP test.

    python tests/ddp_job.py OUT --devices 2 --batch-size 16

Lightning launches the other ranks itself (``strategy="ddp"``), or torchrun does
(``torchrun --nproc_per_node 2 tests/ddp_job.py OUT --devices 2 ...``). Every rank writes what it holds at
the end — deltas, head, Fisher (or with ``--curvature kfac`` the KFAC sums), pre-tuned head, accuracy
matrix — to ``OUT/rank<r>.pt``. ``--head-alignment drift_compensated`` turns on the end-of-task alignment.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import lightning as L
import torch

from lightning_taylor.callbacks import ITA, ContinualEvaluation, PreTuning
from lightning_taylor.data import TaskStreamDataModule
from lightning_taylor.model.module import IncrementalViT

TASKS = 3


def run(out: Path, devices: int, batch_size: int, curvature: str = "diagonal", kfac_tasks: str = "merged",
        head_alignment: str = "none") -> None:
    torch.set_num_threads(1)  # two processes share two cores
    L.seed_everything(0, verbose=False)
    data = TaskStreamDataModule("digits", num_tasks=5, epochs_per_task=1, batch_size=batch_size)
    model = IncrementalViT("vit_tiny_patch16_224", pretrained="embedded", num_classes=10,
                           classes_per_task=2, epochs_per_task=1, lr=3e-4)
    pretuning = PreTuning(probe_epochs=1, align_epochs=2, align_epochs_per_task=1, samples_per_class=32)
    ita = ITA(1.0, rank=2, pretuning=pretuning, head_fisher_samples=16, fisher_batch_size=16, save_dir=str(out),
              curvature=curvature, kfac_tasks=kfac_tasks, head_alignment=head_alignment)
    evaluation = ContinualEvaluation(output_dir=str(out))
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        max_epochs=TASKS, reload_dataloaders_every_n_epochs=1, num_sanity_val_steps=0,
                        limit_train_batches=3, enable_progress_bar=False, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, default_root_dir=str(out), callbacks=[ita, evaluation])
    trainer.fit(model, data)
    state = {
        "world_size": trainer.world_size,
        "deltas": model.task_deltas.state_dict(),
        "head": model.head.state_dict(),
        **({"fisher": ita.accumulator.curvature(include_current=True),
            "fisher_count": ita.accumulator.past_count + ita.accumulator.current_count} if curvature == "diagonal" else
           {"kfac": [{"sums": sums.sums, "count": sums.count, "tokens": sums.tokens}
                     for sums in ita.accumulator.stored()]}),
        "pretuned": ita.pretuned_head,
        "matrix": evaluation.matrices["class_il"].rows,
    }
    torch.save(state, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--curvature", default="diagonal", choices=("diagonal", "kfac"))
    parser.add_argument("--kfac-tasks", default="merged", choices=("merged", "per_task"))
    parser.add_argument("--head-alignment", default="none", choices=("none", "drift_compensated"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    run(args.out, args.devices, args.batch_size, args.curvature, args.kfac_tasks, args.head_alignment)
