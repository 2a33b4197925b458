"""The callbacks on a user's own LightningModule: the same method, the same numbers as our module.

``UserViT`` is written the way a Lightning user writes a classifier — a timm model in ``self.model``, its
own ``training_step`` and an ``AdamW`` over ``self.parameters()`` — and knows nothing of deltas or Fisher.
"""

from types import SimpleNamespace

import lightning as L
import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import SeenLogits
from torch.utils.data import DataLoader

from lightning_taylor.callbacks import ITA, ContinualEvaluation, PreTuning
from lightning_taylor.callbacks.protocol import (
    Classifier,
    current_task,
    require,
    resolve_classifier,
    stream_value,
)
from lightning_taylor.curvature import diagonal_fisher
from lightning_taylor.data import TaskStreamDataModule
from lightning_taylor.deltas.composition import uniform
from lightning_taylor.model.module import IncrementalViT

TINY = dict(img_size=16, patch_size=8, embed_dim=24, depth=2, num_heads=2, in_chans=1)
FAST_PRETUNING = PreTuning(probe_epochs=1, align_epochs=2, align_epochs_per_task=1, samples_per_class=32)
TASKS, K, LR = 3, 2, 1e-2


class UserViT(L.LightningModule):
    """A typical user's module: trains on the current task's classes, logs its own accuracy."""

    def __init__(self, lr: float = LR) -> None:
        super().__init__()
        self.model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **TINY)
        self.lr = lr
        self.current_task: int | None = None  # set before each fit when the stream runs one fit per task

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        task = self.trainer.datamodule.current_task if self.current_task is None else self.current_task
        logits = self(x)[:, task * K : (task + 1) * K]
        loss = F.cross_entropy(logits, y - task * K)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class SeparateHeadViT(UserViT):
    """The other common layout: a feature extractor (``num_classes=0``) and an ``nn.Linear`` head of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY)
        self.head = torch.nn.Linear(self.model.num_features, 10)

    def forward(self, x):
        return self.head(self.model(x))


def data() -> TaskStreamDataModule:
    return TaskStreamDataModule("digits", num_tasks=5, epochs_per_task=1, batch_size=32, image_size=16, seed=0)


def ita(**kwargs) -> ITA:
    return ITA(1.0, rank=2, pretuning=FAST_PRETUNING, head_fisher_samples=16, seed=0, **kwargs)


def trainer(callbacks, max_epochs: int, root) -> L.Trainer:
    return L.Trainer(max_epochs=max_epochs, reload_dataloaders_every_n_epochs=1, num_sanity_val_steps=0,
                     limit_train_batches=2, enable_progress_bar=False, logger=False, enable_checkpointing=False,
                     enable_model_summary=False, default_root_dir=root, callbacks=callbacks)


def state(module, callback, evaluation) -> dict:
    """Everything the comparison covers: banked deltas, head, Fisher, pre-tuned head, accuracy matrix."""
    deltas = module.task_deltas
    assert deltas.banked_tasks == list(range(TASKS))
    return {
        "deltas": {k: v.clone() for k, v in deltas.state_dict().items()},
        "head": {k: v.clone() for k, v in resolve_classifier(module).head.state_dict().items()},
        "fisher": callback.accumulator.curvature(include_current=True),
        "pretuned": callback.pretuned_head,
        "matrix": evaluation.matrices["class_il"].rows,
    }


@pytest.fixture(scope="module")
def ours(tmp_path_factory) -> dict:
    """Our IncrementalViT over the stream in one fit (weight decay as AdamW's default, constant rate)."""
    L.seed_everything(0, verbose=False)
    model = IncrementalViT("vit_tiny_patch16_224", pretrained=False, model_kwargs=TINY, num_classes=10,
                           classes_per_task=K, epochs_per_task=1, lr=LR, weight_decay=0.01)
    initial = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    callback, evaluation = ita(), ContinualEvaluation(output_dir=str(tmp_path_factory.mktemp("ours")))
    trainer([callback, evaluation], TASKS, tmp_path_factory.mktemp("ours_root")).fit(model, data())
    return {"initial": initial, **state(model, callback, evaluation)}


def user_module(ours: dict) -> UserViT:
    user = UserViT()
    user.model.load_state_dict(ours["initial"])  # the same θ0 and initial head as our module's
    return user


def assert_same(result: dict, expected: dict) -> None:
    for part in ("deltas", "head", "fisher", "pretuned"):
        assert result[part].keys() == expected[part].keys(), part
        for key, value in expected[part].items():
            torch.testing.assert_close(result[part][key], value, rtol=1e-5, atol=1e-7, msg=f"{part} {key}")
    assert any(v.abs().sum() > 0 for k, v in expected["deltas"].items() if "task1" in k)  # non-vacuous
    assert [len(row) for row in result["matrix"]] == [1, 2, 3]
    for row, expected_row in zip(result["matrix"], expected["matrix"]):
        assert row == pytest.approx(expected_row, abs=1e-6)


def test_one_fit_over_the_stream_matches_our_module(ours, tmp_path):
    L.seed_everything(0, verbose=False)
    user = user_module(ours)
    callback, evaluation = ita(), ContinualEvaluation(output_dir=str(tmp_path))
    trainer([callback, evaluation], TASKS, tmp_path).fit(user, data())
    assert not any(p.requires_grad for p in user.model.blocks.parameters())  # θ0 frozen by the callback
    assert_same(state(user, callback, evaluation), ours)


def test_one_fit_per_task_matches_one_fit_over_the_stream(ours, tmp_path):
    L.seed_everything(0, verbose=False)
    user = user_module(ours)
    stream = data()
    callback, evaluation = ita(), ContinualEvaluation(output_dir=str(tmp_path))
    for task in range(TASKS):
        stream.set_task(task)
        trainer([callback, evaluation], 1, tmp_path).fit(user, stream)  # a new Trainer per task
        assert user.task_deltas.banked_tasks == list(range(task + 1))
    assert_same(state(user, callback, evaluation), ours)


def test_plain_dataloaders_and_a_separate_head(tmp_path):
    """Own loaders (no DataModule), `current_task` on the module, a head outside the backbone."""
    L.seed_everything(0, verbose=False)
    stream = data()
    user = SeparateHeadViT()
    callback = ita(classes_per_task=K)
    evaluation = ContinualEvaluation(output_dir=str(tmp_path), num_tasks=5, classes_per_task=K)
    fisher_counts = []
    for task in range(TASKS):
        user.current_task = task
        train = DataLoader(stream.task_dataset(task, "train"), batch_size=32, shuffle=True)
        test = DataLoader(stream.tasks_dataset(range(task + 1), "test"), batch_size=128)
        trainer([callback, evaluation], 1, tmp_path).fit(user, train, test)
        fisher_counts.append(callback.accumulator.current_count)
        if task == 0:  # the Fisher of task 0 at θ0 with the pre-tuned head, from scratch
            plain = Classifier(user.model, torch.nn.Linear(user.model.num_features, 10))
            plain.separate_head.load_state_dict(callback.pretuned_head)
            names = [f"model.backbone.{n}.weight" for n in user.task_deltas.names]
            with user.task_deltas.disabled():
                reference = diagonal_fisher(SeenLogits(plain, K), stream.task_dataloader(0, "train"), names)
            current = callback.accumulator.curvature(include_current=True)
            for name in user.task_deltas.names:
                expected = 1e-5 + reference.sums[f"model.backbone.{name}.weight"] / reference.count
                torch.testing.assert_close(current[f"{name}.weight"], expected, rtol=1e-4, atol=1e-9)
    assert fisher_counts == [len(stream.task_dataset(t)) for t in range(TASKS)]
    assert user.task_deltas.banked_tasks == [0, 1, 2]
    assert user.head.weight.requires_grad and not user.model.blocks[0].attn.qkv.weight.requires_grad
    rows = evaluation.matrices["class_il"].rows
    assert [len(row) for row in rows] == [1, 2, 3]
    # The last row is the uniform composition's class-IL accuracy per task, recomputed by hand here.
    user.task_deltas.compose(uniform(range(TASKS)))
    user.eval()
    with torch.no_grad():
        for task in range(TASKS):
            x, y = next(iter(DataLoader(stream.task_dataset(task, "test"), batch_size=1000)))
            accuracy = (user(x)[:, : TASKS * K].argmax(-1) == y).double().mean()
            assert rows[-1][task] == pytest.approx(float(accuracy), abs=1e-9)
    assert (tmp_path / "deltas.safetensors").stat().st_size > 0


class TwoViTs(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.student = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **TINY)
        self.teacher = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **TINY)


def test_protocol_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"`backbone`.*\['student', 'teacher'\].*ITA\(backbone='model'\)"):
        resolve_classifier(TwoViTs())
    assert resolve_classifier(TwoViTs(), backbone="teacher").backbone is not None
    with pytest.raises(ValueError, match=r"`backbone`.*attribute of TwoViTs.*'pupil'.*\['student', 'teacher'\]"):
        resolve_classifier(TwoViTs(), backbone="pupil")
    with pytest.raises(ValueError, match=r"`head`.*nn.Linear.*'student.blocks'"):
        resolve_classifier(TwoViTs(), backbone="teacher", head="student.blocks")
    with pytest.raises(ValueError, match="`epochs_per_task`.*int >= 1"):
        ITA(epochs_per_task=0)


def test_stream_values_come_from_data_then_module_then_argument():
    module, stream = UserViT(), data()
    with_data, without = SimpleNamespace(datamodule=stream, current_epoch=7), SimpleNamespace(datamodule=None,
                                                                                              current_epoch=7)
    assert stream_value(with_data, module, "classes_per_task") == 2
    assert stream_value(without, module, "classes_per_task", 3) == 3
    module.classes_per_task = 5
    assert stream_value(without, module, "classes_per_task") == 5
    with pytest.raises(ValueError, match=r"`classes_per_task` to be 2 .*DataModule.*got 3"):
        stream_value(with_data, module, "classes_per_task", 3)
    with pytest.raises(ValueError, match=r"`num_tasks` to be known.*callback's `num_tasks=`"):
        require(without, module, "num_tasks")
    stream.set_task(3)
    assert current_task(with_data, module, epochs_per_task=3) == 3  # the DataModule's
    assert current_task(without, module, epochs_per_task=3) == 2
    module.current_task = 1
    assert current_task(without, module, epochs_per_task=3) == 1
    module.current_task = None
    with pytest.raises(ValueError, match=r"`current_task`.*before each fit.*`epochs_per_task=`"):
        current_task(without, module)


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_fork"])
def test_spawned_processes_are_refused_with_the_reason(strategy, tmp_path):
    trainer = L.Trainer(strategy=strategy, devices=2, accelerator="cpu", default_root_dir=tmp_path, logger=False)
    with pytest.raises(ValueError, match=r"strategy.*'ddp'.*lost when `fit` returns"):
        ita().setup(trainer, UserViT(), "fit")
