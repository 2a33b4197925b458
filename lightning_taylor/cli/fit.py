"""The ``lightning-taylor`` command: a LightningCLI over :class:`IncrementalViT` and the task-stream data.

``lightning-taylor fit`` with no config runs the offline demo (ITA on the embedded MNIST stream with the
shipped tiny ViT), so ``lightning-taylor fit --print_config`` documents every option of the method; the
paper's settings are in ``configs/<benchmark>/``. One ``fit`` runs a whole stream; ``--ckpt_path`` resumes it
mid-stream in the same run directory. ``test`` / ``validate`` (and ``fit``) given only ``--ckpt_path`` — a
checkpoint or a run directory — take the run's recorded ``config.yaml``. The trainer's epoch schedule follows
from the data: ``max_epochs = num_tasks × epochs_per_task``, data reloaded and the model validated at every
task boundary; setting them otherwise is refused.

"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from jsonargparse import Namespace
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.cli import (
    LightningArgumentParser,
    LightningCLI,
    SaveConfigCallback,
)
from lightning.pytorch.utilities import rank_zero_info

import lightning_taylor.callbacks  # noqa: F401 (short class names: `--trainer.callbacks+=ITA`)
from lightning_taylor._checks import check_positive_int
from lightning_taylor.callbacks.fault_tolerance import (
    FaultTolerance,
    check_output_folders,
)
from lightning_taylor.cli.overrides import (
    callbacks_argument,
    split_method_options,
    with_method_options,
    without_printing,
)
from lightning_taylor.cli.parser import TaylorArgumentParser
from lightning_taylor.cli.threads import auto_threads, available_cores, current_load
from lightning_taylor.data import TaskStreamDataModule
from lightning_taylor.data.split import uniform_size
from lightning_taylor.errors import expected
from lightning_taylor.model.module import IncrementalViT
from lightning_taylor.runs.load import artifacts_problem, find_checkpoint, run_directory

#: The offline demo: the trainer's defaults, and the settings that ``fit`` without ``--config`` runs
#: (``configs/glyphs/ita_aligned.yaml`` spells out the same run).
DEMO_DIR = "runs/glyphs/ita"
DEMO_TRAINER: dict[str, Any] = {
    "num_sanity_val_steps": 0,
    "reload_dataloaders_every_n_epochs": 1,
    "deterministic": True,
    "log_every_n_steps": 5,
    "default_root_dir": DEMO_DIR,
    "logger": {"class_path": "lightning_taylor.loggers.ResumableCSVLogger",
               "init_args": {"save_dir": DEMO_DIR, "name": ""}},
    # Checkpoints whole or absent (docs/faults.md); a config that sets trainer.plugins replaces it.
    "plugins": [{"class_path": "lightning_taylor.checkpoint_io.AtomicCheckpointIO"}],
}
#: The demo's callbacks.
DEMO_CALLBACKS: list[dict[str, Any]] = [
    {"class_path": "lightning_taylor.callbacks.ITA",
     "init_args": {"alpha": 5000.0, "penalty_mode": "coupled", "lambda_fisher": 0.025, "lambda_l2": 0.001,
                   "rank": 4, "head_alignment": "drift_compensated", "fisher_estimator": "mc"}},
    {"class_path": "lightning_taylor.callbacks.ContinualEvaluation"},
    {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
     "init_args": {"save_last": "link", "save_on_train_epoch_end": True}},
]

#: What ``fit`` without ``--config`` runs, given to the parser as a config (not as defaults: jsonargparse would
#: merge a config's callbacks item by item into default ones, so the demo's settings would leak into every
#: config). The glyph stream and backbone, the strengths and 3 epochs per task: docs/learning_quality_glyphs.md.
DEMO_CONFIG: dict[str, Any] = {"trainer": {"callbacks": DEMO_CALLBACKS},
                               "model": {"pretrained": "embedded:glyphs", "lr": 2e-3},
                               "data": {"dataset": "glyphs", "num_tasks": 10, "epochs_per_task": 3}}

SUBCOMMANDS = {
    "fit": "train a whole task stream (no config: the offline ITA demo); --ckpt_path resumes it",
    "validate": "evaluate the seen tasks of a run (--ckpt_path CHECKPOINT_OR_RUN_DIR)",
    "test": "evaluate the whole stream of a run (--ckpt_path CHECKPOINT_OR_RUN_DIR)",
    "predict": "LightningCLI's predict (needs a predict_dataloader)",
}


class SaveRunConfig(SaveConfigCallback):
    """Lightning's config saver, but a resumed ``fit`` writes ``config.yaml`` only once its checkpoint is accepted.

    The run's ``config.yaml`` is what ``test`` / ``validate`` / ``edit`` rebuild the run from, so a resume that
    is refused (another stream, another method) must leave it untouched.

    Args:
        resuming: ``fit`` continues from a checkpoint (set by :class:`TaylorCLI`).
        **kwargs: see ``SaveConfigCallback``.
    """

    def __init__(self, *args: Any, resuming: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resuming = resuming

    def setup(self, trainer, pl_module, stage: str) -> None:  # noqa: ANN001
        if not (self.resuming and stage == "fit"):
            super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001 (the checkpoint has been restored)
        if self.resuming:
            super().setup(trainer, pl_module, "fit")


class TaylorCLI(LightningCLI):
    """LightningCLI with the stream's schedule taken from the data module.

    ``max_epochs`` and ``check_val_every_n_epoch`` follow from ``num_tasks × epochs_per_task``; leave them
    unset (a value that disagrees is refused). Loaders are rebuilt every epoch (cheap), so a task boundary is
    never missed, also after resuming mid-task. ``--threads`` sets the CPU threads (default: chosen from the
    free cores, :mod:`lightning_taylor.cli.threads`). ``--method.NAME VALUE`` sets an argument of the config's
    method callback (:mod:`lightning_taylor.cli.overrides`); command-line errors are a few lines
    (:mod:`lightning_taylor.cli.parser`).
    """

    def __init__(self, *args: Any, parser_class: type[LightningArgumentParser] = TaylorArgumentParser,
                 **kwargs: Any) -> None:
        super().__init__(*args, parser_class=parser_class, **kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        if isinstance(args, (dict, Namespace)):
            self.config = parser.parse_object(args)
            return
        args = list(sys.argv[1:] if args is None else args)
        args, options = split_method_options(args)
        if options:  # one parse to find the method among the callbacks, then the list with the options set
            first = parser.parse_args(without_printing(args))
            config = first[first.subcommand] if first.get("subcommand") else first
            args = [*args, callbacks_argument(with_method_options(config.trainer.get("callbacks") or [], options))]
        self.config = parser.parse_args(args)

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001
        parser.link_arguments("data.epochs_per_task", "model.epochs_per_task")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data", "model.classes_per_task", compute_fn=_uniform_task_size, apply_on="instantiate")
        parser.link_arguments("data", "model.task_sizes", compute_fn=_uneven_task_sizes, apply_on="instantiate")
        parser.add_argument("--threads", type=int | None, default=None,
                            help="CPU intra-op threads; default: the free cores (load average) over the CPU "
                                 "processes; an OMP_NUM_THREADS in the environment is kept")

    @property
    def _config(self) -> Namespace:
        """This subcommand's config (the whole config when built with ``run=False``)."""
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        config = self._config
        if config.get("ckpt_path"):
            config.ckpt_path = os.fspath(find_checkpoint(config.ckpt_path, "ckpt_path"))
            _log_into_run(config, self.subcommand)
            if self.subcommand == "fit":
                _say_resuming(Path(config.ckpt_path))
        self.save_config_kwargs = {**self.save_config_kwargs,
                                   "resuming": self.subcommand == "fit" and bool(config.get("ckpt_path"))}
        if self.subcommand in ("validate", "test"):
            _without_checkpointing(config)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        # Every fit stops cleanly at SIGTERM and checks its folders first (docs/faults.md), unless the config
        # has its own FaultTolerance. Added before LightningCLI's config saver, so a bad folder fails first.
        given = config.get("callbacks") or []
        given = given if isinstance(given, list) else [given]
        if not any(isinstance(c, FaultTolerance) for c in [*given, *callbacks]):
            callbacks = [*callbacks, FaultTolerance()]
        return super()._instantiate_trainer(config, callbacks)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        self._set_threads(self._config.get("threads"))

    def _set_threads(self, threads: int | None) -> None:
        if not isinstance(self.trainer.accelerator, CPUAccelerator):
            return
        if threads is not None:
            check_positive_int("threads", threads)
            reason = "--threads"
        elif "OMP_NUM_THREADS" in os.environ:
            return
        else:
            cores, load = available_cores(), current_load()
            threads = auto_threads(cores, load, max(1, self.trainer.num_devices))
            reason = f"{cores} cores, load {load:.1f}, {self.trainer.num_devices} process(es); --threads to change"
        torch.set_num_threads(threads)
        rank_zero_info(f"CPU threads: {threads} ({reason})")

    def before_fit(self) -> None:
        data, trainer = self.datamodule, self.trainer
        configured = self.config[self.subcommand].trainer.max_epochs
        if configured is not None and configured != data.max_epochs:
            raise expected(
                "trainer.max_epochs", f"num_tasks × epochs_per_task = {data.num_tasks} × {data.epochs_per_task} = "
                f"{data.max_epochs} (or unset)", configured)
        trainer.fit_loop.max_epochs = data.max_epochs
        trainer.check_val_every_n_epoch = data.epochs_per_task
        if trainer.is_global_zero:  # before Lightning's setup opens the logger's folder: a bad path fails here
            check_output_folders(trainer)


def _uniform_task_size(data: TaskStreamDataModule) -> int | None:
    """The model's ``classes_per_task``: the stream's, or ``None`` when its tasks differ in size."""
    return uniform_size(data.task_sizes)


def _uneven_task_sizes(data: TaskStreamDataModule) -> list[int] | None:
    """The model's ``task_sizes``: the stream's class partition when its tasks differ in size, else ``None``."""
    return None if uniform_size(data.task_sizes) else list(data.task_sizes)


def _log_into_run(config: Namespace, subcommand: str) -> None:
    """A resumed ``fit`` logs into the run it continues; ``test`` / ``validate`` into ``<run>/<subcommand>/``."""
    logger = config.trainer.get("logger")
    init = logger.get("init_args") if isinstance(logger, Namespace) else None
    if init is None or init.get("save_dir") is None:
        return  # no logger, or not one with a save_dir / name / version layout: nothing to continue
    run = run_directory(Path(config.ckpt_path))
    if subcommand == "fit":
        parent = Path(init.save_dir) / (init.get("name") or "")
        if init.get("version") is None and run.parent.resolve() == parent.resolve():
            init.version = run.name
    elif (run / "config.yaml").is_file():
        init.save_dir, init.name, init.version = os.fspath(run), subcommand, None


def _say_resuming(checkpoint: Path) -> None:
    """One line on what a resumed fit continues: the checkpoint, and artifacts left incomplete (a full disk)."""
    run = run_directory(checkpoint)
    problem = artifacts_problem(run)
    note = f"; its artifacts are incomplete ({problem}) and are written again at the end" if problem else ""
    rank_zero_info(f"Resuming the run {run} from {checkpoint}{note}.")


def _without_checkpointing(config: Namespace) -> None:
    """``test`` / ``validate`` write no checkpoint: the run's ModelCheckpoint would only warn about its folder."""
    callbacks = config.trainer.get("callbacks") or []
    config.trainer.callbacks = [c for c in callbacks if not str(getattr(c, "class_path", "")).endswith(
        "ModelCheckpoint")]


def with_run_config(args: list[str]) -> list[str]:
    """``SUBCOMMAND --ckpt_path RUN`` without ``--config``: the run's recorded ``config.yaml`` goes first."""
    if not args or args[0] not in ("fit", "validate", "test") or {"-c", "--config"} & set(args) \
            or any(a.startswith("--config=") for a in args):
        return args
    ckpt = _option(args, "--ckpt_path")
    if ckpt is None:
        return args
    config = run_directory(find_checkpoint(ckpt, "--ckpt_path")) / "config.yaml"
    if not config.is_file():
        raise expected("--ckpt_path", "a checkpoint of a run whose directory holds its config.yaml", ckpt,
                       "Pass the run's settings with --config FILE.")
    return [args[0], "--config", os.fspath(config), *args[1:]]


def with_demo_config(args: list[str], subcommand: bool = True) -> list[str]:
    """``fit`` without ``--config`` or ``--ckpt_path`` (without subcommands: any such call) gets the demo's config
    first."""
    rest = args[1:] if subcommand else args
    if subcommand and args[:1] != ["fit"]:
        return args
    if {"-c", "--config", "--ckpt_path"} & set(rest) or any(a.startswith(("--config=", "--ckpt_path=")) for a in rest):
        return args
    demo = ["--config", json.dumps(DEMO_CONFIG)]  # jsonargparse takes a config's content in place of a path
    return [*args[:1], *demo, *rest] if subcommand else [*demo, *rest]


def _option(args: Sequence[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def cli(args: list[str] | None = None, run: bool = True) -> TaylorCLI:
    """Build (and with ``run``, execute) the CLI; ``args`` default to the command line."""
    if args is not None:
        args = with_demo_config(list(args), subcommand=run)
    try:
        return _build_cli(args, run)
    finally:
        if run and torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every rank leaves its process group before the interpreter exits: left to the destructors, a
            # gloo rank whose peer has already gone can abort at exit ("terminate called ...", status -6).
            torch.distributed.destroy_process_group()


def _build_cli(args: list[str] | None, run: bool) -> TaylorCLI:
    return TaylorCLI(
        IncrementalViT,
        TaskStreamDataModule,
        args=args,
        run=run,
        seed_everything_default=0,
        save_config_callback=SaveRunConfig,
        save_config_kwargs={"overwrite": True},
        trainer_defaults=DEMO_TRAINER,
        parser_kwargs={name: {"description": f"lightning-taylor {name}: {text}."}
                       for name, text in SUBCOMMANDS.items()},
    )
