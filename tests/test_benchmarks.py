"""The benchmark scripts run: the GPU check's reduced CPU mode (its checks pass), tiny step-overhead and
task-boundary runs."""

import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_gpu_check_reduced_cpu_mode_passes_its_checks():
    out = run("gpu_check.py", "--device", "cpu", "--reduced", "--threads", "1")
    checks = out[out.index("\nchecks\n"):].splitlines()[2:]
    assert "NO " not in out
    assert sum(line.strip().startswith("yes") for line in checks) >= 5  # Fisher, and per algorithm: stream, bf16
    assert "relative error" in out and "reference / exact" in out  # parts 1 and 4 printed their figures


def test_step_overhead_prints_a_ratio_per_variant():
    out = run("step_overhead.py", "--steps", "2", "--epochs", "1", "--warmup", "0", "--rounds", "1",
              "--batch-size", "4")
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0] in
            ("lora", "ita", "iel", "iel_coupled")}
    assert set(rows) == {"lora", "ita", "iel", "iel_coupled"}
    assert float(rows["lora"][2]) == 1.0
    # The plain step has no method hooks: its share is timing noise (0.00, or 0.01 on a loaded machine).
    plain = float(rows["lora"][-3])
    assert plain <= 0.05 and all(float(rows[v][-3]) > 10 * plain for v in ("ita", "iel", "iel_coupled"))


def test_boundary_cost_times_every_part_of_the_boundary():
    out = run("boundary_cost.py", "--classes", "2", "--estimators", "mc", "--per-class", "6", "--img-size", "32",
              "--batch-size", "4")
    (row,) = [line.split() for line in out.splitlines() if line.split()[:2] == ["2", "mc"]]
    features, pretuning, fisher, head_fisher, epoch = (float(v) for v in row[3:8])
    assert min(features, pretuning, fisher, epoch) > 0 and head_fisher >= 0 and row[-1].endswith("x")
