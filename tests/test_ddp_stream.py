"""DDP end to end: 2 CPU processes (gloo) run a 3-task ITA stream as 1 process does with the same global batch.

``tests/ddp_job.py`` runs the stream on the embedded backbone (so the accuracies are not chance) and every rank
saves what it holds. Two launchers: ``strategy="ddp"`` started as a plain script (Lightning starts the
second rank) and torchrun (the multi-node launcher of the README). Each rank runs batches of 16, the
single process batches of 32, on the same global order (``StreamSampler``).

Compared: the accuracy matrix within 1e-4 (it comes out equal); the Fisher, the pre-tuned head and the
trained head within float tolerance; the deltas within 1e-5 — Adam divides each gradient by its running
RMS, so for the entries whose gradients are rounding noise the different summation order of the DDP
all-reduce shows at that level. The ranks themselves must agree bit for bit.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

JOB = Path(__file__).with_name("ddp_job.py")
LAUNCH = {
    "one process": [sys.executable, str(JOB)],
    "lightning": [sys.executable, str(JOB)],
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(JOB)],
}


def launch(how: str, out: Path, *options: str) -> list[dict]:
    """Run tests/ddp_job.py (``options``: more of its arguments) and load every rank's state."""
    devices, batch_size = (1, 32) if how == "one process" else (2, 16)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([*LAUNCH[how], str(out), "--devices", str(devices), "--batch-size", str(batch_size),
                             *options], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(devices)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    (state,) = launch("one process", tmp_path_factory.mktemp("one_process"))
    return state


def assert_close(a: dict, b: dict, rtol: float, atol: float, part: str) -> None:
    assert a.keys() == b.keys(), part
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=lambda m: f"{part} {key}: {m}")


@pytest.mark.parametrize("how", ["lightning", "torchrun"])
def test_two_processes_match_one_and_each_other(one_process, how, tmp_path):
    ranks = launch(how, tmp_path)
    assert [state["world_size"] for state in ranks] == [2, 2]
    for part in ("deltas", "head", "fisher", "pretuned"):
        for key, value in ranks[0][part].items():  # every rank ends with identical state
            assert torch.equal(value, ranks[1][part][key]), f"{part} {key} differs between ranks"
    assert ranks[0]["matrix"] == ranks[1]["matrix"]

    single, double = one_process, ranks[0]
    assert double["fisher_count"] == single["fisher_count"] == sum((291, 288, 290))  # every example once
    assert [len(row) for row in double["matrix"]] == [1, 2, 3]
    for row, expected in zip(double["matrix"], single["matrix"]):
        assert row == pytest.approx(expected, abs=1e-4)
    assert max(single["matrix"][0]) > 0.55  # the stream learns: not a comparison of chance-level models
    assert_close(double["fisher"], single["fisher"], rtol=1e-5, atol=0, part="fisher")
    assert_close(double["pretuned"], single["pretuned"], rtol=1e-5, atol=1e-7, part="pretuned head")
    assert_close(double["head"], single["head"], rtol=1e-5, atol=1e-6, part="head")
    assert_close(double["deltas"], single["deltas"], rtol=1e-4, atol=1e-5, part="deltas")
    assert any(value.abs().max() > 1e-4 for key, value in single["deltas"].items() if "lora_B_task" in key)
