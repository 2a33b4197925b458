"""The real ``lightning-taylor`` command, as a newcomer runs it: help, defaults, one-line errors, and a run
directory that ``fit --ckpt_path``, ``test`` and ``validate`` work from alone."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_taylor.callbacks import ITA, ContinualEvaluation
from lightning_taylor.callbacks.continual_evaluation import log_matrix
from lightning_taylor.cli import DEMO_DIR, cli
from lightning_taylor.cli.threads import auto_threads
from lightning_taylor.metrics import AccuracyMatrix

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = {"img_size": 16, "patch_size": 8, "embed_dim": 24, "depth": 2, "num_heads": 2, "in_chans": 1}


def command(*args, cwd, check=True):
    """Run ``lightning-taylor ARGS`` in a fresh interpreter, offline, one thread."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("LIGHTNING_TAYLOR_TRACEBACK", None)
    result = subprocess.run([sys.executable, "-m", "lightning_taylor.cli", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def test_help_lists_every_subcommand_with_a_description(tmp_path):
    out = command("--help", cwd=tmp_path).stdout
    for name in ("fit", "validate", "test", "edit"):
        assert f"  {name} " in out
    assert "unlearn / specialise" in out and "offline demo" in out


def test_the_defaults_are_the_offline_ita_demo():
    parsed = cli([], run=False)
    algorithms = [c for c in parsed.trainer.callbacks if isinstance(c, ITA)]
    assert len(algorithms) == 1 and algorithms[0].strength == 5000.0 and algorithms[0].delta_settings.rank == 4
    assert algorithms[0].head_alignment == "drift_compensated" and algorithms[0].penalty_settings.mode == "coupled"
    assert any(isinstance(c, ContinualEvaluation) for c in parsed.trainer.callbacks)
    assert parsed.model.hparams.pretrained == "embedded:glyphs" and parsed.datamodule.dataset == "glyphs"
    assert parsed.model.hparams.lr == 2e-3 and parsed.datamodule.epochs_per_task == 3
    assert parsed.datamodule.num_tasks == 10 and parsed.config.seed_everything == 0


def test_the_demo_is_the_config_that_spells_it_out():
    def settings(args):
        config = cli(args, run=False).config.as_dict()
        callbacks = [(c["class_path"].rsplit(".", 1)[-1], c.get("init_args", {}))
                     for c in config["trainer"]["callbacks"]]
        return callbacks, config["model"], config["data"], config["seed_everything"]

    assert settings([]) == settings(["--config", str(CONFIGS / "glyphs" / "ita_aligned.yaml")])


def test_a_config_takes_nothing_from_the_demo():
    # jsonargparse merges list items of subclass specs: demo defaults would fill a config's unset init_args.
    parsed = cli(["--config", str(CONFIGS / "mnist" / "baselines" / "task_arithmetic.yaml")], run=False)
    (method,) = [c for c in parsed.trainer.callbacks if isinstance(c, ITA)]
    assert method.head_alignment == "none" and method.lambda_fisher == 0.0  # λ_F = α = 0, as the config says
    digits = cli(["--config", str(CONFIGS / "digits" / "ita.yaml")], run=False)
    assert digits.model.hparams.lr == 3e-4 and digits.datamodule.dataset == "digits"


def test_short_class_names_work_on_the_command_line():
    parsed = cli(["--trainer.callbacks=IEL", "--trainer.callbacks.beta=3.0", "--trainer.callbacks+=ContinualEvaluation"],
                 run=False)
    names = [type(c).__name__ for c in parsed.trainer.callbacks]
    assert names[:2] == ["IEL", "ContinualEvaluation"] and parsed.trainer.callbacks[0].strength == 3.0


def test_a_second_method_callback_is_refused(tmp_path):
    result = command("fit", "--trainer.callbacks+=IEL", "--trainer.default_root_dir", str(tmp_path), cwd=tmp_path,
                     check=False)
    assert result.returncode == 2
    assert "Expected `trainer.callbacks` to be one ITA / IEL / baseline callback" in result.stderr


def test_bad_input_is_one_line_without_traceback(tmp_path):
    result = command("fit", "--data.num_tasks", "3", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("lightning-taylor: error: Expected `num_tasks`")


@pytest.mark.parametrize("cores, load, processes, threads", [
    (2, 0.1, 1, 2), (2, 2.0, 1, 1), (2, 1.0, 1, 1), (16, 4.2, 2, 6), (4, 9.0, 1, 1), (8, 0.0, 3, 2),
])
def test_threads_follow_the_free_cores(cores, load, processes, threads):
    assert auto_threads(cores, load, processes) == threads


class FakeWriter:  # a TensorBoard SummaryWriter as far as log_matrix is concerned
    def __init__(self):
        self.figures = []

    def add_figure(self, tag, figure, global_step):
        self.figures.append((tag, global_step, len(figure.axes)))


class FakeLogger:
    def __init__(self):
        self.experiment, self.tables = FakeWriter(), []

    def log_table(self, key, columns, data, step):
        self.tables.append((key, columns, data, step))


def test_the_matrix_reaches_loggers_that_take_figures_and_tables():
    matrix = AccuracyMatrix("class_il")
    matrix.add_row(0, [0.9])
    matrix.add_row(1, [0.5, 0.8])
    logger = FakeLogger()
    log_matrix([logger], "val/class_il/accuracy_matrix", matrix, 1)
    assert logger.experiment.figures == [("val/class_il/accuracy_matrix", 1, 2)]  # heatmap + colour bar
    key, columns, data, step = logger.tables[0]
    assert columns == ["after_task", "task_0", "task_1", "average_accuracy", "forgetting"] and step == 1
    assert data[1][:3] == [1, 50.0, 80.0] and data[1][4] == pytest.approx(40.0) and data[0][2] is None


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 2-task ITA run of the command on a tiny random ViT (the data follows its 1 × 16 × 16 input)."""
    cwd = tmp_path_factory.mktemp("command")
    config = {
        "trainer": {"limit_train_batches": 2, "enable_progress_bar": False, "enable_model_summary": False,
                    "callbacks": [
                        {"class_path": "ITA", "init_args": {"alpha": 1.0, "rank": 2, "head_fisher_samples": 16,
                                                            "pretuning": {"probe_epochs": 1, "align_epochs": 1,
                                                                          "align_epochs_per_task": 1,
                                                                          "samples_per_class": 16}}},
                        {"class_path": "ContinualEvaluation"},
                        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                         "init_args": {"save_last": "link", "save_on_train_epoch_end": True}}]},
        "model": {"model_name": "vit_tiny_patch16_224", "pretrained": False, "model_kwargs": TINY},
        "data": {"num_tasks": 5, "epochs_per_task": 1},
    }
    (cwd / "tiny.yaml").write_text(yaml.safe_dump(config))
    command("fit", "--config", "tiny.yaml", cwd=cwd)
    return cwd, cwd / DEMO_DIR / "version_0"  # the trainer defaults' root: the config sets none


def test_a_run_directory_holds_the_run(run_dir):
    cwd, run = run_dir
    names = {p.name for p in run.iterdir()}
    assert {"config.yaml", "metrics.csv", "deltas.safetensors", "fisher.safetensors", "accuracy_class_il.csv",
            "checkpoints"} <= names
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if not p.is_symlink()) != []
    assert len([p for p in (run / "checkpoints").iterdir() if not p.is_symlink()]) == 1  # one checkpoint kept
    with open(run / "metrics.csv") as handle:
        header = next(csv.reader(handle))
    assert "val/class_il/forgetting" in header and "val/task_il/avg_acc" in header


def test_test_and_validate_work_from_the_run_directory_alone(run_dir):
    cwd, run = run_dir
    result = command("test", "--ckpt_path", str(run), cwd=cwd)
    out = result.stdout + result.stderr  # Lightning logs to stderr, tables go to stdout
    line = next(l for l in out.splitlines() if l.startswith("test class_il accuracy (%):"))
    final = open(run / "accuracy_class_il.csv").read().splitlines()[-1].split(",")
    assert line.endswith(f"avg {100 * float(final[-2]):.2f}")  # the fit's final average accuracy
    assert (run / "test" / "version_0").is_dir() and not (run.parent / "version_1").exists()
    result = command("validate", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), cwd=cwd)
    out = result.stdout + result.stderr
    assert "val/class_il/avg_acc" in out


def test_a_refused_resume_leaves_the_run_untouched(run_dir):
    cwd, run = run_dir
    config = (run / "config.yaml").read_text()
    result = command("fit", "--ckpt_path", str(run), "--data.num_tasks", "2", cwd=cwd, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "Expected `num_tasks` to be 5 (what checkpoint" in result.stderr
    assert (run / "config.yaml").read_text() == config and not (run.parent / "version_1").exists()


def test_a_resumed_fit_continues_in_its_run_directory(run_dir):
    cwd, run = run_dir
    rows_before = len(open(run / "metrics.csv").read().splitlines())
    command("fit", "--ckpt_path", str(run), cwd=cwd)
    assert not (run.parent / "version_1").exists()
    assert len(open(run / "metrics.csv").read().splitlines()) >= rows_before  # kept, not deleted


def test_hub_weights_offline_are_one_line_naming_the_ways_out(tmp_path):
    env_home = {"HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch")}
    old = {k: os.environ.get(k) for k in env_home}
    os.environ.update(env_home)  # an empty cache: nothing to fall back on
    try:
        result = command("fit", "--model.pretrained", "true", "--model.model_name", "vit_tiny_patch16_224",
                         cwd=tmp_path, check=False)
    finally:
        for key, value in old.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert "vit_tiny_patch16_224" in message and "--model.pretrained PATH" in message and "HF_HOME" in message
