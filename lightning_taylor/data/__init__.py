"""Class-incremental task streams: class order, partition and remapping, data sets and the paper's
benchmarks (:mod:`lightning_taylor.data.benchmarks`), transforms, the DataModule.

``TaskStreamDataModule`` is what a Trainer (or the CLI's ``data:`` section) uses; the rest is exposed for
callbacks and custom streams.
"""

from lightning_taylor.data.benchmarks import BENCHMARKS, Benchmark
from lightning_taylor.data.datasets import (
    CIFAR100_CLASSES,
    DATASETS,
    DatasetInfo,
    RawSplits,
    dataset_info,
    load_cifar100_splits,
    load_digits_splits,
    load_embedded_splits,
    load_imagefolder_splits,
)
from lightning_taylor.data.input_size import model_input_size
from lightning_taylor.data.split import ClassIncrementalSplit, class_order, task_ranges
from lightning_taylor.data.stream import TaskStreamDataModule
from lightning_taylor.data.transforms import (
    Recipe,
    ToChannels,
    digits_transforms,
    image_transforms,
    recipe_transforms,
)
from lightning_taylor.data.views import TransformedSubset

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "CIFAR100_CLASSES",
    "ClassIncrementalSplit",
    "DATASETS",
    "DatasetInfo",
    "RawSplits",
    "Recipe",
    "TaskStreamDataModule",
    "ToChannels",
    "TransformedSubset",
    "class_order",
    "dataset_info",
    "digits_transforms",
    "image_transforms",
    "load_cifar100_splits",
    "load_digits_splits",
    "load_embedded_splits",
    "load_imagefolder_splits",
    "model_input_size",
    "recipe_transforms",
    "task_ranges",
]
