"""Mixed precision: the Fisher, the penalty and the head statistics stay float32 whatever the autocast."""

import sys
from pathlib import Path

import pytest
import torch
from conftest import make_vit
from helpers import SeenLogits, randomise_slot, train_stream

from lightning_taylor.curvature import diagonal_fisher
from lightning_taylor.deltas import TaskDeltas
from lightning_taylor.penalties import delta_penalty

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from gpu_check import stream  # noqa: E402  (the 2-task fit the GPU check runs, here on the CPU)


def test_fisher_and_penalty_ignore_a_surrounding_autocast(images):
    vit = make_vit(dtype=torch.float32)
    deltas = TaskDeltas(vit, rank=2)
    train_stream(deltas, 2)
    deltas.begin_task(2)
    randomise_slot(deltas, 3)
    names = [f"model.{n}.weight" for n in deltas.names]
    curvature = {f"{n}.weight": torch.rand_like(vit.get_submodule(n).weight) for n in deltas.names}
    x = images.float()

    def statistics():
        with deltas.disabled():
            fisher = diagonal_fisher(SeenLogits(vit, 5), [x], names)
        return fisher, delta_penalty(deltas, curvature, "iel", 2.0)

    fisher, (value, grads) = statistics()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (x @ x[0, 0]).dtype == torch.bfloat16  # the autocast is on
        fisher_bf16, (value_bf16, grads_bf16) = statistics()
    for name in names:
        assert fisher_bf16.sums[name].dtype == torch.float32
        assert torch.equal(fisher_bf16.sums[name], fisher.sums[name])
    assert value_bf16.dtype == torch.float32 and torch.equal(value_bf16, value)
    assert all(torch.equal(grads_bf16[k], grads[k]) and grads[k].dtype == torch.float32 for k in grads)


@pytest.mark.parametrize("algorithm", ["ita", "iel"])
def test_a_bf16_mixed_stream_keeps_its_statistics_in_float32(algorithm, tmp_path):
    """Two tasks under ``bf16-mixed`` (``benchmarks/gpu_check.py``'s fit, tiny ViT on digits): the forward ran
    in bfloat16, and the task-boundary statistics (computed at θ0, so independent of the training) are bit for
    bit those of a float32 fit."""
    mixed = stream(algorithm, "cpu", "bf16-mixed", str(tmp_path))
    full = stream(algorithm, "cpu", "32-true", str(tmp_path))
    assert mixed["forward"] == {torch.bfloat16} and full["forward"] == {torch.float32}
    assert any(k.startswith("fisher_past.") for k in mixed["statistics"])  # task 0's Fisher, and task 1's
    for key, value in mixed["statistics"].items():  # Fisher sums, pre-tuned head, head Fisher
        assert value.dtype == torch.float32 and torch.equal(value, full["statistics"][key]), key
    penalty = mixed["penalty"]
    assert penalty.dtype == torch.float32 and torch.isfinite(penalty) and penalty > 0
    assert mixed["banked"] == [0, 1] and mixed["finite"]
