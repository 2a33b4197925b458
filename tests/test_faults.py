"""Fail loudly: a fit that goes numerically wrong, or is resumed with inputs that are not its own, stops with a
clear error, and nothing non-finite is written (the callbacks' guard, checkpoint checks and resume record)."""

import hashlib

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from lightning_taylor.callbacks import ITA, ContinualEvaluation, PreTuning
from lightning_taylor.callbacks._curvature import DiagonalCurvature
from lightning_taylor.data import TaskStreamDataModule
from lightning_taylor.finite import (
    NonFiniteError,
    all_finite,
    check_finite,
    first_non_finite,
)
from lightning_taylor.model.module import IncrementalViT

TINY = dict(img_size=16, patch_size=8, embed_dim=24, depth=2, num_heads=2, in_chans=1)
FAST_PRETUNING = PreTuning(probe_epochs=1, align_epochs=2, align_epochs_per_task=1, samples_per_class=32)
EPOCHS_PER_TASK = 1


class PoisonedViT(IncrementalViT):
    """Multiplies the loss by ``value`` at the optimiser steps in ``steps`` (a logit overflow, say)."""

    def __init__(self, steps=(), value=float("nan"), **kwargs):
        super().__init__(**kwargs)
        self.poison_steps, self.poison_value = set(steps), value

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * self.poison_value if self.global_step in self.poison_steps else loss


def fit(root, num_tasks=2, ckpt_path=None, steps=(), value=float("nan"), callbacks=(), **ita):
    L.seed_everything(0, verbose=False)
    data = TaskStreamDataModule("digits", num_tasks=num_tasks, epochs_per_task=EPOCHS_PER_TASK, batch_size=32,
                                image_size=16)
    model = PoisonedViT(steps=steps, value=value, model_name="vit_tiny_patch16_224", pretrained=False, model_kwargs=TINY,
                      num_classes=10, classes_per_task=10 // num_tasks, epochs_per_task=EPOCHS_PER_TASK, lr=3e-3)
    callback = ITA(**{"alpha": 1.0, "rank": 2, "pretuning": FAST_PRETUNING, "head_fisher_samples": 16,
                      "save_dir": str(root), **ita})
    checkpoints = ModelCheckpoint(dirpath=root / "checkpoints", save_last="link", save_top_k=1,
                                  save_on_train_epoch_end=True)
    trainer = L.Trainer(max_epochs=2 * EPOCHS_PER_TASK, reload_dataloaders_every_n_epochs=1,
                        check_val_every_n_epoch=EPOCHS_PER_TASK, num_sanity_val_steps=0, limit_train_batches=3,
                        enable_progress_bar=False, logger=False, enable_model_summary=False, default_root_dir=root,
                        callbacks=[callback, ContinualEvaluation(output_dir=str(root)), checkpoints, *callbacks])
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer, model, callback


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A clean 2-task run: its last.ckpt is the input of the resume cases."""
    root = tmp_path_factory.mktemp("finished")
    fit(root)
    return root


# -- the finiteness helpers -------------------------------------------------------------------------------------
def test_fused_check_agrees_with_the_elementwise_one():
    good = [torch.randn(5), torch.ones(2, 3, dtype=torch.float64), torch.arange(3)]  # ints are ignored
    assert all_finite(good) and first_non_finite(enumerate(good)) is None
    for bad_value in (float("nan"), float("inf"), -float("inf")):
        bad = torch.randn(4)
        bad[2] = bad_value
        assert not all_finite(good + [bad])
        assert first_non_finite([("a", good[0]), ("b", bad)])[0] == "b"
    huge = torch.full((4,), 3e38)  # the sum overflows, the values do not: no false alarm
    check_finite({"huge": huge}, "a test")
    with pytest.raises(NonFiniteError, match=r"in the head: `bias` has 1 of 3 values: 1 is NaN"):
        check_finite({"weight": torch.zeros(3), "bias": torch.tensor([0.0, float("nan"), 1.0])}, "the head")


# -- arguments --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argument, value, message", [
    ("alpha", float("inf"), r"`strength` to be a finite float >= 0, but got inf"),
    ("lambda_fisher", float("nan"), r"`lambda_fisher` to be a finite float >= 0"),
    ("lambda_l2", float("inf"), r"`lambda_l2` to be a finite float >= 0"),
    ("fisher_samples", 0, r"`fisher_samples` to be an int >= 1, but got 0"),
    ("fisher_top_k", 0, r"`fisher_top_k` to be an int >= 1, but got 0"),
    ("on_non_finite", "ignore", r"`on_non_finite` to be one of \('raise', 'skip_step'\)"),
    ("style", "dora", r"`style` to be one of"),
])
def test_bad_strengths_and_settings_are_refused_at_construction(argument, value, message):
    with pytest.raises(ValueError, match=message):
        ITA(**{argument: value})


def test_infinite_learning_rate_is_refused():
    with pytest.raises(ValueError, match=r"`lr` to be a finite float >= 0, but got inf"):
        IncrementalViT(pretrained=False, model_name="vit_tiny_patch16_224", model_kwargs=TINY, lr=float("inf"))


# -- numerical failures during a fit ----------------------------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_loss_stops_the_fit_before_anything_is_saved(tmp_path, value):
    # Step 4 is inside task 1 (3 steps per epoch): task 0's checkpoint exists and must survive untouched.
    with pytest.raises(NonFiniteError, match=r"\[ITA\] task 1, optimiser step 4: `loss \(micro-batch 0\)` is "
                                             r"non-finite .* before anything is saved"):
        fit(tmp_path, steps=(4,), value=value)
    last = tmp_path / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    assert state["epoch"] == 0  # the last good state: after task 0
    assert all_finite(state["state_dict"].values())
    for name in ("deltas.safetensors", "fisher.safetensors", "pretuned_head.safetensors"):
        assert not (tmp_path / name).exists()


def test_skip_step_drops_the_step_and_keeps_training(tmp_path, finished):
    trainer, model, callback = fit(tmp_path, steps=(1, 4), on_non_finite="skip_step")
    assert callback.guard.skipped == 2
    saved = load_file(tmp_path / "deltas.safetensors")
    assert all_finite(saved.values()) and all_finite(model.state_dict().values())
    # A skipped step leaves the slot where it was: the run differs from the clean one.
    clean = load_file(finished / "deltas.safetensors")
    assert any(not torch.equal(saved[k], clean[k]) for k in saved)


def test_non_finite_fisher_stops_at_the_task_boundary(tmp_path, monkeypatch):
    original = DiagonalCurvature.estimate

    def poisoned(self, *args, **kwargs):
        fisher = original(self, *args, **kwargs)
        name = next(iter(fisher.sums))
        fisher.sums[name] = fisher.sums[name] * float("nan")
        return fisher

    monkeypatch.setattr(DiagonalCurvature, "estimate", poisoned)
    with pytest.raises(NonFiniteError, match=r"the backbone Fisher of \[ITA\] task 0: `blocks.0.attn.qkv.weight`"):
        fit(tmp_path)
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()


class PoisonSlotAtEpochEnd(L.Callback):
    """Makes the delta slot NaN after the last optimiser step of epoch 1, before the checkpoint is written."""

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            with torch.no_grad():
                next(pl_module.task_deltas.slot_parameters()).fill_(float("nan"))


def test_a_non_finite_checkpoint_is_never_written(tmp_path):
    with pytest.raises(NonFiniteError, match=r"checkpoint of epoch 1: `task_deltas.blocks.0.attn.qkv.lora_A`.*not "
                                             r"written"):
        fit(tmp_path, callbacks=[PoisonSlotAtEpochEnd()])
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["epoch"] == 0 and all_finite(state["state_dict"].values())


# -- checkpoints and resume -------------------------------------------------------------------------------------
def test_damaged_checkpoint_is_refused_naming_the_file(tmp_path, finished):
    state = torch.load(finished / "checkpoints" / "last.ckpt", weights_only=True)
    key = next(k for k in state["state_dict"] if k.endswith("lora_B_task0"))
    state["state_dict"][key] = torch.full_like(state["state_dict"][key], float("nan"))
    damaged = tmp_path / "damaged.ckpt"
    torch.save(state, damaged)
    with pytest.raises(NonFiniteError, match=rf"checkpoint {damaged}: `state_dict.{key}` has .* damaged"):
        fit(tmp_path / "resumed", ckpt_path=damaged)


@pytest.mark.parametrize("change, message", [
    (dict(num_tasks=5), r"`num_tasks` to be 2 \(what checkpoint .*last.ckpt was trained with\), but got 5"),
    (dict(alpha=3.0), r"`strength` to be 1.0 .* but got 3.0.*allow_strength_change=True"),
    (dict(fisher_estimator="empirical"), r"`fisher_estimator` to be 'exact' .* but got 'empirical'"),
    (dict(style="full"), r"`style` to be 'lora' \(the style of the checkpoint's deltas\), but got 'full'"),
    (dict(rank=3), r"`rank` to be the rank of the checkpoint's deltas \(layer blocks.0.attn.qkv: \{'lora_A'"),
])
def test_resume_with_other_settings_is_refused_naming_the_field(tmp_path, finished, change, message):
    before = digest(finished / "checkpoints" / "last.ckpt")
    with pytest.raises(ValueError, match=message):
        fit(tmp_path, ckpt_path=finished / "checkpoints" / "last.ckpt", **change)
    assert digest(finished / "checkpoints" / "last.ckpt") == before


def test_a_strength_change_is_accepted_when_asked_for(tmp_path, finished):
    trainer, _, callback = fit(tmp_path, ckpt_path=finished / "checkpoints" / "last.ckpt", alpha=3.0,
                               allow_strength_change=True)
    assert callback.record["strength"] == 3.0 and trainer.current_epoch == 2
