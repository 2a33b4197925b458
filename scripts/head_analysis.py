"""Where a finished run's class-IL accuracy goes: backbone deltas against head, and the head's calibration.

    python scripts/head_analysis.py runs/digits/ita/version_0 [more runs ...]

For each run (a run directory of an ITA / IEL fit, with its `pretuned_head.safetensors`) it evaluates the
final class-IL and task-IL average accuracy of four models that cross the two backbones with the two heads:

- backbone: the run's composition θ0 + (1/T) Σ τ_t, or θ0 alone (no delta);
- head: the trained head h (what the run deploys), or the pre-tuned head h̃ (linear probe + alignment on
  synthetic features of every class, the head the penalty pulls h towards).

"θ0 + h̃" is the linear-probe baseline. A gap between class-IL and task-IL accuracy is the head's calibration
*across* tasks; the last table shows it directly: for the test images of each task, the share predicted
into each task's classes (rows: true task, columns: predicted task), for the run's own model.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from lightning_taylor.editing import uniform  # noqa: E402
from lightning_taylor.evaluation import accuracies, eval_loader, predict  # noqa: E402
from lightning_taylor.run import load_run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| run | backbone | head | class-IL avg (%) | task-IL avg (%) |\n|---|---|---|---|---|")
    confusions = {}
    for path in args.runs:
        run = load_run(path)
        data, model, head = run.datamodule, run.model, run.model.head
        trained = {k: v.clone() for k, v in head.state_dict().items()}
        pretuned = load_file(os.path.join(run.run_dir, "pretuned_head.safetensors"))
        loader = eval_loader(data, max(run.tasks) + 1)
        for backbone, composition in (("θ0 + (1/T) Σ τ", uniform(run.tasks)), ("θ0", {})):
            for head_name, state in (("trained h", trained), ("pre-tuned h̃", pretuned)):
                head.load_state_dict({k: v.to(head.weight) for k, v in state.items()})
                logits, targets = predict(model, loader, composition)
                result = accuracies(logits, targets, data.num_tasks, data.classes_per_task)
                class_il = 100 * sum(result["class_il"]) / len(result["class_il"])
                task_il = 100 * sum(result["task_il"]) / len(result["task_il"])
                print(f"| {path} | {backbone} | {head_name} | {class_il:.1f} | {task_il:.1f} |")
                if composition and head_name == "trained h":
                    k = data.classes_per_task
                    predicted, true = logits.argmax(1) // k, targets // k
                    tasks = max(run.tasks) + 1
                    confusions[path] = [[float(((true == t) & (predicted == p)).sum() / (true == t).sum())
                                         for p in range(tasks)] for t in range(tasks)]
        head.load_state_dict(trained)
    for path, rows in confusions.items():
        tasks = len(rows)
        print(f"\n{path}: share of each task's test images predicted into each task's classes (%)")
        print("| true task | " + " | ".join(f"→ {p}" for p in range(tasks)) + " |\n|---|" + "---|" * tasks)
        for t, row in enumerate(rows):
            print(f"| {t} | " + " | ".join(f"{100 * v:.0f}" for v in row) + " |")


if __name__ == "__main__":
    main()
