"""Editing and export fail loudly: every refused input names itself, and nothing non-finite is written."""

import json
import math
import socket
from pathlib import Path

import pytest
import torch
from finished_run import TINY, copy_run
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lightning_taylor.cli.edit import main
from lightning_taylor.deltas import TaskDeltas, export_merged, load_merged
from lightning_taylor.deltas.composition import Composition, reweight, uniform
from lightning_taylor.errors import WriteError
from lightning_taylor.runs import export, load_run
from lightning_taylor.runs.evaluate import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """A private copy of the shared run, for tests that damage it or write into it."""
    return copy_run(finished_run, tmp_path / "run")


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def metadata_of(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def assert_written_tensors_finite(paths) -> None:
    """Every tensor file among ``paths`` holds finite values only."""
    for path in paths:
        if path.suffix == ".safetensors":
            tensors = load_file(path)
        elif path.suffix == ".ckpt":
            tensors = torch.load(path, weights_only=True)["state_dict"]
        else:
            raise AssertionError(f"unexpected file {path}")
        for name, value in tensors.items():
            assert torch.isfinite(value).all(), f"{path}: {name}"


# ------------------------------------------------------------------------------------------- factors
@pytest.mark.parametrize("args, name", [
    (["--factor", "0=nan"], "--factor"),
    (["--factor", "1=inf"], "--factor"),
    (["--factor", "0=0.5,2=-inf"], "--factor"),
    (["--layer-factor", "blocks.0.*:1=inf"], "--layer-factor"),
])
def test_non_finite_factors_are_refused_before_anything_is_written(run_copy, args, name):
    before = files_under(run_copy)
    with pytest.raises(ValueError, match=f"`{name}`.*finite"):
        main([str(run_copy), *args, "--export", str(run_copy / "merged.safetensors")])
    assert files_under(run_copy) == before


def test_python_api_refuses_non_finite_factors_and_coefficients(finished_run, tmp_path):
    with pytest.raises(ValueError, match=r"`factors`.*Task 0 has nan"):
        reweight(uniform([0, 1]), {0: math.nan})
    with pytest.raises(ValueError, match=r"`factors`.*Task 1 has inf"):
        reweight(uniform([0, 1]), {1: math.inf}, layers="blocks.0.*")
    with pytest.raises(ValueError, match=r"`weights`.*Task 1 has -inf"):
        Composition({0: 0.5, 1: -math.inf})
    with pytest.raises(ValueError, match=r"`layer_factors\['blocks.\*'\]`"):
        Composition({0: 1.0}, (("blocks.*", {0: math.nan}),))
    run = load_run(finished_run)
    with pytest.raises(ValueError, match="`weights`"):
        export(run, tmp_path / "nan.safetensors", {0: math.nan, 1: 0.5, 2: 0.5})
    # finite, but too large for float32: the merged weights overflow, and nothing is written
    with pytest.raises(ValueError, match="non-finite values; nothing was written"):
        export(run, tmp_path / "overflow.safetensors", {0: 1e39, 1: 0.0, 2: 0.0})
    with pytest.raises(ValueError, match="logits .* NaN or inf"):
        evaluate(run.model, run.datamodule, {0: 1e39, 1: 0.0, 2: 0.0})
    assert files_under(tmp_path) == set()


def test_a_layer_pattern_matching_nothing_is_an_error_listing_layers(run_copy):
    before = files_under(run_copy)
    with pytest.raises(ValueError, match=r"`layer_factors`.*'no_match\.\*'.*blocks\.0\.attn\.qkv"):
        main([str(run_copy), "--layer-factor", "no_match.*:1=0"])
    assert files_under(run_copy) == before


# ------------------------------------------------------------------------------------------- inputs
def test_a_corrupt_deltas_file_is_named(run_copy):
    garbage = run_copy / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file" * 10)
    before = files_under(run_copy)
    with pytest.raises(ValueError, match=f"`deltas`.*{garbage.name}.*Reading it failed"):
        main([str(run_copy), "--deltas", str(garbage), "--drop", "1"])

    tensors = load_file(run_copy / "deltas.safetensors")
    name = sorted(tensors)[3]
    tensors[name].view(-1)[0] = math.nan
    poisoned = run_copy / "poisoned.safetensors"
    save_file(tensors, poisoned, metadata=metadata_of(run_copy / "deltas.safetensors"))
    before.add(poisoned)
    with pytest.raises(ValueError, match=f"`deltas`.*{poisoned.name}.*`{name}` has 1 of .* is NaN"):
        main([str(run_copy), "--deltas", str(poisoned), "--drop", "1"])
    assert files_under(run_copy) == before  # no edits/ folder, no export


@pytest.mark.parametrize("key", ["backbone.head.weight", "task_deltas.blocks.1.mlp.fc2.lora_B_task0",
                                 "backbone.blocks.0.attn.qkv.weight"])
def test_damaged_checkpoint_bytes_are_found_and_named(run_copy, key):
    checkpoint = run_copy / "checkpoints" / "last.ckpt"
    value = torch.load(checkpoint, weights_only=True)["state_dict"][key]
    data = bytearray(checkpoint.read_bytes())
    start = data.find(value.numpy().tobytes())
    assert start >= 0
    data[start:start + 8] = b"\xff" * 8  # NaN bit patterns in place: the file still loads
    checkpoint.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"`checkpoint`.*last.ckpt.*`{key}` has .* NaN"):
        load_run(run_copy)
    with pytest.raises(ValueError, match=f"`{key}`"):
        main([str(run_copy), "--drop", "0"])
    assert not (run_copy / "edits").exists()


def test_a_crafted_checkpoint_neither_downloads_nor_creates_folders(run_copy, tmp_path, monkeypatch):
    checkpoint = run_copy / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, weights_only=True)
    elsewhere = tmp_path / "elsewhere" / "data"
    state["datamodule_hyper_parameters"].update(dataset="cifar100", root=str(elsewhere), download=True,
                                                num_tasks=10)
    torch.save(state, checkpoint)
    connections = []
    monkeypatch.setattr(socket.socket, "connect", lambda self, *a: connections.append(a) or 1 / 0)
    before = files_under(tmp_path)
    with pytest.raises(ValueError, match=r"`data_root`.*cifar100.*--data-root"):
        main([str(run_copy), "--drop", "0"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"`data_root`.*empty.*--data-root"):
        main([str(run_copy), "--drop", "0", "--data-root", str(empty)])
    assert connections == [] and not elsewhere.parent.exists() and list(empty.iterdir()) == []
    assert files_under(tmp_path) == before


def test_a_digits_run_that_asked_to_download_is_loaded_without(run_copy):
    checkpoint = run_copy / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, weights_only=True)
    state["datamodule_hyper_parameters"]["download"] = True
    torch.save(state, checkpoint)
    assert load_run(run_copy).datamodule.download is False


# ------------------------------------------------------------------------------------------ outputs
def test_output_folders_are_named_after_the_input_and_never_overwritten(run_copy):
    scaled = {k: 2 * v for k, v in load_file(run_copy / "deltas.safetensors").items()}
    save_file(scaled, run_copy / "deltas_b.safetensors", metadata=metadata_of(run_copy / "deltas.safetensors"))
    main([str(run_copy), "--drop", "1"])
    main([str(run_copy), "--drop", "1", "--deltas", str(run_copy / "deltas.safetensors")])
    main([str(run_copy), "--drop", "1", "--deltas", str(run_copy / "deltas_b.safetensors")])
    folders = {p.parent.relative_to(run_copy / "edits").as_posix(): json.loads(p.read_text())
               for p in (run_copy / "edits").rglob("edit.json")}
    assert sorted(folders) == ["deltas/drop1", "deltas_b/drop1", "last/drop1"]
    assert folders["deltas/drop1"]["after"] != folders["deltas_b/drop1"]["after"]  # really other inputs
    assert folders["deltas_b/drop1"]["deltas"].endswith("deltas_b.safetensors")

    table = run_copy / "edits" / "deltas_b" / "drop1" / "edit_accuracy.csv"
    kept = table.read_text()
    with pytest.raises(ValueError, match=r"`--output-dir`.*deltas_b.*--overwrite"):
        main([str(run_copy), "--drop", "1", "--deltas", str(run_copy / "deltas_b.safetensors")])
    assert table.read_text() == kept
    main([str(run_copy), "--drop", "1", "--deltas", str(run_copy / "deltas_b.safetensors"), "--overwrite"])

    merged = run_copy / "merged.safetensors"
    main([str(run_copy), "--keep", "0", "--export", str(merged)])
    exported = merged.read_bytes()
    with pytest.raises(ValueError, match=r"`--export`.*merged.safetensors.*--overwrite"):
        main([str(run_copy), "--keep", "2", "--export", str(merged)])
    assert merged.read_bytes() == exported
    # different per-layer factors get different folders
    main([str(run_copy), "--layer-factor", "blocks.0.*:1=0"])
    main([str(run_copy), "--layer-factor", "blocks.1.*:1=0"])
    assert len(list((run_copy / "edits" / "last").glob("layers1-*"))) == 2


def test_a_failed_export_keeps_the_accuracies_and_says_so(run_copy, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = tmp_path / "out"
    before = files_under(tmp_path) | files_under(run_copy)
    with pytest.raises(WriteError, match=r"merged model to .*a_file.*\(ENOTDIR\).*The accuracies are saved"):
        main([str(run_copy), "--drop", "1", "--output-dir", str(out), "--export", str(blocker / "m.safetensors")])
    written = (files_under(tmp_path) | files_under(run_copy)) - before
    assert written == {out / "edit_accuracy.csv", out / "edit.json"}
    summary = json.loads((out / "edit.json").read_text())
    assert len(summary["after"]["class_il"]) == 3 and "export" not in summary


def test_a_successful_export_is_finite_and_recorded(run_copy, tmp_path):
    out, merged = tmp_path / "out", tmp_path / "models" / "m.safetensors"
    main([str(run_copy), "--factor", "0=2", "--output-dir", str(out), "--export", str(merged)])
    assert json.loads((out / "edit.json").read_text())["export"] == str(merged)
    assert_written_tensors_finite([merged])
    assert sorted(p.name for p in merged.parent.iterdir()) == ["m.safetensors"]  # no partial file left


# ---------------------------------------------------------------------------------------- load_merged
def merged_file(path: Path, **meta: str) -> Path:
    save_file({"x": torch.zeros(1)}, path, metadata={"format": "lightning-taylor/merged/1",
                                                    "model_name": "vit_tiny_patch16_224",
                                                    "model_kwargs": json.dumps(TINY), **meta})
    return path


@pytest.mark.parametrize("meta, match", [
    ({"model_kwargs": json.dumps({**TINY, "checkpoint_path": "/elsewhere/w.pth"})}, "`model_kwargs`.*checkpoint_path"),
    ({"model_kwargs": json.dumps({**TINY, "pretrained_cfg_overlay": {"file": "w.pth"}})},
     "`model_kwargs`.*pretrained_cfg_overlay"),
    ({"model_kwargs": json.dumps({**TINY, "pretrained": True})}, "`model_kwargs`.*'pretrained'"),
    ({"model_kwargs": json.dumps({**TINY, "img_size": {"file": "x"}})}, r"`model_kwargs\['img_size'\]`"),
    ({"model_name": "hf-hub:timm/vit_tiny_patch16_224.augreg_in21k"}, "`model_name`.*hf-hub"),
    ({"model_name": "local-dir:/elsewhere/model"}, "`model_name`.*local-dir"),
    ({"model_name": "no_such_model_anywhere"}, "`model_name`"),
    ({"format": "something else"}, "`format`"),
])
def test_load_merged_takes_only_a_timm_name_and_architecture_kwargs(tmp_path, meta, match):
    path = merged_file(tmp_path / "m.safetensors", **meta)
    with pytest.raises(ValueError, match=match) as info:
        load_merged(path)
    assert "m.safetensors" in str(info.value)


def test_load_merged_names_an_unreadable_file(tmp_path):
    path = tmp_path / "text.safetensors"
    path.write_text("hello")
    with pytest.raises(ValueError, match="`path`.*text.safetensors"):
        load_merged(path)


def test_export_merged_writes_only_what_load_merged_accepts(vit, tmp_path):
    deltas = TaskDeltas(vit, rank=2)
    deltas.begin_task(0)
    for kwargs, name in (({"checkpoint_path": "w.pth"}, "vit_tiny_patch16_224"),
                         ({}, "hf-hub:timm/vit_tiny_patch16_224")):
        with pytest.raises(ValueError, match="`model_"):
            export_merged(vit, deltas, tmp_path / "m.safetensors", {0: 1.0}, name, kwargs)
    assert list(tmp_path.iterdir()) == []
