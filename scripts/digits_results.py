"""Run every method of the README's results table on the embedded digits stream and print the table.

    python scripts/digits_results.py --seeds 0 1 2

Each (method, seed) is one ``lightning-taylor fit`` with the method's config and ``--seed_everything``;
outputs go to ``runs/results/<method>/seed<s>/``. The table reports the final average class-incremental
accuracy (mean over tasks of the last row of the accuracy matrix) and the final forgetting, as
mean ± standard deviation over seeds. Finished runs are reused (delete the folder to re-run).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
from pathlib import Path

METHODS = {
    "ITA": "configs/digits/ita.yaml",
    "ITA, Monte-Carlo Fisher (K = 1)": "configs/digits/ita_mc.yaml",
    "IEL": "configs/digits/iel.yaml",
    "Task arithmetic (α = 0)": "configs/digits/baselines/task_arithmetic.yaml",
    "ITA with α = 0, head penalty kept (ablation)": "configs/digits/baselines/head_penalty_only.yaml",
    "Sequential fine-tuning (one delta)": "configs/digits/baselines/sequential.yaml",
    "Joint training (upper bound)": "configs/digits/baselines/joint.yaml",
    "Linear probe of θ0 (pre-tuned head)": "configs/digits/baselines/linear_probe.yaml",
}


def run(config: str, seed: int, root: Path) -> dict[str, float]:
    out = root / Path(config).stem / f"seed{seed}"
    result = out / "version_0" / "accuracy_class_il.csv"
    if not result.exists():
        command = [
            sys.executable, "-m", "lightning_taylor.cli", "fit", "--config", config, f"--seed_everything={seed}",
            f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}",
            "--trainer.enable_progress_bar=false",
        ]
        print("$", " ".join(command[1:]), flush=True)
        subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL)
    with open(result) as handle:
        last = list(csv.DictReader(handle))[-1]
    return {"accuracy": 100 * float(last["average_accuracy"]), "forgetting": 100 * float(last["forgetting"])}


def summary(values: list[float]) -> str:
    values = [v for v in values if v == v]  # drop NaN (no forgetting with a single task)
    if not values:
        return "–"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {spread:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--root", type=Path, default=Path("runs/results"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args()
    rows = []
    for name in args.methods:
        results = [run(METHODS[name], seed, args.root) for seed in args.seeds]
        rows.append((name, summary([r["accuracy"] for r in results]), summary([r["forgetting"] for r in results]),
                     METHODS[name]))
    print("\n| method | final avg. class-IL accuracy (%) | forgetting (%) | config |\n|---|---|---|---|")
    for name, accuracy, forgetting, config in rows:
        print(f"| {name} | {accuracy} | {forgetting} | `{config}` |")


if __name__ == "__main__":
    main()
