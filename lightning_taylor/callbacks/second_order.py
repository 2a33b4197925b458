"""ITA and IEL as Lightning callbacks: deltas, task boundary, Fisher at θ0, and the penalty step.

One callback runs the whole method on any LightningModule with a timm ViT and a linear head over all classes
(the small protocol of :mod:`lightning_taylor.callbacks.protocol`: ours, or a user's own module and data):

- ``setup``: freezes the backbone and attaches :class:`~lightning_taylor.deltas.TaskDeltas` to
  ``pl_module.task_deltas`` — before the optimisers and DDP are built, so the trainable slot is registered
  once for the whole fit;
- ``on_train_epoch_start``: at a new task ``t`` (the stream's ``current_task``, see the protocol), banks the
  previous delta, pre-tunes the head, computes the Fisher of the backbone at θ0 (deltas off, pre-tuned head
  installed) and of the head (:mod:`~lightning_taylor.callbacks._boundary`), resets the optimiser state; then
  sets the training forward: ``θ0 + τ_t`` (ITA) or the uniform composition ``θ0 + (1/T) Σ_{s≤t} τ_s`` (IEL);
- validation and test evaluate the uniform composition of every task seen;
- with ``curvature="kfac"``, the Kronecker factors ``Ā ⊗ Ḡ`` of every target instead of the diagonal Fisher
  (same place, same cotangents, same reduction; :mod:`~lightning_taylor.curvature.accumulators`), and the Kronecker
  form of the penalty (:mod:`~lightning_taylor.penalties.kfac`); ``kfac.safetensors`` instead of
  ``fisher.safetensors``;
- ``on_before_optimizer_step`` (once per optimiser step, after accumulation): the penalty, decoupled —
  ``θ ← θ − s · clip(∂R/∂θ)``, ``s`` the schedule's current factor — or coupled (``∂R/∂θ`` added to the
  gradients, exactly as if ``R`` were in the loss);
- with ``head_alignment="drift_compensated"``, at the end of each task (its last training batch, before the
  task's validation): re-aligns every seen head row on class mixtures of the *composed* model's features,
  the older classes' mixtures moved by semantic drift compensation (:mod:`~lightning_taylor.head.drift`);
- ``on_train_end``: banks the last delta and saves deltas, curvature and pre-tuned head as safetensors
  (:mod:`~lightning_taylor.callbacks._artifacts`).

The hooks only dispatch: each job has its module, and the settings are grouped by what they control
(:mod:`~lightning_taylor.callbacks._settings`). The baselines (:mod:`~lightning_taylor.callbacks.baselines`)
change what the hooks dispatch to, not the hooks.

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

from dataclasses import asdict
from typing import Any, ClassVar, Sequence

import lightning as L
import torch
from torch import Tensor, nn

from lightning_taylor._checks import (
    check_non_negative,
    check_non_negative_int,
    check_positive_int,
)
from lightning_taylor.callbacks import _boundary
from lightning_taylor.callbacks._artifacts import save_artifacts
from lightning_taylor.callbacks._curvature import CurvatureStrategy, curvature_strategy
from lightning_taylor.callbacks._head_alignment import align_to_composition
from lightning_taylor.callbacks._settings import (
    Curvature,
    CurvatureSettings,
    DeltaSettings,
    HeadAlignment,
    HeadInit,
    HeadSettings,
    PenaltyMode,
    PenaltySettings,
)
from lightning_taylor.callbacks.guard import OnNonFinite, StepGuard
from lightning_taylor.callbacks.protocol import (
    Classifier,
    check_launcher,
    current_task,
    last_epoch_of_task,
    resolve_classifier,
    task_classes,
    task_loader,
)
from lightning_taylor.callbacks.resume import (
    check_delta_layout,
    check_record,
    stream_record,
)
from lightning_taylor.console import show
from lightning_taylor.curvature import Estimator, KFACApprox, KFACTasks
from lightning_taylor.deltas import DeltaStyle, TaskDeltas, uniform
from lightning_taylor.errors import expected
from lightning_taylor.finite import check_finite, flatten_tensors
from lightning_taylor.head import ClassMixtures, PreTuning, pretuned_tensors
from lightning_taylor.penalties import Algorithm, decoupled_step, head_penalty
from lightning_taylor.precision import full_precision
from lightning_taylor.seeding import run_seed

__all__ = ["Curvature", "HeadAlignment", "HeadInit", "IEL", "ITA", "PenaltyMode", "SecondOrder"]


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
            ``τ_t`` (:func:`~lightning_taylor.head.drift.compensate_drift`). No old image is kept. See
            docs/learning_quality.md for what it changes.
        penalty_mode: ``"decoupled"`` (``θ ← θ − s·clip(∂R/∂θ)`` before each optimiser step, the reference)
            or ``"coupled"`` (``∂R/∂θ`` added to the gradients, as if ``R`` were in the loss).
        max_grad_norm: per-tensor clipping of the decoupled step.
        style: delta style, ``"lora"``, ``"full"`` or ``"ia3"``.
        rank: LoRA rank ``r``.
        targets: glob patterns of the ``nn.Linear`` layers that get deltas; ``None``: the block projections
            named as in the backbone's family (:func:`~lightning_taylor.deltas.default_targets`).
        qkv_rank_factor: LoRA rank multiplier of the ``qkv`` projections.
        fisher_estimator: ``"exact"``, ``"mc"``, ``"topk"`` or ``"empirical"``
            (:mod:`lightning_taylor.curvature.diagonal`).
        fisher_samples: sampled labels per example for ``"mc"``.
        fisher_top_k: classes kept by ``"topk"``.
        fisher_batch_size: batch size of the task-boundary passes (features and Fisher).
        prior: ε added to every mean Fisher (KFAC: the ``ε ‖τ‖²`` added to the Kronecker form).
        curvature: ``"diagonal"`` (the diagonal Fisher ``F̄``, docs/method.md §3) or ``"kfac"`` (per target
            layer ``Ā ⊗ Ḡ``, ``Ā`` from the layer's inputs, ``Ḡ`` from the same cotangents as the diagonal
            Fisher, at θ0 with the pre-tuned head; penalty ``(α/2) Σ_layers tr(Ḡ τ Ā τᵀ) + ε ‖τ‖²`` and IEL's
            Jensen gap in the same form, :mod:`lightning_taylor.penalties.kfac`). KFAC supports the ``exact``,
            ``mc`` and ``empirical`` estimators and stores ``in² + out²`` numbers per layer and pair.
        kfac_approx: KFAC's treatment of the token dimension: ``"expand"`` (every token an example) or
            ``"reduce"`` (tokens averaged / summed first), see :mod:`lightning_taylor.curvature.kfac`.
        kfac_tasks: how past tasks' factors combine: ``"merged"`` (one pair, KFAC of the pooled examples;
            constant memory) or ``"per_task"`` (one pair per task, the exact sum of Kronecker products;
            memory and penalty cost grow with the number of tasks), see :mod:`lightning_taylor.curvature.accumulators`.
        pretuning: head pre-tuning settings (docs/method.md §5).
        head_fisher_samples: synthetic features per class for the head's Fisher.
        seed: seeds the slot initialisation, pre-tuning and synthetic features (identical on every rank);
            ``None`` follows ``seed_everything`` (the ``PL_GLOBAL_SEED`` environment variable, else 0).
        save_dir: where deltas, Fisher and pre-tuned heads are saved at the end of ``fit``; ``None`` = the
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
    #: Whether a task boundary pre-tunes the head and estimates the curvature, and the optimiser step adds the
    #: penalties. ``False`` for the sequential fine-tuning baseline.
    regularised: ClassVar[bool] = True

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
        self.strength = float(strength)
        # docs/method.md §4: the head's Fisher weight defaults to α (ITA) or β (IEL).
        self.head_settings = HeadSettings(float(strength if lambda_fisher is None else lambda_fisher),
                                          float(lambda_l2), head_init, head_alignment, head_fisher_samples)
        self.penalty_settings = PenaltySettings(penalty_mode, float(max_grad_norm))
        self.curvature_settings = CurvatureSettings(curvature, fisher_estimator, fisher_samples, fisher_top_k,
                                                    fisher_batch_size, prior, kfac_approx, kfac_tasks)
        self.delta_settings = DeltaSettings(style, rank, None if targets is None else tuple(targets), qkv_rank_factor)
        self.guard = StepGuard(on_non_finite)
        if not isinstance(allow_strength_change, bool):
            raise expected("allow_strength_change", "a bool", allow_strength_change)
        for name, value in (("classes_per_task", classes_per_task), ("epochs_per_task", epochs_per_task)):
            if value is not None:
                check_positive_int(name, value)
        for name, value in (("backbone", backbone), ("head", head)):
            if value is not None and not (isinstance(value, str) and value):
                raise expected(name, "an attribute path (str) or None", value)
        if seed is not None:
            check_non_negative_int("seed", seed)
        self.pretuning, self.seed, self.save_dir = pretuning, seed, save_dir
        self.backbone, self.head = backbone, head
        self.classes_per_task, self.epochs_per_task = classes_per_task, epochs_per_task
        self.allow_strength_change = allow_strength_change
        self.record: dict[str, Any] = {}  # the stream and method of this fit (set up in `setup`)
        # State carried by checkpoints (see state_dict).
        self.task = -1
        self.curvature_strategy: CurvatureStrategy = curvature_strategy(self.curvature_settings)
        self.mixtures: ClassMixtures | None = None
        self.composed_mixtures: ClassMixtures | None = None  # head_alignment: mixtures of composed features
        self.pretuned_head: dict[str, Tensor] = {}  # h̃ of the current task (the head penalty's target)
        self.pretuned_heads: dict[int, dict[str, Tensor]] = {}  # h̃_t of every boundary so far, saved at the end
        self.head_curvature: dict[str, Tensor] = {}

    # -- the settings most often read back ----------------------------------------------------------
    @property
    def lambda_fisher(self) -> float:
        return self.head_settings.lambda_fisher

    @property
    def lambda_l2(self) -> float:
        return self.head_settings.lambda_l2

    @property
    def head_alignment(self) -> HeadAlignment:
        return self.head_settings.alignment

    @property
    def accumulator(self):  # noqa: ANN201 (FisherAccumulator or KroneckerAccumulator)
        """The curvature's sums and counts across tasks (:mod:`lightning_taylor.curvature.accumulators`)."""
        return self.curvature_strategy.accumulator

    @property
    def label(self) -> str:
        """``[ITA]`` or ``[IEL]``: how the callback's messages start."""
        return f"[{self.algorithm.upper()}]"

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
            pl_module.task_deltas = TaskDeltas(model.backbone, seed=self.seed, **self.delta_settings.as_dict())
            # A checkpoint of another delta layout is named before PyTorch lists every missing key.
            pl_module.task_deltas.register_load_state_dict_pre_hook(check_delta_layout)
        self.record = {**stream_record(trainer, pl_module, {"classes_per_task": self.classes_per_task,
                                                            "epochs_per_task": self.epochs_per_task}),
                       **self._method_record(pl_module.task_deltas)}
        if not self.pretuned_head:
            self.pretuned_head = {k: v.detach().float().cpu().clone() for k, v in model.head.state_dict().items()}

    def _method_record(self, deltas: TaskDeltas) -> dict[str, Any]:
        """The method's settings that a resume must share (:mod:`~lightning_taylor.callbacks.resume`)."""
        delta, curvature = self.delta_settings, self.curvature_settings
        fisher = {f"fisher_{k}": (v if k == "estimator" else int(v)) for k, v in curvature.estimator_record().items()}
        return {"algorithm": self.algorithm, "strength": self.strength, "style": delta.style, "rank": delta.rank,
                "qkv_rank_factor": delta.qkv_rank_factor, "targets": list(deltas.targets),
                "penalty_mode": self.penalty_settings.mode, "head_init": self.head_settings.init,
                "head_alignment": self.head_settings.alignment, **fisher, **curvature.record()}

    def model(self, pl_module: L.LightningModule) -> Classifier:
        """Backbone and head of ``pl_module`` (looked up on every call: the callback holds no module)."""
        return resolve_classifier(pl_module, self.backbone, self.head)

    def _task_classes(self, trainer: L.Trainer, pl_module: L.LightningModule, task: int) -> range:
        return task_classes(trainer, pl_module, task, self.classes_per_task)

    # -- composition ----------------------------------------------------------------------------------
    def training_composition(self, task: int) -> dict[int, float]:
        """The task coefficients of the training forward at ``task``."""
        raise NotImplementedError

    def evaluation_composition(self, deltas: TaskDeltas) -> dict[int, float] | None:
        """The composition evaluated: uniform over every task seen (``None`` before any task)."""
        return dict(uniform(deltas.tasks).weights) if deltas.tasks else None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Resumed mid-epoch (a pre-emption checkpoint), Lightning continues the epoch without calling
        # `on_train_epoch_start`: the epoch's composition must still be set (the task's begin is in the state).
        if trainer.fit_loop.restarted_mid_epoch:
            self.on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        task = current_task(trainer, pl_module, self.epochs_per_task)
        if task != self.task:
            with full_precision():  # features, pre-tuning, Fisher and head Fisher in float32 under *-mixed
                self.begin_task(trainer, pl_module, task)
        pl_module.task_deltas.compose(self.training_composition(task))

    def _compose_for_evaluation(self, pl_module: L.LightningModule) -> None:
        composition = self.evaluation_composition(pl_module.task_deltas)
        if composition is not None:
            pl_module.task_deltas.compose(composition)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._compose_for_evaluation(pl_module)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._compose_for_evaluation(pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.training and self.task >= 0:  # validation inside an epoch: back to the training forward
            pl_module.task_deltas.compose(self.training_composition(self.task))

    # -- task boundary --------------------------------------------------------------------------------
    def begin_delta(self, deltas: TaskDeltas, task: int) -> None:
        """Bank the finished delta and start ``task``'s (the slot starts at ``B = 0``)."""
        deltas.begin_task(task)

    def begin_task(self, trainer: L.Trainer, pl_module: L.LightningModule, task: int) -> None:
        """docs/method.md §5: bank, pre-tune, curvature of backbone and head at θ0, fresh optimiser state."""
        deltas, model = pl_module.task_deltas, self.model(pl_module)
        classes = self._task_classes(trainer, pl_module, task)
        show(trainer, f"{self.label} task {task}: classes {classes.start}..{classes.stop - 1}")
        self.begin_delta(deltas, task)
        if self.regularised:
            self._regularise(trainer, pl_module, model, deltas, task, classes)
        for optimizer in trainer.optimizers:  # a new task starts with fresh AdamW moments
            optimizer.state.clear()
        self.task = task

    def _regularise(self, trainer: L.Trainer, pl_module: L.LightningModule, model: Classifier, deltas: TaskDeltas,
                    task: int, classes: range) -> None:
        """The boundary's pre-tuning and curvature (:mod:`~lightning_taylor.callbacks._boundary`)."""
        label = f"{self.label} task {task}"
        loader = task_loader(trainer, task, self.curvature_settings.batch_size)
        if self.task < 0:  # first boundary: one forward checks that every target's delta reaches the output
            deltas.check_reach(model.backbone, next(iter(loader))[0][:2].to(pl_module.device))
        self.pretuned_head, self.mixtures = _boundary.pretune(
            trainer, model, deltas, loader, pl_module.device, self.pretuned_head, self.mixtures, classes, task,
            self.pretuning, self.seed, label)
        self.pretuned_heads[task] = self.pretuned_head
        if self.head_settings.init == "pretuned":
            self._start_from_pretuned(model.head, classes)
        with _boundary.curvature_pass(trainer, pl_module, model, deltas, self.pretuned_head, classes.stop, loader,
                                      self.seed, task) as data:
            sums = self.curvature_strategy.estimate(trainer, deltas, task, data, self.label)
        check_finite(sums.sums, f"the backbone Fisher of {label}")
        head_curvature = _boundary.head_curvature(
            self.pretuned_head, self.mixtures, self._head_fisher_classes(classes), self.head_settings.fisher_samples,
            self.curvature_settings.prior, self.seed, task)
        check_finite(head_curvature, f"the head Fisher of {label}")
        self.curvature_strategy.set_task(task, sums)
        self.head_curvature = head_curvature

    def _head_fisher_classes(self, task_classes: range) -> range:
        """Classes whose synthetic features give the head's Fisher: tasks ≤ t (ITA), < t (IEL)."""
        raise NotImplementedError

    @torch.no_grad()
    def _start_from_pretuned(self, head: nn.Linear, classes: range) -> None:
        """``head_init="pretuned"``: the task's trainable rows (and biases) become h̃'s rows."""
        rows = slice(classes.start, classes.stop)
        for name, value in self.pretuned_head.items():
            getattr(head, name)[rows] = value[rows].to(getattr(head, name))

    # -- end of a task --------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if (self.head_settings.alignment != "none" and trainer.is_last_batch
                and last_epoch_of_task(trainer, pl_module, self.epochs_per_task)):
            with full_precision():
                self.align_to_composition(trainer, pl_module, self.task)

    def align_to_composition(self, trainer: L.Trainer, pl_module: L.LightningModule, task: int) -> None:
        """``head_alignment="drift_compensated"`` at the end of ``task``
        (:mod:`~lightning_taylor.callbacks._head_alignment`)."""
        deltas = pl_module.task_deltas
        seen = list(range(self._task_classes(trainer, pl_module, task).stop))
        loader = task_loader(trainer, task, self.curvature_settings.batch_size)
        self.composed_mixtures = align_to_composition(
            trainer, self.model(pl_module), deltas, loader, pl_module.device, self.composed_mixtures, seen, task,
            self.pretuning, self.seed, f"{self.label} task {task}")
        deltas.compose(self.training_composition(task))
        show(trainer, f"{self.label} task {task}: head aligned on the composed model ({len(seen)} classes, "
                      "drift-compensated)")

    # -- the optimiser step ---------------------------------------------------------------------------
    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        self.guard.add_loss(loss)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        """Check the step, then apply the delta and head penalties, decoupled or coupled (docs/method.md §4)."""
        deltas, head = pl_module.task_deltas, self.model(pl_module).head
        params = {f"task_deltas.{k}": v for k, v in deltas.named_parameters()}
        params.update({f"head.{k}": v for k, v in head.named_parameters()})
        grads: dict[str, Tensor] = {}
        if self.regularised:
            value, delta_grads = self.curvature_strategy.penalty(deltas, self.algorithm, self.strength,
                                                                 pl_module.device)
            grads.update({f"task_deltas.{k}": v for k, v in delta_grads.items()})
            with full_precision():  # like the delta penalty: float32 master weights, autocast off
                head_value, head_grads = self._head_penalty(trainer, pl_module, head)
            grads.update({f"head.{k}": v for k, v in head_grads.items()})
        if not self.guard.check_step(trainer, f"{self.label} task {self.task}", params, grads):
            return  # skip_step: no gradient, no penalty, no update
        if not self.regularised:
            return
        if self.penalty_settings.mode == "decoupled":
            group = optimizer.param_groups[0]
            factor = group["lr"] / group.get("initial_lr", group["lr"]) if group["lr"] else 0.0
            decoupled_step(params, grads, factor, self.penalty_settings.max_grad_norm)
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
                                 self.head_settings.lambda_fisher, self.head_settings.lambda_l2)
            grad_w, grad_b = torch.autograd.grad(value, [weight, bias])
        full_w, full_b = torch.zeros_like(head.weight), torch.zeros_like(head.bias)
        full_w[rows], full_b[rows] = grad_w, grad_b
        return value.detach(), {"weight": full_w, "bias": full_b}

    # -- end of fit -----------------------------------------------------------------------------------
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        deltas = pl_module.task_deltas
        if deltas.current_task < 0:
            return
        deltas.bank()
        directory = self.save_dir or trainer.log_dir or trainer.default_root_dir
        if trainer.is_global_zero and directory:
            curvature = self.curvature_strategy.artifact() if self.regularised else None
            meta = {"algorithm": self.algorithm, "strength": str(self.strength),
                    "penalty_mode": self.penalty_settings.mode}
            save_artifacts(directory, deltas, meta, curvature, *pretuned_tensors(self.pretuned_heads))
            saved = ", ".join(["deltas", *([curvature[0]] if curvature else []),
                               *(["pre-tuned heads"] if self.pretuned_heads else [])])
            show(trainer, f"{self.label} {saved} saved in {directory}")

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
            "accumulator": self.curvature_strategy.state_dict(),
            "mixtures": None if self.mixtures is None else self.mixtures.state_dict(),
            "composed_mixtures": None if self.composed_mixtures is None else self.composed_mixtures.state_dict(),
            "pretuned_head": self.pretuned_head,
            "pretuned_heads": self.pretuned_heads,
            "head_curvature": self.head_curvature,
            "pretuning": asdict(self.pretuning),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.record and "record" in state_dict:  # Lightning restores callbacks after `setup`
            check_record(state_dict["record"], self.record, self.allow_strength_change,
                         getattr(self, "_loading_from", None))
        self.task = state_dict["task"]
        self.curvature_strategy.load_state_dict(state_dict["accumulator"])
        mixtures = state_dict["mixtures"]
        self.mixtures = None if mixtures is None else ClassMixtures.from_state_dict(mixtures)
        composed = state_dict.get("composed_mixtures")  # absent from checkpoints of earlier versions
        self.composed_mixtures = None if composed is None else ClassMixtures.from_state_dict(composed)
        self.pretuned_head = state_dict["pretuned_head"]
        # Checkpoints of earlier versions kept the current boundary's head only: h̃_task, when one was pre-tuned.
        self.pretuned_heads = state_dict.get("pretuned_heads", {self.task: self.pretuned_head}
                                             if self.regularised and self.task >= 0 else {})
        self.head_curvature = state_dict["head_curvature"]


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
