"""CUB-200-2011 (Wah et al., 2011): 200 bird species, 11,788 images, with an official train / test split.

Layout, as the official archive ``CUB_200_2011.tgz`` (https://www.vision.caltech.edu/datasets/cub_200_2011/)
unpacks::

    root/CUB_200_2011/images/<NNN.Species_Name>/<image>.jpg
    root/CUB_200_2011/images.txt              # <image id> <path under images/>
    root/CUB_200_2011/image_class_labels.txt  # <image id> <class id, 1..200>
    root/CUB_200_2011/train_test_split.txt    # <image id> <1: train, 0: test>
    root/CUB_200_2011/classes.txt             # <class id> <NNN.Species_Name>

The official split (5,994 / 5,794 images) is the reference one (``split: seeded`` splits all images
instead). Labels are the official class ids minus one, the reference's order; 10 tasks of 20 classes.
"""

from __future__ import annotations

import torch

from lightning_taylor.data.benchmarks.base import (
    Benchmark,
    Index,
    SplitChoice,
    require,
    split_index,
)
from lightning_taylor.data.benchmarks.files import read_table
from lightning_taylor.data.transforms import Recipe

FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")


def index(root: str, split: SplitChoice, test_fraction: float, split_seed: int) -> Index:
    base = require(CUB200, root, "CUB_200_2011", directory=True)
    images_dir = require(CUB200, root, "CUB_200_2011", "images", directory=True)
    images, labels, is_train, classes = (read_table(CUB200, root, require(CUB200, root, "CUB_200_2011", f), 2)
                                         for f in FILES)
    if len(classes) != CUB200.num_classes:
        raise CUB200.missing(root, f"`{base / 'classes.txt'}` lists {len(classes)} classes, not 200.")
    label_of, train_of = dict(labels), dict(is_train)
    paths, targets, train = [], [], []
    for image_id, relpath in images:
        if image_id not in label_of or image_id not in train_of:
            table = "image_class_labels.txt" if image_id not in label_of else "train_test_split.txt"
            raise CUB200.missing(root, f"Image id {image_id} of `images.txt` has no line in `{base / table}`.")
        label = int(label_of[image_id]) - 1
        if not 0 <= label < CUB200.num_classes or train_of[image_id] not in ("0", "1"):
            raise CUB200.missing(root, f"Image id {image_id} has class {label_of[image_id]} (1..200) and split "
                                 f"flag {train_of[image_id]} (0 or 1) in the label tables of `{base}`.")
        paths.append(str(images_dir / relpath))
        targets.append(label)
        train.append(train_of[image_id] == "1")
    targets_t = torch.tensor(targets, dtype=torch.long)
    names = tuple(name for _, name in classes)
    if split == "seeded":
        return split_index(paths, targets_t, names, test_fraction, split_seed, "cub200")
    train_t = torch.tensor(train)
    return Index([p for p, t in zip(paths, train) if t], targets_t[train_t], [p for p, t in zip(paths, train) if not t],
                 targets_t[~train_t], names, "reference", "official split (CUB_200_2011/train_test_split.txt)")


CUB200 = Benchmark(
    name="cub200", title="CUB-200-2011", num_classes=200, class_names=None, task_sizes=(20,) * 10,
    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),  # ImageNet statistics, as the reference
    recipe=Recipe("resize_random_crop", train_resize=(300, 300), test_resize=256),
    layout="root/CUB_200_2011/{images/,images.txt,image_class_labels.txt,train_test_split.txt,classes.txt}",
    source="Get CUB_200_2011.tgz from https://www.vision.caltech.edu/datasets/cub_200_2011/ and unpack it in "
           "`root`.",
    index=index,
)
