"""``pretuned_head.safetensors``: every boundary's head by task, the single-head files of earlier versions, and
files that cannot be read (lightning_taylor/head/pretuned_file.py)."""

import pytest
import torch
from safetensors.torch import save_file

from lightning_taylor.errors import InputError
from lightning_taylor.head import load_pretuned_heads, pretuned_tensors


def head(seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"weight": torch.randn(6, 4, generator=generator), "bias": torch.randn(6, generator=generator)}


def test_heads_by_task_round_trip(tmp_path):
    heads = {0: head(0), 1: head(1), 3: head(3)}
    tensors, metadata = pretuned_tensors(heads)
    assert sorted(tensors) == ["task0.bias", "task0.weight", "task1.bias", "task1.weight", "task3.bias",
                               "task3.weight"]
    save_file(tensors, str(tmp_path / "h.safetensors"), metadata=metadata)
    loaded = load_pretuned_heads(tmp_path / "h.safetensors")
    assert sorted(loaded.by_task) == [0, 1, 3]
    for task, state in heads.items():
        for name, value in state.items():
            assert torch.equal(loaded.head(task)[name], value)
    assert loaded.last is loaded.by_task[3]
    with pytest.raises(InputError, match=r"`task` to be a task whose pre-tuned head .* holds \[0, 1, 3\], but got 2"):
        loaded.head(2)


def test_a_single_head_file_is_the_last_boundarys(tmp_path):
    save_file(head(5), str(tmp_path / "old.safetensors"))
    loaded = load_pretuned_heads(tmp_path / "old.safetensors")
    assert loaded.by_task == {} and torch.equal(loaded.last["weight"], head(5)["weight"])
    with pytest.raises(InputError, match="holds only the last boundary's head"):
        loaded.head(0)


@pytest.mark.parametrize("tensors, metadata, match", [
    ({"w": torch.zeros(2)}, None, r"`tensors` of `.*bad.safetensors` to be per-task heads .* but got \['w'\]"),
    ({"task0.weight": torch.zeros(2, 2)}, {"format": "pretuned_heads", "tasks": "0"},
     r"task<t>.weight and task<t>.bias for the tasks \[0\], but got \['task0.bias'\]"),
    ({"task0.weight": torch.zeros(2, 2)}, {"format": "pretuned_heads", "tasks": "zero"},
     r"`tasks` of .* comma-separated task indices"),
    ({"weight": torch.full((2, 2), float("nan")), "bias": torch.zeros(2)}, None, r"Non-finite values in the pre-tuned"),
])
def test_a_file_that_cannot_be_read_is_named(tensors, metadata, match, tmp_path):
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=metadata)
    with pytest.raises((InputError, FloatingPointError), match=match):
        load_pretuned_heads(tmp_path / "bad.safetensors")
    with pytest.raises(InputError, match="`path` to be a readable safetensors file of pre-tuned heads"):
        load_pretuned_heads(tmp_path / "missing.safetensors")
