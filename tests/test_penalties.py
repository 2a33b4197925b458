import pytest
import torch
from helpers import randomise_slot, train_stream

from lightning_taylor.deltas import TaskDeltas
from lightning_taylor.penalties import (
    decoupled_step,
    delta_penalty,
    head_penalty,
    iel_members,
    iel_penalty,
    iel_penalty_grad,
    ita_penalty,
    ita_penalty_grad,
    jensen_gap,
)

SHAPE = (7, 5)


def rand(seed, positive=False):
    t = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return t.abs() + 0.1 if positive else t


def autograd_of(fn, tau):
    tau = tau.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(tau), tau)
    return grad


def test_ita_value_and_gradient():
    tau, fisher = rand(0), rand(1, positive=True)
    assert torch.isclose(ita_penalty(tau, fisher, 0.3), 0.15 * (fisher * tau**2).sum())
    torch.testing.assert_close(ita_penalty_grad(tau, fisher, 0.3), autograd_of(lambda t: ita_penalty(t, fisher, 0.3), tau))


@pytest.mark.parametrize("task_index", [0, 1, 4])
def test_iel_gradient_is_autograd_of_the_closed_form(task_index):
    tau, past, fisher = rand(0), rand(2), rand(1, positive=True)
    expected = autograd_of(lambda t: iel_penalty(t, past, fisher, 20.0, task_index), tau)
    torch.testing.assert_close(iel_penalty_grad(tau, past, fisher, 20.0, task_index), expected)


def test_members_count_has_the_phantom_at_task_zero():
    assert [iel_members(t) for t in range(4)] == [2, 2, 3, 4]
    with pytest.raises(ValueError, match="`task_index`.*-1"):
        iel_members(-1)


@pytest.mark.parametrize("task_index", [0, 1, 3])
def test_iel_is_beta_T_times_the_jensen_gap_up_to_a_constant(task_index):
    """R(τ) − β·T·gap(τ_0, …, τ_{t−1}, τ) does not depend on τ (θ0 is the phantom member at t = 0)."""
    beta, fisher = 2.5, rand(1, positive=True)
    past = [rand(10 + s) for s in range(task_index)] or [torch.zeros(SHAPE, dtype=torch.float64)]
    members = len(past) + 1
    assert members == iel_members(task_index)
    past_sum = sum(past)

    def residual(tau):
        gap = jensen_gap(past + [tau], [1 / members] * members, fisher)
        return iel_penalty(tau, past_sum, fisher, beta, task_index) - beta * members * gap

    constants = [residual(rand(seed)) for seed in (3, 4, 5)]
    torch.testing.assert_close(constants[0], constants[1])
    torch.testing.assert_close(constants[0], constants[2])
    # and the gradients agree: the penalty's gradient is β·T·∂gap/∂τ
    tau = rand(6)
    gap_grad = autograd_of(lambda t: beta * members * jensen_gap(past + [t], [1 / members] * members, fisher), tau)
    torch.testing.assert_close(iel_penalty_grad(tau, past_sum, fisher, beta, task_index), gap_grad)


def test_jensen_gap_is_mean_loss_minus_composed_loss_of_the_quadratic():
    """For L(δ) = ½ δᵀFδ + gᵀδ, Σ w_t L(τ_t) − L(Σ w_t τ_t) is the Jensen gap."""
    fisher, g = rand(1, positive=True), rand(9)
    taus, weights = [rand(2), rand(3), rand(4)], [0.2, 0.3, 0.5]
    loss = lambda d: 0.5 * (fisher * d * d).sum() + (g * d).sum()  # noqa: E731
    composed = sum(w * t for w, t in zip(weights, taus))
    expected = sum(w * loss(t) for w, t in zip(weights, taus)) - loss(composed)
    torch.testing.assert_close(jensen_gap(taus, weights, fisher), expected)


@pytest.mark.parametrize("style", ["lora", "full", "ia3"])
@pytest.mark.parametrize("algorithm", ["ita", "iel"])
def test_slot_gradients_follow_the_chain_rule(vit, style, algorithm):
    """delta_penalty's analytic slot gradients (Bᵀ G, G Aᵀ for LoRA) equal autograd through τ(slot)."""
    deltas = TaskDeltas(vit, style=style, rank=2)
    train_stream(deltas, 2)
    deltas.begin_task(2)
    randomise_slot(deltas, 11)
    generator = torch.Generator().manual_seed(0)
    curvature = {f"{n}.weight": torch.rand(l.weight.shape, generator=generator, dtype=torch.float64) + 0.1
                 for n, _, l in deltas.layers()}
    value, grads = delta_penalty(deltas, curvature, algorithm, 0.7)

    total = 0.0
    slots = dict(deltas.named_parameters())
    with torch.enable_grad():
        for name, layer, linear in deltas.layers():
            tau = layer.dense(layer.slot_state(), linear.weight)
            fisher = curvature[f"{name}.weight"]
            if algorithm == "ita":
                total = total + ita_penalty(tau, fisher, 0.7)
            else:
                past = deltas.task_delta(name, 0) + deltas.task_delta(name, 1)
                total = total + iel_penalty(tau, past, fisher, 0.7, 2)
        expected = torch.autograd.grad(total, list(slots.values()))
    torch.testing.assert_close(value, total.detach())
    assert set(grads) == set(slots)
    for (key, _), grad in zip(slots.items(), expected):
        assert grad.abs().sum() > 0
        torch.testing.assert_close(grads[key], grad, rtol=1e-10, atol=1e-14)


def test_delta_penalty_rejects_bad_arguments(vit):
    deltas = TaskDeltas(vit, rank=2)
    deltas.begin_task(0)
    with pytest.raises(ValueError, match="`algorithm`.*'ewc'"):
        delta_penalty(deltas, {}, "ewc", 1.0)
    with pytest.raises(ValueError, match="`strength`.*-1.0"):
        delta_penalty(deltas, {}, "ita", -1.0)


def test_head_penalty_value():
    w, b = rand(0), rand(1)[0]
    tw, tb = rand(2), rand(3)[0]
    fw, fb = rand(4, positive=True), rand(5, positive=True)[0]
    expected = 0.1 * ((fw * (w - tw) ** 2).sum() + (fb * (b - tb) ** 2).sum()) + 0.01 * (((w - tw) ** 2).sum() + ((b - tb) ** 2).sum())
    torch.testing.assert_close(head_penalty(w, b, tw, tb, fw, fb, 0.1, 0.01), expected)
    torch.testing.assert_close(head_penalty(w, None, tw, None, fw, None, 0.1, 0.0), 0.1 * (fw * (w - tw) ** 2).sum())


def test_decoupled_step_scales_and_clips_per_tensor():
    small = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    large = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    grads = {"small": torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64), "large": torch.tensor([300.0, 400.0], dtype=torch.float64)}
    decoupled_step({"small": small, "large": large}, grads, lr_factor=0.5)
    torch.testing.assert_close(small.detach(), torch.tensor([-0.5, -1.0, -1.0], dtype=torch.float64))
    torch.testing.assert_close(large.detach(), torch.tensor([-30.0, -40.0], dtype=torch.float64))  # clipped to norm 100
