"""``lightning-taylor edit``: edit a finished run's composition, print and save the accuracies, export.

::

    lightning-taylor edit runs/glyphs/ita/version_0 --drop 1 --mask-removed --export ita_without_1.safetensors
    lightning-taylor edit RUN --keep 0 2                    # specialise to tasks 0 and 2 (uniform over them)
    lightning-taylor edit RUN --factor 0=0.5 3=2            # per-task factors m_s
    lightning-taylor edit RUN --layer-factor 'blocks.0.*:1=0'   # m_1 = 0 in the layers matching blocks.0.*

``RUN`` is a run directory (its ``checkpoints/last.ckpt`` is used) or a ``.ckpt`` file. The per-task
accuracies before and after are printed and written to ``edit_accuracy.csv`` and ``edit.json`` in
``--output-dir``, by default ``<run dir>/edits/<input>/<edit>``: ``<input>`` is the stem of the ``--deltas``
file, else of the checkpoint (``last``), and ``<edit>`` names the edit (``drop1_mask``). An existing,
non-empty output folder or export file is refused unless ``--overwrite`` is given. The tables are saved
before the export, so a failed export loses nothing. The data is never downloaded: ``--data-root`` says
where the run's data is on this machine.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Sequence

from lightning_taylor.errors import WriteError, expected
from lightning_taylor.runs.edit import Edit, EditResult, apply_edit, export
from lightning_taylor.runs.load import find_checkpoint, load_run, run_directory

#: One line for ``lightning-taylor --help``.
SUMMARY = "unlearn / specialise / reweight a finished run's task deltas, evaluate, export for plain timm"


def _parse_factors(specs: Sequence[str], what: str) -> dict[int, float]:
    """``["0=0.5,1=2", "3=0"]`` → ``{0: 0.5, 1: 2.0, 3: 0.0}``; every factor must be finite."""
    factors = {}
    for spec in specs:
        for item in str(spec).split(","):
            task, sep, value = item.partition("=")
            try:
                factors[int(task)] = float(value)
            except ValueError:
                raise expected(what, "TASK=FACTOR pairs such as 0=0.5 (comma-separated or repeated)", spec) from None
            if not sep:
                raise expected(what, "TASK=FACTOR pairs such as 0=0.5", spec)
            if not math.isfinite(factors[int(task)]):
                raise expected(what, "TASK=FACTOR pairs with a finite FACTOR (no nan or inf)", spec)
    return factors


def _parse_layer_factors(specs: Sequence[str]) -> tuple[tuple[str, dict[int, float]], ...]:
    parsed = []
    for spec in specs:
        pattern, sep, factors = str(spec).rpartition(":")
        if not sep or not pattern:
            raise expected("--layer-factor", "PATTERN:TASK=FACTOR[,TASK=FACTOR...] such as 'blocks.0.*:1=0'", spec)
        parsed.append((pattern, _parse_factors([factors], "--layer-factor")))
    return tuple(parsed)


def build_parser():  # noqa: ANN201 (a jsonargparse.ArgumentParser)
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="lightning-taylor edit", description="Edit a finished run's composition of task deltas (unlearn, specialise, reweight), "
                            "evaluate it before and after, optionally export the merged model.",
                            epilog="Accuracies before (uniform composition) and after are printed and saved as "
                                   "edit_accuracy.csv / edit.json in --output-dir.")
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file with these options")
    parser.add_argument("run", type=str, help="run directory (uses checkpoints/last.ckpt) or checkpoint file")
    parser.add_argument("--deltas", type=str | None, default=None,
                        help="a deltas.safetensors to use instead of the checkpoint's deltas")
    parser.add_argument("--drop", type=int, nargs="+", default=[], help="tasks to unlearn (m_k = 0)")
    parser.add_argument("--keep", type=int, nargs="+", default=[], help="tasks to specialise to (uniform over them)")
    parser.add_argument("--renormalise", action="store_true",
                        help="after --drop, rescale the kept tasks so that the coefficients keep their sum")
    parser.add_argument("--factor", type=str, nargs="+", default=[], help="per-task factors TASK=M, e.g. 0=0.5 3=2")
    parser.add_argument("--layer-factor", type=str, nargs="+", default=[],
                        help="per-layer factors PATTERN:TASK=M[,TASK=M], e.g. 'blocks.0.*:1=0'")
    parser.add_argument("--mask-removed", action="store_true",
                        help="mask the classes of removed tasks (logit -inf), in the evaluation and the export")
    parser.add_argument("--export", type=str | None, default=None,
                        help="write the merged edited model here (safetensors, loads with plain timm)")
    parser.add_argument("--output-dir", type=str | None, default=None,
                        help="default: <run dir>/edits/<deltas or checkpoint stem>/<edit>")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output folder's tables and an existing export file")
    parser.add_argument("--device", type=str, default="cpu")
    parser.add_argument("--data-root", type=str | None, default=None,
                        help="where the run's data is on this machine (it is never downloaded)")
    parser.add_argument("--eval-batch-size", type=int | None, default=None)
    return parser


def output_dir(checkpoint: Path, deltas: str | None, edit: Edit) -> Path:
    """``<run dir>/edits/<input>/<edit>``: the edit *and* its input, so different inputs never share a folder."""
    source = Path(deltas).stem if deltas is not None else checkpoint.stem
    return run_directory(checkpoint) / "edits" / source / edit.name


def _refuse_overwriting(output: Path, export_path: str | None, overwrite: bool) -> None:
    if overwrite:
        return
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise expected("--output-dir", "a new or empty folder", os.fspath(output),
                       "It holds an earlier edit's results: pass --overwrite to replace them, or another --output-dir.")
    if export_path is not None and Path(export_path).exists():
        raise expected("--export", "a file that does not exist yet", export_path,
                       "Pass --overwrite to replace it.")


def main(args: Sequence[str] | None = None) -> EditResult:
    """Load a run, apply an edit, save and print the accuracies, then optionally export the merged model.

    Prints the table and where the files went, nothing else (warnings go to ``logging``).
    """
    cfg = build_parser().parse_args(args)
    edit = Edit(drop=tuple(cfg.drop), keep=tuple(cfg.keep), factors=_parse_factors(cfg.factor, "--factor"),
                layer_factors=_parse_layer_factors(cfg.layer_factor), renormalise=cfg.renormalise,
                mask_removed=cfg.mask_removed)
    checkpoint = find_checkpoint(cfg.run)
    output = Path(cfg.output_dir) if cfg.output_dir else output_dir(checkpoint, cfg.deltas, edit)
    _refuse_overwriting(output, cfg.export, cfg.overwrite)  # before the minutes of evaluation, not after

    overrides = {"eval_batch_size": cfg.eval_batch_size} if cfg.eval_batch_size is not None else {}
    run = load_run(checkpoint, deltas=cfg.deltas, device=cfg.device, data_overrides=overrides,
                   data_root=cfg.data_root)
    if run.incomplete is not None:  # loadable, but the user should know what they are editing
        print(f"lightning-taylor edit: note: the run {run.run_dir} is incomplete: {run.incomplete}; editing "  # noqa: T201
              f"{run.checkpoint} (tasks {run.tasks}).", file=sys.stderr)
    result = apply_edit(run, edit)
    extra = {"checkpoint": os.fspath(run.checkpoint), "run": run.info,
             **({"deltas": os.fspath(run.deltas_file)} if run.deltas_file is not None else {})}
    csv_path = result.save(output, extra)  # first: a failed export must not lose the accuracies
    print(result.format_table())  # noqa: T201 (the command's output)
    print(f"Accuracies written to {csv_path} and {output / 'edit.json'}")  # noqa: T201
    if cfg.export:
        try:
            export(run, cfg.export, result.composition, result.masked_classes, {"edit": json.dumps(edit.to_dict())})
        except ValueError as err:  # InputError included: keep its type, add what was kept
            raise type(err)(f"{err} Nothing was exported; the accuracies are saved in {output}.") from err
        except WriteError as err:  # a full disk, no permission: the same, with the OS's reason
            raise WriteError(f"{err} The accuracies are saved in {output}.", err.errno) from err
        result.save(output, {**extra, "export": os.fspath(cfg.export)})  # edit.json records the export
        print(f"Merged model written to {cfg.export}")  # noqa: T201
    return result


__all__ = ["build_parser", "main", "output_dir"]
