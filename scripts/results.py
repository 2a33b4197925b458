"""Run every method of the README's results table on an embedded stream, print the table and check the targets.

    python scripts/results.py --stream mnist --seeds 0 1 2 --jobs 2

Each (method, seed) is one ``lightning-taylor fit --config configs/<stream>/... --seed_everything S``. Outputs
go to ``runs/results/<stream>/<config path under configs/<stream>>/seed<s>/`` (for example
``runs/results/mnist/baselines/joint/seed0``); finished runs are reused (delete a folder to re-run).
Every method of a seed sees the same class order, split and data, so comparisons are paired by seed.

The table gives the final average class-incremental accuracy (mean over tasks of the last row of the accuracy
matrix) and the final forgetting, as mean ± standard deviation over seeds, and the per-seed accuracies. Then
it prints each target of the learning-quality issues (docs/learning_quality.md, docs/learning_quality_glyphs.md)
with the paired per-seed differences and whether it holds.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

#: row name -> config file under configs/<stream>/
METHODS = {
    "ITA": "ita.yaml",
    "ITA, Monte-Carlo Fisher (K = 1)": "ita_mc.yaml",
    "ITA, KFAC": "ita_kfac.yaml",
    "ITA, head aligned": "ita_aligned.yaml",
    "IEL": "iel.yaml",
    "IEL, KFAC": "iel_kfac.yaml",
    "IEL, head aligned": "iel_aligned.yaml",
    "Task arithmetic (α = 0, λ_F = 0)": "baselines/task_arithmetic.yaml",
    "ITA with α = 0, head penalty kept": "baselines/head_penalty_only.yaml",
    "IEL with β = 0, head penalty kept": "baselines/iel_head_penalty_only.yaml",
    "ITA with α = 0, head aligned": "baselines/head_penalty_only_aligned.yaml",
    "IEL with β = 0, head aligned": "baselines/iel_head_penalty_only_aligned.yaml",
    "Sequential fine-tuning (one delta)": "baselines/sequential.yaml",
    "Joint fine-tuning (upper bound)": "baselines/joint.yaml",
    "Linear probe of θ0 (pre-tuned head)": "baselines/linear_probe.yaml",
}


def run(config: Path, seed: int, out: Path, threads: int | None) -> dict[str, float]:
    result = out / "version_0" / "accuracy_class_il.csv"
    if not result.exists():
        command = [
            sys.executable, "-m", "lightning_taylor.cli", "fit", "--config", str(config), f"--seed_everything={seed}",
            f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}",
            "--trainer.enable_progress_bar=false", *([f"--threads={threads}"] if threads else []),
        ]
        print("$", " ".join(command[1:]), flush=True)
        subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    with open(result) as handle:
        last = list(csv.DictReader(handle))[-1]
    return {"accuracy": 100 * float(last["average_accuracy"]), "forgetting": 100 * float(last["forgetting"])}


def summary(values: list[float]) -> str:
    values = [v for v in values if v == v]  # drop NaN (no forgetting with a single task)
    if not values:
        return "–"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {spread:.1f}"


def targets(acc: dict[str, list[float]]) -> list[tuple[str, list[float], bool]]:
    """The issue's targets as (statement, paired per-seed differences, holds)."""
    def diff(a: str, b: str) -> list[float]:
        return [x - y for x, y in zip(acc[a], acc[b])]

    probe, joint, seq = "Linear probe of θ0 (pre-tuned head)", "Joint fine-tuning (upper bound)", \
        "Sequential fine-tuning (one delta)"
    checks = []

    def mean_at_least(text: str, values: list[float], bound: float) -> None:
        checks.append((text, values, statistics.mean(values) >= bound))

    def every_at_least(text: str, values: list[float], bound: float) -> None:
        checks.append((text, values, min(values) >= bound))

    def every_above(text: str, values: list[float], bound: float) -> None:
        checks.append((text, values, min(values) > bound))

    task_arithmetic = "Task arithmetic (α = 0, λ_F = 0)"
    if probe in acc:
        checks.append(("linear probe of θ0 ≥ 60", acc[probe], statistics.mean(acc[probe]) >= 60))
    if {probe, joint} <= acc.keys():
        mean_at_least("joint ≥ linear probe + 5", diff(joint, probe), 5)
    # Each method with its ablation (the same run with α = 0 / β = 0): the reference's head, and the aligned head.
    pairs = {"ITA": "ITA with α = 0, head penalty kept", "IEL": "IEL with β = 0, head penalty kept",
             "ITA, head aligned": "ITA with α = 0, head aligned", "IEL, head aligned": "IEL with β = 0, head aligned"}
    for method, ablation in pairs.items():
        if method not in acc:
            continue
        if probe in acc:
            mean_at_least(f"{method} ≥ linear probe + 2 on average", diff(method, probe), 2)
            every_at_least(f"{method} ≥ linear probe + 2 in every seed", diff(method, probe), 2)
        if ablation in acc:
            strength = "β" if method.startswith("IEL") else "α"
            mean_at_least(f"{method} ≥ its {strength} = 0 ablation + 2 on average", diff(method, ablation), 2)
            every_above(f"{method} > its {strength} = 0 ablation in every seed", diff(method, ablation), 0)
        if task_arithmetic in acc:
            mean_at_least(f"{method} ≥ task arithmetic + 5", diff(method, task_arithmetic), 5)
        if seq in acc:
            mean_at_least(f"{method} ≥ sequential + 20", diff(method, seq), 20)
        if joint in acc:
            mean_at_least(f"{method} within 10 of joint", diff(method, joint), -10)
    mc = "ITA, Monte-Carlo Fisher (K = 1)"
    if {"ITA", mc} <= acc.keys():
        values = diff(mc, "ITA")
        checks.append(("Monte-Carlo Fisher within 1 of exact", values, abs(statistics.mean(values)) <= 1))
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stream", default="mnist", help="a folder of configs/ (glyphs, mnist, digits)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--root", type=Path, default=Path("runs/results"))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS),
                        help="rows to run (default: every row but the KFAC ones; see --kfac)")
    parser.add_argument("--kfac", action="store_true", help="add the KFAC rows to the default rows")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each with one CPU thread)")
    args = parser.parse_args()
    if args.methods is None:
        args.methods = [name for name in METHODS if args.kfac or "KFAC" not in name]
    configs = {name: Path("configs") / args.stream / METHODS[name] for name in args.methods}
    configs = {name: path for name, path in configs.items() if path.exists()}
    # Parallel runs get one thread each; a single run lets the command choose (see README, "CPU threads").
    threads = 1 if args.jobs > 1 else None
    jobs = {(name, seed): (path, seed, args.root / args.stream / path.relative_to(Path("configs") / args.stream)
                           .with_suffix("") / f"seed{seed}", threads)
            for name, path in configs.items() for seed in args.seeds}
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {key: pool.submit(run, *value) for key, value in jobs.items()}
        results = {key: future.result() for key, future in futures.items()}

    acc = {name: [results[name, s]["accuracy"] for s in args.seeds] for name in configs}
    seeds = " | ".join(f"seed {s}" for s in args.seeds)
    print(f"\n`python scripts/results.py --stream {args.stream} --seeds {' '.join(map(str, args.seeds))}`\n")
    print(f"| method | final avg. class-IL accuracy (%) | forgetting (%) | {seeds} | config |\n"
          f"|---|---|---|{'---|' * len(args.seeds)}---|")
    for name, path in configs.items():
        forgetting = summary([results[name, s]["forgetting"] for s in args.seeds])
        per_seed = " | ".join(f"{v:.1f}" for v in acc[name])
        print(f"| {name} | {summary(acc[name])} | {forgetting} | {per_seed} | `{path.as_posix()}` |")
    print(f"\n| target | paired differences, {', '.join(f'seed {s}' for s in args.seeds)} | holds |\n|---|---|---|")
    for text, values, holds in targets(acc):
        print(f"| {text} | {', '.join(f'{v:+.1f}' for v in values)} | {'yes' if holds else 'no'} |")


if __name__ == "__main__":
    main()
