"""ITA and IEL as Lightning callbacks: deltas, task boundary, Fisher at θ0, and the penalty step.

One callback runs the whole method on any LightningModule with a timm ViT and a linear head over all classes
(the small protocol of :mod:`lightning_taylor.callbacks.protocol`: ours, or a user's own module and data):

- ``setup``: freezes the backbone and attaches :class:`~lightning_taylor.deltas.TaskDeltas` to
  ``pl_module.task_deltas`` — before the optimisers and DDP are built, so the trainable slot is registered
  once for the whole fit;
- ``on_train_epoch_start``: at a new task ``t`` (the stream's ``current_task``, see the protocol), banks the
  previous delta, pre-tunes the head, computes the Fisher of the backbone at θ0 (deltas off, pre-tuned head
  installed) and of the head, resets the optimiser state; then sets the training forward: ``θ0 + τ_t``
  (ITA) or the uniform composition ``θ0 + (1/T) Σ_{s≤t} τ_s`` (IEL);
- validation and test evaluate the uniform composition of every task seen;
- with ``curvature="kfac"``, the Kronecker factors ``Ā ⊗ Ḡ`` of every target instead of the diagonal Fisher
  (same place, same cotangents, same reduction; :mod:`~lightning_taylor.kfac_accumulator`), and the Kronecker
  form of the penalty (:mod:`~lightning_taylor.kfac_penalties`); ``kfac.safetensors`` instead of
  ``fisher.safetensors``;
- ``on_before_optimizer_step`` (once per optimiser step, after accumulation): the penalty, decoupled —
  ``θ ← θ − s · clip(∂R/∂θ)``, ``s`` the schedule's current factor — or coupled (``∂R/∂θ`` added to the
  gradients, exactly as if ``R`` were in the loss);
- with ``head_alignment="drift_compensated"``, at the end of each task (its last training batch, before the
  task's validation): re-aligns every seen head row on class mixtures of the *composed* model's features,
  the older classes' mixtures moved by semantic drift compensation (:mod:`~lightning_taylor.drift_compensation`);
- ``on_train_end``: banks the last delta and saves deltas, Fisher and pre-tuned head as safetensors.

Everything needed to resume mid-stream is in the checkpoint: deltas in the module's state, the rest
(task index, Fisher sums and counts, pre-tuned head, head Fisher, mixtures) in this callback's state, with a
record of the stream and the method it belongs to (:mod:`~lightning_taylor.callbacks.resume`): a resume with
other settings is refused.

Nothing non-finite is trained on or written (:mod:`~lightning_taylor.callbacks.guard`): every optimiser step
checks its losses, gradients, penalty gradients and trainable tensors; every task boundary checks the
pre-tuned head and the Fisher; a checkpoint is checked when it is loaded and refused when it would be saved
with a non-finite tensor; the safetensors files are checked before they are written.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import asdict
from typing import Any, ClassVar, Iterator, Literal, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_taylor._checks import (
    check_choice,
    check_non_negative,
    check_non_negative_int,
    check_positive_int,
    expected,
)
from lightning_taylor.alignment import ClassMixtures, align_head, alignment_epochs, fit_class_mixtures, head_fisher
from lightning_taylor.callbacks.guard import OnNonFinite, StepGuard
from lightning_taylor.callbacks.pretuning import PreTuning, extract_features, pretune_head
from lightning_taylor.callbacks.protocol import (
    Classifier,
    check_launcher,
    current_task,
    last_epoch_of_task,
    resolve_classifier,
    task_loader,
)
from lightning_taylor.callbacks.protocol import task_classes as stream_task_classes
from lightning_taylor.callbacks.resume import check_delta_layout, check_record, stream_record
from lightning_taylor.console import show
from lightning_taylor.deltas import DeltaStyle, TaskDeltas, save_deltas
from lightning_taylor.drift_compensation import compensate_drift
from lightning_taylor.editing import uniform
from lightning_taylor.finite import check_finite, flatten_tensors
from lightning_taylor.fisher import Estimator, FisherAccumulator, diagonal_fisher
from lightning_taylor.kfac import KFACApprox, KroneckerSums, kronecker_sums
from lightning_taylor.kfac_accumulator import KFACTasks, KroneckerAccumulator, check_factor_memory
from lightning_taylor.kfac_penalties import kfac_delta_penalty, prepare_curvature
from lightning_taylor.penalties import Algorithm, decoupled_step, delta_penalty, head_penalty
from lightning_taylor.precision import full_precision
from lightning_taylor.seeding import mix, run_seed

log = logging.getLogger(__name__)

PenaltyMode = Literal["decoupled", "coupled"]
HeadInit = Literal["random", "pretuned"]
HeadAlignment = Literal["none", "drift_compensated"]
Curvature = Literal["diagonal", "kfac"]


class _SeenLogits(nn.Module):
    """The model's logits restricted to the classes seen so far (the Fisher's classifier)."""

    def __init__(self, model: Classifier, num_seen: int) -> None:
        super().__init__()
        self.model, self.num_seen = model, num_seen

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)[:, : self.num_seen]


def _shard(loader: DataLoader, rank: int, world_size: int) -> DataLoader:
    """This process's strided share of ``loader``'s data set, without the padding of DistributedSampler."""
    if world_size == 1:
        return loader
    sampler = UnrepeatedDistributedSampler(loader.dataset, world_size, rank, shuffle=False)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn)


class SecondOrder(L.Callback):
    """Shared machinery of :class:`ITA` and :class:`IEL` (see the module docstring).

    Args:
        strength: α (ITA) or β (IEL).
        lambda_fisher: λ_F of the head penalty ``λ_F Σ F_head (h_t − h̃_t)² + λ_2 ‖h_t − h̃_t‖²``;
            ``None`` = ``strength``.
        lambda_l2: λ_2 of the head penalty.
        head_init: where task t's trainable head rows start: ``"random"`` (the module's trunc-normal 0.02
            initialisation, the reference's) or ``"pretuned"`` (copied from the pre-tuned head h̃_t of this
            task's boundary, so that they start calibrated against the other tasks' rows; see
            docs/learning_quality.md for what it changes).
        head_alignment: ``"none"`` (the reference: the deployed head is the trained one) or
            ``"drift_compensated"``: at the end of each task ``t`` every seen head row is re-aligned (the
            pre-tuning's alignment step and settings) on class mixtures of the deployed composition's features
            — task ``t``'s classes fitted on its images under ``θ0 + (1/(t+1)) Σ_{s≤t} τ_s``, every older
            class's mixture moved by the drift these images show between the compositions without and with
            ``τ_t`` (:func:`~lightning_taylor.drift_compensation.compensate_drift`). No old image is kept. See
            docs/learning_quality.md for what it changes.
        penalty_mode: ``"decoupled"`` (``θ ← θ − s·clip(∂R/∂θ)`` before each optimiser step, the reference)
            or ``"coupled"`` (``∂R/∂θ`` added to the gradients, as if ``R`` were in the loss).
        max_grad_norm: per-tensor clipping of the decoupled step.
        style: delta style, ``"lora"``, ``"full"`` or ``"ia3"``.
        rank: LoRA rank ``r``.
        targets: glob patterns of the ``nn.Linear`` layers that get deltas; ``None``: the block projections
            named as in the backbone's family (:func:`~lightning_taylor.deltas.default_targets`).
        qkv_rank_factor: LoRA rank multiplier of the ``qkv`` projections.
        fisher_estimator: ``"exact"``, ``"mc"``, ``"topk"`` or ``"empirical"`` (see :mod:`lightning_taylor.fisher`).
        fisher_samples: sampled labels per example for ``"mc"``.
        fisher_top_k: classes kept by ``"topk"``.
        fisher_batch_size: batch size of the task-boundary passes (features and Fisher).
        prior: ε added to every mean Fisher (KFAC: the ``ε ‖τ‖²`` added to the Kronecker form).
        curvature: ``"diagonal"`` (the diagonal Fisher ``F̄``, docs/method.md §3) or ``"kfac"`` (per target
            layer ``Ā ⊗ Ḡ``, ``Ā`` from the layer's inputs, ``Ḡ`` from the same cotangents as the diagonal
            Fisher, at θ0 with the pre-tuned head; penalty ``(α/2) Σ_layers tr(Ḡ τ Ā τᵀ) + ε ‖τ‖²`` and IEL's
            Jensen gap in the same form, :mod:`lightning_taylor.kfac_penalties`). KFAC supports the ``exact``,
            ``mc`` and ``empirical`` estimators and stores ``in² + out²`` numbers per layer and pair.
        kfac_approx: KFAC's treatment of the token dimension: ``"expand"`` (every token an example) or
            ``"reduce"`` (tokens averaged / summed first), see :mod:`lightning_taylor.kfac`.
        kfac_tasks: how past tasks' factors combine: ``"merged"`` (one pair, KFAC of the pooled examples;
            constant memory) or ``"per_task"`` (one pair per task, the exact sum of Kronecker products;
            memory and penalty cost grow with the number of tasks), see :mod:`lightning_taylor.kfac_accumulator`.
        pretuning: head pre-tuning settings (docs/method.md §5).
        head_fisher_samples: synthetic features per class for the head's Fisher.
        seed: seeds the slot initialisation, pre-tuning and synthetic features (identical on every rank);
            ``None`` follows ``seed_everything`` (the ``PL_GLOBAL_SEED`` environment variable, else 0).
        save_dir: where deltas, Fisher and pre-tuned head are saved at the end of ``fit``; ``None`` = the
            logger's directory.
        backbone: attribute path of the ViT in the LightningModule; ``None``: ``backbone``, else the only
            timm-like child (see :mod:`~lightning_taylor.callbacks.protocol`).
        head: attribute path of the ``nn.Linear`` head; ``None``: the backbone's classifier, else ``head``.
        classes_per_task: head rows per task, for streams whose DataModule and LightningModule do not say.
        epochs_per_task: for one ``fit`` over a stream whose DataModule and LightningModule do not state
            ``current_task``: task ``current_epoch // epochs_per_task``.
        on_non_finite: ``"raise"`` (stop the fit, naming the task, step and tensor) or ``"skip_step"`` (drop
            optimiser steps with a non-finite loss or gradient); see :mod:`~lightning_taylor.callbacks.guard`.
        allow_strength_change: accept a resume whose ``strength`` differs from the checkpoint's (every other
            recorded stream and method setting must match; see :mod:`~lightning_taylor.callbacks.resume`).
    """

    algorithm: ClassVar[Algorithm]

    def __init__(
        self,
        strength: float,
        lambda_fisher: float | None = None,
        lambda_l2: float = 0.001,
        head_init: HeadInit = "random",
        head_alignment: HeadAlignment = "none",
        penalty_mode: PenaltyMode = "decoupled",
        max_grad_norm: float = 100.0,
        style: DeltaStyle = "lora",
        rank: int = 16,
        targets: Sequence[str] | None = None,
        qkv_rank_factor: int = 3,
        fisher_estimator: Estimator = "exact",
        fisher_samples: int = 1,
        fisher_top_k: int = 10,
        fisher_batch_size: int = 32,
        prior: float = 1e-5,
        curvature: Curvature = "diagonal",
        kfac_approx: KFACApprox = "expand",
        kfac_tasks: KFACTasks = "merged",
        pretuning: PreTuning = PreTuning(),  # noqa: B008 (a frozen-by-convention settings record)
        head_fisher_samples: int = 256,
        seed: int | None = None,
        save_dir: str | None = None,
        backbone: str | None = None,
        head: str | None = None,
        classes_per_task: int | None = None,
        epochs_per_task: int | None = None,
        on_non_finite: OnNonFinite = "raise",
        allow_strength_change: bool = False,
    ) -> None:
        check_non_negative("strength", strength)
        check_non_negative("lambda_l2", lambda_l2)
        if lambda_fisher is not None:
            check_non_negative("lambda_fisher", lambda_fisher)
        check_choice("head_init", head_init, ("random", "pretuned"))
        check_choice("head_alignment", head_alignment, ("none", "drift_compensated"))
        check_choice("penalty_mode", penalty_mode, ("decoupled", "coupled"))
        check_non_negative("max_grad_norm", max_grad_norm)
        check_choice("fisher_estimator", fisher_estimator, ("exact", "mc", "topk", "empirical"))
        check_positive_int("fisher_batch_size", fisher_batch_size)
        check_positive_int("fisher_samples", fisher_samples)
        check_positive_int("fisher_top_k", fisher_top_k)
        check_non_negative("prior", prior)
        check_choice("curvature", curvature, ("diagonal", "kfac"))
        check_choice("kfac_approx", kfac_approx, ("expand", "reduce"))
        check_choice("kfac_tasks", kfac_tasks, ("merged", "per_task"))
        if curvature == "kfac" and fisher_estimator == "topk":
            raise expected("fisher_estimator", "'exact', 'mc' or 'empirical' with `curvature: kfac`", fisher_estimator,
                           "KFAC's factors have no top-k truncation.")
        check_choice("style", style, ("lora", "full", "ia3"))
        check_positive_int("rank", rank)
        check_positive_int("qkv_rank_factor", qkv_rank_factor)
        check_choice("on_non_finite", on_non_finite, ("raise", "skip_step"))
        if not isinstance(allow_strength_change, bool):
            raise expected("allow_strength_change", "a bool", allow_strength_change)
        check_positive_int("head_fisher_samples", head_fisher_samples)
        for name, value in (("classes_per_task", classes_per_task), ("epochs_per_task", epochs_per_task)):
            if value is not None:
                check_positive_int(name, value)
        for name, value in (("backbone", backbone), ("head", head)):
            if value is not None and not (isinstance(value, str) and value):
                raise expected(name, "an attribute path (str) or None", value)
        self.strength = float(strength)
        # docs/method.md §4: the head's Fisher weight defaults to α (ITA) or β (IEL).
        self.lambda_fisher = float(strength if lambda_fisher is None else lambda_fisher)
        self.lambda_l2, self.head_init, self.head_alignment = float(lambda_l2), head_init, head_alignment
        self.penalty_mode, self.max_grad_norm = penalty_mode, float(max_grad_norm)
        self.fisher_config = dict(estimator=fisher_estimator, samples=fisher_samples, top_k=fisher_top_k)
        self.fisher_batch_size, self.prior = fisher_batch_size, prior
        # The stored names avoid `curvature`, the method that gives the diagonal penalty's F̄.
        self.curvature_type, self.kfac_approx, self.kfac_tasks = curvature, kfac_approx, kfac_tasks
        self.pretuning = pretuning
        if seed is not None:
            check_non_negative_int("seed", seed)
        self.head_fisher_samples, self.seed, self.save_dir = head_fisher_samples, seed, save_dir
        self.delta_config = dict(style=style, rank=rank, targets=None if targets is None else tuple(targets),
                                 qkv_rank_factor=qkv_rank_factor)
        self.backbone, self.head = backbone, head
        self.classes_per_task, self.epochs_per_task = classes_per_task, epochs_per_task
        self.guard, self.allow_strength_change = StepGuard(on_non_finite), allow_strength_change
        self.record: dict[str, Any] = {}  # the stream and method of this fit (set up in `setup`)
        # State carried by checkpoints (see state_dict).
        self.task = -1
        self.accumulator = FisherAccumulator(prior) if curvature == "diagonal" else KroneckerAccumulator(kfac_tasks)
        self.mixtures: ClassMixtures | None = None
        self.composed_mixtures: ClassMixtures | None = None  # head_alignment: mixtures of composed features
        self.pretuned_head: dict[str, Tensor] = {}
        self.head_curvature: dict[str, Tensor] = {}
        # Derived from the accumulator, on the device: F̄ (diagonal) or the prepared Kronecker terms (kfac).
        self._curvature: dict[str, Any] | None = None

    # -- set-up ---------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        check_launcher(trainer, type(self).__name__)
        others = [type(c).__name__ for c in trainer.callbacks if isinstance(c, SecondOrder) and c is not self]
        if others:
            raise expected("trainer.callbacks", "one ITA / IEL / baseline callback", [type(self).__name__, *others],
                           "Each one attaches and trains its own deltas; keep one (`--trainer.callbacks+=` appends "
                           "to the config's list, or to the demo's when no --config is given).")
        self.seed = run_seed(self.seed)  # follow seed_everything, resolved when the run starts
        model = self.model(pl_module)
        if getattr(pl_module, "task_deltas", None) is None:
            # θ0 stays fixed; the head and the deltas (registered here, before optimisers and DDP) train.
            model.backbone.requires_grad_(False)
            model.head.requires_grad_(True)
            pl_module.task_deltas = TaskDeltas(model.backbone, seed=self.seed, **self.delta_config)
            # A checkpoint of another delta layout is named before PyTorch lists every missing key.
            pl_module.task_deltas.register_load_state_dict_pre_hook(check_delta_layout)
        self.record = {**stream_record(trainer, pl_module, {"classes_per_task": self.classes_per_task,
                                                            "epochs_per_task": self.epochs_per_task}),
                       **self._method_record(pl_module.task_deltas)}
        if not self.pretuned_head:
            self.pretuned_head = {k: v.detach().float().cpu().clone() for k, v in model.head.state_dict().items()}

    def _method_record(self, deltas: TaskDeltas) -> dict[str, Any]:
        config = self.delta_config
        fisher = {f"fisher_{k}": v for k, v in self._fisher_settings().items()}
        return {"algorithm": self.algorithm, "strength": self.strength, "style": config["style"],
                "rank": config["rank"], "qkv_rank_factor": config["qkv_rank_factor"],
                "targets": list(deltas.targets), "penalty_mode": self.penalty_mode, "head_init": self.head_init,
                "head_alignment": self.head_alignment,
                **{k: (int(v) if k != "fisher_estimator" else v) for k, v in fisher.items()},
                **self._curvature_record()}

    def _curvature_record(self) -> dict[str, str]:
        """The curvature and, for KFAC, the settings that define its factors (part of the resume record)."""
        if self.curvature_type == "diagonal":
            return {"curvature": "diagonal"}
        return {"curvature": "kfac", "kfac_approx": self.kfac_approx, "kfac_tasks": self.kfac_tasks}

    def model(self, pl_module: L.LightningModule) -> Classifier:
        """Backbone and head of ``pl_module`` (looked up on every call: the callback holds no module)."""
        return resolve_classifier(pl_module, self.backbone, self.head)

    @staticmethod
    def _deltas(pl_module: L.LightningModule) -> TaskDeltas:
        return pl_module.task_deltas

    def _task_classes(self, trainer: L.Trainer, pl_module: L.LightningModule, task: int) -> range:
        """The head rows of ``task`` (:func:`~lightning_taylor.callbacks.protocol.task_classes`)."""
        return stream_task_classes(trainer, pl_module, task, self.classes_per_task)

    # -- composition ----------------------------------------------------------------------------------
    def training_composition(self, task: int) -> dict[int, float]:
        raise NotImplementedError

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        task = current_task(trainer, pl_module, self.epochs_per_task)
        if task != self.task:
            with full_precision():  # features, pre-tuning, Fisher and head Fisher in float32 under *-mixed
                self.begin_task(trainer, pl_module, task)
        self._deltas(pl_module).compose(self.training_composition(task))

    def _compose_for_evaluation(self, pl_module: L.LightningModule) -> None:
        deltas = self._deltas(pl_module)
        if deltas.tasks:
            deltas.compose(uniform(deltas.tasks))

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._compose_for_evaluation(pl_module)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._compose_for_evaluation(pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.training and self.task >= 0:  # validation inside an epoch: back to the training forward
            self._deltas(pl_module).compose(self.training_composition(self.task))

    # -- task boundary --------------------------------------------------------------------------------
    def begin_task(self, trainer: L.Trainer, pl_module: L.LightningModule, task: int) -> None:
        """docs/method.md §5: bank, pre-tune, Fisher of backbone and head at θ0, fresh optimiser state."""
        deltas, model = self._deltas(pl_module), self.model(pl_module)
        task_classes = self._task_classes(trainer, pl_module, task)
        show(trainer, f"[{self.algorithm.upper()}] task {task}: classes {task_classes.start}..{task_classes.stop - 1}")
        deltas.begin_task(task)
        loader = task_loader(trainer, task, self.fisher_batch_size)
        if self.task < 0:  # first boundary: one forward checks that every target's delta reaches the output
            deltas.check_reach(model.backbone, next(iter(loader))[0][:2].to(pl_module.device))

        with deltas.disabled():
            features, labels = extract_features(model, loader, pl_module.device)
        head = nn.Linear(features.shape[1], self.pretuned_head["weight"].shape[0])
        head.load_state_dict(self.pretuned_head)
        self.mixtures = pretune_head(head, self.mixtures, features, labels, task_classes, task, self.pretuning, self.seed)
        # Pre-tuning is deterministic, but features computed on different devices may differ in the last bits:
        # every rank takes rank zero's head and mixtures, so all ranks train against the same h̃.
        pretuned, mixtures = trainer.strategy.broadcast(
            ({k_: v.detach().clone() for k_, v in head.state_dict().items()}, self.mixtures.state_dict()), src=0)
        label = f"[{self.algorithm.upper()}] task {task}"
        check_finite(pretuned, f"the pre-tuned head of {label}",
                     "Its features come from θ0 on this task's training images: check the inputs and the weights.")
        self.pretuned_head = pretuned
        self.mixtures = ClassMixtures.from_state_dict(mixtures)
        head.load_state_dict(pretuned)
        if self.head_init == "pretuned":
            self._start_from_pretuned(model.head, task_classes)

        fisher = self._backbone_fisher(trainer, pl_module, task, task_classes.stop, loader)
        check_finite(fisher.sums, f"the backbone Fisher of {label}")
        head_curvature = self._head_fisher(head, task, task_classes)
        check_finite(head_curvature, f"the head Fisher of {label}")
        self.accumulator.set_task(task, fisher)
        self._curvature = None
        self.head_curvature = head_curvature

        for optimizer in trainer.optimizers:  # a new task starts with fresh AdamW moments
            optimizer.state.clear()
        self.task = task

    # -- end of a task: the deployed head aligned on the composed model -----------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if (self.head_alignment != "none" and trainer.is_last_batch
                and last_epoch_of_task(trainer, pl_module, self.epochs_per_task)):
            with full_precision():
                self.align_to_composition(trainer, pl_module, self.task)

    def align_to_composition(self, trainer: L.Trainer, pl_module: L.LightningModule, task: int) -> None:
        """``head_alignment="drift_compensated"`` at the end of ``task`` (see the class docstring).

        Runs on every rank on the same in-order data, like the pre-tuning, and every rank then takes rank
        zero's head rows and mixtures. Rows of unseen classes are not written.
        """
        deltas, model = self._deltas(pl_module), self.model(pl_module)
        seen_classes = list(range(self._task_classes(trainer, pl_module, task).stop))
        loader = task_loader(trainer, task, self.fisher_batch_size)
        tasks = deltas.tasks
        deltas.compose(uniform(tasks))
        after, labels = extract_features(model, loader, pl_module.device)
        settings, seed = self.pretuning, mix(self.seed, 1_000 + task)  # a stream apart from the pre-tuning's
        mixtures = fit_class_mixtures(after, labels, n_components=settings.n_components, seed=seed % 2**32)
        if self.composed_mixtures is not None and len(tasks) > 1:
            deltas.compose(uniform(tasks[:-1]))
            before, _ = extract_features(model, loader, pl_module.device)
            moved = compensate_drift(self.composed_mixtures, before, after)
            moved.update(mixtures)
            mixtures = moved
        deltas.compose(self.training_composition(task))
        # Aligned on a CPU float32 copy, as the pre-tuning is, so every rank computes the same rows.
        head = nn.Linear(model.head.in_features, model.head.out_features, bias=model.head.bias is not None)
        head.load_state_dict({k: v.detach().float().cpu() for k, v in model.head.state_dict().items()})
        align_head(head, mixtures, seen_classes,
                   epochs=alignment_epochs(task, settings.align_epochs, settings.align_epochs_per_task),
                   lr=settings.align_lr, batch_size=settings.batch_size, per_class=settings.samples_per_class,
                   temperature=settings.temperature, generator=torch.Generator().manual_seed(seed))
        aligned, state = trainer.strategy.broadcast(
            ({k: v.detach().clone() for k, v in head.state_dict().items()}, mixtures.state_dict()), src=0)
        check_finite(aligned, f"the head aligned at the end of [{self.algorithm.upper()}] task {task}",
                     "Its features come from the composed model on this task's training images.")
        rows = torch.tensor(seen_classes)
        with torch.no_grad():
            for name, value in aligned.items():
                target = getattr(model.head, name)
                target[rows.to(target.device)] = value[rows].to(target)
        self.composed_mixtures = ClassMixtures.from_state_dict(state)
        show(trainer, f"[{self.algorithm.upper()}] task {task}: head aligned on the composed model "
                      f"({len(seen_classes)} classes, drift-compensated)")

    @torch.no_grad()
    def _start_from_pretuned(self, head: nn.Linear, task_classes: range) -> None:
        """``head_init="pretuned"``: the task's trainable rows (and biases) become h̃'s rows."""
        rows = slice(task_classes.start, task_classes.stop)
        for name, value in self.pretuned_head.items():
            getattr(head, name)[rows] = value[rows].to(getattr(head, name))

    @contextlib.contextmanager
    def _curvature_pass(self, trainer: L.Trainer, pl_module: L.LightningModule, task: int, num_seen: int,
                        loader: DataLoader) -> Iterator[tuple[nn.Module, DataLoader, Iterator, torch.Generator]]:
        """What both curvature passes share (docs/method.md §3): θ0 (deltas off) with the pre-tuned head h̃ over
        the classes seen so far, this process's shard of the task's training images, and a generator of its own
        for ``mc`` labels (reproducible, independent across ranks). The trained head is put back afterwards."""
        deltas, model = self._deltas(pl_module), self.model(pl_module)
        head = model.head
        trained_head = {k: v.detach().clone() for k, v in head.state_dict().items()}
        head.load_state_dict({k: v.to(head.weight) for k, v in self.pretuned_head.items()})
        shard = _shard(loader, trainer.global_rank, trainer.world_size)
        batches = ((batch[0].to(pl_module.device), batch[1].to(pl_module.device)) for batch in shard)
        generator = torch.Generator().manual_seed(mix(mix(self.seed, task), trainer.global_rank))
        try:
            with deltas.disabled():
                yield _SeenLogits(model, num_seen), shard, batches, generator
        finally:
            head.load_state_dict(trained_head)

    def _backbone_fisher(self, trainer: L.Trainer, pl_module: L.LightningModule, task: int, num_seen: int,
                         loader: DataLoader):
        if self.curvature_type == "kfac":
            return self._backbone_kfac(trainer, pl_module, task, num_seen, loader)
        names = [f"model.backbone.{name}.weight" for name in self._deltas(pl_module).names]
        curvature_pass = self._curvature_pass(trainer, pl_module, task, num_seen, loader)
        with curvature_pass as (classifier, shard, batches, generator):
            # A progress bar on rank zero when the trainer shows bars (a long pass: C backward rows per example).
            bar = None
            if trainer.is_global_zero and trainer.progress_bar_callback is not None:
                bar = Tqdm(total=len(shard.sampler), desc=f"Fisher ({self.fisher_config['estimator']})", leave=False,
                           unit="img", dynamic_ncols=True)
            try:
                fisher = diagonal_fisher(classifier, batches, names, **self.fisher_config, generator=generator,
                                         progress=None if bar is None else (lambda n: bar.update(n - bar.n)))
            finally:
                if bar is not None:
                    bar.close()
        fisher.all_reduce()  # every rank reaches this collective; sums and counts, divided later
        fisher.sums = {name[len("model.backbone.") :]: value for name, value in fisher.sums.items()}
        show(trainer, f"[{self.algorithm.upper()}] Fisher ({fisher.estimator}) over {fisher.count} examples")
        return fisher

    def _backbone_kfac(self, trainer: L.Trainer, pl_module: L.LightningModule, task: int, num_seen: int,
                       loader: DataLoader) -> KroneckerSums:
        """KFAC sums ``A = Σ a aᵀ``, ``G = Σ g gᵀ`` of the targets at θ0, pre-tuned head (:mod:`~lightning_taylor.kfac`).

        As for the diagonal Fisher: over the classes seen so far, each process over its own shard of the
        task's training images, then sums and counts summed over the processes (divided only later).
        """
        self._check_kfac_memory(pl_module, task)
        layers = [f"model.backbone.{name}" for name in self._deltas(pl_module).names]
        config = self.fisher_config
        with self._curvature_pass(trainer, pl_module, task, num_seen, loader) as (classifier, _, batches, generator):
            sums = kronecker_sums(classifier, batches, layers, config["estimator"], self.kfac_approx,
                                  config["samples"], generator)
        sums.all_reduce()  # every rank reaches this collective; sums and counts, divided later
        strip = len("model.backbone.")
        sums.inputs = {name[strip:]: value for name, value in sums.inputs.items()}
        sums.grads = {name[strip:]: value for name, value in sums.grads.items()}
        show(trainer, f"[{self.algorithm.upper()}] KFAC ({sums.approx}, {sums.estimator}) over {sums.count} examples")
        return sums

    def _check_kfac_memory(self, pl_module: L.LightningModule, task: int) -> None:
        """Refuse, before computing them, factors that would not fit the device (``InputError`` on ``curvature``).

        A task adds its sums and the penalty's means; merged, a transient pooled pair (3 pairs), per task,
        one mean pair per task (``task + 2`` pairs).
        """
        deltas = self._deltas(pl_module)
        weights = [linear.weight for _, _, linear in deltas.layers()]
        shapes = {name: tuple(linear.weight.shape) for name, _, linear in deltas.layers()}
        pairs = 3 if self.kfac_tasks == "merged" else task + 2
        check_factor_memory(shapes, pairs, weights[0].dtype, weights[0].device, self.kfac_tasks)

    def _head_fisher_classes(self, task_classes: range) -> range:
        """Classes whose synthetic features give the head's Fisher, given the current task's classes:
        tasks ≤ t (ITA), < t (IEL)."""
        raise NotImplementedError

    def _head_fisher(self, head: nn.Linear, task: int, task_classes: range) -> dict[str, Tensor]:
        classes = self._head_fisher_classes(task_classes)
        weight_sum = torch.zeros_like(head.weight)
        bias_sum = torch.zeros_like(head.bias)
        count = 0
        if len(classes):
            generator = torch.Generator().manual_seed(self.seed * 104729 + task)
            features, _ = self.mixtures.sample(list(classes), self.head_fisher_samples, generator)
            weight_sum, bias_sum, count = head_fisher(head, features, list(classes))
        scale = 1.0 / count if count else 0.0
        return {"weight": self.prior + weight_sum * scale, "bias": self.prior + bias_sum * scale}

    # -- penalty --------------------------------------------------------------------------------------
    def curvature(self, device: torch.device) -> dict[str, Tensor]:
        """``F̄_<t`` (ITA) or ``F̄_≤t`` (IEL) on ``device``."""
        if self._curvature is None or next(iter(self._curvature.values())).device != device:
            mean = self.accumulator.curvature(include_current=self.algorithm == "iel")
            self._curvature = {k: v.to(device) for k, v in mean.items()}
        return self._curvature

    def _delta_penalty(self, pl_module: L.LightningModule) -> tuple[Tensor, dict[str, Tensor]]:
        """The current slot's penalty and its gradients, with the diagonal Fisher or the Kronecker factors."""
        deltas = self._deltas(pl_module)
        if self.curvature_type == "diagonal":
            return delta_penalty(deltas, self.curvature(pl_module.device), self.algorithm, self.strength)
        if self._curvature is None:  # once per task (reset at every boundary and on load): C, M, the means
            factors = self.accumulator.factors(include_current=self.algorithm == "iel")
            self._curvature = prepare_curvature(deltas, factors, self.algorithm, self.prior, pl_module.device)
        return kfac_delta_penalty(deltas, self._curvature, self.algorithm, self.strength)

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        self.guard.add_loss(loss)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        deltas = self._deltas(pl_module)
        params = {f"task_deltas.{k}": v for k, v in deltas.named_parameters()}
        value, grads = self._delta_penalty(pl_module)
        grads = {f"task_deltas.{k}": v for k, v in grads.items()}
        head = self.model(pl_module).head
        with full_precision():  # like delta_penalty: float32 master weights, autocast off
            head_value, head_grads = self._head_penalty(trainer, pl_module, head)
        params.update({f"head.{k}": v for k, v in head.named_parameters()})
        grads.update({f"head.{k}": v for k, v in head_grads.items()})
        if not self.guard.check_step(trainer, f"[{self.algorithm.upper()}] task {self.task}", params, grads):
            return  # skip_step: no gradient, no penalty, no update
        if self.penalty_mode == "decoupled":
            group = optimizer.param_groups[0]
            factor = group["lr"] / group.get("initial_lr", group["lr"]) if group["lr"] else 0.0
            decoupled_step(params, grads, factor, self.max_grad_norm)
        else:
            for key, grad in grads.items():
                param = params[key]
                param.grad = grad.clone() if param.grad is None else param.grad + grad
        pl_module.log("train/penalty", value, on_step=True, on_epoch=False)
        pl_module.log("train/head_penalty", head_value, on_step=True, on_epoch=False)

    def _head_penalty(self, trainer: L.Trainer, pl_module: L.LightningModule, head: nn.Linear
                      ) -> tuple[Tensor, dict[str, Tensor]]:
        """``λ_F Σ F_head (h_t − h̃_t)² + λ_2 ‖h_t − h̃_t‖²`` on task t's rows, and its gradient."""
        classes = self._task_classes(trainer, pl_module, self.task)
        rows = slice(classes.start, classes.stop)
        device, dtype = head.weight.device, head.weight.dtype
        target = {n: v[rows].to(device, dtype) for n, v in self.pretuned_head.items()}
        fisher = {n: v[rows].to(device, dtype) for n, v in self.head_curvature.items()}
        with torch.enable_grad():
            weight = head.weight[rows].detach().requires_grad_()
            bias = head.bias[rows].detach().requires_grad_()
            value = head_penalty(weight, bias, target["weight"], target["bias"], fisher["weight"], fisher["bias"],
                                 self.lambda_fisher, self.lambda_l2)
            grad_w, grad_b = torch.autograd.grad(value, [weight, bias])
        full_w, full_b = torch.zeros_like(head.weight), torch.zeros_like(head.bias)
        full_w[rows], full_b[rows] = grad_w, grad_b
        return value.detach(), {"weight": full_w, "bias": full_b}

    # -- end of fit -----------------------------------------------------------------------------------
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        deltas = self._deltas(pl_module)
        if deltas.current_task < 0:
            return
        deltas.bank()
        directory = self.save_dir or trainer.log_dir or trainer.default_root_dir
        if trainer.is_global_zero and directory:
            curvature_file, curvature, curvature_meta = self._curvature_file()
            for tensors, what in ((deltas.state_dict(), "the deltas"), (curvature, f"the {curvature_file} curvature"),
                                  (self.pretuned_head, "the pre-tuned head")):
                check_finite(tensors, f"{what} to be saved in {directory}", "Nothing was written.")
            os.makedirs(directory, exist_ok=True)
            meta = {"algorithm": self.algorithm, "strength": str(self.strength), "penalty_mode": self.penalty_mode}
            save_deltas(deltas, os.path.join(directory, "deltas.safetensors"), metadata=meta)
            save_file({k: v.contiguous().cpu() for k, v in curvature.items()}, os.path.join(directory, curvature_file),
                      metadata=curvature_meta)
            save_file({k: v.contiguous() for k, v in self.pretuned_head.items()},
                      os.path.join(directory, "pretuned_head.safetensors"))
            show(trainer, f"[{self.algorithm.upper()}] deltas, {curvature_file} and pre-tuned head saved in "
                          f"{directory}")

    def _curvature_file(self) -> tuple[str, dict[str, Tensor], dict[str, str]]:
        """File name, tensors and metadata of the curvature over all tasks, written at the end of ``fit``.

        ``fisher.safetensors``: the mean diagonal Fisher, prior included. ``kfac.safetensors``: the per-example
        means ``<layer>.A`` (Ā, in × in) and ``<layer>.G`` (Ḡ, out × out) of the pooled tasks (``merged``),
        or ``<layer>.A.task<t>`` / ``<layer>.G.task<t>`` per task (``per_task``: the curvature is
        ``Σ_t (n_t / N) Ā_t ⊗ Ḡ_t`` with the counts ``n_t`` of the metadata); the prior is not in the factors.
        """
        accumulator = self.accumulator
        if self.curvature_type == "diagonal":
            return "fisher.safetensors", accumulator.curvature(include_current=True), {
                "kind": "mean diagonal Fisher at θ0 over all tasks, prior included",
                "estimators": ",".join(accumulator.estimators), "prior": str(self.prior),
                "examples": str(accumulator.past_count + accumulator.current_count), **self._fisher_settings()}
        stored = accumulator.stored()
        tasks = [str(r["task"]) for r in accumulator.records]
        tensors: dict[str, Tensor] = {}
        for task, sums in zip(tasks if self.kfac_tasks == "per_task" else [None], stored):
            suffix = "" if task is None else f".task{task}"
            for name, (a, g) in sums.factors().items():
                tensors[f"{name}.A{suffix}"], tensors[f"{name}.G{suffix}"] = a, g
        return "kfac.safetensors", tensors, {
            "kind": f"KFAC factors (per-example means) at θ0, {self.kfac_tasks}; prior not included",
            "approximation": self.kfac_approx, "tasks_combined": self.kfac_tasks, "prior": str(self.prior),
            "estimators": ",".join(r["estimator"] for r in accumulator.records), "tasks": ",".join(tasks),
            "counts": ",".join(str(r["count"]) for r in accumulator.records), "examples": str(accumulator.count),
            "tokens": str(stored[0].tokens), **self._fisher_settings()}

    def _fisher_settings(self) -> dict[str, str]:
        """The estimator and the settings that matter for it (recorded with every saved Fisher)."""
        config = self.fisher_config
        relevant = {"mc": ("samples",), "topk": ("top_k",)}.get(config["estimator"], ())
        return {"estimator": config["estimator"], **{k: str(config[k]) for k in relevant}}

    # -- checkpointing --------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Refuse to write a checkpoint with a non-finite tensor (it would replace the last good one)."""
        check_finite(flatten_tensors(checkpoint["state_dict"]), f"the checkpoint of epoch {trainer.current_epoch}",
                     "It was not written; the last checkpoint on disk is the last good state.")
        check_finite(flatten_tensors(self.state_dict()), f"the {type(self).__name__} state of epoch "
                     f"{trainer.current_epoch}", "The checkpoint was not written.")

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """A damaged checkpoint (non-finite bytes) is refused before anything trains on it."""
        self._loading_from = trainer.ckpt_path  # named by `load_state_dict`, which Lightning calls next
        own = checkpoint.get("callbacks", {}).get(self.state_key, {})  # others may hold inf (ModelCheckpoint)
        check_finite(flatten_tensors({"state_dict": checkpoint.get("state_dict", {}), self.state_key: own}),
                     f"checkpoint {trainer.ckpt_path}", "The file is damaged: resume from an earlier checkpoint.")

    def state_dict(self) -> dict[str, Any]:
        return {
            "record": self.record,
            "task": self.task,
            "accumulator": self.accumulator.get_extra_state(),
            "mixtures": None if self.mixtures is None else self.mixtures.state_dict(),
            "composed_mixtures": None if self.composed_mixtures is None else self.composed_mixtures.state_dict(),
            "pretuned_head": self.pretuned_head,
            "head_curvature": self.head_curvature,
            "pretuning": asdict(self.pretuning),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.record and "record" in state_dict:  # Lightning restores callbacks after `setup`
            check_record(state_dict["record"], self.record, self.allow_strength_change,
                         getattr(self, "_loading_from", None))
        self.task = state_dict["task"]
        self.accumulator.set_extra_state(state_dict["accumulator"])
        mixtures = state_dict["mixtures"]
        self.mixtures = None if mixtures is None else ClassMixtures.from_state_dict(mixtures)
        composed = state_dict.get("composed_mixtures")  # absent from checkpoints of earlier versions
        self.composed_mixtures = None if composed is None else ClassMixtures.from_state_dict(composed)
        self.pretuned_head = state_dict["pretuned_head"]
        self.head_curvature = state_dict["head_curvature"]
        self._curvature = None


class ITA(SecondOrder):
    """Incremental Task Arithmetic: train each delta on its own (``θ0 + τ_t``), penalised by ``F̄_<t``.

    Args:
        alpha: strength ``α`` of ``(α/2) Σ F̄_<t ⊙ τ_t²`` (0.02 on Split CIFAR-100, 5.0 on CropDisease); with
            ``curvature="kfac"`` of ``(α/2) Σ_layers [tr(Ḡ τ_t Ā τ_tᵀ) + ε ‖τ_t‖²]``.
        **kwargs: see :class:`SecondOrder` (head penalty, delta style, Fisher estimator, curvature, pre-tuning, …).
    """

    algorithm = "ita"

    def __init__(self, alpha: float = 0.02, **kwargs: Any) -> None:
        super().__init__(strength=alpha, **kwargs)

    def training_composition(self, task: int) -> dict[int, float]:
        return {task: 1.0}

    def _head_fisher_classes(self, task_classes: range) -> range:
        return range(task_classes.stop)


class IEL(SecondOrder):
    """Incremental Ensemble Learning: train the uniform composition, penalise its Jensen gap with ``F̄_≤t``.

    Args:
        beta: strength ``β`` of ``β [½ (1 − 1/T) Σ F̄ τ² − (1/T) Σ F̄ τ P]`` (20 on Split CIFAR-100); with
            ``curvature="kfac"`` the same with ``Σ F̄ x y`` replaced by ``q(x, y) = Σ tr(Ḡ x Ā yᵀ) + ε ⟨x, y⟩``.
        **kwargs: see :class:`SecondOrder`.
    """

    algorithm = "iel"

    def __init__(self, beta: float = 20.0, **kwargs: Any) -> None:
        super().__init__(strength=beta, **kwargs)

    def training_composition(self, task: int) -> dict[int, float]:
        return dict(uniform(range(task + 1)).weights)

    def _head_fisher_classes(self, task_classes: range) -> range:
        return range(task_classes.start)
