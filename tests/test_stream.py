"""One `fit` over a task stream with ITA and IEL, checked against docs/method.md step by step."""

import copy

import lightning as L
import pytest
import timm
import torch
from helpers import SeenLogits

from lightning_taylor.callbacks import IEL, ITA, ContinualEvaluation, PreTuning
from lightning_taylor.curvature import diagonal_fisher
from lightning_taylor.data import TaskStreamDataModule
from lightning_taylor.deltas.composition import uniform
from lightning_taylor.model.module import IncrementalViT

TINY = dict(img_size=16, patch_size=8, embed_dim=24, depth=2, num_heads=2, in_chans=1)
FAST_PRETUNING = PreTuning(probe_epochs=1, align_epochs=2, align_epochs_per_task=1, samples_per_class=32)


def make_parts(algorithm: str, **callback_kwargs):
    L.seed_everything(0, verbose=False)
    data = TaskStreamDataModule("digits", num_tasks=5, epochs_per_task=1, batch_size=32, image_size=16)
    model = IncrementalViT("vit_tiny_patch16_224", pretrained=False, model_kwargs=TINY, num_classes=10,
                           classes_per_task=2, epochs_per_task=1, lr=1e-2)
    kind = ITA if algorithm == "ita" else IEL
    callback = kind(1.0, rank=2, pretuning=FAST_PRETUNING, head_fisher_samples=16, **callback_kwargs)
    return data, model, callback


def hand_built(pl_module, weights: dict[int, float]) -> torch.nn.Module:
    """A plain timm model with W0 + Σ w_t τ_t written into its weights (no hooks)."""
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **TINY).eval()
    plain.load_state_dict(pl_module.backbone.state_dict())
    deltas = pl_module.task_deltas
    with torch.no_grad():
        for name in deltas.names:
            for task, w in weights.items():
                plain.get_submodule(name).weight += w * deltas.task_delta(name, task)
    return plain


class Spy(L.Callback):
    """Records the state after each task boundary and checks every forward against hand-built weights."""

    def __init__(self, algorithm: L.Callback) -> None:
        self.algorithm, self.records, self.checked = algorithm, {}, {"train": 0, "val": 0}

    def on_train_epoch_start(self, trainer, pl_module):
        task, algo, deltas = trainer.datamodule.current_task, self.algorithm, pl_module.task_deltas
        self.records[task] = {
            "pretuned": copy.deepcopy(algo.pretuned_head),
            "curvature": {k: v.clone() for k, v in algo.curvature_strategy.mean(algo.algorithm, pl_module.device).items()},
            "current_count": algo.accumulator.current_count,
            "banked": deltas.banked_tasks,
            "current": deltas.current_task,
            "head": copy.deepcopy(pl_module.head.state_dict()),
        }

    def _check(self, pl_module, batch, weights, stage):
        x = batch[0]
        plain = hand_built(pl_module, weights)
        plain.load_state_dict({**plain.state_dict(), **{f"head.{k}": v for k, v in pl_module.head.state_dict().items()}})
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            torch.testing.assert_close(pl_module(x), plain(x), rtol=1e-4, atol=1e-5)
        pl_module.train(was_training)
        self.checked[stage] += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        task = trainer.datamodule.current_task
        if batch_idx == 0:
            weights = {task: 1.0} if isinstance(self.algorithm, ITA) else dict(uniform(range(task + 1)).weights)
            self._check(pl_module, batch, weights, "train")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            self._check(pl_module, batch, dict(uniform(range(trainer.datamodule.current_task + 1)).weights), "val")


def fit(algorithm: str, tmp_path, tasks: int = 3, **callback_kwargs):
    data, model, callback = make_parts(algorithm, **callback_kwargs)
    spy = Spy(callback)
    evaluation = ContinualEvaluation(output_dir=str(tmp_path))
    trainer = L.Trainer(max_epochs=tasks, reload_dataloaders_every_n_epochs=1, num_sanity_val_steps=0,
                        limit_train_batches=2, enable_progress_bar=False, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[callback, spy, evaluation])
    trainer.fit(model, data)
    return trainer, data, model, callback, spy, evaluation


def task_fisher(model, data, pretuned, task):
    """F_task at θ0 with the pre-tuned head over the classes seen at `task`, computed from scratch."""
    plain = hand_built(model, {})  # θ0, no hooks
    plain.get_classifier().load_state_dict(pretuned)
    seen = (task + 1) * data.classes_per_task
    names = [f"model.{n}.weight" for n in model.task_deltas.names]
    return diagonal_fisher(SeenLogits(plain, seen), data.task_dataloader(task, "train"), names)


@pytest.mark.parametrize("algorithm", ["ita", "iel"])
def test_stream_runs_and_follows_the_method(algorithm, tmp_path):
    trainer, data, model, callback, spy, evaluation = fit(algorithm, tmp_path)
    records = spy.records
    assert sorted(records) == [0, 1, 2]
    # every forward (training and evaluation) matched the hand-built composition
    assert spy.checked["train"] == 3 and spy.checked["val"] == 3
    # deltas: task t trains in the slot, earlier tasks are banked
    for task in range(3):
        assert records[task]["current"] == task and records[task]["banked"] == list(range(task))
    assert model.task_deltas.banked_tasks == [0, 1, 2]  # the last one banked at the end of fit

    # Fisher: ITA's curvature at task 1 is the prior plus the mean Fisher of task 0;
    # IEL's at task 1 is the prior plus the mean over tasks 0 and 1 with true counts.
    f0 = task_fisher(model, data, records[0]["pretuned"], 0)
    f1 = task_fisher(model, data, records[1]["pretuned"], 1)
    assert records[1]["current_count"] == f1.count == len(data.task_dataset(1))
    for name in model.task_deltas.names:
        key, prefixed = f"{name}.weight", f"model.{name}.weight"
        if algorithm == "ita":
            expected = 1e-5 + f0.sums[prefixed] / f0.count
            torch.testing.assert_close(records[0]["curvature"][key], torch.full_like(expected, 1e-5))
        else:
            expected = 1e-5 + (f0.sums[prefixed] + f1.sums[prefixed]) / (f0.count + f1.count)
        torch.testing.assert_close(records[1]["curvature"][key], expected, rtol=1e-4, atol=1e-9)

    # pre-tuned head: the rows of classes not seen yet keep their initial values
    initial = records[0]["head"]
    for task in range(3):
        seen = (task + 1) * data.classes_per_task
        pretuned = records[task]["pretuned"]["weight"]
        torch.testing.assert_close(pretuned[seen:], initial["weight"][seen:].float(), rtol=0, atol=0)
        assert not torch.equal(pretuned[:seen], initial["weight"][:seen].float())

    # continual evaluation: one row per task, written to disk
    assert len(evaluation.matrices["class_il"].rows) == 3
    for name in ("accuracy_class_il.csv", "accuracy_class_il.png", "accuracy_task_il.csv", "deltas.safetensors",
                 "fisher.safetensors", "pretuned_head.safetensors"):
        assert (tmp_path / name).stat().st_size > 0, name


@pytest.mark.parametrize("mode", ["decoupled", "coupled"])
def test_penalty_step_applies_the_closed_form_gradients(mode, tmp_path):
    """One optimiser step's penalty: θ ← θ − s·clip(∂R/∂θ) (decoupled) or grad += ∂R/∂θ (coupled)."""
    from lightning_taylor.penalties import delta_penalty

    trainer, data, model, callback, _, _ = fit("ita", tmp_path, tasks=2, penalty_mode=mode)
    deltas = model.task_deltas
    deltas.begin_task(2)  # a fresh slot for task 2 with non-zero values
    torch.manual_seed(0)
    with torch.no_grad():
        for p in deltas.slot_parameters():
            p.normal_(0, 0.1)
    callback.task = 2
    params = dict(deltas.named_parameters())
    before = {k: v.detach().clone() for k, v in params.items()}
    for p in params.values():
        p.grad = torch.zeros_like(p)
    _, expected = delta_penalty(deltas, callback.curvature_strategy.mean("ita", model.device), "ita", callback.strength)
    optimizer = trainer.optimizers[0]
    group = optimizer.param_groups[0]
    factor = group["lr"] / group["initial_lr"]
    model.log = lambda *args, **kwargs: None  # outside a loop, Lightning has nowhere to log to
    callback.on_before_optimizer_step(trainer, model, optimizer)
    assert any(g.abs().sum() > 0 for g in expected.values())
    for key, grad in expected.items():
        if mode == "coupled":
            torch.testing.assert_close(params[key].grad, grad)
            torch.testing.assert_close(params[key].detach(), before[key], rtol=0, atol=0)
        else:
            clipped = grad * min(1.0, 100.0 / float(grad.norm())) if grad.norm() > 0 else grad
            torch.testing.assert_close(params[key].detach(), before[key] - factor * clipped)
