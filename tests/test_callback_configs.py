"""The ready-made callback lists of ``callbacks/`` on a LightningCLI project that is not ours.

``foreign_project/cli.py`` is someone else's LightningCLI script (its own module, data and config). Every file of
``callbacks/`` parses there into exactly the callbacks its Python equivalent builds; every way of adding one that
the README documents works, and the ways it says do not work fail as it says; and the combined file, added on
the command line, runs a two-task stream to the same banked deltas and accuracy matrices as the Python API.
"""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from foreign_project.cli import SyntheticStream, TaskClassifier, main
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary
from safetensors.torch import load_file

from lightning_taylor.callbacks import IEL, ITA, ContinualEvaluation, FaultTolerance

REPO = Path(__file__).parents[1]
CALLBACKS = REPO / "callbacks"
CONFIG = REPO / "tests" / "foreign_project" / "config.yaml"
COMBINED = CALLBACKS / "ita_eval_checkpoint.yaml"

ITA_ARGS = dict(alpha=0.02, lambda_fisher=0.025, lambda_l2=0.001, style="lora", rank=16, fisher_estimator="exact")
#: What each file means, written with the Python API.
EQUIVALENTS = {
    "ita.yaml": lambda: [ITA(**ITA_ARGS)],
    "ita_mc.yaml": lambda: [ITA(**{**ITA_ARGS, "fisher_estimator": "mc"}, fisher_samples=1)],
    "iel.yaml": lambda: [IEL(beta=20.0, lambda_fisher=0.1, lambda_l2=0.001, style="lora", rank=16)],
    "continual_evaluation.yaml": lambda: [ContinualEvaluation()],
    "checkpoint.yaml": lambda: [ModelCheckpoint(save_last="link", save_on_train_epoch_end=True)],
    "fault_tolerance.yaml": lambda: [FaultTolerance(check_folders=True)],
    "ita_eval_checkpoint.yaml": lambda: [ITA(**ITA_ARGS), ContinualEvaluation(),
                                         ModelCheckpoint(save_last="link", save_on_train_epoch_end=True)],
}
FILES = sorted(path.name for path in CALLBACKS.glob("*.yaml"))


def _plain(value) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)) or dataclasses.is_dataclass(value):
        return True
    if isinstance(value, (list, tuple)):
        return all(map(_plain, value))
    return isinstance(value, dict) and all(_plain(k) and _plain(v) for k, v in value.items())


def settings(callback) -> tuple:
    """A callback's class and its plain attributes (its settings; tensors and helper objects left out)."""
    return type(callback), {k: v for k, v in vars(callback).items() if _plain(v)}


def configured_callbacks(*args: str) -> list:
    """The callbacks the foreign project's LightningCLI builds from ``args`` (without those Lightning adds)."""
    cli = main([str(a) for a in args], run=False)
    return cli.config_init.trainer.callbacks[: len(cli.config.trainer.callbacks)]


def own_callback(callback) -> bool:
    """The foreign project's own callback (from its config.yaml)."""
    return isinstance(callback, ModelSummary) and callback._max_depth == 2


def test_every_file_is_covered_and_plain_ascii():
    assert FILES == sorted(EQUIVALENTS)
    for name in FILES:
        text = (CALLBACKS / name).read_bytes()
        text.decode("ascii")  # jsonargparse reads with the locale's encoding
        assert f"--trainer.callbacks+=path/to/callbacks/{name}" in text.decode(), name  # the header's command
        assert isinstance(yaml.safe_load(text), list), name  # a value of trainer.callbacks, not a config


@pytest.mark.parametrize("name", FILES)
def test_file_parses_to_its_python_equivalent(name):
    built = configured_callbacks("--config", CONFIG, f"--trainer.callbacks+={CALLBACKS / name}")
    assert own_callback(built[0])  # appended: the project's own callback is kept
    assert [settings(c) for c in built[1:]] == [settings(c) for c in EQUIVALENTS[name]()]


def test_combined_file_is_the_three_single_files():
    singles = [f"--trainer.callbacks+={CALLBACKS / n}" for n in ("ita.yaml", "continual_evaluation.yaml",
                                                                 "checkpoint.yaml")]
    repeated = configured_callbacks("--config", CONFIG, *singles)
    combined = configured_callbacks("--config", CONFIG, f"--trainer.callbacks+={COMBINED}")
    assert [settings(c) for c in repeated] == [settings(c) for c in combined]


def test_overlay_config_appends_with_a_path_relative_to_itself(tmp_path):
    overlay = tmp_path / "add_ita.yaml"
    overlay.write_text(f"trainer:\n  callbacks+: {os.path.relpath(COMBINED, tmp_path)}\n")
    built = configured_callbacks("--config", CONFIG, "--config", overlay)
    assert own_callback(built[0])
    assert [settings(c) for c in built[1:]] == [settings(c) for c in EQUIVALENTS[COMBINED.name]()]


def test_own_config_can_take_a_file_as_its_whole_list(tmp_path):
    own = tmp_path / "config.yaml"
    own.write_text(f"trainer:\n  callbacks: {os.path.relpath(COMBINED, tmp_path)}\n")
    built = configured_callbacks("--config", own)
    assert [settings(c) for c in built] == [settings(c) for c in EQUIVALENTS[COMBINED.name]()]


def test_what_does_not_extend_the_list(tmp_path, capsys):
    """A later --config replaces the list; a file is no config, nor an item of a list."""
    later = tmp_path / "later.yaml"
    later.write_text(yaml.safe_dump({"trainer": {"callbacks": yaml.safe_load(COMBINED.read_text())}}))
    built = configured_callbacks("--config", CONFIG, "--config", later)
    assert not any(map(own_callback, built)) and len(built) == 3
    built = configured_callbacks(f"--trainer.callbacks+={COMBINED}", "--config", CONFIG)
    assert len(built) == 1 and own_callback(built[0])  # `+=` before the --config that sets the list: lost
    with pytest.raises(SystemExit):
        configured_callbacks("--config", CONFIG, "--config", COMBINED)
    assert "Unexpected config" in capsys.readouterr().err
    item = tmp_path / "item.yaml"
    item.write_text(f"trainer:\n  callbacks:\n    - {COMBINED}\n")
    with pytest.raises(SystemExit):
        configured_callbacks("--config", item)
    assert "Not a valid subclass of Callback" in capsys.readouterr().err


# -- the combined file on a two-task stream ---------------------------------------------------------------
QUIET = ["--trainer.enable_progress_bar=false"]
SAVED = ("deltas", "fisher", "pretuned_head")  # the files ITA writes at the end of fit


def saved(directory: Path) -> dict:
    return {name: load_file(directory / f"{name}.safetensors") for name in SAVED}


def outcome(model, evaluation, directory: Path) -> dict:
    assert model.task_deltas.banked_tasks == [0, 1]
    return {"module": {k: v.clone() for k, v in model.task_deltas.state_dict().items()}, **saved(directory),
            "matrices": {name: matrix.rows for name, matrix in evaluation.matrices.items()}}


def assert_same_tensors(result: dict, expected: dict, parts) -> None:
    # Tight: the same computation in the same order; a looser tolerance would miss e.g. another alpha.
    for part in parts:
        assert result[part].keys() == expected[part].keys(), part
        for key, value in expected[part].items():
            torch.testing.assert_close(result[part][key], value, rtol=1e-6, atol=1e-9, msg=f"{part} {key}")


def assert_same(result: dict, expected: dict) -> None:
    assert_same_tensors(result, expected, ("module", *SAVED))
    assert any(v.abs().sum() > 0 for k, v in expected["deltas"].items() if "task1" in k)  # non-vacuous
    for name, rows in expected["matrices"].items():
        assert [len(row) for row in result["matrices"][name]] == [1, 2]
        for row, expected_row in zip(result["matrices"][name], rows):
            assert row == pytest.approx(expected_row, abs=1e-6), name


@pytest.fixture(scope="module")
def python_api(tmp_path_factory) -> dict:
    """The same module, data and trainer settings, with ITA and ContinualEvaluation given in Python."""
    config = yaml.safe_load(CONFIG.read_text())
    trainer_settings = {k: v for k, v in config["trainer"].items() if k not in ("callbacks", "default_root_dir")}
    directory = tmp_path_factory.mktemp("python_api")
    L.seed_everything(config["seed_everything"], verbose=False)
    model, data = TaskClassifier(**config["model"]), SyntheticStream(**config["data"])
    evaluation = ContinualEvaluation()
    trainer = L.Trainer(**trainer_settings, default_root_dir=directory, enable_progress_bar=False,
                        callbacks=[ITA(**ITA_ARGS), evaluation])
    trainer.fit(model, data)
    return outcome(model, evaluation, directory)


def test_combined_file_runs_the_stream_like_the_python_api(python_api, tmp_path):
    cli = main(["fit", "--config", str(CONFIG), f"--trainer.callbacks+={COMBINED}",
                f"--trainer.default_root_dir={tmp_path}", *QUIET])
    callbacks = cli.trainer.callbacks
    assert any(map(own_callback, callbacks))
    assert not any(p.requires_grad for p in cli.model.encoder.blocks.parameters())  # θ0 frozen by ITA
    evaluation = next(c for c in callbacks if isinstance(c, ContinualEvaluation))
    assert_same(outcome(cli.model, evaluation, tmp_path), python_api)
    assert (tmp_path / "accuracy_class_il.csv").is_file()
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["epoch"] == 1 and any(key.startswith("ITA") for key in checkpoint["callbacks"])


def test_the_documented_command_in_a_fresh_process(python_api, tmp_path):
    """The README's command, from the repository root, as a user runs it (files read back from disk)."""
    command = [sys.executable, "tests/foreign_project/cli.py", "fit", "--config", "tests/foreign_project/config.yaml",
               "--trainer.callbacks+=callbacks/ita_eval_checkpoint.yaml", f"--trainer.default_root_dir={tmp_path}",
               *QUIET]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_tensors(saved(tmp_path), python_api, SAVED)
    assert (tmp_path / "accuracy_class_il.csv").is_file() and (tmp_path / "checkpoints" / "last.ckpt").is_file()
