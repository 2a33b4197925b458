"""Mixed precision: the Fisher, the penalty and the head statistics stay float32 whatever the autocast."""

import lightning as L
import pytest
import torch
from conftest import make_vit
from helpers import SeenLogits, randomise_slot, train_stream

from lightning_taylor.callbacks import IEL, ITA, PreTuning
from lightning_taylor.data import TaskStreamDataModule
from lightning_taylor.deltas import TaskDeltas
from lightning_taylor.fisher import diagonal_fisher
from lightning_taylor.module import IncrementalViT
from lightning_taylor.penalties import delta_penalty

TINY = dict(img_size=16, patch_size=8, embed_dim=24, depth=2, num_heads=2, in_chans=1)
FAST_PRETUNING = PreTuning(probe_epochs=1, align_epochs=1, align_epochs_per_task=0, samples_per_class=16)


def test_fisher_and_penalty_ignore_a_surrounding_autocast(images):
    vit = make_vit(dtype=torch.float32)
    deltas = TaskDeltas(vit, rank=2)
    train_stream(deltas, 2)
    deltas.begin_task(2)
    randomise_slot(deltas, 3)
    names = [f"model.{n}.weight" for n in deltas.names]
    curvature = {f"{n}.weight": torch.rand_like(vit.get_submodule(n).weight) for n in deltas.names}
    x = images.float()

    def statistics():
        with deltas.disabled():
            fisher = diagonal_fisher(SeenLogits(vit, 5), [x], names)
        return fisher, delta_penalty(deltas, curvature, "iel", 2.0)

    fisher, (value, grads) = statistics()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (x @ x[0, 0]).dtype == torch.bfloat16  # the autocast is on
        fisher_bf16, (value_bf16, grads_bf16) = statistics()
    for name in names:
        assert fisher_bf16.sums[name].dtype == torch.float32
        assert torch.equal(fisher_bf16.sums[name], fisher.sums[name])
    assert value_bf16.dtype == torch.float32 and torch.equal(value_bf16, value)
    assert all(torch.equal(grads_bf16[k], grads[k]) and grads[k].dtype == torch.float32 for k in grads)


class ForwardDtype(L.Callback):
    """The dtypes of the head's output inside training steps (what autocast made of the forward)."""

    def __init__(self) -> None:
        self.dtypes: set[torch.dtype] = set()
        self._handle = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._handle = pl_module.head.register_forward_hook(lambda m, a, out: self.dtypes.add(out.dtype))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._handle.remove()


def two_task_fit(algorithm: str, precision: str, tmp_path):
    L.seed_everything(0, verbose=False)
    data = TaskStreamDataModule("digits", num_tasks=5, epochs_per_task=1, batch_size=32, image_size=16)
    model = IncrementalViT("vit_tiny_patch16_224", pretrained=False, model_kwargs=TINY, num_classes=10,
                           classes_per_task=2, epochs_per_task=1, lr=1e-2)
    kind = ITA if algorithm == "ita" else IEL
    callback = kind(1.0, rank=2, pretuning=FAST_PRETUNING, head_fisher_samples=16, fisher_estimator="mc",
                    save_dir=str(tmp_path / precision))
    spy = ForwardDtype()
    trainer = L.Trainer(max_epochs=2, precision=precision, reload_dataloaders_every_n_epochs=1,
                        num_sanity_val_steps=0, limit_train_batches=3, limit_val_batches=0, enable_progress_bar=False,
                        logger=False, enable_checkpointing=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=[callback, spy])
    trainer.fit(model, data)
    return trainer, model, callback, spy


@pytest.mark.parametrize("algorithm", ["ita", "iel"])
def test_a_bf16_mixed_stream_keeps_its_statistics_in_float32(algorithm, tmp_path):
    """Two tasks under ``bf16-mixed``: the forward ran in bfloat16, and the task-boundary statistics (computed
    at θ0, so independent of the training) are bit-for-bit those of a float32 fit."""
    trainer, model, callback, spy = two_task_fit(algorithm, "bf16-mixed", tmp_path)
    _, _, reference, reference_spy = two_task_fit(algorithm, "32-true", tmp_path)
    assert spy.dtypes == {torch.bfloat16} and reference_spy.dtypes == {torch.float32}
    ours, theirs = callback.accumulator, reference.accumulator
    assert ours.past and ours.current  # task 0's Fisher in `past`, task 1's in `current`
    for mine, other in ((ours.past, theirs.past), (ours.current, theirs.current),
                        (callback.head_curvature, reference.head_curvature),
                        (callback.pretuned_head, reference.pretuned_head)):
        for key, value in mine.items():
            assert value.dtype == torch.float32 and torch.equal(value, other[key]), key
    penalty = trainer.callback_metrics["train/penalty"]
    assert penalty.dtype == torch.float32 and torch.isfinite(penalty) and penalty > 0
    assert model.task_deltas.banked_tasks == [0, 1]
    assert all(torch.isfinite(p).all() for p in model.task_deltas.parameters())
