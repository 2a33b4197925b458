"""Task-stream DataModule: class-incremental split, task schedule, loaders, data sets (no network)."""

import pickle
import re
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

import lightning_taylor.data.datasets as datasets_module
from lightning_taylor.data import (
    CIFAR100_CLASSES,
    ClassIncrementalSplit,
    TaskStreamDataModule,
    class_order,
)
from lightning_taylor.data.samplers import StreamSampler
from lightning_taylor.seeding import mix

NUM_DIGITS = 1797


def fake_trainer(epoch: int, every: int = 1, max_epochs: int | None = None) -> SimpleNamespace:
    """The attributes of a Trainer that the DataModule reads."""
    return SimpleNamespace(current_epoch=epoch, reload_dataloaders_every_n_epochs=every, max_epochs=max_epochs,
                           world_size=1, global_rank=0)


def labels_of(loader) -> torch.Tensor:
    return torch.cat([y for _, y in loader])


@pytest.fixture(scope="module")
def digits() -> TaskStreamDataModule:
    dm = TaskStreamDataModule(epochs_per_task=5, augment=False)
    dm.setup()
    return dm


# ------------------------------------------------------------------------------------------- class order


def test_class_order_is_a_reproducible_seeded_permutation():
    state = torch.random.get_rng_state()
    orders = [class_order(100, seed) for seed in (0, 0, 1)]
    assert torch.equal(torch.random.get_rng_state(), state)  # own generator: global RNG untouched
    assert sorted(orders[0]) == list(range(100))
    assert orders[0] == orders[1]
    assert orders[0] != orders[2]
    assert orders[0] != list(range(100))
    assert class_order(10, None) == list(range(10))


def test_split_remaps_to_contiguous_tasks():
    split = ClassIncrementalSplit(6, 3, [4, 0, 5, 2, 1, 3])
    assert split.remap([4, 0, 5, 2, 1, 3]).tolist() == [0, 1, 2, 3, 4, 5]
    assert [split.task_classes(t) for t in range(3)] == [range(0, 2), range(2, 4), range(4, 6)]
    assert split.task_of_label(torch.arange(6)).tolist() == [0, 0, 1, 1, 2, 2]
    assert split.task_of_label(5) == 2
    labels = torch.tensor([5, 0, 3, 2, 1, 4])
    assert split.task_indices(labels, [0, 2]).tolist() == [0, 1, 4, 5]
    with pytest.raises(ValueError, match="`order`"):
        ClassIncrementalSplit(6, 3, [0, 0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match="`targets`.*0..5"):
        split.remap([6])


# ---------------------------------------------------------------------------------------- digits stream


def test_digits_split_sizes_and_disjoint_train_test(digits):
    raw = digits._raw
    train_idx, test_idx = set(raw.train.indices), set(raw.test.indices)
    assert not train_idx & test_idx
    assert len(train_idx | test_idx) == NUM_DIGITS
    assert len(test_idx) == int(np.ceil(0.2 * NUM_DIGITS))
    # Stratified: every class keeps about a fifth of its images for testing.
    for c in range(10):
        in_class = (raw.train_targets == c).sum() + (raw.test_targets == c).sum()
        assert abs(float((raw.test_targets == c).sum() / in_class) - 0.2) < 0.02
    assert digits.num_classes == 10 and digits.num_tasks == 5 and digits.classes_per_task == 2
    assert digits.max_epochs == 25 and digits.in_chans == 1 and digits.image_size == 28


def test_digits_every_task_owns_exactly_its_labels(digits):
    train_total = test_total = 0
    for task in range(digits.num_tasks):
        for split in ("train", "test"):
            dataset = digits.task_dataset(task, split)
            labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
            assert set(labels.tolist()) == set(digits.task_classes(task)) == set(range(2 * task, 2 * task + 2))
            # The remapped label names the original class of the stored image.
            raw = digits._raw.train if split == "train" else digits._raw.test
            original = torch.tensor([int(raw[int(i)][1]) for i in dataset.indices])
            assert original.tolist() == [digits.class_order[y] for y in labels.tolist()]
            if split == "train":
                train_total += len(dataset)
            else:
                test_total += len(dataset)
    assert train_total + test_total == NUM_DIGITS
    assert digits.task_of_label(torch.tensor([0, 3, 9])).tolist() == [0, 1, 4]
    assert digits.class_names == tuple(str(c) for c in digits.class_order)
    assert digits.original_class_names == tuple(str(c) for c in range(10))


def test_digits_class_order_follows_the_seed():
    natural = TaskStreamDataModule(class_order_seed=None)
    assert natural.class_order == tuple(range(10))
    assert TaskStreamDataModule(class_order_seed=3).class_order == tuple(class_order(10, 3))
    assert TaskStreamDataModule(class_order_seed=3).class_order != TaskStreamDataModule(class_order_seed=4).class_order


def test_digits_images_are_resized_and_normalised():
    dm = TaskStreamDataModule(image_size=16, mean=0.25, std=0.5, augment=False)
    x, _ = next(iter(dm.task_dataloader(0, batch_size=64)))
    assert x.shape == (64, 1, 16, 16) and x.dtype == torch.float32 and type(x) is torch.Tensor
    # Raw pixels lie in [0, 1]; background 0 maps to (0 - 0.25) / 0.5.
    assert x.min() == pytest.approx(-0.5) and x.max() <= (1 - 0.25) / 0.5 + 1e-6
    native = TaskStreamDataModule(image_size=8)
    assert next(iter(native.task_dataloader(0)))[0].shape[-2:] == (8, 8)


def test_digits_augmentation_only_when_asked():
    dm = TaskStreamDataModule(augment=True)
    torch.manual_seed(0)
    plain = [dm.task_dataset(0, augment=False)[i][0] for i in range(8)]
    again = [dm.task_dataset(0, augment=False)[i][0] for i in range(8)]
    jittered = [dm.task_dataset(0, augment=True)[i][0] for i in range(8)]
    assert all(torch.equal(a, b) for a, b in zip(plain, again))
    assert not all(torch.equal(a, b) for a, b in zip(plain, jittered))
    assert all(a.shape == b.shape for a, b in zip(plain, jittered))


def test_split_seed_changes_the_digits_split():
    a, b = TaskStreamDataModule(split_seed=0), TaskStreamDataModule(split_seed=1)
    a.setup(), b.setup()
    assert a._raw.test.indices != b._raw.test.indices
    c = TaskStreamDataModule(split_seed=0)
    c.setup()
    assert a._raw.test.indices == c._raw.test.indices


# ---------------------------------------------------------------------------------------- task schedule


def test_current_task_without_trainer_from_epoch_and_from_set_task():
    dm = TaskStreamDataModule(epochs_per_task=3)
    assert dm.current_task == 0
    for epoch, task in [(0, 0), (2, 0), (3, 1), (8, 2), (14, 4), (40, 4)]:  # clamped to the last task
        dm.trainer = fake_trainer(epoch)
        assert dm.current_task == task
    dm.set_task(1)
    assert dm.current_task == 1  # explicit wins over the trainer's epoch
    state = dm.state_dict()
    dm.set_task(None)
    assert dm.current_task == 4
    dm.load_state_dict(state)
    assert dm.current_task == 1
    with pytest.raises(ValueError, match="`task`.*0..4.*5"):
        dm.set_task(5)


def test_train_dataloader_serves_only_the_current_task(digits):
    digits.trainer = fake_trainer(epoch=7)  # epochs_per_task=5 -> task 1
    try:
        labels = labels_of(digits.train_dataloader())
        assert set(labels.tolist()) == set(digits.task_classes(1))
        assert len(labels) == len(digits.task_dataset(1, "train"))
        digits.set_task(3)
        assert set(labels_of(digits.train_dataloader()).tolist()) == set(digits.task_classes(3))
    finally:
        digits.trainer = None
        digits.set_task(None)


def test_val_dataloader_serves_every_seen_task_and_test_all(digits):
    digits.trainer = fake_trainer(epoch=12)  # task 2
    try:
        labels = labels_of(digits.val_dataloader())
        assert set(labels.tolist()) == set(range(6))
        assert len(labels) == sum(len(digits.task_dataset(t, "test")) for t in range(3))
        test_labels = labels_of(digits.test_dataloader())
        assert set(test_labels.tolist()) == set(range(10))
        assert len(test_labels) == len(digits._raw.test_targets)
    finally:
        digits.trainer = None


def test_task_dataloader_defaults_and_options(digits):
    loader = digits.task_dataloader(2)
    assert loader.batch_size == digits.eval_batch_size
    assert set(labels_of(loader).tolist()) == set(digits.task_classes(2))
    assert set(labels_of(digits.task_dataloader(2, "test", batch_size=7)).tolist()) == set(digits.task_classes(2))
    assert digits.task_dataloader(0, batch_size=7).batch_size == 7
    with pytest.raises(ValueError, match="`split`.*'val'"):
        digits.task_dataloader(0, "val")
    with pytest.raises(ValueError, match="`task`.*0..4.*7"):
        digits.task_dataloader(7)


def test_views_pickle_for_worker_processes(digits):
    dataset = pickle.loads(pickle.dumps(digits.task_dataset(1, augment=True)))
    x, y = dataset[0]
    assert x.shape == (1, 28, 28) and y in digits.task_classes(1)


# ----------------------------------------------------------------------------- deterministic batches


def sampled(sampler, epoch: int) -> list[tuple[int, int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("size", [12, 13])
def test_stream_sampler_gives_two_ranks_the_global_batches_of_one(size):
    data = list(range(size))
    one = sampled(StreamSampler(data, seed=3), 0)
    ranks = [sampled(StreamSampler(data, seed=3, num_replicas=2, rank=r), 0) for r in range(2)]
    assert sorted(i for i, _ in one) == data  # a permutation, each example with its own seed
    assert len({s for _, s in one}) == size
    assert len(ranks[0]) == len(ranks[1]) == -(-size // 2)  # padded to equal length like DistributedSampler
    interleaved = [pair for step in zip(*ranks) for pair in step]
    assert interleaved[:size] == one  # rank r holds positions r, r + 2, ... of the same order
    assert interleaved[size:] == one[: len(interleaved) - size]  # the padding repeats the order's start


def test_stream_sampler_order_depends_on_seed_and_epoch_of_the_task_only():
    data = list(range(50))
    reference = sampled(StreamSampler(data, seed=3), 1)
    torch.manual_seed(123)  # the global random state plays no part
    assert sampled(StreamSampler(data, seed=3, first_epoch=10), 11) == reference
    assert sampled(StreamSampler(data, seed=3), 2) != reference
    assert sampled(StreamSampler(data, seed=4), 1) != reference
    assert mix(3, 1) != mix(1, 3) and 0 <= mix(2**62, 2**62) < 2**63


def test_seeded_augmentation_ignores_the_global_random_state(digits):
    dataset = digits.task_dataset(0, augment=True)
    state = torch.random.get_rng_state()
    first = dataset[(5, 77)][0]
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is left as it was
    torch.manual_seed(99)
    assert torch.equal(dataset[(5, 77)][0], first)
    assert not torch.equal(dataset[(5, 78)][0], first)
    assert not torch.equal(dataset[5][0], digits.task_dataset(0)[5][0])  # plain indices still augment


def test_train_batches_are_the_same_in_one_fit_or_one_fit_per_task():
    dm = TaskStreamDataModule(epochs_per_task=3, image_size=8, seed=5)
    dm.trainer = fake_trainer(epoch=7)  # task 2, its second epoch
    in_stream = [(x, y) for x, y in dm.train_dataloader()]
    dm.set_task(2)
    dm.trainer = fake_trainer(epoch=1)  # the second epoch of a fit of task 2 alone
    alone = [(x, y) for x, y in dm.train_dataloader()]
    assert len(in_stream) == len(alone) > 1
    for (x1, y1), (x2, y2) in zip(in_stream, alone):
        assert torch.equal(y1, y2) and torch.equal(x1, x2)


def test_eval_loaders_share_the_test_set_across_ranks_without_repeats(digits):
    shares = []
    for rank in range(2):
        digits.trainer = SimpleNamespace(**{**vars(fake_trainer(epoch=0)), "world_size": 2, "global_rank": rank})
        try:
            shares.append(labels_of(digits.test_dataloader()))
        finally:
            digits.trainer = None
    assert len(shares[0]) + len(shares[1]) == len(digits._raw.test_targets)  # each example once
    assert sorted(torch.cat(shares).tolist()) == sorted(labels_of(digits.test_dataloader()).tolist())


@pytest.mark.parametrize(
    "every, epoch, max_epochs, ok",
    [
        (1, 7, 25, True),
        (5, 0, 25, True),
        (5, 5, 25, True),
        (5, 7, 25, False),  # resumed mid-task: the next reload (epoch 12) misses the boundary at 10
        (0, 0, 25, False),  # never reloads
        (2, 0, 25, False),  # does not divide epochs_per_task
        (0, 0, 5, True),  # the fit ends with the first task: nothing to reload
        (0, 21, 25, True),  # last task
    ],
)
def test_reload_schedule_must_hit_every_task_boundary(digits, every, epoch, max_epochs, ok):
    digits.trainer = fake_trainer(epoch, every, max_epochs)
    try:
        if ok:
            digits.train_dataloader()
        else:
            with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs"):
                digits.train_dataloader()
    finally:
        digits.trainer = None


class _RecordLabels(L.LightningModule):
    """A linear classifier that records which labels every epoch trains and validates on."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(28 * 28, num_classes)
        self.train_labels: dict[int, set[int]] = {}
        self.val_labels: dict[int, list[int]] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.train_labels.setdefault(self.current_epoch, set()).update(y.tolist())
        return torch.nn.functional.cross_entropy(self.layer(x.flatten(1)), y)

    def validation_step(self, batch, batch_idx):
        if not self.trainer.sanity_checking:
            self.val_labels.setdefault(self.current_epoch, []).extend(batch[1].tolist())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_one_fit_runs_the_whole_stream(tmp_path):
    dm = TaskStreamDataModule(epochs_per_task=2, batch_size=64, mean=[0.5])
    model = _RecordLabels(dm.num_classes)
    trainer = L.Trainer(max_epochs=dm.max_epochs, reload_dataloaders_every_n_epochs=dm.epochs_per_task,
                        limit_train_batches=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    for epoch in range(dm.max_epochs):
        task = epoch // dm.epochs_per_task
        assert model.train_labels[epoch] <= set(dm.task_classes(task))
        assert sorted(set(model.val_labels[epoch])) == list(range((task + 1) * dm.classes_per_task))
    # The DataModule's hyperparameters and state keep the checkpoint loadable with weights_only=True.
    dm.set_task(3)
    trainer.save_checkpoint(tmp_path / "stream.ckpt")
    checkpoint = torch.load(tmp_path / "stream.ckpt", weights_only=True)
    assert checkpoint["datamodule_hyper_parameters"]["epochs_per_task"] == 2
    assert checkpoint["TaskStreamDataModule"] == {"task": 3, "current_task": 3}


# ------------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(dataset="fashion_mnist"), "dataset"),
        (dict(num_tasks=0), "num_tasks"),
        (dict(num_tasks=4), "num_tasks"),
        (dict(num_tasks=2.0), "num_tasks"),
        (dict(epochs_per_task=0), "epochs_per_task"),
        (dict(class_order_seed=-1), "class_order_seed"),
        (dict(class_order_seed=1.5), "class_order_seed"),
        (dict(batch_size=0), "batch_size"),
        (dict(eval_batch_size=True), "eval_batch_size"),
        (dict(num_workers=-1), "num_workers"),
        (dict(image_size=0), "image_size"),
        (dict(mean=[0.5, 0.5]), "mean"),
        (dict(mean="0.5"), "mean"),
        (dict(std=0.0), "std"),
        (dict(std=[1.0, -1.0, 1.0]), "std"),
        (dict(download="yes"), "download"),
        (dict(test_fraction=0.0), "test_fraction"),
        (dict(test_fraction=1.0), "test_fraction"),
        (dict(split_seed=-3), "split_seed"),
        (dict(augment=None), "augment"),
        (dict(root=3), "root"),
    ],
)
def test_bad_arguments_name_the_argument_and_value(kwargs, name):
    (value,) = kwargs.values()
    with pytest.raises(ValueError, match=rf"Expected `{name}` to be .*, but got {re.escape(repr(value))}\."):
        TaskStreamDataModule(**kwargs)


def test_num_tasks_error_message():
    with pytest.raises(ValueError) as info:
        TaskStreamDataModule(num_tasks=3)
    assert str(info.value) == "Expected `num_tasks` to be an int >= 1 that divides the 10 classes, but got 3."


def test_test_fraction_too_small_for_a_stratified_split():
    dm = TaskStreamDataModule(test_fraction=0.001)
    with pytest.raises(ValueError, match="`test_fraction`.*0.001"):
        dm.setup()


# -------------------------------------------------------------------------------------------- CIFAR-100


def test_cifar100_needs_a_root_and_explains_a_missing_download(tmp_path):
    with pytest.raises(ValueError, match="`root`.*download"):
        TaskStreamDataModule(dataset="cifar100")
    dm = TaskStreamDataModule(dataset="cifar100", root=str(tmp_path))  # nothing there, download=False
    assert dm.num_classes == 100 and dm.num_tasks == 10 and dm.in_chans == 3 and dm.image_size == 224
    # The fine labels are numbered alphabetically, so the embedded names need no download.
    assert len(set(CIFAR100_CLASSES)) == 100 and list(CIFAR100_CLASSES) == sorted(CIFAR100_CLASSES)
    with pytest.raises(ValueError, match=r"`root`.*cifar-100-python.*`download: true`"):
        dm.setup()


class FakeCIFAR100(torch.utils.data.Dataset):
    """Stands in for torchvision's CIFAR100 (which checks MD5 sums of the real files): random 32×32 images."""

    calls: list = []

    def __init__(self, root, train=True, download=False, transform=None):
        FakeCIFAR100.calls.append(dict(root=root, train=train, download=download))
        n = 300 if train else 200
        rng = np.random.default_rng(0 if train else 1)
        self.data = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        self.targets = [i % 100 for i in range(n)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return Image.fromarray(self.data[i]), self.targets[i]


def test_cifar100_stream_with_fake_data(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets_module, "CIFAR100", FakeCIFAR100)
    FakeCIFAR100.calls.clear()
    dm = TaskStreamDataModule(dataset="cifar100", root=str(tmp_path), download=True, image_size=16, batch_size=8,
                              mean=[0.5, 0.4, 0.3])
    dm.prepare_data()
    assert {(c["train"], c["download"]) for c in FakeCIFAR100.calls} == {(True, True), (False, True)}
    dm.trainer = fake_trainer(epoch=dm.epochs_per_task * 4)  # task 4
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32
    assert set(labels_of(dm.train_dataloader()).tolist()) == set(range(40, 50))
    assert set(labels_of(dm.val_dataloader()).tolist()) == set(range(50))
    assert len(labels_of(dm.test_dataloader())) == 200
    assert dm.class_names[:3] == tuple(CIFAR100_CLASSES[c] for c in dm.class_order[:3])
    # Remapped labels name the stored image's original class; test images come out square and normalised.
    dataset = dm.task_dataset(4, "test")
    x0, y0 = dataset[0]
    assert dm.class_order[y0] == int(dm._raw.test_targets[int(dataset.indices[0])])
    assert x0.shape == (3, 16, 16) and x0[2].min() >= (0 - 0.3) / 0.5 - 1e-6 and x0[2].max() <= (1 - 0.3) / 0.5 + 1e-6


# ----------------------------------------------------------------------------------------- image folder


def write_image_folder(root: Path, classes: dict[str, tuple[int, int]]) -> None:
    """``classes[split/name] = (count, mode_switch)``: PNGs of assorted sizes and modes."""
    rng = np.random.default_rng(0)
    for key, (count, gray) in classes.items():
        folder = root / key
        folder.mkdir(parents=True)
        for i in range(count):
            size = (20 + 3 * i, 12 + i)  # non-square on purpose
            pixels = rng.integers(0, 256, size=(size[1], size[0]) + (() if gray else (3,)), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")


@pytest.fixture
def image_folder(tmp_path) -> Path:
    names = ["cat", "ant", "dog", "bee"]
    layout = {f"train/{n}": (3, i % 2) for i, n in enumerate(names)}
    layout.update({f"test/{n}": (2, i % 2) for i, n in enumerate(names)})
    write_image_folder(tmp_path, layout)
    return tmp_path


def test_imagefolder_stream(image_folder):
    dm = TaskStreamDataModule(dataset="imagefolder", root=str(image_folder), num_tasks=2, class_order_seed=None,
                              image_size=12, batch_size=4)
    assert dm.original_class_names == ("ant", "bee", "cat", "dog")  # sorted, as ImageFolder numbers them
    assert dm.class_names == dm.original_class_names and dm.in_chans == 3
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 12, 12)  # grayscale and non-square images become square RGB
    assert set(y.tolist()) <= {0, 1}
    x, y = next(iter(dm.task_dataloader(1, "test")))
    assert x.shape == (4, 3, 12, 12) and set(y.tolist()) == {2, 3}
    assert len(labels_of(dm.test_dataloader())) == 8


def test_imagefolder_errors(image_folder, tmp_path_factory):
    with pytest.raises(ValueError, match="`num_tasks`.*None"):
        TaskStreamDataModule(dataset="imagefolder", root=str(image_folder))
    with pytest.raises(ValueError, match="`num_tasks`.*4 classes.*3"):
        TaskStreamDataModule(dataset="imagefolder", root=str(image_folder), num_tasks=3)
    with pytest.raises(ValueError, match="`root`.*None"):
        TaskStreamDataModule(dataset="imagefolder", num_tasks=2)
    (image_folder / "test" / "emu").mkdir()
    with pytest.raises(ValueError, match=r"`root`.*same class folders.*only in test/: \['emu'\]"):
        TaskStreamDataModule(dataset="imagefolder", root=str(image_folder), num_tasks=2)
    only_train = tmp_path_factory.mktemp("only_train")
    write_image_folder(only_train, {"train/a": (1, 0)})
    with pytest.raises(ValueError, match="`root`.*`test/` is missing"):
        TaskStreamDataModule(dataset="imagefolder", root=str(only_train), num_tasks=1)


def test_imagefolder_class_without_images(image_folder):
    (image_folder / "train" / "emu").mkdir()
    (image_folder / "test" / "emu").mkdir()
    (image_folder / "test" / "emu" / "notes.txt").write_text("not an image")
    dm = TaskStreamDataModule(dataset="imagefolder", root=image_folder, num_tasks=5)  # a Path works too
    assert dm.root == str(image_folder) and dm.hparams.root == str(image_folder)
    with pytest.raises(ValueError, match="`root`.*at least one image"):
        dm.setup()


# ----------------------------------------------------------------------------------- input of the model


def test_to_channels_converts_pil_and_tensors():
    from lightning_taylor.data.transforms import ToChannels

    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(ToChannels(1)(rgb)), np.asarray(rgb.convert("L")))  # PIL's luminance
    grey = rgb.convert("L")
    assert np.array_equal(np.asarray(ToChannels(3)(grey)), np.repeat(np.asarray(grey)[..., None], 3, axis=2))
    assert ToChannels(3)(rgb) is rgb and ToChannels(3)(rgb.convert("P")).mode == "RGB"
    x = torch.rand(1, 5, 7)
    assert ToChannels(1)(x) is x and torch.equal(ToChannels(3)(x), x.repeat(3, 1, 1))
    luminance = (torch.tensor([0.2989, 0.587, 0.114]).view(3, 1, 1) * x.repeat(3, 1, 1)).sum(0, keepdim=True)
    assert torch.allclose(ToChannels(1)(x.repeat(3, 1, 1)), luminance, atol=1e-6)


class _PlainTimmModule(L.LightningModule):
    """A user's module: a timm ViT in an attribute of its own name, no `input_size`."""

    def __init__(self, **kwargs):
        super().__init__()
        import timm

        self.net = timm.create_model("vit_tiny_patch16_224", pretrained=False, patch_size=8, embed_dim=24, depth=1,
                                     num_heads=2, num_classes=4, **kwargs)


def test_stream_follows_the_model_input(image_folder):
    from lightning_taylor.model.module import IncrementalViT

    dm = TaskStreamDataModule(dataset="imagefolder", root=str(image_folder), num_tasks=2, batch_size=4, mean=0.5)
    assert (dm.in_chans, dm.image_size) == (3, 224)  # the data set's defaults until a model says otherwise
    dm.follow_model(IncrementalViT(num_classes=4))  # the embedded backbone: 1 channel, 28 px
    assert (dm.in_chans, dm.image_size, dm.mean) == (1, 28, (0.5,))
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 1, 28, 28)
    # Digits for an RGB model found through its patch embedding: the grey channel repeated, resized once.
    digits = TaskStreamDataModule(augment=False, mean=[0.5], std=0.25)
    digits.follow_model(_PlainTimmModule(img_size=16, in_chans=3))
    assert (digits.in_chans, digits.image_size, digits.mean, digits.std) == (3, 16, (0.5,) * 3, (0.25,) * 3)
    x, _ = next(iter(digits.task_dataloader(0)))
    assert x.shape[1:] == (3, 16, 16) and torch.equal(x[:, 0], x[:, 2])
    assert torch.equal(x[:, :1], next(iter(TaskStreamDataModule(augment=False, image_size=16, std=0.25)
                                            .task_dataloader(0)))[0])
    # A module's own `input_size` wins; one that is not (C, H, W) is not ours to interpret.
    stated = _PlainTimmModule(img_size=16)
    stated.input_size = (1, 24, 24)
    digits.follow_model(stated)
    assert (digits.in_chans, digits.image_size) == (1, 24)
    stated.input_size = 784
    digits.follow_model(stated)
    assert (digits.in_chans, digits.image_size) == (3, 16)
    # Without a model the data set's defaults (or the explicit settings) apply.
    assert TaskStreamDataModule(in_chans=3).in_chans == 3


def write_odd_folder(root: Path, grey: bool, classes: int = 4, train: int = 6, test: int = 2) -> Path:
    """JPEG and PNG photos of 40×30 and 30×41 pixels, RGB or grey."""
    rng = np.random.default_rng(1)
    for split, count in (("train", train), ("test", test)):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                height, width = (30, 40) if i % 2 else (41, 30)
                pixels = rng.integers(0, 256, size=(height, width) + (() if grey else (3,)), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.{'png' if i % 3 else 'jpg'}")
    return root


@pytest.mark.parametrize("grey", [False, True], ids=["rgb", "grey"])
def test_imagefolder_template_fits_with_the_default_backbone(tmp_path, grey):
    from lightning_taylor.callbacks import ITA
    from lightning_taylor.cli import cli

    root = write_odd_folder(tmp_path / "images", grey)
    config = Path(__file__).parents[1] / "configs" / "imagefolder" / "ita.yaml"
    run = tmp_path / "run"
    parsed = cli(["fit", "--config", str(config), "--data.root", str(root), "--data.epochs_per_task", "1",
                  "--data.batch_size", "8", "--trainer.default_root_dir", str(run), "--trainer.logger.save_dir",
                  str(run), "--trainer.enable_progress_bar", "false"])
    data, model, trainer = parsed.datamodule, parsed.model, parsed.trainer
    assert type(next(c for c in trainer.callbacks if isinstance(c, ITA))) is ITA
    assert (data.in_chans, data.image_size) == (1, 28) and model.input_size == (1, 28, 28)
    assert trainer.current_epoch == 2 and model.task_deltas.banked_tasks == [0, 1]
    version = run / "version_0"
    assert (version / "checkpoints" / "last.ckpt").is_file() and (version / "deltas.safetensors").is_file()
    assert len((version / "accuracy_class_il.csv").read_text().strip().splitlines()) == 1 + 2  # header, 2 tasks
