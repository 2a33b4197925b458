"""Faults a cluster produces: pre-emption (SIGTERM), a full disk and unwritable folders (docs/faults.md).

The full disk is a file-size limit (``RLIMIT_FSIZE``, with SIGXFSZ ignored so that writes fail with EFBIG) set
in a subprocess; every subprocess is bounded in time. Streams are the embedded digits, 2 short tasks.
"""

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_taylor.cli import main
from lightning_taylor.cli.fit import DEMO_DIR, cli, with_run_config

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
SHORT = ["--data.dataset", "digits", "--data.num_tasks", "2", "--data.epochs_per_task", "2",
         "--data.test_fraction", "0.9", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
         "--trainer.enable_progress_bar", "false", "--model.lr", "0.002"]
TIMEOUT = 240


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "lightning_taylor.cli", *args]


def environment(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]), **extra}
    env.pop("LIGHTNING_TAYLOR_TRACEBACK", None)
    return env


def file_size_limit(limit: int):
    """A ``preexec_fn``: writes past ``limit`` bytes fail with EFBIG (a disk that fills), not with a signal."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def partial_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".partial")]


def run_dir(root: Path) -> Path:
    runs = sorted(root.glob(f"{DEMO_DIR}/version_*"))
    assert len(runs) == 1, sorted(str(p) for p in root.rglob("*"))
    return runs[0]


def assert_short(stderr: str, *patterns: str) -> None:
    lines = [line for line in stderr.splitlines() if line.startswith("lightning-taylor: error:")]
    assert lines, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    for pattern in patterns:
        assert pattern in lines[-1], lines[-1]


# ------------------------------------------------------------------------------------------- pre-emption
def test_sigterm_checkpoints_exits_143_and_the_resume_equals_an_uninterrupted_run(tmp_path):
    interrupted, reference = tmp_path / "interrupted", tmp_path / "reference"
    interrupted.mkdir()
    slow = ["--trainer.callbacks+=slow_batches.SlowBatches"]
    process = subprocess.Popen(command("fit", *SHORT, *slow), cwd=interrupted, env=environment(SLOW_BATCHES_SECONDS="2"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not list(interrupted.glob("runs/*/*/*/checkpoints/epoch=0-*.ckpt")):  # the first checkpoint
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()[-3000:]
            time.sleep(0.2)
        time.sleep(1.0)  # inside epoch 1's first (slowed) batch
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=TIMEOUT)
    finally:
        process.kill()
    assert process.returncode == 143, output[-3000:]
    run = run_dir(interrupted)
    assert "Stopped by SIGTERM at epoch 1" in output, output[-3000:]
    assert os.path.realpath(run / "checkpoints" / "last.ckpt") == str((run / "checkpoints" / "preempted.ckpt"))
    assert not partial_files(interrupted) and not (run / "deltas.safetensors").exists()

    reference.mkdir()
    try:
        os.chdir(interrupted)  # in this process: the run's config.yaml (its relative folders), its run directory
        cli(with_run_config(["fit", "--ckpt_path", str(run)]))
        os.chdir(reference)
        cli(["fit", *SHORT])
    finally:
        os.chdir(ROOT)
    expected = run_dir(reference)
    assert (run / "accuracy_class_il.csv").read_text() == (expected / "accuracy_class_il.csv").read_text()
    for name in ("deltas.safetensors", "fisher.safetensors", "pretuned_head.safetensors"):
        ours, theirs = load_file(run / name), load_file(expected / name)
        assert ours.keys() == theirs.keys()
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=f"{name} {key}")
    assert not (run / "checkpoints" / "preempted.ckpt").exists()  # a finished fit removes it


# ------------------------------------------------------------------------------------------- a full disk
def test_a_checkpoint_that_does_not_fit_leaves_no_partial_file_and_a_short_error(tmp_path):
    result = subprocess.run(command("fit", *SHORT), cwd=tmp_path, env=environment(), capture_output=True, text=True,
                            timeout=TIMEOUT, preexec_fn=file_size_limit(1_000_000))
    assert result.returncode == 1, result.stderr[-3000:]
    assert_short(result.stderr, "Could not write the checkpoint to", "epoch=0-step=3.ckpt", "(EFBIG)",
                 "No checkpoint of this run is on disk yet.")
    assert not partial_files(tmp_path) and not list(tmp_path.rglob("*.ckpt"))


def test_artifacts_that_do_not_fit_are_written_none_of_them(tmp_path):
    callbacks = json.dumps([{"class_path": "lightning_taylor.callbacks.ITA",
                             "init_args": {"alpha": 10.0, "rank": 2, "head_alignment": "none"}},
                            {"class_path": "lightning_taylor.callbacks.ContinualEvaluation"}])
    args = [*SHORT, "--trainer.enable_checkpointing", "false", "--trainer.callbacks", callbacks]
    result = subprocess.run(command("fit", *args), cwd=tmp_path, env=environment(), capture_output=True, text=True,
                            timeout=TIMEOUT, preexec_fn=file_size_limit(1_000_000))  # deltas fit, the Fisher not
    assert result.returncode == 1, result.stderr[-3000:]
    assert_short(result.stderr, "Could not write the fisher.safetensors curvature", "(EFBIG)",
                 "No artifact in", "was replaced")
    run = run_dir(tmp_path)
    assert not partial_files(tmp_path)
    for name in ("deltas.safetensors", "fisher.safetensors", "pretuned_head.safetensors", "artifacts.json"):
        assert not (run / name).exists(), name


def test_an_export_that_does_not_fit_is_a_short_error_and_no_file(finished_run, tmp_path):
    export = tmp_path / "merged.safetensors"
    result = subprocess.run(command("edit", str(finished_run), "--drop", "1", "--output-dir", str(tmp_path / "edit"),
                                    "--export", str(export)),
                            env=environment(), capture_output=True, text=True, timeout=TIMEOUT,
                            preexec_fn=file_size_limit(40_000))  # the tables fit, the model not
    assert result.returncode == 1, result.stderr[-3000:]
    assert_short(result.stderr, f"Could not write the merged model to {export}", "(EFBIG)",
                 "The accuracies are saved in")
    assert not export.exists() and not partial_files(tmp_path)
    assert (tmp_path / "edit" / "edit.json").is_file()


# ------------------------------------------------------------------------------------------- folders, old files
def test_an_output_folder_below_a_file_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *SHORT, "--trainer.default_root_dir", str(blocker / "runs"),
              "--trainer.logger.init_args.save_dir", str(blocker / "runs")])
    assert exit_info.value.code == 1
    message = capsys.readouterr().err
    assert message.startswith("lightning-taylor: error: Could not write") and "(ENOTDIR)" in message, message
    assert "Nothing was trained" in message and len(message.splitlines()) == 1
