"""Editing a finished run (lightning_taylor.runs.edit): loading, the edit algebra, masking, export, the CLI."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from finished_run import TASKS, TINY, copy_run
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lightning_taylor import cli as cli_module
from lightning_taylor.deltas.composition import uniform
from lightning_taylor.runs import (
    Edit,
    apply_edit,
    evaluate,
    export,
    load_run,
    predict,
    removed_tasks,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(finished_run):
    return finished_run


@pytest.fixture(scope="module")
def run(run_dir):
    return load_run(run_dir)


@pytest.fixture(scope="module")
def images(run):
    return torch.stack([run.datamodule.tasks_dataset(range(TASKS), "test")[i][0] for i in range(0, 96, 3)])


def hand_built(run, weights_of_layer) -> torch.nn.Module:
    """A plain timm model with W0 + Σ_s w_s τ_s written into each target layer (no hooks)."""
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **TINY).eval()
    plain.load_state_dict(run.model.backbone.state_dict())
    with torch.no_grad():
        for name in run.deltas.names:
            for task, w in weights_of_layer(name).items():
                plain.get_submodule(name).weight += w * run.deltas.task_delta(name, task)
    return plain


def logits_of(run, composition, images, mask=None):
    return predict(run.model, [(images, torch.zeros(len(images)))], composition, mask)[0]


def test_load_run_reproduces_the_composed_logits(run_dir, run, images):
    assert (run.deltas.style, run.deltas.rank, run.deltas.qkv_rank_factor) == ("lora", 2, 3)
    assert run.tasks == [0, 1, 2] and run.info == {"algorithm": "ita", "strength": "1.0"}
    assert run.model_kwargs == {**TINY, "num_classes": 10} and run.datamodule.image_size == 16
    composed = logits_of(run, uniform(run.tasks), images)
    reference = hand_built(run, lambda name: {t: 1 / 3 for t in range(TASKS)})(images)
    torch.testing.assert_close(composed, reference, rtol=1e-5, atol=1e-5)
    # the deltas file gives the same model
    from_file = load_run(run_dir, deltas=run_dir / "deltas.safetensors")
    torch.testing.assert_close(logits_of(from_file, uniform(from_file.tasks), images), composed, rtol=0, atol=0)
    # evaluation covers the seen tasks, and matches accuracies computed by hand
    result = evaluate(run.model, run.datamodule)
    assert len(result["class_il"]) == len(result["task_il"]) == TASKS
    logits, targets = predict(run.model, [next(iter(torch.utils.data.DataLoader(
        run.datamodule.tasks_dataset(range(TASKS), "test"), batch_size=10_000)))], uniform(run.tasks))
    correct = logits[:, : 2 * TASKS].argmax(1) == targets
    for task in range(TASKS):
        assert result["class_il"][task] == pytest.approx(correct[targets // 2 == task].double().mean().item())


def test_edit_algebra():
    tasks = [0, 1, 2, 3]
    assert Edit(drop=(1,)).composition(tasks).weights == {0: 0.25, 1: 0.0, 2: 0.25, 3: 0.25}
    assert Edit(drop=(1,), renormalise=True).composition(tasks).weights == pytest.approx({0: 1 / 3, 1: 0, 2: 1 / 3, 3: 1 / 3})
    assert Edit(keep=(0, 2)).composition(tasks).weights == pytest.approx({0: 0.5, 1: 0, 2: 0.5, 3: 0})
    assert Edit(keep=(0, 2), drop=(2,)).composition(tasks).weights == pytest.approx({0: 0.5, 1: 0, 2: 0, 3: 0})
    assert Edit(factors={3: 2.0}).composition(tasks).weights == {0: 0.25, 1: 0.25, 2: 0.25, 3: 0.5}
    comp = Edit(layer_factors=(("blocks.0.*", {1: 0.0}),)).composition(tasks)
    assert comp.for_layer("blocks.0.mlp.fc1") == {0: 0.25, 1: 0.0, 2: 0.25, 3: 0.25}
    assert comp.for_layer("blocks.1.mlp.fc1") == {0: 0.25, 1: 0.25, 2: 0.25, 3: 0.25}
    layers = ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    assert removed_tasks(comp, layers) == []
    assert removed_tasks(Edit(layer_factors=(("blocks.*", {1: 0.0}),)).composition(tasks), layers) == [1]
    assert removed_tasks(Edit(keep=(3,)).composition(tasks), layers) == [0, 1, 2]
    assert Edit(drop=(1,), mask_removed=True).name == "drop1_mask"
    with pytest.raises(ValueError, match="Unknown"):
        Edit(drop=(7,)).composition(tasks)


@pytest.mark.parametrize("k", range(TASKS))
def test_dropping_a_task_equals_composing_without_it(run, images, k):
    dropped = logits_of(run, Edit(drop=(k,)).composition(run.tasks), images)
    reference = hand_built(run, lambda name: {t: 1 / 3 for t in range(TASKS) if t != k})(images)
    torch.testing.assert_close(dropped, reference, rtol=1e-5, atol=1e-5)
    assert (dropped - logits_of(run, uniform(run.tasks), images)).abs().max() > 1e-2  # not vacuous
    kept = logits_of(run, Edit(keep=(k,)).composition(run.tasks), images)
    torch.testing.assert_close(kept, hand_built(run, lambda name: {k: 1.0})(images), rtol=1e-5, atol=1e-5)


def test_per_layer_factors(run, images):
    edit = Edit(factors={0: 2.0}, layer_factors=(("blocks.0.*", {1: 0.0, 2: 0.5}),))
    edited = logits_of(run, edit.composition(run.tasks), images)
    expected = hand_built(run, lambda name: {0: 2 / 3, 1: 0.0, 2: 1 / 6} if name.startswith("blocks.0.")
                          else {0: 2 / 3, 1: 1 / 3, 2: 1 / 3})(images)
    torch.testing.assert_close(edited, expected, rtol=1e-5, atol=1e-5)
    assert apply_edit(run, edit).removed == []


def test_masking_makes_removed_classes_impossible(run, images):
    masked = apply_edit(run, Edit(drop=(1,), mask_removed=True))
    plain = apply_edit(run, Edit(drop=(1,)))
    assert masked.removed == plain.removed == [1]
    assert masked.masked_classes == [2, 3] and plain.masked_classes == []
    assert masked.before == plain.before and masked.after["class_il"][1] == 0.0
    assert math.isnan(masked.after["task_il"][1]) and not math.isnan(plain.after["task_il"][1])
    for task in (0, 2):  # masking can only help the other tasks
        assert masked.after["class_il"][task] >= plain.after["class_il"][task]
    composition = masked.composition
    logits = logits_of(run, composition, images, mask=[2, 3])
    assert torch.isneginf(logits[:, [2, 3]]).all()
    assert not set(logits.argmax(1).tolist()) & {2, 3}
    torch.testing.assert_close(logits[:, [0, 1, 4, 5]], logits_of(run, composition, images)[:, [0, 1, 4, 5]])


PLAIN_LOADER = """
import json, sys
import safetensors
import safetensors.torch
import timm
import torch

model_path, inputs_path, out_path = sys.argv[1:]
with safetensors.safe_open(model_path, "pt") as f:
    meta = f.metadata()
model = timm.create_model(meta["model_name"], pretrained=False, **json.loads(meta["model_kwargs"])).eval()
model.load_state_dict(safetensors.torch.load_file(model_path))
with torch.no_grad():
    logits = model(safetensors.torch.load_file(inputs_path)["x"])
safetensors.torch.save_file({"logits": logits}, out_path)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "lightning_taylor", "pytorch_lightning"))))
"""


def test_export_loads_with_plain_timm_in_a_fresh_process(run, images, tmp_path):
    edit = Edit(drop=(1,), layer_factors=(("blocks.1.*", {0: 0.5}),), mask_removed=True)
    composition = edit.composition(run.tasks)
    path = export(run, tmp_path / "merged.safetensors", composition, [2, 3])
    expected = logits_of(run, composition, images, mask=[2, 3])
    # the model is back to the unmasked head and the hooks still compose (export does not merge in place)
    assert not run.deltas.merged and torch.isfinite(logits_of(run, composition, images)).all()
    save_file({"x": images.contiguous()}, tmp_path / "x.safetensors")
    script = tmp_path / "load.py"
    script.write_text(PLAIN_LOADER)
    done = subprocess.run([sys.executable, str(script), str(path), str(tmp_path / "x.safetensors"),
                           str(tmp_path / "out.safetensors")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []  # nothing of ours or Lightning's was imported
    logits = load_file(tmp_path / "out.safetensors")["logits"]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)  # -inf in the masked columns on both sides
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["masked_classes"]) == [2, 3] and meta["classes_per_task"] == "2"
    assert json.loads(meta["composition"]) == pytest.approx({"0": 1 / 3, "1": 0.0, "2": 1 / 3})
    assert json.loads(meta["layer_factors"]) == [["blocks.1.*", {"0": 0.5}]]
    assert len(json.loads(meta["class_names"])) == 10


def test_cli_edit_end_to_end(run_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["lightning-taylor", "edit", str(run_dir / "checkpoints" / "last.ckpt"),
                                      "--drop", "1", "--factor", "0=0.5", "--layer-factor", "blocks.0.*:2=0",
                                      "--mask-removed", "--output-dir", str(out), "--export",
                                      str(out / "merged.safetensors")])
    cli_module.main()
    printed = capsys.readouterr().out
    assert "class-IL before" in printed and "removed" in printed
    rows = (out / "edit_accuracy.csv").read_text().splitlines()
    assert rows[0].split(",")[:4] == ["task", "coefficient", "removed", "class_il_before"]
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "1", "2", "average"]
    summary = json.loads((out / "edit.json").read_text())
    assert summary["removed_tasks"] == [1] and summary["masked_classes"] == [2, 3]
    assert summary["composition"] == pytest.approx({"0": 1 / 6, "1": 0.0, "2": 1 / 3})
    assert summary["after"]["class_il"][1] == 0.0
    assert (out / "merged.safetensors").stat().st_size > 0


def test_cli_rejects_bad_factors(run_dir):
    from lightning_taylor.cli.edit import main

    with pytest.raises(ValueError, match="TASK=FACTOR"):
        main([str(run_dir), "--factor", "0:0.5"])
    with pytest.raises(ValueError, match="PATTERN:TASK=FACTOR"):
        main([str(run_dir), "--layer-factor", "1=0"])


def test_load_run_is_ready_to_evaluate_and_falls_back_on_config_yaml(run_dir, images, tmp_path):
    fresh = load_run(run_dir / "checkpoints" / "last.ckpt")  # a checkpoint alone
    with torch.no_grad():
        deployed = fresh.model(images)  # composed uniformly on load: the deployed model, ready for test / validate
    torch.testing.assert_close(deployed, logits_of(fresh, uniform(fresh.tasks), images), rtol=0, atol=0)
    # a checkpoint without the data's hyper-parameters: LightningCLI's config.yaml next to checkpoints/ has them
    copy = copy_run(run_dir, tmp_path / "run")
    state = torch.load(copy / "checkpoints" / "last.ckpt", weights_only=True)
    data = state.pop("datamodule_hyper_parameters")
    torch.save(state, copy / "checkpoints" / "last.ckpt")
    (copy / "deltas.safetensors").unlink()
    with pytest.raises(ValueError, match="`checkpoint`.*config.yaml"):
        load_run(copy)
    config = {"model": {"lr": 0.01},
              "data": {"class_path": "lightning_taylor.data.TaskStreamDataModule", "init_args": data},
              "trainer": {"callbacks": [{"class_path": "lightning_taylor.callbacks.ITA", "init_args": {"alpha": 7}}]}}
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    loaded = load_run(copy)
    assert loaded.info == {"algorithm": "ita", "strength": "7.0"} and loaded.config == config
    assert loaded.datamodule.image_size == 16 and loaded.datamodule.num_tasks == 5
    assert evaluate(loaded.model, loaded.datamodule) == evaluate(fresh.model, fresh.datamodule)
    # nor the module's: its config section, with the classes linked from the data as LightningCLI does
    state.pop("hyper_parameters")
    torch.save(state, copy / "checkpoints" / "last.ckpt")
    config["model"] = {"model_name": "vit_tiny_patch16_224", "pretrained": False, "model_kwargs": TINY}
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    loaded = load_run(copy)
    assert loaded.model.hparams.num_classes == 10 and loaded.model.hparams.classes_per_task == 2
    assert evaluate(loaded.model, loaded.datamodule) == evaluate(fresh.model, fresh.datamodule)


def test_the_command_prints_the_table_and_where_files_went_nothing_else(run_dir, tmp_path):
    out, merged = tmp_path / "out", tmp_path / "merged.safetensors"
    done = subprocess.run([sys.executable, "-m", "lightning_taylor.cli", "edit", str(run_dir), "--drop", "1",
                           "--output-dir", str(out), "--export", str(merged)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 0, done.stderr
    # No library INFO lines (e.g. the backbone's "pretrained=False"), no warnings; only the note that this
    # fixture's run stopped after 3 of its 5 tasks.
    assert [line.split(" is incomplete:")[0] for line in done.stderr.splitlines()] == [
        f"lightning-taylor edit: note: the run {run_dir}"]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("Edit drop1: composition") and lines[2].startswith("-----")
    assert [r.split()[0] for r in lines[3:7]] == ["0", "1*", "2", "average"]
    assert lines[-2:] == [f"Accuracies written to {out / 'edit_accuracy.csv'} and {out / 'edit.json'}",
                          f"Merged model written to {merged}"]
    assert len(lines) == 10 and merged.is_file()
