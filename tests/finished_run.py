"""A tiny finished ITA run directory, built once per test session (the ``finished_run`` fixture of conftest.py).

Layout as ``lightning-taylor fit`` leaves it: ``checkpoints/last.ckpt`` and ``deltas.safetensors``.
The deltas are large and random, so that no edit passes vacuously. Tests that damage or add files work on
a :func:`copy_run`, never on the shared directory.
"""

import shutil
from pathlib import Path

import lightning as L
import torch

from lightning_taylor._atomic import commit_files
from lightning_taylor.callbacks import ITA, PreTuning
from lightning_taylor.data import TaskStreamDataModule
from lightning_taylor.deltas import save_deltas
from lightning_taylor.model.module import IncrementalViT

TINY = dict(img_size=16, patch_size=8, embed_dim=24, depth=2, num_heads=2, in_chans=1)
TASKS = 3  # trained tasks out of the stream's 5


def make_run(root: Path) -> Path:
    """Train ITA on 3 of 5 digit tasks (one batch each), randomise the deltas, save checkpoint and deltas."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread beats two cores shared with other processes
    try:
        L.seed_everything(0, verbose=False)
        data = TaskStreamDataModule("digits", num_tasks=5, epochs_per_task=1, batch_size=32, image_size=16,
                                    eval_batch_size=512)
        model = IncrementalViT("vit_tiny_patch16_224", pretrained=False, model_kwargs=TINY, num_classes=10,
                               classes_per_task=2, epochs_per_task=1, lr=1e-2)
        pretuning = PreTuning(probe_epochs=1, align_epochs=1, align_epochs_per_task=0, samples_per_class=16)
        callback = ITA(1.0, rank=2, pretuning=pretuning, head_fisher_samples=8, fisher_estimator="empirical",
                       save_dir=str(root))
        trainer = L.Trainer(max_epochs=TASKS, reload_dataloaders_every_n_epochs=1, num_sanity_val_steps=0,
                            limit_train_batches=1, limit_val_batches=0, enable_progress_bar=False, logger=False,
                            enable_checkpointing=False, enable_model_summary=False, default_root_dir=root,
                            callbacks=[callback])
        trainer.fit(model, data)
        deltas = model.task_deltas
        assert deltas.banked_tasks == [0, 1, 2] and deltas.current_task == 2
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for _, delta, _ in deltas.layers():
                for task in (0, 1):
                    for value in delta.task_state(task).values():
                        value.copy_(0.3 * torch.randn(value.shape, generator=generator))
                for value in delta.slot_state().values():
                    value.copy_(0.3 * torch.randn(value.shape, generator=generator))
        deltas.bank()  # task 2 lives in the slot (as in a checkpoint saved during fit) and in the bank
        trainer.save_checkpoint(root / "checkpoints" / "last.ckpt")
        save_deltas(deltas, root / "deltas.safetensors", metadata={"algorithm": "ita", "strength": "1.0"})
        # The manifest lists the files as they are now (fit's lists the deltas before they were randomised).
        commit_files(root, [(p.name, p.read_bytes(), p.name) for p in sorted(root.glob("*.safetensors"))])
    finally:
        torch.set_num_threads(threads)
    return root


def copy_run(source: Path, target: Path) -> Path:
    """A private copy of a run directory (for tests that damage or add files)."""
    shutil.copytree(source, target)
    return target
