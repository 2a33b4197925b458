"""The shipped glyph stream and its backbone: held-out letters in held-out fonts, 10 tasks of 10 letters."""

import json
import unicodedata

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lightning_taylor.data import TaskStreamDataModule, load_embedded_splits
from lightning_taylor.data.datasets import dataset_info, glyphs_file
from lightning_taylor.model.backbone import create_backbone, embedded_metadata, embedded_weights


@pytest.fixture(scope="module")
def stream():
    with np.load(glyphs_file(), allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def test_stream_holds_100_letters_with_100_training_and_20_test_images_each(stream):
    codepoints = [int(c) for c in stream["codepoints"]]
    assert len(codepoints) == len(set(codepoints)) == 100
    # Letters only: no digit or other number, so MNIST stays a domain shift for the backbone.
    assert {unicodedata.category(chr(c))[0] for c in codepoints} == {"L"}
    for split, count in (("train", 100), ("test", 20)):
        images, labels, fonts = stream[f"{split}_images"], stream[f"{split}_labels"], stream[f"{split}_fonts"]
        assert images.shape == (100 * count, 28, 28) and images.dtype == np.uint8
        assert np.bincount(labels, minlength=100).tolist() == [count] * 100
        assert fonts.max() < len(stream["fonts"])
        assert (images.reshape(len(images), -1).max(1) > 96).all()  # every image has visible ink
    recipe = json.loads(str(stream["recipe"]))
    assert recipe["train_per_class"] == 100 and recipe["test_per_class"] == 20


def test_stream_letters_and_fonts_are_disjoint_from_the_backbones_pre_training(stream):
    meta = embedded_metadata("embedded:glyphs")
    pre_codepoints, pre_fonts = set(json.loads(meta["codepoints"])), set(json.loads(meta["fonts"]))
    assert len(pre_codepoints) >= 1000 and not any(unicodedata.category(chr(c)) == "Nd" for c in pre_codepoints)
    assert not pre_codepoints & {int(c) for c in stream["codepoints"]}
    used_fonts = {str(stream["fonts"][i]) for i in np.unique(np.concatenate([stream["train_fonts"],
                                                                            stream["test_fonts"]]))}
    assert used_fonts and not pre_fonts & used_fonts
    assert used_fonts <= set(json.loads(meta["held_out_fonts"]))


def test_glyph_stream_has_ten_tasks_of_ten_letters_and_names_them():
    info = dataset_info("glyphs")
    assert len(info.class_names) == 100 and info.class_names[0].startswith("U+") and info.num_tasks == 10
    raw = load_embedded_splits("glyphs", image_size=28, test_fraction=0.2, split_seed=0)
    image, label = raw.train[0]
    assert image.shape == (1, 28, 28) and 0 <= float(image.min()) and float(image.max()) <= 1
    assert len(raw.train_targets) == 10_000 and len(raw.test_targets) == 2000
    assert load_embedded_splits("glyphs", 16, 0.2, 0).test[0][0].shape == (1, 16, 16)
    data = TaskStreamDataModule("glyphs", epochs_per_task=1, batch_size=50)
    data.setup()
    assert data.num_tasks == 10 and data.task_sizes == (10,) * 10
    seen = torch.cat([y for _, y in data.task_dataloader(3, "test")])
    assert set(seen.tolist()) == set(range(30, 40)) and len(seen) == 200


def test_glyph_backbone_is_a_named_embedded_choice_next_to_the_default():
    model = create_backbone(None, "embedded:glyphs", num_classes=100, seed=0)
    shipped = load_file(embedded_weights("embedded:glyphs"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in shipped.items())
    assert model.head.out_features == 100
    assert embedded_weights() != embedded_weights("embedded:glyphs")  # "embedded" is still Fashion-MNIST's
    with pytest.raises(ValueError, match="pretrained"):
        embedded_weights("embedded:nothing")
