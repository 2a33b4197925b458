"""Editing experiment: unlearning (drop τ_k) and specialisation (keep only τ_k) for every task k of some runs.

Run from the repository root after training the runs, e.g. ITA, IEL and unregularised task arithmetic
(ITA with α = 0) on the embedded digits stream (about 30 s per run on 2 CPU cores):

    export HF_HUB_OFFLINE=1
    lightning-taylor fit --config configs/digits/ita.yaml --trainer.logger.init_args.version editing
    lightning-taylor fit --config configs/digits/iel.yaml --trainer.logger.init_args.version editing
    lightning-taylor fit --config configs/digits/baselines/task_arithmetic.yaml --trainer.logger.init_args.version editing
    python benchmarks/editing_report.py runs/digits/ita/editing runs/digits/iel/editing \\
        runs/digits/task_arithmetic/editing --labels ITA IEL "TA (α=0)" --output-dir runs/editing_report

For each run (a run directory or a checkpoint, see :func:`lightning_taylor.runs.load.load_run`) and each task k
it evaluates, on the test sets of all seen tasks, the uniform composition (1/T) Σ_s τ_s ("before") and

- **drop k** (unlearning): m_k = 0, the others keep 1/T (``--renormalise``: 1/(T−1));
- **keep k** (specialisation): only τ_k, with coefficient 1;

and reports, as fractions in the CSV and percentages in the markdown:

- ``task_k``: class-IL accuracy on task k's test set (argmax over every seen class), before / after;
- ``task_k_til``: task-IL accuracy on task k (argmax within task k's classes), before / after;
- ``others``: mean over the other tasks j ≠ k of their class-IL accuracy, before / after;
- ``masked``: the same after-edit numbers when the removed tasks' classes are masked (logit −∞): for a drop,
  ``others`` with task k's classes masked (in the markdown); for a keep, ``task_k`` with every other task's
  classes masked (CSV only: it equals task k's task-IL accuracy).

The heads are never edited. Writes ``editing_report.md`` and ``editing_report.csv`` in ``--output-dir``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lightning_taylor.data.split import classes_of  # noqa: E402
from lightning_taylor.deltas.composition import uniform  # noqa: E402
from lightning_taylor.runs import Edit  # noqa: E402
from lightning_taylor.runs.evaluate import accuracies, eval_loader, predict  # noqa: E402
from lightning_taylor.runs.load import load_run  # noqa: E402

FIELDS = ["method", "edit", "k", "task_k_before", "task_k_after", "task_k_til_before", "task_k_til_after",
          "others_before", "others_after", "task_k_after_masked", "others_after_masked"]


def mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def report_run(path: str, label: str | None, renormalise: bool, device: str) -> list[dict]:
    run = load_run(path, device=device)
    data, tasks, k_per = run.datamodule, run.tasks, list(run.datamodule.task_sizes)  # classes of each task
    seen = max(tasks) + 1
    loader = eval_loader(data, seen)
    method = label or run.label

    def accs(composition, mask=()):
        logits, targets = predict(run.model, loader, composition)
        return accuracies(logits, targets, data.num_tasks, k_per, mask)

    before = accs(uniform(tasks))
    rows = []
    for k in tasks:
        others = [j for j in range(seen) if j != k]
        for kind, edit in (("drop", Edit(drop=(k,), renormalise=renormalise)), ("keep", Edit(keep=(k,)))):
            composition = edit.composition(tasks)
            removed = [k] if kind == "drop" else [t for t in tasks if t != k]
            logits, targets = predict(run.model, loader, composition)
            after = accuracies(logits, targets, data.num_tasks, k_per)
            masked = accuracies(logits, targets, data.num_tasks, k_per, classes_of(removed, run.task_ranges))
            rows.append({
                "method": method, "edit": kind, "k": k,
                "task_k_before": before["class_il"][k], "task_k_after": after["class_il"][k],
                "task_k_til_before": before["task_il"][k], "task_k_til_after": after["task_il"][k],
                "others_before": mean([before["class_il"][j] for j in others]),
                "others_after": mean([after["class_il"][j] for j in others]),
                "task_k_after_masked": masked["class_il"][k],
                "others_after_masked": mean([masked["class_il"][j] for j in others]),
            })
    for kind in ("drop", "keep"):
        mine = [r for r in rows if r["edit"] == kind]
        rows.append({"method": method, "edit": kind, "k": "mean",
                     **{f: mean([r[f] for r in mine]) for f in FIELDS[3:]}})
    return rows


def pct(value: float) -> str:
    return "–" if math.isnan(value) else f"{100 * value:.1f}"


def delta(after: float, before: float) -> str:
    return "–" if math.isnan(after) or math.isnan(before) else f"{100 * (after - before):+.1f}"


def markdown(rows: list[dict], renormalise: bool) -> str:
    scaling = "1/(T−1)" if renormalise else "1/T"
    lines = ["# Editing the composition: unlearning and specialisation", "",
             "Class-IL accuracy (%) on the test sets of all seen tasks. *before*: uniform composition "
             "(1/T) Σ_s τ_s. *others*: mean over the tasks j ≠ k. Heads are not edited; *masked* columns set the "
             "removed tasks' logits to −∞.", ""]
    lines += [f"## Unlearning: drop τ_k (the other tasks keep {scaling})", "",
              "| method | k | task k before | task k after | Δ | task-IL k before | task-IL k after | "
              "others before | others after | Δ | others after (masked) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["edit"] == "drop"):
        lines.append(f"| {r['method']} | {r['k']} | {pct(r['task_k_before'])} | {pct(r['task_k_after'])} | "
                     f"{delta(r['task_k_after'], r['task_k_before'])} | {pct(r['task_k_til_before'])} | "
                     f"{pct(r['task_k_til_after'])} | {pct(r['others_before'])} | {pct(r['others_after'])} | "
                     f"{delta(r['others_after'], r['others_before'])} | {pct(r['others_after_masked'])} |")
    lines += ["", "## Specialisation: keep only τ_k (coefficient 1)", "",
              "| method | k | task k before | task k after | Δ | task-IL k before | task-IL k after | "
              "others before | others after | Δ |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["edit"] == "keep"):
        lines.append(f"| {r['method']} | {r['k']} | {pct(r['task_k_before'])} | {pct(r['task_k_after'])} | "
                     f"{delta(r['task_k_after'], r['task_k_before'])} | {pct(r['task_k_til_before'])} | "
                     f"{pct(r['task_k_til_after'])} | {pct(r['others_before'])} | "
                     f"{pct(r['others_after'])} | {delta(r['others_after'], r['others_before'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories (checkpoints/last.ckpt) or checkpoint files")
    parser.add_argument("--labels", nargs="+", default=None, help="one name per run (default: algorithm and strength)")
    parser.add_argument("--output-dir", default="runs/editing_report")
    parser.add_argument("--renormalise", action="store_true", help="drop τ_k and rescale the others to 1/(T−1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default; 1 on a busy machine)")
    args = parser.parse_args()
    if args.labels is not None and len(args.labels) != len(args.runs):
        parser.error(f"--labels needs one name per run ({len(args.runs)}), got {len(args.labels)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    rows = []
    for i, path in enumerate(args.runs):
        rows += report_run(path, args.labels[i] if args.labels else None, args.renormalise, args.device)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    with open(output / "editing_report.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows([{k: repr(v) if isinstance(v, float) else v for k, v in r.items()} for r in rows])
    text = markdown(rows, args.renormalise)
    (output / "editing_report.md").write_text(text)
    print(text)
    print(f"Written to {output / 'editing_report.md'} and {output / 'editing_report.csv'}")


if __name__ == "__main__":
    main()
