"""What a benchmark of the paper is (:class:`Benchmark`) and the pieces its loader is built from.

A benchmark's loader only *indexes* its files: it reads the metadata the authors distribute (a split file,
a label table, class folders) and returns the image paths and labels of both splits (:class:`Index`),
without opening an image. Images are decoded by :class:`FileList` when a batch first needs them, so the
index of a 30,000-image folder is built in well under a second (``benchmarks/index.py``), once per stream.

Where a benchmark has an official split, or the reference framework (mammoth) ships its own split files,
that split is used when its files are found next to the data (``split="reference"``); otherwise a
deterministic seeded, stratified split of the images (:func:`seeded_split`, ``split="seeded"``).
``split="auto"`` (the default) takes the reference split when its files are there; the split a run used is
recorded in the data module's hyper-parameters.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_taylor.data.datasets import read_image
from lightning_taylor.data.transforms import Recipe
from lightning_taylor.errors import expected

SplitChoice = Literal["auto", "reference", "seeded"]

#: file name endings read as images (what PIL decodes and the distributions use)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class Index:
    """Image paths and original labels of both splits, the class names, and which split this is.

    ``split`` is ``"reference"`` (official or reference-framework split files) or ``"seeded"``;
    ``split_source`` says in words which files (or which seed) defined it.
    """

    train_paths: list[str]
    train_targets: Tensor
    test_paths: list[str]
    test_targets: Tensor
    class_names: tuple[str, ...]
    split: Literal["reference", "seeded"]
    split_source: str


class FileList(Dataset):
    """Images ``paths[i]`` with labels ``targets[i]``, decoded (:func:`read_image`) only when an item is read."""

    def __init__(self, paths: Sequence[str], targets: Tensor) -> None:
        if len(paths) != len(targets):
            raise ValueError(f"Expected one label per path, but got {len(paths)} paths and {len(targets)} labels.")
        self.paths = list(paths)
        self.targets = torch.as_tensor(targets, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return read_image(self.paths[index]), int(self.targets[index])


@dataclass(frozen=True)
class Benchmark:
    """One benchmark of the paper: its task structure, reference transforms, layout and index.

    Attributes:
        name: the ``dataset`` value (``"cub200"``).
        title: how the data set is called (``"CUB-200-2011"``).
        num_classes: number of classes.
        class_names: every class in the reference's label order (label ``i`` is ``class_names[i]``);
            ``None`` where only the data's metadata names them (read when the index is built).
        task_sizes: classes of each task, in task order, as in the reference (``[20] * 9 + [16]``).
        mean, std: the reference's normalisation.
        recipe: the reference's training and test transforms.
        layout: the folder expected under ``root``, as the authors' archive unpacks (for errors and docs).
        source: where to get the data (and the reference split files), in words.
        index: ``index(root, split, test_fraction, split_seed)`` -> :class:`Index`.
        download: fetches the data into ``root`` (torchvision), or ``None`` where torchvision cannot.
    """

    name: str
    title: str
    num_classes: int
    class_names: tuple[str, ...] | None
    task_sizes: tuple[int, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    recipe: Recipe
    layout: str
    source: str
    index: Callable[[str, SplitChoice, float, int], Index]
    download: Callable[[str], None] | None = None

    def missing(self, root: str, what: str, hint: str = "") -> Exception:
        """The error for data that is not where the layout says: names ``what`` and where to get it."""
        return expected("root", f"a directory holding {self.title} laid out as `{self.layout}`", root,
                        f"{what} {hint} {self.source}".replace("  ", " ").strip())


def require(benchmark: Benchmark, root: str, *parts: str, directory: bool = False) -> Path:
    """``root/parts...``, which must exist (as a directory if ``directory``), else :meth:`Benchmark.missing`."""
    path = Path(root, *parts)
    if not (path.is_dir() if directory else path.is_file()):
        kind = "folder" if directory else "file"
        raise benchmark.missing(root, f"The {kind} `{path}` is missing.")
    return path


def list_images(directory: str | os.PathLike) -> list[str]:
    """Paths of the image files directly in ``directory``, sorted (one ``scandir``, no file opened)."""
    with os.scandir(directory) as entries:
        return sorted(e.path for e in entries if e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file())


def class_folders(benchmark: Benchmark, root: str, directory: Path, class_names: Sequence[str] | None = None
                  ) -> tuple[list[str], Tensor]:
    """Images of ``directory/<class>/`` for each of ``class_names`` (default: the benchmark's), labelled by
    position in that list. A missing, empty or unexpected class folder is an error naming it."""
    names = list(benchmark.class_names if class_names is None else class_names)
    with os.scandir(directory) as entries:
        found = {e.name for e in entries if e.is_dir()}
    absent, extra = [n for n in names if n not in found], sorted(found - set(names))
    if absent or extra:
        raise benchmark.missing(root, f"`{directory}` should hold the {len(names)} class folders of {benchmark.title}: "
                                f"missing {absent[:5]}{' ...' if len(absent) > 5 else ''}, unexpected "
                                f"{extra[:5]}{' ...' if len(extra) > 5 else ''}.")
    paths, labels = [], []
    for label, name in enumerate(names):
        images = list_images(directory / name)
        if not images:
            raise benchmark.missing(root, f"The class folder `{directory / name}` holds no image.")
        paths += images
        labels += [label] * len(images)
    return paths, torch.tensor(labels, dtype=torch.long)


def seeded_split(targets: Tensor, test_fraction: float, seed: int, name: str = "data") -> tuple[Tensor, Tensor]:
    """``(train, test)`` positions of a stratified split: ``round(test_fraction · n_c)`` of every class (at
    least one, and at least one left for training) go to the test set.

    Deterministic: the same seed and the same (sorted) index give the same split on any machine, since each
    class's images are drawn by ``randperm`` from one generator seeded by ``seed``, classes in label order.
    """
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for label in torch.unique(targets).tolist():
        members = torch.nonzero(targets == label, as_tuple=True)[0]
        if len(members) < 2:
            raise expected(f"{name} class {label}", "a class with at least 2 images (one per split)",
                           f"{len(members)} image")
        n_test = min(max(round(test_fraction * len(members)), 1), len(members) - 1)
        shuffled = members[torch.randperm(len(members), generator=generator)]
        test.append(shuffled[:n_test])
        train.append(shuffled[n_test:])
    return torch.sort(torch.cat(train)).values, torch.sort(torch.cat(test)).values


def split_index(paths: list[str], targets: Tensor, class_names: Sequence[str], test_fraction: float,
                split_seed: int, name: str) -> Index:
    """The :class:`Index` of a seeded split (:func:`seeded_split`) of one list of images."""
    train, test = seeded_split(targets, test_fraction, split_seed, name)
    return Index([paths[i] for i in train.tolist()], targets[train], [paths[i] for i in test.tolist()],
                 targets[test], tuple(class_names), "seeded",
                 f"seeded stratified split: test_fraction={test_fraction}, split_seed={split_seed}")


def choose_split(benchmark: Benchmark, root: str, split: SplitChoice, reference_files: Sequence[Path]) -> bool:
    """Whether to use the reference split: its files are all there (``auto``) or asked for (``reference``,
    an error naming a missing file); ``seeded`` never."""
    if split == "seeded":
        return False
    present = [p.is_file() for p in reference_files]
    if split == "reference" and not all(present):
        missing = next(p for p, ok in zip(reference_files, present) if not ok)
        raise benchmark.missing(root, f"`split: reference` needs the reference split file `{missing}`, which is "
                                "missing.",
                                "Use `split: seeded` (or `auto`) for the seeded split.")
    return all(present)


def folder_index(benchmark: Benchmark, root: str, folder: Path, class_names: Sequence[str], split: SplitChoice,
                 split_files: Sequence[Path], read_entries: Callable[[Path], tuple[Sequence[str], Sequence[int]]],
                 test_fraction: float, split_seed: int) -> Index:
    """The index of one folder per class: the reference split when its two files (train, test) are chosen
    (:func:`choose_split`; ``read_entries(file)`` gives their entries and targets), else a seeded split."""
    paths, targets = class_folders(benchmark, root, folder)
    if not choose_split(benchmark, root, split, split_files):
        return split_index(paths, targets, class_names, test_fraction, split_seed, benchmark.name)
    listed = set(paths)
    (train_paths, train_targets), (test_paths, test_targets) = [
        listed_split(benchmark, root, file, *read_entries(file), folder, class_names, listed) for file in split_files]
    names = [file.name for file in split_files]
    return Index(train_paths, train_targets, test_paths, test_targets, tuple(class_names), "reference",
                 f"reference split files {names}")


def listed_split(benchmark: Benchmark, root: str, file: Path, entries: Sequence[str], targets: Sequence[int],
                 folder: Path, class_names: Sequence[str], listed: set[str]) -> tuple[list[str], Tensor]:
    """Paths and labels of one part of a reference split file whose entries end in ``<class>/<image>``.

    Each entry resolves to ``folder/<class>/<image>`` (so files written on another machine resolve here)
    and must be one of the ``listed`` images, with the label of its class folder equal to its target;
    otherwise the error names the file and the entry.
    """
    label_of = {name: i for i, name in enumerate(class_names)}
    paths, labels = [], []
    for entry, target in zip(entries, targets):
        parts = Path(str(entry)).parts
        path = str(folder.joinpath(*parts[-2:])) if len(parts) >= 2 else str(entry)
        label = label_of.get(parts[-2]) if len(parts) >= 2 else None
        if path not in listed or label != target:
            problem = "is not one of the images" if path not in listed else f"has target {target}, not {label}"
            raise benchmark.missing(root, f"The split file `{file}` is inconsistent with the data: `{entry}` "
                                    f"{problem}.")
        paths.append(path)
        labels.append(label)
    return paths, torch.tensor(labels, dtype=torch.long)
