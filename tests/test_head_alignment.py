"""``head_alignment="drift_compensated"``: semantic drift compensation, and the end-of-task alignment in a fit."""

import math

import lightning as L
import pytest
import torch
from test_ddp_stream import launch
from test_resume import TASKS, Preempted, final_state, run

from lightning_taylor.callbacks import ITA
from lightning_taylor.head import ClassMixtures
from lightning_taylor.head.drift import compensate_drift


def _mixtures(seed: int = 0, classes=(0, 1), components: int = 3, dim: int = 4) -> ClassMixtures:
    g = torch.Generator().manual_seed(seed)
    mixtures = ClassMixtures()
    for c in classes:
        mixtures.add(c, torch.softmax(torch.randn(components, generator=g), 0),
                     torch.randn(components, dim, generator=g, dtype=torch.float64),
                     torch.rand(components, dim, generator=g, dtype=torch.float64) + 0.1)
    return mixtures


def test_drift_compensation_equals_its_definition_by_brute_force():
    mixtures, g = _mixtures(), torch.Generator().manual_seed(1)
    before = torch.randn(7, 4, generator=g, dtype=torch.float64)
    after = before + torch.randn(7, 4, generator=g, dtype=torch.float64)
    moved = compensate_drift(mixtures, before, after, bandwidth=0.5)
    for c in mixtures.classes:
        weights, means, variances = mixtures.components(c)
        squared = [[float(((before[i] - mu) ** 2).sum()) for i in range(7)] for mu in means]
        sigma2 = 0.5 * torch.tensor(squared, dtype=torch.float64).median().item()  # the lower middle value
        for k, mu in enumerate(means):
            kernel = torch.tensor([math.exp(-d / (2 * sigma2)) for d in squared[k]], dtype=torch.float64)
            expected = mu + (kernel[:, None] * (after - before)).sum(0) / kernel.sum()
            torch.testing.assert_close(moved.components(c)[1][k], expected, rtol=1e-12, atol=1e-12)
        assert torch.equal(moved.components(c)[0], weights) and torch.equal(moved.components(c)[2], variances)
    assert moved.classes == mixtures.classes


def test_a_uniform_shift_moves_every_mean_by_it_and_the_input_stays():
    mixtures = _mixtures()
    original = {c: mixtures.components(c)[1].clone() for c in mixtures.classes}
    before = torch.randn(9, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    shift = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    for bandwidth in (1e-3, 0.25, 100.0):
        moved = compensate_drift(mixtures, before, before + shift, bandwidth)
        for c in mixtures.classes:
            torch.testing.assert_close(moved.components(c)[1], original[c] + shift, rtol=0, atol=1e-12)
            assert torch.equal(mixtures.components(c)[1], original[c])


def test_a_narrow_kernel_takes_the_drift_of_the_image_under_the_mean():
    mixtures = _mixtures(classes=(3,), components=2)
    means = mixtures.components(3)[1]
    others = torch.randn(5, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 10
    before = torch.cat([means, others])  # images 0 and 1 sit on the two component means
    drift = torch.randn(7, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    moved = compensate_drift(mixtures, before, before + drift, bandwidth=1e-4)
    torch.testing.assert_close(moved.components(3)[1], means + drift[:2], rtol=0, atol=1e-9)


def test_bad_inputs_are_named():
    mixtures, before = _mixtures(), torch.zeros(5, 4)
    with pytest.raises(ValueError, match="after"):
        compensate_drift(mixtures, before, torch.zeros(4, 4))
    with pytest.raises(ValueError, match="before"):
        compensate_drift(mixtures, torch.zeros(5, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="bandwidth"):
        compensate_drift(mixtures, before, before, bandwidth=0.0)
    with pytest.raises(ValueError, match="head_alignment"):
        ITA(1.0, head_alignment="always")


class Watch(L.Callback):
    """Records the aligner's calls and, at every validation, the head before and after the alignment."""

    def __init__(self) -> None:
        self.calls, self.heads, self.mixtures = [], [], []

    def setup(self, trainer, pl_module, stage):
        self.callback = next(c for c in trainer.callbacks if isinstance(c, ITA))
        original = self.callback.align_to_composition

        def recorded(trainer, pl_module, task):
            self.calls.append((task, trainer.current_epoch))
            self.trained = pl_module.head.weight.detach().clone()
            original(trainer, pl_module, task)

        self.callback.align_to_composition = recorded

    def on_validation_epoch_start(self, trainer, pl_module):
        self.heads.append((self.trained, pl_module.head.weight.detach().clone()))
        self.mixtures.append(ClassMixtures.from_state_dict(self.callback.composed_mixtures.state_dict()))


def test_the_head_is_aligned_at_each_task_end_before_its_validation(tmp_path):
    watch = Watch()
    _, _, callback, _ = run("ita", tmp_path, extra=[watch], head_alignment="drift_compensated")
    assert watch.calls == [(0, 1), (1, 3), (2, 5)]  # the last epoch of each 2-epoch task
    assert callback.record["head_alignment"] == "drift_compensated"
    for task, (trained, aligned) in enumerate(watch.heads):
        seen = 2 * (task + 1)
        assert not torch.equal(aligned[:seen], trained[:seen])  # every seen row re-aligned
        assert torch.equal(aligned[seen:], trained[seen:])  # unseen rows untouched
        assert watch.mixtures[task].classes == list(range(seen))
    # Old classes move with the composition (means only); a class's weights and variances are kept.
    for c in (0, 1):
        old, new = watch.mixtures[0].components(c), watch.mixtures[1].components(c)
        assert torch.equal(old[0], new[0]) and torch.equal(old[2], new[2])
        assert not torch.equal(old[1], new[1])


@pytest.mark.parametrize("crash_epoch", [3, 2])  # inside task 1: mid-task, and at its boundary
def test_a_resumed_aligned_run_ends_like_the_uninterrupted_one(tmp_path, crash_epoch):
    _, model, callback, evaluation = run("ita", tmp_path / "whole", head_alignment="drift_compensated")
    expected = {**final_state(model, callback, evaluation), "mixtures": callback.composed_mixtures.state_dict()}
    with pytest.raises(Preempted):
        run("ita", tmp_path / "cut", crash_epoch=crash_epoch, head_alignment="drift_compensated")
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    _, model, callback, evaluation = run("ita", tmp_path / "cut", ckpt_path=str(last),
                                         head_alignment="drift_compensated")
    resumed = {**final_state(model, callback, evaluation), "mixtures": callback.composed_mixtures.state_dict()}
    assert len(resumed["matrix"]) == TASKS and resumed["matrix"] == expected["matrix"]
    for key, value in expected["params"].items():
        torch.testing.assert_close(resumed["params"][key], value, rtol=0, atol=0, msg=key)
    extra = "_extra_state"
    for got, want in zip(resumed["mixtures"][extra]["means"], expected["mixtures"][extra]["means"], strict=True):
        assert torch.equal(got, want)


def test_a_run_without_alignment_refuses_to_resume_with_it(tmp_path):
    with pytest.raises(Preempted):
        run("ita", tmp_path, crash_epoch=3)
    with pytest.raises(ValueError, match="head_alignment"):
        run("ita", tmp_path, ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"), head_alignment="drift_compensated")


def test_two_processes_align_the_same_head_as_one(tmp_path):
    single, = launch("one process", tmp_path / "one", "--head-alignment", "drift_compensated")
    ranks = launch("lightning", tmp_path / "two", "--head-alignment", "drift_compensated")
    for key, value in ranks[0]["head"].items():  # every rank takes rank zero's aligned rows
        assert torch.equal(value, ranks[1]["head"][key]), key
    assert ranks[0]["matrix"] == ranks[1]["matrix"]
    for row, expected in zip(ranks[0]["matrix"], single["matrix"], strict=True):
        assert row == pytest.approx(expected, abs=2e-2)  # the same images, sharded: close, not bit-equal
    for key, value in single["head"].items():
        torch.testing.assert_close(ranks[0]["head"][key], value, rtol=1e-3, atol=1e-4, msg=key)
