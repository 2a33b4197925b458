"""Stanford Cars (Krause et al., 2013): 196 car models, 16,185 images, official train / test split.

Layout: torchvision's (``torchvision.datasets.StanfordCars``), i.e. the original archives unpacked in
``root/stanford_cars/``::

    root/stanford_cars/cars_train/<00001>.jpg
    root/stanford_cars/cars_test/<00001>.jpg
    root/stanford_cars/devkit/cars_meta.mat          # class_names
    root/stanford_cars/devkit/cars_train_annos.mat   # annotations: fname, class (1..196)
    root/stanford_cars/cars_test_annos_withlabels.mat

torchvision can no longer download it (the original host is gone). Labels are the official class ids
minus one, the reference's order; the reference's partition is uneven, 9 tasks of 20 classes and one of 16.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_taylor.data.benchmarks.base import (
    Benchmark,
    Index,
    SplitChoice,
    require,
    split_index,
)
from lightning_taylor.data.transforms import Recipe


def _load_mat(root: str, path: Path, key: str):
    import scipy.io  # torchvision's own dependency for this data set

    try:
        return scipy.io.loadmat(str(path), squeeze_me=True)[key]
    except (OSError, ValueError, KeyError) as err:
        raise CARS196.missing(root, f"`{path}` could not be read as a MATLAB file with `{key}` ({err!r}).") from err


def _annotations(root: str, annos: Path, images: Path) -> tuple[list[str], list[int]]:
    table = _load_mat(root, annos, "annotations")
    try:
        rows = [(str(images / str(a["fname"])), int(a["class"]) - 1) for a in table]
    except (ValueError, IndexError, TypeError) as err:
        raise CARS196.missing(root, f"`{annos}` should hold annotations with `fname` and `class` ({err!r}).") from err
    bad = next((f for f, c in rows if not 0 <= c < CARS196.num_classes), None)
    if bad is not None:
        raise CARS196.missing(root, f"`{annos}` gives `{bad}` a class outside 1..196.")
    return [f for f, _ in rows], [c for _, c in rows]


def index(root: str, split: SplitChoice, test_fraction: float, split_seed: int) -> Index:
    base = require(CARS196, root, "stanford_cars", directory=True)
    names = tuple(str(n) for n in _load_mat(root, require(CARS196, root, "stanford_cars", "devkit", "cars_meta.mat"),
                                            "class_names"))
    if len(names) != CARS196.num_classes:
        raise CARS196.missing(root, f"`{base / 'devkit' / 'cars_meta.mat'}` names {len(names)} classes, not 196.")
    halves = []
    for annos, images in ((("devkit", "cars_train_annos.mat"), "cars_train"),
                          (("cars_test_annos_withlabels.mat",), "cars_test")):
        paths, labels = _annotations(root, require(CARS196, root, "stanford_cars", *annos),
                                     require(CARS196, root, "stanford_cars", images, directory=True))
        halves.append((paths, torch.tensor(labels, dtype=torch.long)))
    (train_paths, train_targets), (test_paths, test_targets) = halves
    if split == "seeded":
        return split_index(train_paths + test_paths, torch.cat([train_targets, test_targets]), names,
                           test_fraction, split_seed, "cars196")
    return Index(train_paths, train_targets, test_paths, test_targets, names, "reference",
                 "official split (devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat)")


CARS196 = Benchmark(
    name="cars196", title="Stanford Cars", num_classes=196, class_names=None, task_sizes=(20,) * 9 + (16,),
    mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),  # the reference serves it unnormalised
    # The reference resizes and centre-crops once when preprocessing, then flips for training only.
    recipe=Recipe("resize_center_crop", train_resize=224, test_resize=224),
    layout="root/stanford_cars/{cars_train/,cars_test/,devkit/cars_meta.mat,devkit/cars_train_annos.mat,"
           "cars_test_annos_withlabels.mat}",
    source="torchvision cannot download Stanford Cars any more: get the archives (e.g. the Kaggle mirror "
           "`jessicali9530/stanford-cars-dataset` plus `cars_test_annos_withlabels.mat`) and unpack them in "
           "`root/stanford_cars/` as torchvision's StanfordCars expects.",
    index=index,
)
