"""Finished runs: rebuild one from its directory (:mod:`.load`), evaluate a composition (:mod:`.evaluate`), edit
and export it (:mod:`.edit`). The command line front end is ``lightning-taylor edit`` (:mod:`lightning_taylor.cli.edit`).
"""

from lightning_taylor.runs.edit import (
    Edit,
    EditResult,
    apply_edit,
    export,
    removed_tasks,
)
from lightning_taylor.runs.evaluate import (
    accuracies,
    eval_loader,
    evaluate,
    mask_logits,
    predict,
)
from lightning_taylor.runs.load import Run, find_checkpoint, load_run, run_directory

__all__ = [
    "Edit",
    "EditResult",
    "Run",
    "accuracies",
    "apply_edit",
    "eval_loader",
    "evaluate",
    "export",
    "find_checkpoint",
    "load_run",
    "mask_logits",
    "predict",
    "removed_tasks",
    "run_directory",
]
