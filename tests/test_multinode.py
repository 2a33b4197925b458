"""Two nodes, simulated on this machine over 127.0.0.1: `lightning-taylor fit` as the README launches it.

Each "node" is one process (``--trainer.num_nodes 2 --trainer.devices 1``) started three ways: by torchrun
(``--nnodes 2 --node_rank {0,1} --master_addr 127.0.0.1``), by Lightning's own environment variables
(``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``) and by SLURM's (``SLURM_NTASKS``,
``SLURM_PROCID``, ... as ``srun`` sets them, read by Lightning's ``SLURMEnvironment``). Node 1 runs in its own,
empty working folder, as a second machine would: it must write nothing there, so only global rank 0 writes
the run directory. The run directory must hold what a 1-node × 2-process run of the same config holds:
deltas, Fisher, pre-tuned head and accuracy matrix (the tolerances of tests/test_ddp_stream.py). Every process
is bounded in time and only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
COMMAND = shutil.which("lightning-taylor") or "lightning-taylor"
#: a short digits stream: 2 tasks × 5 classes, one epoch of 3 batches each, Monte-Carlo Fisher
FIT = ["fit", "--config", str(ROOT / "configs/digits/ita.yaml"), "--data.num_tasks", "2",
       "--data.epochs_per_task", "1", "--data.test_fraction", "0.8", "--trainer.limit_train_batches", "3",
       "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
       "--trainer.strategy", "ddp", "--method.fisher_estimator", "mc", "--threads", "1"]
RUN = Path("runs/digits/ita/version_0")
TIMEOUT = 420


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def base_env() -> dict[str, str]:
    drop = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK", "GROUP_RANK")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("SLURM_", "TORCHELASTIC"))}
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PL_DISABLE_FORK": "1"}


def start(commands: list[tuple[list[str], dict[str, str], Path]]) -> list[subprocess.Popen]:
    """Start every (command, environment, working folder) at once."""
    return [subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for cmd, env, cwd in commands]


def finish(processes: list[subprocess.Popen]) -> list[str]:
    """Every process's output, each waited for at most :data:`TIMEOUT`; any still running is killed."""
    try:
        return [process.communicate(timeout=TIMEOUT)[0] for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()


def run_nodes(commands: list[tuple[list[str], dict[str, str], Path]]) -> None:
    """Start every command at once; all must end with status 0 in time."""
    processes = start(commands)
    outputs = finish(processes)
    for node, (process, output) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, f"node {node} exited {process.returncode}:\n{output[-4000:]}"


def two_nodes(how: str, tmp_path: Path) -> Path:
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for folder in nodes:
        folder.mkdir()
    port = free_port()
    args = [*FIT, "--trainer.num_nodes", "2", "--trainer.devices", "1"]
    commands = []
    for rank, cwd in enumerate(nodes):
        env = base_env()
        if how == "torchrun":
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                   "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port), COMMAND, *args]
        elif how == "environment":
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK=str(rank), LOCAL_RANK="0",
                       WORLD_SIZE="2")
            cmd = [COMMAND, *args]
        else:  # SLURM, as `srun` sets it for --nodes=2 --ntasks-per-node=1
            env.update(SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", SLURM_NNODES="2", SLURM_PROCID=str(rank),
                       SLURM_LOCALID="0", SLURM_NODEID=str(rank), SLURM_JOB_ID="4242", SLURM_JOB_NAME="lightning-taylor",
                       SLURM_NODELIST="127.0.0.1", MASTER_PORT=str(port))
            cmd = [COMMAND, *args]
        commands.append((cmd, env, cwd))
    run_nodes(commands)
    written = [p.relative_to(nodes[1]) for p in nodes[1].rglob("*")]
    assert not written, f"node 1 (global rank 1) wrote {written[:10]}"
    return nodes[0] / RUN


@pytest.fixture(scope="module")
def one_node(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("one_node")
    run_nodes([([COMMAND, *FIT, "--trainer.num_nodes", "1", "--trainer.devices", "2"], base_env(), cwd)])
    return cwd / RUN


def artifacts(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(run / f"{name}.safetensors") for name in ("deltas", "fisher", "pretuned_head")}


def matrix(run: Path) -> list[list[str]]:
    with open(run / "accuracy_class_il.csv") as handle:
        return list(csv.reader(handle))


@pytest.mark.parametrize("how", ["torchrun", "environment", "slurm"])
def test_two_nodes_write_one_run_equal_to_one_node_with_two_processes(how, one_node, tmp_path):
    run = two_nodes(how, tmp_path)
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"], "one run directory, from rank 0"
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").exists()
    assert matrix(run) == matrix(one_node)
    expected, got = artifacts(one_node), artifacts(run)
    for part, tolerance in (("deltas", 1e-5), ("fisher", 1e-6), ("pretuned_head", 1e-6)):
        assert got[part].keys() == expected[part].keys(), part
        for key, value in expected[part].items():
            torch.testing.assert_close(got[part][key], value, rtol=tolerance, atol=tolerance,
                                       msg=lambda m, part=part, key=key: f"{how}: {part} {key}: {m}")


def test_sigterm_to_every_node_checkpoints_once_and_every_rank_exits_143(tmp_path):
    """Pre-emption under DDP, as SLURM does it: SIGTERM to every task. Both ranks agree on the batch to stop at
    (FaultTolerance all-reduces the decision), rank 0 writes ``preempted.ckpt``, and every rank exits 143."""
    import signal
    import time

    nodes = [tmp_path / "node0", tmp_path / "node1"]
    port = free_port()
    commands = []
    for rank, cwd in enumerate(nodes):
        cwd.mkdir()
        env = {**base_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(rank),
               "LOCAL_RANK": "0", "WORLD_SIZE": "2", "SLOW_BATCHES_SECONDS": "2",
               "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
        args = [*FIT, "--data.epochs_per_task", "2", "--trainer.num_nodes", "2", "--trainer.devices", "1",
                "--trainer.callbacks+=slow_batches.SlowBatches"]  # epoch 1's batches take 2 s: the signal lands there
        commands.append(([COMMAND, *args], env, cwd))
    processes = start(commands)
    checkpoints = nodes[0] / RUN / "checkpoints"
    try:
        deadline = time.monotonic() + TIMEOUT
        while not list(checkpoints.glob("epoch=0-*.ckpt")):  # the first epoch's checkpoint
            assert all(p.poll() is None for p in processes) and time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.2)
    except BaseException:
        for process in processes:
            process.kill()
        finish(processes)
        raise
    time.sleep(1.0)
    for process in processes:
        process.send_signal(signal.SIGTERM)
    outputs = finish(processes)
    for rank, (process, output) in enumerate(zip(processes, outputs)):
        assert process.returncode == 143, f"rank {rank} exited {process.returncode}:\n{output[-3000:]}"
    assert (checkpoints / "preempted.ckpt").is_file()
    assert os.path.realpath(checkpoints / "last.ckpt") == str(checkpoints / "preempted.ckpt")
    assert not [p for p in nodes[1].rglob("*")], "rank 1 wrote files"
