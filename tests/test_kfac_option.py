"""``curvature: kfac`` as an option of ITA and IEL: penalties, accumulated factors, DDP, resume, export, CLI."""

import pytest
import torch
from conftest import make_vit
from helpers import randomise_slot, train_stream

from lightning_taylor.deltas import TaskDeltas
from lightning_taylor.kfac import KroneckerSums, kronecker_sums
from lightning_taylor.kfac_accumulator import KroneckerAccumulator
from lightning_taylor.kfac_penalties import kfac_delta_penalty, prepare_curvature
from lightning_taylor.penalties import iel_members

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
