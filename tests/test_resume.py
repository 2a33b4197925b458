"""Crash and resume: a fit killed inside task 2 of 3 and resumed from its last checkpoint ends as if uninterrupted.

Also: the callbacks pickle, and their checkpointed state loads with ``torch.load(weights_only=True)``.
"""

import copy
import pickle

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_taylor.callbacks import IEL, ITA, ContinualEvaluation, PreTuning
from lightning_taylor.data import TaskStreamDataModule
from lightning_taylor.head import PRETUNED_FILE, load_pretuned_heads
from lightning_taylor.model.module import IncrementalViT

TINY = dict(img_size=16, patch_size=8, embed_dim=24, depth=2, num_heads=2, in_chans=1)
FAST_PRETUNING = PreTuning(probe_epochs=1, align_epochs=2, align_epochs_per_task=1, samples_per_class=32)
TASKS, EPOCHS_PER_TASK = 3, 2
ALGORITHMS = {"ita": ITA, "iel": IEL}


class Preempted(RuntimeError):
    pass


class Crash(L.Callback):
    """Kills the fit at the start of batch ``batch`` of epoch ``epoch`` (as a pre-empted job dies)."""

    def __init__(self, epoch: int, batch: int = 1) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise Preempted(f"epoch {self.epoch}, batch {self.batch}")


def run(algorithm: str, root, crash_epoch: int | None = None, ckpt_path=None, extra=(), strength=1.0, **options):
    """A 3-task stream of 2 epochs per task, checkpointed after every epoch; fresh objects every call.

    ``strength`` and ``options`` go to the ITA / IEL callback, ``extra`` callbacks run after it.
    """
    L.seed_everything(0, verbose=False)
    data = TaskStreamDataModule("digits", num_tasks=5, epochs_per_task=EPOCHS_PER_TASK, batch_size=32, image_size=16)
    model = IncrementalViT("vit_tiny_patch16_224", pretrained=False, model_kwargs=TINY, num_classes=10,
                           classes_per_task=2, epochs_per_task=EPOCHS_PER_TASK, lr=3e-3)
    callback = ALGORITHMS[algorithm](strength, rank=2, pretuning=FAST_PRETUNING, head_fisher_samples=16,
                                     save_dir=str(root), **options)
    evaluation = ContinualEvaluation(output_dir=str(root))
    checkpoints = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, save_top_k=-1,
                                  save_on_train_epoch_end=True)
    callbacks = [callback, *extra, evaluation, checkpoints] + ([] if crash_epoch is None else [Crash(crash_epoch)])
    trainer = L.Trainer(max_epochs=TASKS * EPOCHS_PER_TASK, reload_dataloaders_every_n_epochs=1,
                        check_val_every_n_epoch=EPOCHS_PER_TASK, num_sanity_val_steps=0, limit_train_batches=3,
                        enable_progress_bar=False, logger=False, enable_model_summary=False,
                        default_root_dir=root, callbacks=callbacks)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer, model, callback, evaluation


def final_state(model, callback, evaluation) -> dict:
    return {
        "matrix": evaluation.matrices["class_il"].rows,
        "params": {k: v.clone() for k, v in model.state_dict().items()},
        "fisher": callback.accumulator.curvature(include_current=True),
        "pretuned": callback.pretuned_head,
        "pretuned_heads": {f"task{t}.{k}": v for t, head in callback.pretuned_heads.items() for k, v in head.items()},
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    results = {}
    for algorithm in ALGORITHMS:
        root = tmp_path_factory.mktemp(f"uninterrupted_{algorithm}")
        trainer, model, callback, evaluation = run(algorithm, root)
        results[algorithm] = {"root": root, "callback": callback, "evaluation": evaluation,
                              **final_state(model, callback, evaluation)}
    return results


@pytest.mark.parametrize(
    "algorithm, crash_epoch",
    [
        ("ita", 3),  # inside task 1's second epoch: resumes mid-task from the epoch-2 checkpoint
        ("ita", 2),  # inside task 1's first epoch: resumes at the boundary (Fisher, pre-tuning redone)
        ("iel", 3),
    ],
)
def test_resumed_run_ends_like_the_uninterrupted_one(uninterrupted, algorithm, crash_epoch, tmp_path):
    with pytest.raises(Preempted):
        run(algorithm, tmp_path, crash_epoch=crash_epoch)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == crash_epoch - 1

    _, model, callback, evaluation = run(algorithm, tmp_path, ckpt_path=str(last))
    resumed, expected = final_state(model, callback, evaluation), uninterrupted[algorithm]
    assert len(resumed["matrix"]) == TASKS
    assert resumed["matrix"] == expected["matrix"]
    for part in ("params", "fisher", "pretuned", "pretuned_heads"):
        assert resumed[part].keys() == expected[part].keys()
        for key, value in expected[part].items():
            torch.testing.assert_close(resumed[part][key], value, rtol=0, atol=0, msg=f"{part} {key}")


def test_checkpointed_callback_state_loads_with_weights_only(uninterrupted):
    expected = uninterrupted["ita"]
    checkpoint = torch.load(expected["root"] / "checkpoints" / "last.ckpt", weights_only=True)
    states = {key.split("{")[0]: value for key, value in checkpoint["callbacks"].items()}
    restored = ITA()
    restored.load_state_dict(states["ITA"])
    assert restored.task == TASKS - 1
    fisher = restored.accumulator.curvature(include_current=True)
    for key, value in expected["fisher"].items():
        torch.testing.assert_close(fisher[key], value, rtol=0, atol=0)
    evaluation = ContinualEvaluation()
    evaluation.load_state_dict(states["ContinualEvaluation"])
    assert evaluation.matrices["class_il"].rows == expected["matrix"]
    assert sorted(restored.pretuned_heads) == [0, 1, 2]
    # A checkpoint of an earlier version kept the current boundary's head only.
    older = ITA()
    older.load_state_dict({k: v for k, v in states["ITA"].items() if k != "pretuned_heads"})
    assert list(older.pretuned_heads) == [TASKS - 1] and older.pretuned_heads[TASKS - 1] is older.pretuned_head


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_every_boundarys_pretuned_head_is_saved(uninterrupted, algorithm):
    """``pretuned_head.safetensors`` holds h̃_t of every task t, not only the last boundary's."""
    entry = uninterrupted[algorithm]
    saved, callback = load_pretuned_heads(entry["root"] / PRETUNED_FILE), entry["callback"]
    assert sorted(saved.by_task) == list(range(TASKS))
    for task in range(TASKS):
        for name, value in callback.pretuned_heads[task].items():
            assert torch.equal(saved.head(task)[name], value), (task, name)
        seen = 2 * (task + 1)
        # rows of classes not seen yet are still the initial head's; the task's new rows were pre-tuned
        assert torch.equal(saved.head(task)["weight"][seen:], saved.head(0)["weight"][seen:])
        if task:
            assert not torch.equal(saved.head(task)["weight"][seen - 2:seen], saved.head(0)["weight"][seen - 2:seen])
    assert all(torch.equal(saved.last[k], callback.pretuned_head[k]) for k in ("weight", "bias"))


def assert_equal(a, b) -> None:
    """Nested dicts / lists / tensors / plain values, equal exactly."""
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_equal(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_equal(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


@pytest.mark.parametrize("clone", [lambda c: pickle.loads(pickle.dumps(c)), copy.deepcopy], ids=["pickle", "deepcopy"])
def test_callbacks_survive_pickling(uninterrupted, clone):
    for original in (uninterrupted["ita"]["callback"], uninterrupted["ita"]["evaluation"], ITA(alpha=3.0)):
        copied = clone(original)
        assert type(copied) is type(original)
        assert_equal(copied.state_dict(), original.state_dict())
    assert clone(uninterrupted["ita"]["callback"]).strength == 1.0
