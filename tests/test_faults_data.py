"""Weights and data that do not fit are refused early, with an error naming the file, index or setting."""

import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

from lightning_taylor.data import TaskStreamDataModule
from lightning_taylor.errors import InputError
from lightning_taylor.head.pretuning import extract_features
from lightning_taylor.model.backbone import create_backbone
from lightning_taylor.model.module import IncrementalViT

SMALL = dict(img_size=16, patch_size=8, embed_dim=24, depth=3, num_heads=2)


# ------------------------------------------------------------------------------------------ weights files


def test_weights_of_a_shallower_vit_are_refused_listing_the_missing_keys(tmp_path):
    path = tmp_path / "shallow.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", num_classes=0, **{**SMALL, "depth": 1}).state_dict(), path)
    with pytest.raises(InputError) as info:
        create_backbone("vit_tiny_patch16_224", str(path), num_classes=4, model_kwargs=SMALL)
    message = str(info.value)
    assert f"but got {str(path)!r}" in message and "every backbone parameter" in message
    assert re.search(r"missing keys 24 \(blocks\.1\.norm1\.weight, .*\.\.\.\)", message)  # 2 blocks × 12 tensors
    assert "unexpected" not in message and "`model_kwargs`" in message


def test_weights_of_another_width_are_refused_listing_the_shapes(tmp_path):
    path = tmp_path / "wide.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=0, **{**SMALL, "embed_dim": 32}).state_dict(), path)
    with pytest.raises(InputError, match=r"'.*wide\.pth'.*other shapes \(file vs model\) \d+ \(cls_token \(1, 1, 32\) "
                                         r"vs \(1, 1, 24\)"):
        create_backbone("vit_tiny_patch16_224", str(path), num_classes=4, model_kwargs=SMALL)


def _text_file(path: Path) -> None:
    path.write_text("this is not a weights file\n" * 20)


@pytest.mark.parametrize("name, write, reason", [
    ("text.safetensors", _text_file, r"a readable weights file.*SafetensorError.*header too large"),
    ("text.pth", _text_file, r"a readable weights file.*Reading it failed"),
    ("list.pth", lambda p: torch.save([1, 2], p), r"a state dict.*It holds a list"),
    ("stats.pth", lambda p: torch.save({"epoch": 3}, p), r"a state dict.*It holds a mapping with 'epoch': int"),
    ("absent.safetensors", None, r"an existing weights file"),
])
def test_every_weights_file_error_names_the_file(tmp_path, name, write, reason):
    path = tmp_path / name
    if write is not None:
        write(path)
    with pytest.raises(InputError, match=rf"`pretrained`.*{reason}") as info:
        create_backbone("vit_tiny_patch16_224", str(path), num_classes=4, model_kwargs=SMALL)
    assert str(path) in str(info.value)


def test_model_name_must_be_the_embedded_files():
    with pytest.raises(InputError, match=r"`model_name` to be None or 'vit_tiny_patch16_224' \(the model in the "
                                         r"embedded weights\).*but got 'vit_base_patch16_224'"):
        IncrementalViT("vit_base_patch16_224", pretrained="embedded")
    named = IncrementalViT("vit_tiny_patch16_224", pretrained="embedded")  # the file's own name is fine
    assert named.input_size == IncrementalViT().input_size == (1, 28, 28)


def test_hub_weights_offline_name_the_model_and_the_ways_out(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))  # an empty cache, whatever this machine holds
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(InputError) as info:
        IncrementalViT("vit_tiny_patch16_224.augreg_in21k", pretrained=True, model_kwargs=dict(depth=1))
    message = str(info.value)
    assert message.startswith("Expected `pretrained` to be weights that timm can load for "
                              "model_name='vit_tiny_patch16_224.augreg_in21k', but got True.")
    assert "`--model.pretrained PATH`" in message and "HF_HOME" in message and "\n" not in message


# ---------------------------------------------------------------------------------------------- images


def _folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


@pytest.mark.parametrize("damage", ["truncated", "text"])
def test_an_unreadable_image_is_named_when_decoded(tmp_path, damage):
    root = _folder(tmp_path / "images")
    bad = root / "train" / "b" / "1.png"
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:200])
    else:
        bad.write_text("not an image")
    dm = TaskStreamDataModule(dataset="imagefolder", root=str(root), num_tasks=1, batch_size=4, image_size=8)
    dm.setup()  # the index is built without decoding anything
    dm.task_dataset(0)[0]  # the other files still decode
    pattern = rf"`image file` to be an image that PIL can decode, but got {re.escape(repr(str(bad)))}\."
    with pytest.raises(InputError, match=pattern):
        list(dm.train_dataloader())


def test_non_finite_pixels_are_named_by_dataset_index():
    dm = TaskStreamDataModule(augment=False)
    dm.setup()
    dataset = dm.task_dataset(1)
    index = int(dataset.indices[3])
    dm._raw.train.dataset.tensors[0][dm._raw.train.indices[index], 0, 5, 5] = float("nan")
    try:
        with pytest.raises(InputError, match=rf"`digits train\[{index}\]` to be an input with finite values.*"
                                             r"'1 NaN and 0 infinite of 784 values'"):
            list(dm.task_dataloader(1))
    finally:
        dm._raw.train.dataset.tensors[0][dm._raw.train.indices[index], 0, 5, 5] = 0.0


def test_non_finite_task_boundary_inputs_are_named_by_loader_position():
    model = IncrementalViT()
    model.features = lambda x: model.backbone.forward_head(model.backbone.forward_features(x), pre_logits=True)
    x = torch.zeros(10, 1, 28, 28)
    x[7, 0, 3, 3] = float("inf")
    loader = DataLoader(TensorDataset(x, torch.zeros(10, dtype=torch.long)), batch_size=4)  # a user's own data
    with pytest.raises(InputError, match=r"`the task-boundary inputs` to be finite.*examples \[7\] of the loader"):
        extract_features(model, loader, torch.device("cpu"))


# ---------------------------------------------------------------------------------- data versus model


def test_settings_that_disagree_with_the_model_are_refused_naming_both():
    model = IncrementalViT()  # the embedded backbone takes 1 × 28 × 28
    with pytest.raises(InputError, match=r"`image_size` to be None or 28, the model's input size \(IncrementalViT"
                                         r"\.input_size = \(1, 28, 28\)\), but got 32\. Leave `data\.image_size` unset"
                                         r".*`model\.model_kwargs\.img_size: 32`"):
        TaskStreamDataModule(image_size=32).follow_model(model)
    with pytest.raises(InputError, match=r"`in_chans` to be None or 1.*but got 3\. Leave `data\.in_chans` unset.*"
                                         r"`model\.model_kwargs\.in_chans: 3`"):
        TaskStreamDataModule(in_chans=3).follow_model(model)
    with pytest.raises(InputError, match=r"`mean` to be a float or a list of 1 such values.*\[0\.5, 0\.4, 0\.3\]"):
        TaskStreamDataModule(dataset="cifar100", root="unused", mean=[0.5, 0.4, 0.3]).follow_model(model)
    wide = IncrementalViT("vit_tiny_patch16_224", pretrained=False, model_kwargs=dict(
        img_size=(16, 24), patch_size=8, embed_dim=24, depth=1, num_heads=2))
    with pytest.raises(InputError, match=r"`IncrementalViT\.input_size` to be a square input size.*\(3, 16, 24\)"):
        TaskStreamDataModule().follow_model(wide)


def test_the_check_runs_in_setup_before_any_training(tmp_path):
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(InputError, match="`image_size` to be None or 28"):
        trainer.fit(IncrementalViT(), TaskStreamDataModule(image_size=16, epochs_per_task=1))
    assert trainer.global_step == 0
