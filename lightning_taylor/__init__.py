"""lightning-taylor: incremental learning for pre-trained ViTs by second-order task arithmetic (ITA / IEL).

The public API, by what it is for (docs/architecture.md shows which folder owns what):

- **the method, as Lightning callbacks**: :class:`ITA`, :class:`IEL` (and their base :class:`SecondOrder`), the
  baselines :class:`LinearProbe` and :class:`SequentialFineTuning`, :class:`ContinualEvaluation`, the head's
  :class:`PreTuning` settings;
- **model and data**: :class:`IncrementalViT` (a timm ViT with a task-sliced head), :class:`TaskStreamDataModule`;
- **deltas and their algebra**: :class:`TaskDeltas`, :class:`Composition`, :func:`uniform`, :func:`unlearn`,
  :func:`specialise`, :func:`reweight`, :func:`save_deltas` / :func:`load_deltas`, :func:`load_merged`;
- **curvature**: :func:`diagonal_fisher`, :func:`kronecker_sums` and their sums;
- **finished runs**: :func:`load_run`, :func:`evaluate`, :class:`Edit`, :func:`apply_edit`, :func:`export`;
- **metrics and logging**: :class:`ContinualAccuracy`, :class:`AccuracyMatrix`, :class:`ResumableCSVLogger`;
- **faults**: :class:`FaultTolerance` (SIGTERM: checkpoint and exit 143; folders checked before training),
  :class:`AtomicCheckpointIO` (checkpoints whole or absent), docs/faults.md;
- **errors**: :class:`InputError` (a bad argument, file or setting), :class:`NonFiniteError`, :class:`WriteError`
  (a file that could not be written).
"""

from lightning_taylor import _moved
from lightning_taylor.callbacks import (
    IEL,
    ITA,
    ContinualEvaluation,
    FaultTolerance,
    LinearProbe,
    PreTuning,
    SecondOrder,
    SequentialFineTuning,
)
from lightning_taylor.checkpoint_io import AtomicCheckpointIO
from lightning_taylor.curvature import (
    FisherSums,
    KroneckerSums,
    diagonal_fisher,
    kronecker_sums,
)
from lightning_taylor.data import TaskStreamDataModule
from lightning_taylor.deltas import (
    Composition,
    TaskDeltas,
    load_deltas,
    load_merged,
    reweight,
    save_deltas,
    specialise,
    uniform,
    unlearn,
)
from lightning_taylor.errors import InputError, NonFiniteError, WriteError
from lightning_taylor.loggers import ResumableCSVLogger
from lightning_taylor.metrics import AccuracyMatrix, ContinualAccuracy
from lightning_taylor.model import IncrementalViT
from lightning_taylor.runs import Edit, Run, apply_edit, evaluate, export, load_run

__version__ = "0.2.0"

_moved.install()

__all__ = [
    # the method
    "IEL", "ITA", "SecondOrder", "LinearProbe", "SequentialFineTuning", "ContinualEvaluation", "PreTuning",
    # faults: pre-emption, checkpoints whole or absent
    "FaultTolerance", "AtomicCheckpointIO",
    # model and data
    "IncrementalViT", "TaskStreamDataModule",
    # deltas
    "TaskDeltas", "Composition", "uniform", "unlearn", "specialise", "reweight", "save_deltas", "load_deltas",
    "load_merged",
    # curvature
    "diagonal_fisher", "FisherSums", "kronecker_sums", "KroneckerSums",
    # runs
    "load_run", "Run", "evaluate", "Edit", "apply_edit", "export",
    # metrics and logging
    "ContinualAccuracy", "AccuracyMatrix", "ResumableCSVLogger",
    # errors
    "InputError", "NonFiniteError", "WriteError",
]
