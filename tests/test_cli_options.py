"""The method's options from the command line, and command-line errors of a few lines (lightning_taylor/cli/)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightning_taylor.callbacks import IEL, ITA, SecondOrder
from lightning_taylor.cli import cli, main
from lightning_taylor.cli.overrides import METHOD_ARGUMENTS, split_method_options
from lightning_taylor.cli.parser import MAX_DETAIL_LINES, short_message
from lightning_taylor.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def method(parsed) -> SecondOrder:
    (found,) = [c for c in parsed.trainer.callbacks if isinstance(c, SecondOrder)]
    return found


def test_options_are_taken_out_in_both_spellings_and_others_are_left():
    rest, options = split_method_options(
        ["fit", "--method.alpha", "5", "--trainer.callbacks.rank=8", "--trainer.callbacks.save_last", "false",
         "--model.lr", "0.1"])
    assert rest == ["fit", "--trainer.callbacks.save_last", "false", "--model.lr", "0.1"]
    assert options == [("--method.alpha", "alpha", "5"), ("--trainer.callbacks.rank", "rank", "8")]
    with pytest.raises(InputError, match="`--method.alpha` to be a value"):
        split_method_options(["fit", "--method.alpha"])


def test_method_arguments_do_not_shadow_the_checkpoint_callbacks_options():
    """``--trainer.callbacks.NAME`` keeps jsonargparse's meaning (the last callback) for ModelCheckpoint's names."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_taylor.cli.overrides import init_arguments

    assert {"alpha", "beta", "rank", "curvature", "fisher_estimator", "head_alignment"} <= METHOD_ARGUMENTS
    assert not METHOD_ARGUMENTS & set(init_arguments(ModelCheckpoint))


def test_demo_takes_method_options_and_keeps_its_callbacks():
    parsed = cli(["--trainer.callbacks.alpha", "5", "--method.rank", "8", "--method.curvature=kfac",
                  "--method.pretuning.probe_epochs", "7", "--trainer.logger", "false"], run=False)
    ita = method(parsed)
    assert type(ita) is ITA and ita.strength == 5.0 and ita.delta_settings.rank == 8
    assert ita.curvature_settings.kind == "kfac" and ita.pretuning.probe_epochs == 7
    assert ita.head_alignment == "drift_compensated"  # the demo's other settings are kept
    names = [type(c).__name__ for c in parsed.trainer.callbacks]
    assert names.count("ContinualEvaluation") == 1 and names.count("ModelCheckpoint") == 1  # nothing doubled


def test_iel_config_takes_its_strength_and_estimator(tmp_path):
    parsed = cli(["--config", str(ROOT / "configs/digits/iel.yaml"), "--trainer.callbacks.beta", "3",
                  "--method.fisher_estimator", "mc", "--trainer.callbacks.save_last", "false",
                  "--trainer.logger", "false"], run=False)
    iel = method(parsed)
    assert type(iel) is IEL and iel.strength == 3.0 and iel.curvature_settings.estimator == "mc"
    checkpoint = next(c for c in parsed.trainer.callbacks if type(c).__name__ == "ModelCheckpoint")
    assert checkpoint.save_last is False  # jsonargparse's own `--trainer.callbacks.X` still reaches the last one


def test_the_saved_config_holds_the_values_the_run_used(tmp_path):
    """``--print_config`` (like the run's config.yaml) shows the options set on the command line."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli(["--config", str(ROOT / "configs/digits/ita.yaml"), "--method.alpha", "7.5", "--print_config"],
            run=False)
    config = yaml.safe_load(out.getvalue())
    (ita,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith(".ITA")]
    assert ita["init_args"]["alpha"] == 7.5 and len(config["trainer"]["callbacks"]) == 3


def run_main(args, capsys, monkeypatch, traceback=False):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if traceback:
        monkeypatch.setenv("LIGHTNING_TAYLOR_TRACEBACK", "1")
    else:
        monkeypatch.delenv("LIGHTNING_TAYLOR_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as stop:
        main(args)
    return stop.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("args, named", [
    (["fit", "--method.curvature", "kfc"], ["--method.curvature", "'kfc'", "'diagonal', 'kfac'"]),
    (["fit", "--method.alhpa", "3"], ["--method.alhpa", "alpha"]),
    (["fit", "--trainer.callbacks.rank", "abc"], ["--trainer.callbacks.rank", "'abc'", "int"]),
    (["fit", "--model.lr", "abc"], ["model.lr", "abc", "float"]),
    (["fit", "--method.pretuning.probe_epochs", "x"], ["pretuning.probe_epochs", "int", "x"]),
    (["fit", "--data.num_taks", "3"], ["unrecognized arguments", "--data.num_taks"]),
    (["fit", "--trainer.callbacks.monitor", "3", "--trainer.callbacks.save_top_k", "x"], ["save_top_k"]),
])
def test_command_line_mistakes_are_a_few_lines(args, named, capsys, monkeypatch):
    code, lines = run_main(args, capsys, monkeypatch)
    assert code == 2
    assert 1 <= len(lines) <= MAX_DETAIL_LINES + 3, "\n".join(lines)
    text = "\n".join(lines)
    assert all(word in text for word in named), text
    assert "usage:" not in text


def test_the_full_text_is_behind_the_traceback_switch(capsys, monkeypatch):
    code, lines = run_main(["fit", "--model.lr", "abc"], capsys, monkeypatch, traceback=True)
    assert code == 2 and any(line.startswith("usage:") for line in lines) and len(lines) > 20


def test_short_message_keeps_the_key_and_the_reason():
    message = ('Parser key "trainer.callbacks":\n  Does not validate against any of the Union subtypes\n'
               "  Subtypes: [list, Callback, NoneType]\n  Errors:\n"
               "    - Problem with given class_path 'lightning.pytorch.callbacks.ModelCheckpoint':\n"
               "        Option 'alpha' is not accepted\n    - Problem with given class_path 'lightning.Callback':\n"
               "        Option 'alpha' is not accepted\n    - Expected a <class 'NoneType'>\n"
               "  Given value type: <class 'NestedArg'>\n  Given value: NestedArg(key='alpha', val='5')")
    short = short_message(message).splitlines()
    assert short[0] == 'Parser key "trainer.callbacks":' and len(short) <= MAX_DETAIL_LINES + 2
    assert "Option 'alpha' is not accepted" in "\n".join(short) and "Subtypes" not in "\n".join(short)
