"""Miniature copies of the benchmarks' layouts: the real metadata formats and class counts, tiny images.

``write_all(root)`` writes every benchmark under ``root`` as its authors distribute it (see the modules of
``lightning_taylor/data/benchmarks``), with ``IMAGES`` images of 8×8 pixels per class, plus the reference
split files where the reference has them. Nothing is downloaded.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from lightning_taylor.data.benchmarks import BENCHMARKS

IMAGES = 3  # per class: 2 for training and 1 for testing in the reference split files


def _image(path: Path, seed: int, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _folders(folder: Path, class_names, seed: int) -> dict[str, list[list]]:
    """``folder/<class>/<class>_<i>.jpg``; returns reference-style rows ``[<class>/<file>, label]`` per split."""
    rows = {"train": [], "test": []}
    for label, name in enumerate(class_names):
        for i in range(IMAGES):
            _image(folder / name / f"{name}_{i}.jpg", seed + 100 * label + i)
            rows["test" if i == IMAGES - 1 else "train"].append([f"{name}/{name}_{i}.jpg", label])
    return rows


def write_imagenet_r(root: Path) -> None:
    rows = _folders(root / "imagenet-r", BENCHMARKS["imagenet_r"].class_names, 1)
    for part in ("train", "test"):  # the reference's paths: relative to another machine's data folder
        content = {"data": [f"data/imagenet-r/{p}" for p, _ in rows[part]], "targets": [t for _, t in rows[part]]}
        (root / f"imagenet-r_{part}.yaml").write_text(yaml.safe_dump(content))


def write_cub200(root: Path) -> None:
    base = root / "CUB_200_2011"
    images, labels, split, classes = [], [], [], []
    for c in range(200):
        folder = f"{c + 1:03d}.Bird_{c}"
        classes.append(f"{c + 1} {folder}")
        for i in range(IMAGES):
            image_id = c * IMAGES + i + 1
            _image(base / "images" / folder / f"Bird_{c}_{i}.jpg", 2000 + image_id)
            images.append(f"{image_id} {folder}/Bird_{c}_{i}.jpg")
            labels.append(f"{image_id} {c + 1}")
            split.append(f"{image_id} {int(i < IMAGES - 1)}")
    for name, lines in (("images.txt", images), ("image_class_labels.txt", labels),
                        ("train_test_split.txt", split), ("classes.txt", classes)):
        (base / name).write_text("\n".join(lines) + "\n")


def write_cars196(root: Path) -> None:
    import scipy.io

    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    names = np.array([f"Make Model {c} 2012" for c in range(196)], dtype=object)
    scipy.io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": names.reshape(1, -1)})
    record = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"), ("fname", "O")]
    for part, annos, per_class in (("cars_train", base / "devkit" / "cars_train_annos.mat", IMAGES - 1),
                                   ("cars_test", base / "cars_test_annos_withlabels.mat", 1)):
        table = np.zeros((1, 196 * per_class), dtype=record)
        for c in range(196):
            for i in range(per_class):
                n = c * per_class + i
                fname = f"{n + 1:05d}.jpg"
                _image(base / part / fname, 3000 + n + (0 if part == "cars_train" else 10000))
                table[0, n] = (1, 1, 8, 8, c + 1, fname)
        scipy.io.savemat(annos, {"annotations": table})


def write_eurosat(root: Path) -> None:
    rows = _folders(root / "eurosat" / "2750", BENCHMARKS["eurosat"].class_names, 4)
    names = BENCHMARKS["eurosat"].class_names
    split = {part: [[p, t, names[t]] for p, t in rows[part]] for part in ("train", "test")}
    split["val"] = []
    (root / "eurosat" / "split_zhou_EuroSAT.json").write_text(json.dumps(split))


def write_isic(root: Path) -> None:
    header = ["image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    for part, count in (("Training", IMAGES), ("Test", 1)):
        rows = []
        for label in range(7):  # NV (column 2) included: the loader leaves it out
            for i in range(count):
                name = f"ISIC_{part[:2]}{label}{i:04d}"
                _image(root / f"ISIC2018_Task3_{part}_Input" / f"{name}.jpg", 5000 + 10 * label + i)
                rows.append([name] + [f"{float(j == label):.1f}" for j in range(7)])
        table = root / f"ISIC2018_Task3_{part}_GroundTruth" / f"ISIC2018_Task3_{part}_GroundTruth.csv"
        table.parent.mkdir(parents=True)
        with open(table, "w", newline="") as file:
            csv.writer(file).writerows([header, *rows])


def write_resisc45(root: Path) -> None:
    rows = _folders(root / "NWPU-RESISC45", BENCHMARKS["resisc45"].class_names, 6)
    for part in ("train", "test"):
        content = {"data": [f"NWPU-RESISC45/{p}" for p, _ in rows[part]], "targets": [t for _, t in rows[part]]}
        (root / "NWPU-RESISC45" / f"resisc45_{part}.yaml").write_text(yaml.safe_dump(content))


def write_cropdisease(root: Path) -> None:
    rows = _folders(root / "cropdisease" / "images", BENCHMARKS["cropdisease"].class_names, 7)
    for part in ("train", "test"):
        content = {"data": [p for p, _ in rows[part]], "labels": [t for _, t in rows[part]]}
        (root / "cropdisease" / f"{part}.json").write_text(json.dumps(content))


WRITERS = {"imagenet_r": write_imagenet_r, "cub200": write_cub200, "cars196": write_cars196,
           "eurosat": write_eurosat, "isic": write_isic, "resisc45": write_resisc45, "cropdisease": write_cropdisease}


def write_all(root: Path) -> dict[str, Path]:
    """Every benchmark in its own folder ``root/<name>``; returns the roots by name."""
    roots = {}
    for name, write in WRITERS.items():
        roots[name] = root / name
        roots[name].mkdir(parents=True)
        write(roots[name])
    return roots
