"""ISIC 2018 task 3 (Codella et al., 2019; Tschandl et al., 2018): dermoscopic images of skin lesions.

Layout, as the challenge's archives (https://challenge.isic-archive.com/data/#2018, task 3) unpack::

    root/ISIC2018_Task3_Training_Input/ISIC_<nnnnnnn>.jpg
    root/ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv
    # optional, the official test set with its released labels:
    root/ISIC2018_Task3_Test_Input/ISIC_<nnnnnnn>.jpg
    root/ISIC2018_Task3_Test_GroundTruth/ISIC2018_Task3_Test_GroundTruth.csv

The ground-truth tables have the header ``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC`` and one 1.0 per row. As in
the reference framework, the nevus class (NV) is left out: 6 classes, in the reference's order MEL, BCC,
AKIEC, BKL, DF, VASC, 3 tasks of 2. The reference trains on its own preprocessed copy, whose split is not
distributed with the challenge data: here the official test set is the test split when its two files are
present (``split: reference``), else a seeded stratified split of the training images.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from lightning_taylor.data.benchmarks.base import (
    Benchmark,
    Index,
    SplitChoice,
    choose_split,
    require,
    split_index,
)
from lightning_taylor.data.transforms import Recipe

#: the table's columns kept, in the reference's label order (NV is left out)
ISIC_COLUMNS = ("MEL", "BCC", "AKIEC", "BKL", "DF", "VASC")
ISIC_CLASSES = ("melanoma", "basal cell carcinoma", "actinic keratosis or intraepithelial carcinoma",
                "benign keratosis", "dermatofibroma", "vascular skin lesion")


def _part(root: str, part: str) -> tuple[list[str], list[int]]:
    images = require(ISIC, root, f"ISIC2018_Task3_{part}_Input", directory=True)
    table = require(ISIC, root, f"ISIC2018_Task3_{part}_GroundTruth", f"ISIC2018_Task3_{part}_GroundTruth.csv")
    with open(table, newline="") as file:
        rows = list(csv.DictReader(file))
    columns = ("image", "NV", *ISIC_COLUMNS)
    if not rows or any(c not in rows[0] for c in columns):
        raise ISIC.missing(root, f"`{table}` should be a CSV table with the columns {list(columns)}.")
    paths, labels = [], []
    for line, row in enumerate(rows, start=2):
        try:
            hot = [float(row[c]) for c in ("NV", *ISIC_COLUMNS)]
        except (TypeError, ValueError) as err:
            raise ISIC.missing(root, f"Line {line} of `{table}` should hold numbers 0 / 1 ({err}).") from err
        if sorted(hot) != [0.0] * 6 + [1.0]:
            raise ISIC.missing(root, f"Line {line} of `{table}` should have exactly one class set to 1.")
        if hot[0] == 1.0:  # nevus: not one of the benchmark's classes
            continue
        paths.append(str(images / f"{row['image']}.jpg"))
        labels.append(hot.index(1.0) - 1)
    return paths, labels


def index(root: str, split: SplitChoice, test_fraction: float, split_seed: int) -> Index:
    test_files = [Path(root, "ISIC2018_Task3_Test_GroundTruth", "ISIC2018_Task3_Test_GroundTruth.csv")]
    train_paths, train_labels = _part(root, "Training")
    if not choose_split(ISIC, root, split, test_files):
        return split_index(train_paths, torch.tensor(train_labels, dtype=torch.long), ISIC_CLASSES, test_fraction,
                           split_seed, "isic")
    test_paths, test_labels = _part(root, "Test")
    return Index(train_paths, torch.tensor(train_labels, dtype=torch.long), test_paths,
                 torch.tensor(test_labels, dtype=torch.long), ISIC_CLASSES, "reference",
                 "official test set (ISIC2018_Task3_Test_GroundTruth.csv)")


ISIC = Benchmark(
    name="isic", title="ISIC 2018 task 3", num_classes=6, class_names=ISIC_CLASSES, task_sizes=(2,) * 3,
    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),  # ImageNet statistics, as the reference
    recipe=Recipe("resize_random_crop", train_resize=256, test_resize=(256, 256)),
    layout="root/ISIC2018_Task3_Training_{Input/,GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv}",
    source="Get the task 3 training input and ground truth (and, for the official test split, the test input "
           "and ground truth) from https://challenge.isic-archive.com/data/#2018 and unpack them in `root`.",
    index=index,
)
