"""``curvature: kfac`` as an option of ITA and IEL: penalties, accumulated factors, DDP, resume, export, CLI."""

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
from conftest import make_vit
from helpers import SeenLogits, randomise_slot, train_stream
from safetensors import safe_open
from safetensors.torch import load_file
from test_ddp_stream import launch
from test_resume import Preempted, run

from lightning_taylor.callbacks import ITA, SecondOrder
from lightning_taylor.callbacks import _curvature as second_order
from lightning_taylor.callbacks.resume import check_record
from lightning_taylor.cli import cli
from lightning_taylor.curvature import (
    KroneckerAccumulator,
    KroneckerSums,
    check_factor_memory,
    kronecker_sums,
    memory,
)
from lightning_taylor.deltas import TaskDeltas
from lightning_taylor.errors import InputError
from lightning_taylor.penalties import iel_members
from lightning_taylor.penalties.kfac import kfac_delta_penalty, prepare_curvature
from lightning_taylor.runs import Edit, apply_edit, export, load_run, predict

TARGETS = ["blocks.0.attn.qkv", "blocks.1.mlp.fc2"]
PRIOR = 1e-2


def spd(n: int, generator: torch.Generator) -> torch.Tensor:
    m = torch.randn(n, n, generator=generator, dtype=torch.float64)
    return m @ m.T / n + 0.1 * torch.eye(n, dtype=torch.float64)


def random_factors(deltas: TaskDeltas, terms: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {name: [(spd(linear.in_features, generator), spd(linear.out_features, generator)) for _ in range(terms)]
            for name, _, linear in deltas.layers()}


def dense_penalty(tau, past, terms, algorithm, strength, task):
    """R by the dense quadratic form ``vec(x)ᵀ (Σ_k Ā_k ⊗ Ḡ_k + ε I) vec(y)`` (column-major vec)."""
    curvature = sum(torch.kron(a, g) for a, g in terms) if terms else 0.0
    curvature = curvature + PRIOR * torch.eye(tau.numel(), dtype=torch.float64)

    def q(x, y):
        return x.T.reshape(-1) @ curvature @ y.T.reshape(-1)

    if algorithm == "ita":
        return 0.5 * strength * q(tau, tau)
    members = iel_members(task)
    return strength * (0.5 * (1 - 1 / members) * q(tau, tau) - q(tau, past) / members)


@pytest.mark.parametrize("style", ["lora", "full", "ia3"])
@pytest.mark.parametrize("algorithm, task", [("ita", 0), ("ita", 2), ("iel", 0), ("iel", 2)])
@pytest.mark.parametrize("terms", [1, 3])  # merged (one pair) and per_task (one pair per task)
def test_penalty_and_gradients_equal_autograd_of_the_dense_form(style, algorithm, task, terms):
    deltas = TaskDeltas(make_vit(), style=style, rank=2, targets=TARGETS, seed=1)
    if task:
        train_stream(deltas, task)  # banks tasks 0..task-1 with non-zero deltas
    deltas.begin_task(task)
    randomise_slot(deltas, seed=9, scale=0.3)
    # ITA's first task has no past tasks: only the prior.
    factors = random_factors(deltas, 0 if (algorithm, task) == ("ita", 0) else terms, seed=task)
    strength = 3.0
    prepared = prepare_curvature(deltas, factors, algorithm, PRIOR, torch.device("cpu"))
    value, grads = kfac_delta_penalty(deltas, prepared, algorithm, strength)

    slot = dict(deltas.named_parameters())
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in slot.items()}
    reference = 0.0
    for name, layer, linear in deltas.layers():
        state = {s: leaves[f"{name}.{s}"] for s in layer.slot_names}
        tau = layer.dense(state, linear.weight)
        reference = reference + dense_penalty(tau, deltas.past_sum(name), factors[name], algorithm, strength, task)
    expected = torch.autograd.grad(reference, list(leaves.values()))
    assert abs(float(reference.detach())) > 1e-3  # nothing passes vacuously
    torch.testing.assert_close(value, reference.detach(), rtol=1e-10, atol=1e-12)
    assert grads.keys() == leaves.keys()
    for key, grad in zip(leaves, expected):
        assert grad.abs().max() > 0, key
        torch.testing.assert_close(grads[key], grad, rtol=1e-10, atol=1e-12, msg=lambda m: f"{key}: {m}")


def test_accumulator_merged_pools_and_per_task_sums_the_products():
    model = make_vit(seed=3)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(n, 3, 16, 16, generator=generator, dtype=torch.float64), None) for n in (3, 5, 4)]
    sums = [kronecker_sums(model, [b], TARGETS) for b in batches]
    merged, per_task = KroneckerAccumulator("merged"), KroneckerAccumulator("per_task")
    for task, s in enumerate(sums):
        merged.set_task(task, s)
        per_task.set_task(task, s)
    pooled = kronecker_sums(model, batches, TARGETS).factors()
    for name in TARGETS:
        # merged: the factors of the pooled examples (ITA: tasks < t; IEL: ≤ t)
        (a, g), = merged.factors(include_current=True)[name]
        torch.testing.assert_close(a, pooled[name][0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(g, pooled[name][1], rtol=1e-12, atol=1e-14)
        past = kronecker_sums(model, batches[:2], TARGETS).factors()[name]
        (a, g), = merged.factors(include_current=False)[name]
        torch.testing.assert_close(torch.kron(a, g), torch.kron(*past), rtol=1e-12, atol=1e-14)
        # per_task: Σ_s (n_s / N) Ā_s ⊗ Ḡ_s exactly
        exact = sum(s.count * torch.kron(*s.factors()[name]) for s in sums) / sum(s.count for s in sums)
        ours = sum(torch.kron(a, g) for a, g in per_task.factors(include_current=True)[name])
        torch.testing.assert_close(ours, exact, rtol=1e-12, atol=1e-14)
        assert (ours - sum(torch.kron(a, g) for a, g in merged.factors(True)[name])).abs().max() > 1e-8
    assert merged.factors(include_current=False)[TARGETS[0]] and len(merged.terms) == 1
    assert len(per_task.terms) == 2
    fresh = KroneckerAccumulator()
    fresh.set_task(0, sums[0])
    assert fresh.factors(include_current=False) == {name: [] for name in TARGETS}  # ITA's task 0: prior only
    restored = KroneckerAccumulator()
    restored.set_extra_state(per_task.get_extra_state())
    for name in TARGETS:
        for (a, g), (a2, g2) in zip(per_task.factors(True)[name], restored.factors(True)[name]):
            assert torch.equal(a, a2) and torch.equal(g, g2)
    assert isinstance(restored.current, KroneckerSums)


# -- the option in a fit ------------------------------------------------------------------------------------
RUNS = {"ita merged": ("ita", "merged"), "iel per_task": ("iel", "per_task")}


class HeadAtBoundary(L.Callback):
    """The ITA / IEL callback's pre-tuned head at every task boundary (the head its factors were computed with)."""

    def __init__(self) -> None:
        self.heads: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_epoch_start(self, trainer, pl_module):
        (method,) = [c for c in trainer.callbacks if isinstance(c, SecondOrder)]
        self.heads.setdefault(method.task, {k: v.clone() for k, v in method.pretuned_head.items()})


@pytest.fixture(scope="module")
def kfac_runs(tmp_path_factory, one_thread):
    results = {}
    for key, (algorithm, tasks) in RUNS.items():
        root = tmp_path_factory.mktemp(key.replace(" ", "_"))
        recorder = HeadAtBoundary()
        trainer, model, callback, evaluation = run(algorithm, root, extra=[recorder], curvature="kfac",
                                                   kfac_tasks=tasks)
        results[key] = dict(root=root, trainer=trainer, model=model, callback=callback, evaluation=evaluation,
                            heads=recorder.heads)
    return results


def final_state(model, callback, evaluation) -> dict:
    return {"matrix": evaluation.matrices["class_il"].rows,
            "params": {k: v.clone() for k, v in model.state_dict().items()},
            "kfac": {f"{i}.{k}": v for i, s in enumerate(callback.accumulator.stored()) for k, v in s.sums.items()},
            "pretuned": callback.pretuned_head}


def direct_sums(entry, task: int) -> KroneckerSums:
    """kronecker_sums at θ0 with the task's pre-tuned head over the classes seen, on the task's training images."""
    trainer, model, callback = entry["trainer"], entry["model"], entry["callback"]
    classifier = callback.model(model)
    head, trained = classifier.head, {k: v.clone() for k, v in classifier.head.state_dict().items()}
    head.load_state_dict(entry["heads"][task])
    loader = trainer.datamodule.task_dataloader(task, "train", batch_size=callback.curvature_settings.batch_size)
    names = model.task_deltas.names
    try:
        with model.task_deltas.disabled():
            sums = kronecker_sums(SeenLogits(classifier, 2 * (task + 1)), [(x, y) for x, y in loader],
                                  [f"model.backbone.{n}" for n in names])
    finally:
        head.load_state_dict(trained)
    return KroneckerSums({n: sums.inputs[f"model.backbone.{n}"] for n in names},
                         {n: sums.grads[f"model.backbone.{n}"] for n in names}, sums.count,
                         {n: sums.tokens[f"model.backbone.{n}"] for n in names})


@pytest.mark.parametrize("key", RUNS)
def test_callback_factors_equal_kronecker_sums_computed_directly(kfac_runs, key):
    entry = kfac_runs[key]
    accumulator = entry["callback"].accumulator
    direct = [direct_sums(entry, task) for task in range(3)]
    if accumulator.tasks == "merged":
        direct = [KroneckerSums({n: sum(d.inputs[n] for d in direct) for n in direct[0].inputs},
                                {n: sum(d.grads[n] for d in direct) for n in direct[0].grads},
                                sum(d.count for d in direct), direct[0].tokens)]
    stored = accumulator.stored()
    assert len(stored) == len(direct)
    for ours, reference in zip(stored, direct):
        assert ours.count == reference.count > 0 and ours.tokens == reference.tokens
        for name, value in reference.sums.items():
            assert value.abs().max() > 0, name
            torch.testing.assert_close(ours.sums[name], value, rtol=1e-5, atol=1e-6 * float(value.abs().max()))
    # what was saved at the end: the means of the stored sums, with how they were made
    path = entry["root"] / "kfac.safetensors"
    saved = load_file(path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["approximation"] == "expand" and meta["tasks_combined"] == accumulator.tasks
    assert meta["estimator"] == "exact" and meta["counts"] == ",".join(str(r["count"]) for r in accumulator.records)
    name = entry["model"].task_deltas.names[0]
    suffix = "" if accumulator.tasks == "merged" else ".task2"
    torch.testing.assert_close(saved[f"{name}.G{suffix}"], stored[-1].factors()[name][1])
    assert len(saved) == 2 * len(stored) * len(entry["model"].task_deltas.names)


@pytest.mark.parametrize("key, crash_epoch", [("ita merged", 3), ("iel per_task", 2)])
def test_resumed_kfac_run_ends_bit_exact(kfac_runs, key, crash_epoch, tmp_path):
    algorithm, tasks = RUNS[key]
    with pytest.raises(Preempted):
        run(algorithm, tmp_path, crash_epoch=crash_epoch, curvature="kfac", kfac_tasks=tasks)
    _, model, callback, evaluation = run(algorithm, tmp_path, ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"),
                                         curvature="kfac", kfac_tasks=tasks)
    entry = kfac_runs[key]
    resumed, expected = final_state(model, callback, evaluation), final_state(entry["model"], entry["callback"],
                                                                              entry["evaluation"])
    assert resumed["matrix"] == expected["matrix"] and len(resumed["matrix"]) == 3
    for part in ("params", "kfac", "pretuned"):
        assert resumed[part].keys() == expected[part].keys() and resumed[part]
        for name, value in expected[part].items():
            assert torch.equal(resumed[part][name], value), f"{part} {name}"


@pytest.mark.parametrize("change", [{"curvature": "diagonal"}, {"kfac_tasks": "per_task"}, {"kfac_approx": "reduce"}])
def test_resume_with_other_curvature_settings_is_refused(kfac_runs, change, tmp_path):
    checkpoint = next((kfac_runs["ita merged"]["root"] / "checkpoints").glob("epoch=2-*.ckpt"))
    options = {"curvature": "kfac", "kfac_tasks": "merged", **change}
    (field,) = change
    with pytest.raises(InputError, match=f"Expected `{field}` to be .* trained with.*but got '{change[field]}'"):
        run("ita", tmp_path, ckpt_path=str(checkpoint), **options)


def test_a_checkpoint_without_a_curvature_record_is_a_diagonal_one():
    check_record({"algorithm": "ita"}, {"algorithm": "ita", "curvature": "diagonal"}, False, None)
    with pytest.raises(InputError, match="`curvature` to be 'diagonal'"):
        check_record({"algorithm": "ita"}, {"algorithm": "ita", "curvature": "kfac"}, False, "old.ckpt")


def test_a_kfac_run_edits_and_exports_like_a_diagonal_one(kfac_runs, tmp_path):
    entry = kfac_runs["ita merged"]
    loaded = load_run(entry["root"])
    trained = entry["model"].task_deltas
    assert loaded.tasks == [0, 1, 2]
    for name in trained.names:
        for task in loaded.tasks:
            assert torch.equal(loaded.deltas.task_delta(name, task), trained.task_delta(name, task))
    edit = Edit(drop=(1,))
    composition = edit.composition(loaded.tasks)
    images = torch.stack([loaded.datamodule.tasks_dataset(range(3), "test")[i][0] for i in range(0, 60, 3)])
    expected = predict(loaded.model, [(images, torch.zeros(len(images)))], composition)[0]
    path = export(loaded, tmp_path / "merged.safetensors", composition)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    plain = timm.create_model(meta["model_name"], pretrained=False, **json.loads(meta["model_kwargs"])).eval()
    plain.load_state_dict(load_file(path))
    with torch.no_grad():
        torch.testing.assert_close(plain(images), expected, rtol=1e-5, atol=1e-5)
    full = predict(loaded.model, [(images, torch.zeros(len(images)))], Edit().composition(loaded.tasks))[0]
    assert (full - expected).abs().max() > 1e-4  # dropping task 1 changed the model
    result = apply_edit(loaded, edit)
    assert result.removed == [1]
    assert [row["coefficient"] for row in result.rows()[:3]] == pytest.approx([1 / 3, 0.0, 1 / 3])


def test_factors_that_do_not_fit_are_refused_before_computing(monkeypatch, tmp_path):
    monkeypatch.setattr(memory, "available_memory", lambda device: 4096)

    def never(*args, **kwargs):
        raise AssertionError("the factors were computed")

    monkeypatch.setattr(second_order, "kronecker_sums", never)
    with pytest.raises(InputError, match=r"^Expected `curvature` to be a curvature whose factors fit in cpu "
                                         r"\(0\.00 GiB free\), but got 'kfac'\. The KFAC factors of this task need"):
        run("ita", tmp_path, curvature="kfac")


def vit_b16_shapes() -> dict:
    d = 768
    return {f"blocks.{b}.{n}": s for b in range(12) for n, s in
            (("attn.qkv", (3 * d, d)), ("attn.proj", (d, d)), ("mlp.fc1", (4 * d, d)), ("mlp.fc2", (d, 4 * d)))}


def test_vit_b16_factors_need_1_2_gib_per_pair(monkeypatch):
    """The README's figure: 12 · 46 · 768² numbers = 1.21 GiB in float32 per factor pair."""
    monkeypatch.setattr(memory, "available_memory", lambda device: 2**30)
    with pytest.raises(InputError, match=r"need 1\.21 GiB \(1 pairs of 325,582,848 numbers"):
        check_factor_memory(vit_b16_shapes(), 1, torch.float32, torch.device("cpu"), "merged")
    with pytest.raises(InputError, match="`kfac_tasks: merged` keeps one pair"):
        check_factor_memory(vit_b16_shapes(), 1, torch.float32, torch.device("cpu"), "per_task")
    monkeypatch.setattr(memory, "available_memory", lambda device: 2 * 2**30)
    check_factor_memory(vit_b16_shapes(), 1, torch.float32, torch.device("cpu"), "merged")


def test_topk_is_refused_with_kfac():
    with pytest.raises(InputError, match="`fisher_estimator` to be 'exact', 'mc' or 'empirical' with `curvature"):
        ITA(curvature="kfac", fisher_estimator="topk")


@pytest.mark.parametrize("config, curvature", [("ita.yaml", "diagonal"), ("ita_kfac.yaml", "kfac"),
                                               ("iel_kfac.yaml", "kfac")])
def test_print_config_lists_the_options(config, curvature, capsys):
    with pytest.raises(SystemExit):
        cli(["fit", "--config", f"configs/digits/{config}", "--print_config"])
    out = capsys.readouterr().out
    for line in (f"curvature: {curvature}", "kfac_approx: expand", "kfac_tasks: merged"):
        assert line in out
    parsed = cli(["--config", f"configs/digits/{config}"], run=False)
    (method,) = [c for c in parsed.trainer.callbacks if isinstance(c, SecondOrder)]
    assert method.curvature_settings.kind == curvature


def test_two_processes_give_the_factors_of_one(tmp_path):
    """tests/ddp_job.py with ``--curvature kfac``: 2 gloo ranks (Lightning's ddp) against 1 process."""
    (single,) = launch("one process", tmp_path / "one", "--curvature", "kfac", "--kfac-tasks", "per_task")
    ranks = launch("lightning", tmp_path / "two", "--curvature", "kfac", "--kfac-tasks", "per_task")
    assert [state["world_size"] for state in ranks] == [2, 2] and len(single["kfac"]) == 3
    for task, reference in enumerate(single["kfac"]):
        for rank in ranks:
            ours = rank["kfac"][task]
            assert ours["count"] == reference["count"] > 0 and ours["tokens"] == reference["tokens"]
            for name, value in reference["sums"].items():
                assert value.abs().max() > 0
                torch.testing.assert_close(ours["sums"][name], value, rtol=1e-4, atol=1e-5 * float(value.abs().max()))
        for name, value in ranks[0]["kfac"][task]["sums"].items():
            assert torch.equal(value, ranks[1]["kfac"][task]["sums"][name]), name


def test_the_cost_benchmark_times_kfac_against_the_diagonal(kfac_runs):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "curvature.py"
    done = subprocess.run([sys.executable, str(script), str(kfac_runs["ita merged"]["root"]), "--cost", "--examples",
                           "16", "--batch-size", "8", "--repeats", "1", "--steps", "2"],
                          check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in done.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| boundary") and not line.startswith("| penalty")}
    assert set(rows) == {"exact", "mc", "ITA", "IEL"}
    assert all(float(cells[-1]) > 0 for cells in rows.values())


def delta_norms(model) -> list[float]:
    deltas = model.task_deltas
    return [float(sum(deltas.task_delta(n, t).square().sum() for n in deltas.names)) ** 0.5 for t in deltas.tasks]


@pytest.mark.parametrize("mode", ["decoupled", "coupled"])
def test_the_kronecker_penalty_pulls_the_deltas_in_both_modes(mode, monkeypatch, tmp_path):
    """The same fit with the KFAC penalty's gradients zeroed ends with larger deltas of the penalised tasks."""
    real, calls = second_order.kfac_delta_penalty, []

    def scaled(scale):
        def penalty(*args, **kwargs):
            value, grads = real(*args, **kwargs)
            calls.append(float(value))
            return value, {k: scale * g for k, g in grads.items()}
        return penalty

    norms = {}
    for scale in (1.0, 0.0):
        monkeypatch.setattr(second_order, "kfac_delta_penalty", scaled(scale))
        _, model, _, _ = run("ita", tmp_path / str(scale), strength=1e3, curvature="kfac", penalty_mode=mode)
        norms[scale] = delta_norms(model)
    assert len(calls) == 2 * 3 * 2 * 3 and max(calls) > 0  # every optimiser step of both fits
    for task in (1, 2):  # tasks with past curvature (task 0 has the prior only)
        assert norms[1.0][task] < norms[0.0][task], (task, norms)
