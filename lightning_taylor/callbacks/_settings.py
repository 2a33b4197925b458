"""The method's settings, grouped by what they control; each group checks itself when it is built.

The callbacks keep flat, typed constructor arguments (what LightningCLI, ``--print_config`` and the YAML
configs read) and group them here: the deltas, the curvature, the head, and how the penalty is applied.
Choices are read from the ``Literal`` types themselves (:func:`typing.get_args`), so a new choice is added in
one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

from lightning_taylor._checks import (
    check_choice,
    check_non_negative,
    check_positive_int,
)
from lightning_taylor.curvature import Estimator, KFACApprox, KFACTasks
from lightning_taylor.deltas import DeltaStyle
from lightning_taylor.errors import expected

PenaltyMode = Literal["decoupled", "coupled"]
HeadInit = Literal["random", "pretuned"]
HeadAlignment = Literal["none", "drift_compensated"]
Curvature = Literal["diagonal", "kfac"]


def _choice(name: str, value: Any, choices: Any) -> None:
    check_choice(name, value, get_args(choices))


@dataclass(frozen=True)
class DeltaSettings:
    """The per-task deltas: style, LoRA rank (``qkv`` gets ``qkv_rank_factor × rank``), target layers."""

    style: DeltaStyle = "lora"
    rank: int = 16
    targets: tuple[str, ...] | None = None
    qkv_rank_factor: int = 3

    def __post_init__(self) -> None:
        _choice("style", self.style, DeltaStyle)
        check_positive_int("rank", self.rank)
        check_positive_int("qkv_rank_factor", self.qkv_rank_factor)

    def as_dict(self) -> dict[str, Any]:
        """The :class:`~lightning_taylor.deltas.TaskDeltas` arguments."""
        return {"style": self.style, "rank": self.rank, "targets": self.targets,
                "qkv_rank_factor": self.qkv_rank_factor}


@dataclass(frozen=True)
class CurvatureSettings:
    """Which curvature is estimated at θ0 at each boundary, and how (docs/method.md §3, §8)."""

    kind: Curvature = "diagonal"
    estimator: Estimator = "exact"
    samples: int = 1
    top_k: int = 10
    batch_size: int = 32
    prior: float = 1e-5
    kfac_approx: KFACApprox = "expand"
    kfac_tasks: KFACTasks = "merged"

    def __post_init__(self) -> None:
        _choice("curvature", self.kind, Curvature)
        _choice("fisher_estimator", self.estimator, Estimator)
        check_positive_int("fisher_samples", self.samples)
        check_positive_int("fisher_top_k", self.top_k)
        check_positive_int("fisher_batch_size", self.batch_size)
        check_non_negative("prior", self.prior)
        _choice("kfac_approx", self.kfac_approx, KFACApprox)
        _choice("kfac_tasks", self.kfac_tasks, KFACTasks)
        if self.kind == "kfac" and self.estimator == "topk":
            raise expected("fisher_estimator", "'exact', 'mc' or 'empirical' with `curvature: kfac`", self.estimator,
                           "KFAC's factors have no top-k truncation.")

    @property
    def estimator_config(self) -> dict[str, Any]:
        """The estimator's arguments (of :func:`~lightning_taylor.curvature.diagonal_fisher`)."""
        return {"estimator": self.estimator, "samples": self.samples, "top_k": self.top_k}

    def estimator_record(self) -> dict[str, str]:
        """The estimator and the settings that matter for it (recorded with every saved curvature)."""
        relevant = {"mc": ("samples",), "topk": ("top_k",)}.get(self.estimator, ())
        return {"estimator": self.estimator, **{k: str(getattr(self, k)) for k in relevant}}

    def record(self) -> dict[str, str]:
        """The curvature and, for KFAC, the settings that define its factors (part of the resume record)."""
        if self.kind == "diagonal":
            return {"curvature": "diagonal"}
        return {"curvature": "kfac", "kfac_approx": self.kfac_approx, "kfac_tasks": self.kfac_tasks}


@dataclass(frozen=True)
class HeadSettings:
    """The head: its penalty ``λ_F Σ F_head (h − h̃)² + λ_2 ‖h − h̃‖²``, its start, its end-of-task alignment."""

    lambda_fisher: float
    lambda_l2: float = 0.001
    init: HeadInit = "random"
    alignment: HeadAlignment = "none"
    fisher_samples: int = 256

    def __post_init__(self) -> None:
        check_non_negative("lambda_fisher", self.lambda_fisher)
        check_non_negative("lambda_l2", self.lambda_l2)
        _choice("head_init", self.init, HeadInit)
        _choice("head_alignment", self.alignment, HeadAlignment)
        check_positive_int("head_fisher_samples", self.fisher_samples)


@dataclass(frozen=True)
class PenaltySettings:
    """How the penalties enter each optimiser step: decoupled (clipped per tensor) or added to the gradients."""

    mode: PenaltyMode = "decoupled"
    max_grad_norm: float = 100.0

    def __post_init__(self) -> None:
        _choice("penalty_mode", self.mode, PenaltyMode)
        check_non_negative("max_grad_norm", self.max_grad_norm)
