"""Wall time of the default demo (`lightning-taylor fit`) on an idle machine and on a loaded one.

    python scripts/time_demo.py                # idle, then beside one busy process per core
    python scripts/time_demo.py --only loaded

Each run starts `lightning-taylor fit` (no arguments: the embedded ITA demo) in a fresh temporary
directory, with the thread count the command chooses itself, and prints its wall time and its final class-IL
average accuracy. "Loaded" starts one CPU-bound Python process per core first (a busy loop) and stops them
afterwards. The environment's OMP_NUM_THREADS is removed for the runs, so the command's own choice is timed.
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lightning_taylor.cli.fit import DEMO_DIR
from lightning_taylor.cli.threads import available_cores


def _spin() -> None:  # a CPU-bound process standing for other work on the machine
    while True:
        pass


def run_demo() -> tuple[float, float]:
    """(seconds, final average class-IL accuracy in %) of one `lightning-taylor fit` in a temporary folder."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["HF_HUB_OFFLINE"] = "1"
    with tempfile.TemporaryDirectory() as cwd:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lightning_taylor.cli", "fit", "--trainer.enable_progress_bar", "false"],
                       cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        with open(Path(cwd) / DEMO_DIR / "version_0" / "accuracy_class_il.csv") as handle:
            last = list(csv.DictReader(handle))[-1]
    return seconds, 100 * float(last["average_accuracy"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("idle", "loaded"), default=None)
    args = parser.parse_args()
    settings = [args.only] if args.only else ["idle", "loaded"]
    for setting in settings:
        spinners = []
        if setting == "loaded":
            spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(available_cores())]
            for process in spinners:
                process.start()
            time.sleep(65)  # let the 1-minute load average see them, as it would on a busy machine
        try:
            seconds, accuracy = run_demo()
        finally:
            for process in spinners:
                process.terminate()
        print(f"{setting:>6}: {seconds / 60:.1f} min ({seconds:.0f} s), final class-IL average {accuracy:.2f} %",
              flush=True)


if __name__ == "__main__":
    main()
