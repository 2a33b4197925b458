"""A run, rebuilt from its directory or checkpoint: the module with its task deltas, and its task stream.

A run directory, as ``lightning-taylor fit`` leaves it::

    <run>/config.yaml               the resolved configuration (LightningCLI), optional
    <run>/checkpoints/last.ckpt     backbone θ0, head, banked deltas, hyper-parameters of module and data
    <run>/deltas.safetensors        the banked deltas with the method's name and strength, optional
    <run>/pretuned_head.safetensors every boundary's pre-tuned head (:meth:`Run.pretuned_heads`), optional
    <run>/artifacts.json            the manifest of the artifacts (deltas, curvature, pre-tuned head)

:func:`load_run` takes the directory (its ``checkpoints/last.ckpt``, else the newest ``.ckpt`` there) or a
checkpoint file, and returns a :class:`Run` whose model is in eval mode, composed uniformly over its tasks
(``θ0 + (1/T) Σ_s τ_s``, the deployed model), ready for ``Trainer.test`` / ``validate`` or for editing.

What it trusts and checks, since a run may come from elsewhere:

- the checkpoint is read with ``weights_only=True`` and every tensor of its state (backbone, head, deltas)
  must be finite; the error names the file and the first bad tensor;
- the backbone is rebuilt without fetching weights (θ0 is in the checkpoint) from a plain timm name and
  architecture arguments only (:func:`lightning_taylor.deltas.io.check_model_spec`);
- the module's and the data's arguments are the checkpoint's hyper-parameters, else the ``model`` /
  ``data`` sections of ``config.yaml``;
- the data is never downloaded (``download=False`` whatever the run said) and is read from ``data_root``
  when given; data that is not on disk is an error naming ``data_root``;
- a ``deltas`` file replacing the checkpoint's deltas must be readable and finite (errors name the file);
- a run that is not finished is loaded, and says so (:attr:`Run.incomplete`; `lightning-taylor edit` prints a note): its fit
  stopped before the stream's end (pre-empted, killed), or its artifacts were not all written (a full disk:
  ``artifacts.json`` missing or disagreeing with the files, :func:`artifacts_problem`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from lightning_taylor.data import TaskStreamDataModule
from lightning_taylor.data.datasets import EMBEDDED
from lightning_taylor.data.split import uniform_size
from lightning_taylor.deltas import TaskDeltas, load_deltas
from lightning_taylor.deltas.composition import uniform
from lightning_taylor.deltas.io import check_model_spec, read_metadata
from lightning_taylor.errors import InputError, expected
from lightning_taylor.finite import first_non_finite
from lightning_taylor.head.pretuned_file import (
    PRETUNED_FILE,
    PretunedHeads,
    load_pretuned_heads,
)
from lightning_taylor.model.backbone import resolve_model
from lightning_taylor.model.module import IncrementalViT

log = logging.getLogger(__name__)

_SLOTS = {"lora_A": "lora", "delta": "full", "scale": "ia3"}
_PREFIX = "task_deltas."
_STRENGTH = {"ITA": "alpha", "IEL": "beta"}  # the callbacks' names of their strength argument


@dataclass
class Run:
    """A finished (or interrupted) run, rebuilt from its checkpoint.

    Attributes:
        model: the module in eval mode, with ``model.task_deltas`` attached, loaded and composed uniformly.
        datamodule: the run's task stream, set up (its data is on disk).
        deltas: ``model.task_deltas``.
        checkpoint: the checkpoint file read.
        run_dir: the run's directory (the checkpoint's ``checkpoints/`` parent).
        model_name: timm model name of the backbone.
        model_kwargs: ``timm.create_model`` arguments of the backbone, ``num_classes`` included.
        info: what is known about training: ``algorithm`` (``ita`` / ``iel``), ``strength``, ... (strings).
        deltas_file: the file the deltas were taken from instead of the checkpoint, if any.
        config: the run's ``config.yaml`` (parsed), if there is one.
        incomplete: why the run is not finished (stopped mid-stream, artifacts not all written), or ``None``.
    """

    model: IncrementalViT
    datamodule: TaskStreamDataModule
    deltas: TaskDeltas
    checkpoint: Path
    run_dir: Path
    model_name: str
    model_kwargs: dict[str, Any]
    info: dict[str, str] = field(default_factory=dict)
    deltas_file: Path | None = None
    config: dict[str, Any] | None = None
    incomplete: str | None = None

    @property
    def tasks(self) -> list[int]:
        """Tasks that have a delta (banked, or the live slot's task)."""
        return self.deltas.tasks

    @property
    def classes_per_task(self) -> int:
        """Head rows per task of a uniform stream (see :attr:`task_ranges` for any stream)."""
        return int(self.model.hparams.classes_per_task)

    @property
    def task_ranges(self) -> tuple[range, ...]:
        """The head rows of each task: the stream's class partition."""
        return self.model.task_ranges

    def pretuned_heads(self) -> PretunedHeads:
        """The run's ``pretuned_head.safetensors`` (every boundary's ``h̃_t``; one head in older runs)."""
        return load_pretuned_heads(self.run_dir / PRETUNED_FILE)

    @property
    def label(self) -> str:
        """A short name for tables, e.g. ``ita (strength 1.0)``."""
        algorithm = self.info.get("algorithm", "run")
        strength = self.info.get("strength")
        return algorithm if strength is None else f"{algorithm} (strength {strength})"


def find_checkpoint(path: str | os.PathLike, argument: str = "run") -> Path:
    """``path`` itself if it is a file, else ``<path>/checkpoints/last.ckpt`` or the newest ``.ckpt`` there.

    ``argument`` names the setting in the error (``run`` for ``edit``, ``ckpt_path`` for the other commands).
    """
    path = Path(path)
    if path.is_file():
        return path
    folder = path / "checkpoints"
    if (folder / "last.ckpt").is_file():
        return folder / "last.ckpt"
    found = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    if not found:
        raise expected(argument, "a checkpoint file or a run directory with checkpoints/*.ckpt", os.fspath(path))
    return found[-1]


def run_directory(checkpoint: Path) -> Path:
    """The run directory of ``checkpoint``: the parent of its ``checkpoints/`` folder, else its own folder."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def artifacts_problem(run_dir: str | os.PathLike) -> str | None:
    """Why ``run_dir``'s artifacts are not one complete set (see :func:`lightning_taylor._atomic.manifest_problem`),
    or ``None`` (complete, or none written)."""
    from lightning_taylor._atomic import manifest_problem
    from lightning_taylor.callbacks._artifacts import ARTIFACT_FILES

    return manifest_problem(run_dir, ARTIFACT_FILES)


def _unfinished(checkpoint: Mapping[str, Any], data: Mapping[str, Any] | None, run_dir: Path) -> str | None:
    """Why the run is not finished: its artifacts are incomplete, or its checkpoint is before the stream's end."""
    problem = artifacts_problem(run_dir)
    if problem is not None:
        return f"its artifacts are incomplete: {problem}"
    try:
        done = int(checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
        total = int(data["num_tasks"]) * int(data["epochs_per_task"])
    except (KeyError, TypeError, ValueError):
        return None  # not a checkpoint of a task-stream fit: nothing to compare with
    if done < total:
        return f"its fit stopped after {done} of {total} epochs (resume it with `lightning-taylor fit --ckpt_path`)"
    return None


def _read_checkpoint(path: Path) -> dict[str, Any]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip, unpickling and storage errors alike: say which file
        raise expected("checkpoint", "a Lightning checkpoint readable with torch.load(weights_only=True)",
                       os.fspath(path), f"Reading it failed: {type(err).__name__}: {err}") from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise expected("checkpoint", "a Lightning checkpoint with a `state_dict`", os.fspath(path))
    bad = first_non_finite(checkpoint["state_dict"].items())
    if bad is not None:
        raise expected("checkpoint", "a checkpoint whose tensors are all finite", os.fspath(path),
                       f"The tensor `{bad[0]}` has {bad[1]} (a damaged file or a diverged run).")
    return checkpoint


def _read_config(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise expected("config", "a readable YAML file (the run's LightningCLI configuration)", os.fspath(path),
                       str(err)) from err
    if not isinstance(config, dict):
        raise expected("config", "a YAML mapping (the run's LightningCLI configuration)", os.fspath(path))
    return config


def _section(config: Mapping[str, Any] | None, name: str) -> dict[str, Any] | None:
    """The constructor arguments of ``config[name]`` (plain or ``class_path`` / ``init_args`` form)."""
    section = (config or {}).get(name)
    if not isinstance(section, Mapping):
        return None
    return dict(section.get("init_args") or {}) if "class_path" in section else dict(section)


def _delta_config(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """Style, rank, target layers and qkv rank factor of ``TaskDeltas``, from its slot tensors in ``state``."""
    layers: dict[str, tuple[str, Tensor]] = {}
    for key, value in state.items():
        if key.startswith(_PREFIX):
            name, _, slot = key[len(_PREFIX):].rpartition(".")
            if slot in _SLOTS:
                layers[name] = (_SLOTS[slot], value)
    if not layers:
        raise expected("checkpoint", "a run with task deltas (an ITA / IEL callback)", "no `task_deltas.*` tensors")
    styles = {style for style, _ in layers.values()}
    if len(styles) != 1:
        raise expected("checkpoint", "task deltas of one style", sorted(styles))
    style = styles.pop()
    config: dict[str, Any] = {"style": style, "targets": tuple(layers), "rank": 1, "qkv_rank_factor": 1}
    if style == "lora":
        ranks = {name: int(a.shape[0]) for name, (_, a) in layers.items()}
        other = [r for n, r in ranks.items() if not n.endswith("qkv")]
        qkv = [r for n, r in ranks.items() if n.endswith("qkv")]
        rank = other[0] if other else qkv[0]
        factor = qkv[0] // rank if qkv and other else 1
        if any(r != rank for r in other) or any(r != rank * factor for r in qkv):
            raise expected("checkpoint", "LoRA deltas of one rank (qkv: a multiple of it)", sorted(set(ranks.values())))
        config.update(rank=rank, qkv_rank_factor=factor)
    return config


def _info(checkpoint: Mapping[str, Any], config: Mapping[str, Any] | None, deltas_file: Path | None) -> dict[str, str]:
    """Algorithm and strength: from the checkpoint's callbacks and ``config.yaml``, then the deltas file."""
    info: dict[str, str] = {}
    for key in checkpoint.get("callbacks", {}):
        kind = str(key).split("{")[0]  # Lightning's state key: the class name, maybe with its arguments
        if kind in _STRENGTH:
            info["algorithm"] = kind.lower()
    trainer = (config or {}).get("trainer")
    for callback in (trainer.get("callbacks") or []) if isinstance(trainer, Mapping) else []:
        if isinstance(callback, Mapping) and isinstance(callback.get("init_args"), Mapping):
            kind = str(callback.get("class_path", "")).rpartition(".")[2]
            if kind in _STRENGTH and _STRENGTH[kind] in callback["init_args"]:
                info.update(algorithm=kind.lower(), strength=str(float(callback["init_args"][_STRENGTH[kind]])))
    if deltas_file is not None and deltas_file.is_file():
        try:
            meta = read_metadata(deltas_file)
        except (OSError, SafetensorError) as err:  # only the labels come from it here: say so and go on
            log.warning("Could not read the metadata of %s (%s); the run is labelled without it", deltas_file, err)
            meta = {}
        info.update({k: meta[k] for k in ("algorithm", "strength", "penalty_mode") if k in meta})
    return info


def _datamodule(hparams: Mapping[str, Any] | None, source: Path, data_root: str | os.PathLike | None,
                overrides: Mapping[str, Any], model: IncrementalViT) -> TaskStreamDataModule:
    """The run's stream, serving ``model``'s input, never downloading, from ``data_root`` if given; set up, so
    missing data fails here."""
    if hparams is None:
        raise expected("checkpoint", "a run of TaskStreamDataModule (with its hyper-parameters or a config.yaml)",
                       os.fspath(source), "Pass `datamodule=` to evaluate on another stream.")
    args = {k: v for k, v in hparams.items() if not k.startswith("_")}
    args.update(overrides)
    if data_root is not None:
        args["root"] = os.fspath(data_root)
    args["download"] = False  # a run from elsewhere must not make us fetch data or create directories
    dataset = args.get("dataset", "digits")
    try:
        datamodule = TaskStreamDataModule(**args)
        datamodule.follow_model(model)  # as `setup` does under a Trainer: channels and size of the backbone
        datamodule.setup()
    except (InputError, OSError) as err:
        if dataset in EMBEDDED:  # bundled with a Python package: not a question of where the data is
            raise
        cause = str(err).split(". ")[0].rstrip(".")  # the problem, without its advice to download
        raise expected("data_root", f"a directory holding the run's '{dataset}' data", args.get("root"),
                       f"({cause}.) Runs are loaded without downloading: point `--data-root` "
                       "(load_run(data_root=...)) at a copy of the data.") from err
    return datamodule


@torch.no_grad()
def _load_deltas_file(deltas: TaskDeltas, path: Path) -> None:
    """Bank the deltas of ``path`` (checked readable and finite) into ``deltas``; the slot takes its task's."""
    try:
        tensors = load_file(os.fspath(path))
    except (OSError, SafetensorError) as err:
        raise expected("deltas", "a deltas.safetensors file written by the ITA / IEL callback", os.fspath(path),
                       f"Reading it failed: {err}.") from err
    bad = first_non_finite(tensors.items())
    if bad is not None:
        raise expected("deltas", "a deltas file whose tensors are all finite", os.fspath(path),
                       f"The tensor `{bad[0]}` has {bad[1]}.")
    tasks = load_deltas(deltas, path)
    current = deltas.current_task
    if current in tasks:  # the slot's task enters the forward through the slot: give it the file's values
        for _, delta, _ in deltas.layers():
            for name, value in delta.task_state(current).items():
                delta.slot_state()[name].copy_(value)
    missing = sorted(set(deltas.tasks) - set(tasks))
    if missing:
        log.warning("%s has no delta for tasks %s; the checkpoint's are used for them", path, missing)


def load_run(
    path: str | os.PathLike,
    deltas: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    data_overrides: Mapping[str, Any] | None = None,
    datamodule: TaskStreamDataModule | None = None,
    data_root: str | os.PathLike | None = None,
) -> Run:
    """Rebuild a run from its directory or checkpoint (see the module docstring for what is checked).

    Args:
        path: a run directory (``checkpoints/last.ckpt``, else the newest ``.ckpt`` there) or a checkpoint.
        deltas: a ``deltas.safetensors`` written by the ITA / IEL callback, to use instead of the deltas in
            the checkpoint (backbone and head still come from the checkpoint).
        device: where the model goes.
        data_overrides: arguments of :class:`TaskStreamDataModule` that replace the saved ones (e.g.
            ``eval_batch_size``); ``download`` is always ``False``.
        datamodule: the stream to evaluate on, instead of the run's own (needed when the run used another
            DataModule).
        data_root: where the run's data is on this machine (replaces the saved ``root``).
    """
    checkpoint_path = find_checkpoint(path)
    run_dir = run_directory(checkpoint_path)
    checkpoint = _read_checkpoint(checkpoint_path)
    config = _read_config(run_dir)
    source = os.fspath(checkpoint_path)

    data_hparams = checkpoint.get("datamodule_hyper_parameters") or _section(config, "data")
    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
    if not hparams:  # a checkpoint without the module's hyper-parameters: the config's, linked to the data
        stream = datamodule or TaskStreamDataModule(**{k: v for k, v in (data_hparams or {}).items()
                                                       if not k.startswith("_") and k != "download"})
        k = uniform_size(stream.task_sizes)
        hparams = {**(_section(config, "model") or {}), "num_classes": stream.num_classes, "classes_per_task": k,
                   "task_sizes": None if k else list(stream.task_sizes)}
        hparams.setdefault("epochs_per_task", stream.epochs_per_task)
    try:
        # θ0 is in the checkpoint's state: rebuild the architecture without fetching any weights.
        model_name, model_kwargs = resolve_model(hparams.get("model_name"), hparams.get("pretrained", False),
                                                 hparams.get("model_kwargs"))
    except InputError as err:
        raise expected("checkpoint", "a checkpoint of IncrementalViT (with its hyper-parameters)", source,
                       str(err)) from err
    check_model_spec(model_name, model_kwargs, source)
    model = IncrementalViT(**{**hparams, "model_name": model_name, "pretrained": False, "model_kwargs": model_kwargs})
    state = checkpoint["state_dict"]
    model.task_deltas = TaskDeltas(model.backbone, **_delta_config(state))
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # missing / unexpected keys or shapes: name the file
        raise expected("checkpoint", "the state of an IncrementalViT with task deltas", source, str(err)) from err

    deltas_file = Path(deltas) if deltas is not None else None
    if deltas_file is not None:
        _load_deltas_file(model.task_deltas, deltas_file)
    if datamodule is None:
        datamodule = _datamodule(data_hparams, checkpoint_path, data_root, dict(data_overrides or {}), model)
    if datamodule.task_ranges != model.task_ranges:
        theirs, ours = [len(r) for r in model.task_ranges], list(datamodule.task_sizes)
        raise expected("data", f"a stream of {hparams['num_classes']} classes in tasks of {theirs} classes",
                       f"{datamodule.num_classes} classes in tasks of {ours}")
    model.task_deltas.compose(uniform(model.task_deltas.tasks))
    model.eval().requires_grad_(False)
    info = _info(checkpoint, config, deltas_file or run_dir / "deltas.safetensors")
    incomplete = _unfinished(checkpoint, data_hparams, run_dir)
    if incomplete is not None:
        log.info("The run %s is incomplete: %s", run_dir, incomplete)  # Run.incomplete; the command says it
    log.debug("Loaded %s: tasks %s, %s deltas", checkpoint_path, model.task_deltas.tasks, model.task_deltas.style)
    return Run(model.to(device), datamodule, model.task_deltas, checkpoint_path, run_dir, model_name,
               {**model_kwargs, "num_classes": hparams["num_classes"]}, info, deltas_file, config, incomplete)


__all__ = ["Run", "artifacts_problem", "find_checkpoint", "load_run", "run_directory"]
