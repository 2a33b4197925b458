"""The paper's benchmarks on miniature fakes of their layouts: classes, tasks, splits, errors, a fit each."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
import yaml
from benchmark_fakes import IMAGES, WRITERS, write_all

import lightning_taylor.data.benchmarks.base as base_module
from lightning_taylor.data import ClassIncrementalSplit, TaskStreamDataModule
from lightning_taylor.data.benchmarks import BENCHMARKS, seeded_split
from lightning_taylor.errors import InputError

#: the reference task structure of the issue: tasks x classes
STRUCTURE = {"imagenet_r": [20] * 10, "cub200": [20] * 10, "cars196": [20] * 9 + [16], "eurosat": [2] * 5,
             "isic": [2] * 3, "resisc45": [5] * 9, "cropdisease": [5] * 7}
#: images per class in each split of the fakes' reference split, and of a seeded split of 3 (round(0.2 · 3) = 1)
REFERENCE_SPLIT = (IMAGES - 1, 1)


@pytest.fixture(scope="session")
def roots(tmp_path_factory) -> dict[str, Path]:
    return write_all(tmp_path_factory.mktemp("benchmarks"))


def fresh(name: str, tmp_path: Path) -> Path:
    """A private copy of one fake, for tests that break it."""
    root = tmp_path / name
    root.mkdir()
    WRITERS[name](root)
    return root


def stream(name: str, root: Path, **kwargs) -> TaskStreamDataModule:
    data = TaskStreamDataModule(name, root=str(root), **kwargs)
    data.setup()
    return data


def class_folder(path: str) -> str:
    return Path(path).parent.name


def test_every_benchmark_is_registered_with_the_reference_structure():
    from typing import get_args

    from lightning_taylor.data.stream import ALL_DATASETS, DatasetName

    assert set(BENCHMARKS) == set(STRUCTURE) and get_args(DatasetName) == ALL_DATASETS  # the CLI's choices
    for name, sizes in STRUCTURE.items():
        assert list(BENCHMARKS[name].task_sizes) == sizes and BENCHMARKS[name].num_classes == sum(sizes)


@pytest.mark.parametrize("name", sorted(STRUCTURE))
@pytest.mark.parametrize("split", ["auto", "seeded"])
def test_classes_tasks_and_splits(roots, name, split):
    data = stream(name, roots[name], split=split)
    sizes = STRUCTURE[name]
    assert data.num_classes == sum(sizes) and list(data.task_sizes) == sizes and data.num_tasks == len(sizes)
    assert data.class_order == tuple(range(data.num_classes))  # the reference's order: no permutation
    # Every class in exactly one task, tasks contiguous and in order.
    owners = [[t for t in range(data.num_tasks) if y in data.task_classes(t)] for y in range(data.num_classes)]
    assert all(len(o) == 1 for o in owners) and [o[0] for o in owners] == sorted(o[0] for o in owners)
    assert torch.equal(data.task_of_label(torch.arange(data.num_classes)), torch.tensor([o[0] for o in owners]))
    # Split sizes per class (the fakes hold 3 images per class).
    expected_split = "seeded" if split == "seeded" else "reference"
    assert data.hparams["split"] == expected_split and data.split_source
    train, test = data._raw.train, data._raw.test
    assert set(train.paths).isdisjoint(test.paths)
    per_class = REFERENCE_SPLIT
    if split != "seeded" and name == "isic":  # all 3 training images, and the official test set's one
        per_class = (IMAGES, 1)
    for labels, count in ((train.targets, per_class[0]), (test.targets, per_class[1])):
        assert torch.bincount(labels, minlength=data.num_classes).tolist() == [count] * data.num_classes
    # Every task's loader serves only its own classes.
    for task in (0, data.num_tasks - 1):
        labels = torch.tensor([data.task_dataset(task, "test").labels.tolist()]).flatten()
        assert set(labels.tolist()) == set(data.task_classes(task))


@pytest.mark.parametrize("name", ["imagenet_r", "resisc45", "eurosat", "cropdisease"])
def test_labels_follow_the_class_folders(roots, name):
    data = stream(name, roots[name])
    for part in (data._raw.train, data._raw.test):
        paths, targets = part.paths, part.targets
        assert [class_folder(p) for p in paths] == [data.original_class_names[t] for t in targets.tolist()]


def test_reference_order_of_imagenet_r_is_the_split_files_not_sorted(roots):
    names = BENCHMARKS["imagenet_r"].class_names
    assert len(set(names)) == 200 and list(names) != sorted(names) and names[0] == "n02165456"


def test_seeded_split_is_deterministic_and_follows_the_seed(roots):
    one, two = (stream("resisc45", roots["resisc45"], split="seeded") for _ in range(2))
    assert one._raw.test.paths == two._raw.test.paths and one._raw.train.paths == two._raw.train.paths
    other = stream("resisc45", roots["resisc45"], split="seeded", split_seed=1)
    assert other._raw.test.paths != one._raw.test.paths
    assert torch.equal(torch.bincount(other._raw.test.targets), torch.bincount(one._raw.test.targets))


def test_seeded_split_is_stratified_and_refuses_a_class_of_one():
    targets = torch.tensor([0] * 10 + [1] * 5 + [2] * 2)
    train, test = seeded_split(targets, 0.2, seed=0)
    assert torch.bincount(targets[test]).tolist() == [2, 1, 1] and len(train) + len(test) == len(targets)
    assert set(train.tolist()).isdisjoint(test.tolist())
    with pytest.raises(InputError, match="class 1"):
        seeded_split(torch.tensor([0, 0, 1]), 0.5, seed=0)


def test_setup_decodes_no_image(roots, monkeypatch):
    def refuse(path):
        raise AssertionError(f"decoded {path}")

    monkeypatch.setattr(base_module, "read_image", refuse)
    for name in STRUCTURE:
        stream(name, roots[name])


def test_construction_reads_no_data_and_setup_names_the_missing_folder(tmp_path):
    data = TaskStreamDataModule("cub200", root=str(tmp_path / "absent"))  # configs build without the data
    with pytest.raises(InputError, match=r"CUB-200-2011.*`.*absent/CUB_200_2011` is missing.*caltech"):
        data.setup()


def test_a_missing_metadata_file_is_named(tmp_path):
    root = fresh("cub200", tmp_path)
    (root / "CUB_200_2011" / "train_test_split.txt").unlink()
    with pytest.raises(InputError, match="train_test_split.txt` is missing"):
        stream("cub200", root)


def test_an_inconsistent_split_file_is_named(tmp_path):
    root = fresh("imagenet_r", tmp_path)
    file = root / "imagenet-r_test.yaml"
    content = yaml.safe_load(file.read_text())
    content["targets"][0] = (content["targets"][0] + 1) % 200
    file.write_text(yaml.safe_dump(content))
    with pytest.raises(InputError, match=r"imagenet-r_test.yaml` is inconsistent.*has target"):
        stream("imagenet_r", root)
    content["data"][0] = "data/imagenet-r/n02165456/not_there.jpg"
    file.write_text(yaml.safe_dump(content))
    with pytest.raises(InputError, match="not_there.jpg` is not one of the images"):
        stream("imagenet_r", root)


def test_split_reference_needs_its_files_and_auto_falls_back(tmp_path):
    root = fresh("cropdisease", tmp_path)
    (root / "cropdisease" / "test.json").unlink()
    with pytest.raises(InputError, match=r"split: reference.*test.json`, which is missing"):
        stream("cropdisease", root, split="reference")
    assert stream("cropdisease", root).hparams["split"] == "seeded"


def test_missing_and_unexpected_class_folders_are_named(tmp_path):
    root = fresh("resisc45", tmp_path)
    shutil.move(root / "NWPU-RESISC45" / "wetland", root / "NWPU-RESISC45" / "wet_land")
    with pytest.raises(InputError, match=r"missing \['wetland'\], unexpected \['wet_land'\]"):
        stream("resisc45", root)


def test_broken_label_tables_are_named(tmp_path):
    root = fresh("isic", tmp_path)
    table = root / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv"
    lines = table.read_text().splitlines()
    table.write_text("\n".join([lines[0], lines[1].replace("1.0", "0.0"), *lines[2:]]) + "\n")
    with pytest.raises(InputError, match="Line 2 of .*GroundTruth.csv` should have exactly one class"):
        stream("isic", root)
    root = fresh("eurosat", tmp_path)
    split = json.loads((root / "eurosat" / "split_zhou_EuroSAT.json").read_text())
    split["train"][0] = ["AnnualCrop/AnnualCrop_0.jpg", 3, "AnnualCrop"]
    (root / "eurosat" / "split_zhou_EuroSAT.json").write_text(json.dumps(split))
    with pytest.raises(InputError, match="split_zhou_EuroSAT.json` is inconsistent"):
        stream("eurosat", root)


def test_download_only_where_torchvision_can():
    with pytest.raises(InputError, match=r"`download`.*cannot fetch Stanford Cars"):
        TaskStreamDataModule("cars196", root="data", download=True)
    TaskStreamDataModule("eurosat", root="data", download=True)  # torchvision's EuroSAT


def test_benchmarks_need_a_root():
    with pytest.raises(InputError, match=r"`root`.*imagenet-r.tar"):
        TaskStreamDataModule("imagenet_r")


def test_uneven_partition_of_cars196(roots):
    data = stream("cars196", roots["cars196"])
    assert data.task_ranges[-1] == range(180, 196) and data.task_classes(9) == range(180, 196)
    with pytest.raises(InputError, match="uneven class partition"):
        data.classes_per_task
    assert len(data.task_dataset(9, "train")) == 16 * (IMAGES - 1)
    uniform = TaskStreamDataModule("cars196", root="data", num_tasks=7)  # another count: uniform, 28 classes
    assert uniform.classes_per_task == 28 and uniform.task_sizes == (28,) * 7


def test_class_partition_bookkeeping():
    split = ClassIncrementalSplit(7, 3, list(range(7)), task_sizes=[3, 3, 1])
    assert split.task_ranges == (range(0, 3), range(3, 6), range(6, 7)) and not split.uniform
    assert split.task_of_label(torch.tensor([0, 2, 3, 5, 6])).tolist() == [0, 0, 1, 1, 2]
    assert split.task_of_label(6) == 2
    assert split.task_indices(torch.tensor([6, 0, 4, 6]), [2]).tolist() == [0, 3]
    assert ClassIncrementalSplit(6, 3, list(range(6))).classes_per_task == 2
    with pytest.raises(InputError, match="task_sizes"):
        ClassIncrementalSplit(7, 2, list(range(7)), task_sizes=[3, 3])
    with pytest.raises(InputError, match="num_tasks"):
        ClassIncrementalSplit(7, 2, list(range(7)), task_sizes=[3, 3, 1])


def test_reference_normalisation_and_grey_models(roots):
    data = TaskStreamDataModule("eurosat", root=str(roots["eurosat"]))
    assert data.mean == BENCHMARKS["eurosat"].mean and data.std == BENCHMARKS["eurosat"].std
    grey = TaskStreamDataModule("cub200", root="data", in_chans=1)
    assert len(grey.mean) == 1 and 0.45 < grey.mean[0] < 0.5  # luminance of the ImageNet means
    assert TaskStreamDataModule("isic", root="data", mean=0.5).mean == (0.5,) * 3


class _TinyViT(L.LightningModule):
    """A tiny timm ViT trained on the current task's classes (task-local loss over its head rows)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=24,
                                     depth=1, num_heads=2, num_classes=num_classes)
        self.seen: set[int] = set()

    def training_step(self, batch, batch_idx):
        x, y = batch
        classes = self.trainer.datamodule.task_classes(self.trainer.datamodule.current_task)
        assert x.shape[1:] == (3, 16, 16)  # the stream follows the model's input
        return torch.nn.functional.cross_entropy(self.vit(x)[:, classes.start:classes.stop], y - classes.start)

    def validation_step(self, batch, batch_idx):
        self.seen.update(batch[1].tolist())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("name", sorted(STRUCTURE))
def test_one_batch_fit_on_each_stream(roots, name, tmp_path):
    data = TaskStreamDataModule(name, root=str(roots[name]), epochs_per_task=1, batch_size=4, eval_batch_size=64)
    model = _TinyViT(data.num_classes)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0,
                        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 1 and model.seen <= set(data.task_classes(0)) and model.seen
    assert data.hparams["split"] == "reference"


def test_the_index_is_built_once_per_stream(roots, monkeypatch):
    benchmark, builds = BENCHMARKS["eurosat"], []
    counted = dataclasses.replace(benchmark, index=lambda *a: builds.append(a) or benchmark.index(*a))
    monkeypatch.setitem(BENCHMARKS, "eurosat", counted)
    data = TaskStreamDataModule("eurosat", root=str(roots["eurosat"]))
    for task in range(data.num_tasks):
        data.set_task(task)
        data.train_dataloader(), data.val_dataloader(), data.task_dataloader(task)
    assert len(builds) == 1


@pytest.mark.parametrize("method", ["ita", "iel"])
def test_cars196_uneven_stream_end_to_end(roots, tmp_path, method):
    """Cars-196's 9 × 20 + 1 × 16 stream: train every task, evaluate, edit (drop the short task) and export."""
    import safetensors
    import safetensors.torch

    from lightning_taylor.callbacks import IEL, ITA, ContinualEvaluation, PreTuning
    from lightning_taylor.model.module import IncrementalViT
    from lightning_taylor.runs import Edit, apply_edit, export, load_run

    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    data = TaskStreamDataModule("cars196", root=str(roots["cars196"]), epochs_per_task=1, batch_size=8,
                                eval_batch_size=512)
    assert data.num_tasks == 10 and data.task_sizes[-1] == 16
    model = IncrementalViT("vit_tiny_patch16_224", pretrained=False, num_classes=196, classes_per_task=None,
                           task_sizes=list(data.task_sizes), epochs_per_task=1, lr=1e-2,
                           model_kwargs=dict(img_size=16, patch_size=8, embed_dim=24, depth=1, num_heads=2))
    pretuning = PreTuning(n_components=1, probe_epochs=1, align_epochs=1, align_epochs_per_task=0, samples_per_class=4)
    algorithm = (ITA if method == "ita" else IEL)(1.0, rank=2, pretuning=pretuning, head_fisher_samples=8,
                                                  fisher_estimator="empirical", save_dir=str(tmp_path))
    evaluation = ContinualEvaluation(output_dir=str(tmp_path))
    trainer = L.Trainer(max_epochs=data.max_epochs, reload_dataloaders_every_n_epochs=1, num_sanity_val_steps=0,
                        limit_train_batches=1, check_val_every_n_epoch=1, enable_progress_bar=False, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[algorithm, evaluation])
    trainer.fit(model, data)
    # Training: every task banked; the last task's head penalty and Fisher used its 16 rows.
    assert model.task_deltas.tasks == list(range(10))
    assert algorithm.record["task_sizes"] == [20] * 9 + [16] and "classes_per_task" not in algorithm.record
    # Evaluation: a full 10 × 10 matrix, task 9 evaluated on its 16 classes.
    rows = evaluation.matrices["class_il"].rows
    assert len(rows) == 10 and len(rows[-1]) == 10 and all(0 <= a <= 1 for a in rows[-1])
    assert len((tmp_path / "accuracy_class_il.csv").read_text().strip().splitlines()) >= 10
    # Editing and export from the saved run.
    trainer.save_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    run = load_run(tmp_path)
    assert run.task_ranges[-1] == range(180, 196)
    result = apply_edit(run, Edit(drop=(9,), mask_removed=True))
    assert result.removed == [9] and result.masked_classes == list(range(180, 196))
    assert len(result.before["class_il"]) == 10 and result.after["task_il"][9] != result.after["task_il"][9]  # NaN
    path = export(run, tmp_path / "merged.safetensors", result.composition, result.masked_classes)
    meta = safetensors.safe_open(str(path), "pt").metadata()
    assert json.loads(meta["head_layout"])["task_rows"][-1] == [180, 196] and meta["classes_per_task"] == "null"
    merged = timm.create_model(meta["model_name"], **json.loads(meta["model_kwargs"]))
    merged.load_state_dict(safetensors.torch.load_file(str(path)))
    assert merged.get_classifier().out_features == 196


def test_continual_accuracy_of_an_uneven_partition_against_brute_force():
    from lightning_taylor.metrics import continual_accuracy_counts

    sizes, generator = [3, 3, 2], torch.Generator().manual_seed(0)
    ranges = [range(0, 3), range(3, 6), range(6, 8)]
    logits, target = torch.randn(40, 8, generator=generator), torch.randint(0, 6, (40,), generator=generator)
    class_il, task_il, total = continual_accuracy_counts(logits, target, 2, sizes, 3)
    expected = torch.zeros(3, 3, dtype=torch.long)
    for row, y in zip(logits, target.tolist()):
        t = next(i for i, r in enumerate(ranges) if y in r)
        expected[0, t] += int(row[:6].argmax()) == y
        expected[1, t] += ranges[t].start + int(row[ranges[t].start:ranges[t].stop].argmax()) == y
        expected[2, t] += 1
    assert torch.equal(torch.stack([class_il, task_il, total]), expected)
    uniform = continual_accuracy_counts(logits[:, :6], target, 2, 2 * [3], 2)
    assert all(torch.equal(a, b) for a, b in zip(uniform, continual_accuracy_counts(logits[:, :6], target, 2, 3, 2)))


def test_the_logged_hyperparameters_name_the_split(roots, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    data = TaskStreamDataModule("isic", root=str(roots["isic"]), split="auto", epochs_per_task=1, batch_size=4)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, num_sanity_val_steps=0,
                        accelerator="cpu", logger=CSVLogger(tmp_path, name="run"), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(_TinyViT(data.num_classes), datamodule=data)
    logged = yaml.safe_load(next(tmp_path.rglob("hparams.yaml")).read_text())
    assert logged["split"] == "reference" and logged["dataset"] == "isic" and logged["class_order_seed"] is None


def test_the_resume_record_holds_an_uneven_partition():
    from types import SimpleNamespace

    from lightning_taylor.callbacks.resume import check_record, stream_record

    def record(sizes):
        module = SimpleNamespace(task_sizes=sizes, num_tasks=len(sizes), epochs_per_task=1, hparams={})
        return stream_record(SimpleNamespace(datamodule=None), module, {})

    cars = record([20] * 9 + [16])
    assert cars["task_sizes"] == [20] * 9 + [16] and "classes_per_task" not in cars
    with pytest.raises(InputError, match=r"`task_sizes` to be \[20, 20"):
        check_record(cars, record([16] + [20] * 9), allow_strength_change=False, checkpoint=None)
