"""KFAC factors against curvlinops' KFACLinearOperator, and the Kronecker penalties against autograd."""

import warnings

import pytest
import torch
from conftest import make_vit
from kfac_reference import kfac_penalty, kfac_penalty_grad, lora_grads, quadratic
from torch import nn

from lightning_taylor.curvature import KroneckerSums, kronecker_sums
from lightning_taylor.curvature.memory import factor_memory

LAYERS = ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.1.mlp.fc2"]


@pytest.fixture(scope="module")
def model_and_data():
    model = make_vit(seed=3)
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(8, 3, 16, 16, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 5, (8,), generator=generator)
    return model, x, y


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("estimator, fisher_type", [("exact", "type-2"), ("empirical", "empirical")])
def test_factors_equal_curvlinops(model_and_data, approx, estimator, fisher_type):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from curvlinops import KFACLinearOperator
    model, x, y = model_and_data
    weights = [model.get_submodule(name).weight for name in LAYERS]
    for p in weights:
        p.requires_grad_(True)
    try:
        oracle = KFACLinearOperator(model, nn.CrossEntropyLoss(reduction="sum"), weights, [(x[:5], y[:5]), (x[5:], y[5:])],
                                    fisher_type=fisher_type, kfac_approx=approx, check_deterministic=False)
        if hasattr(oracle, "compute_kronecker_factors"):
            oracle.compute_kronecker_factors()
    finally:
        for p in weights:
            p.requires_grad_(False)
    ours = kronecker_sums(model, [(x[:5], y[:5]), (x[5:], y[5:])], LAYERS, estimator=estimator, approx=approx)
    factors = ours.factors()
    assert ours.count == 8 and ours.tokens == {name: 5 for name in LAYERS}
    for name in LAYERS:
        a, g = factors[name]
        torch.testing.assert_close(a, oracle._input_covariances[name], rtol=1e-10, atol=1e-12)
        # Ours is the per-example mean; curvlinops' G is for the summed loss.
        torch.testing.assert_close(g * ours.count, oracle._gradient_covariances[name], rtol=1e-10, atol=1e-12)


def test_mc_factors_estimate_the_exact_ones(model_and_data):
    model, x, y = model_and_data
    exact = kronecker_sums(model, [(x, y)], LAYERS[:1]).factors()[LAYERS[0]][1]
    sampled = kronecker_sums(model, [(x, y)], LAYERS[:1], estimator="mc", samples=4000,
                             generator=torch.Generator().manual_seed(0)).factors()[LAYERS[0]][1]
    assert float((sampled - exact).norm() / exact.norm()) < 0.05


def test_sums_of_shards_equal_the_whole(model_and_data):
    model, x, y = model_and_data
    whole = kronecker_sums(model, [(x, y)], LAYERS)
    parts = [kronecker_sums(model, [(x[s], y[s])], LAYERS) for s in (slice(0, 3), slice(3, 8))]
    merged = KroneckerSums({n: parts[0].inputs[n] + parts[1].inputs[n] for n in LAYERS},
                           {n: parts[0].grads[n] + parts[1].grads[n] for n in LAYERS},
                           parts[0].count + parts[1].count, parts[0].tokens)
    for name in LAYERS:
        for ours, reference in zip(merged.factors()[name], whole.factors()[name]):
            torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-14)


def test_quadratic_is_the_kronecker_quadratic_form():
    generator = torch.Generator().manual_seed(1)
    out, inp = 4, 3
    a = torch.randn(inp, inp, generator=generator, dtype=torch.float64)
    g = torch.randn(out, out, generator=generator, dtype=torch.float64)
    a, g = a @ a.T, g @ g.T
    tau = torch.randn(out, inp, generator=generator, dtype=torch.float64)
    vec = tau.T.reshape(-1)  # column-major vec(τ): (Ā ⊗ Ḡ) acts on it
    dense = vec @ torch.kron(a, g) @ vec
    torch.testing.assert_close(quadratic(tau, tau, a, g), dense)
    torch.testing.assert_close(quadratic(tau, tau, a, g, prior=0.5), dense + 0.5 * tau.square().sum())


@pytest.mark.parametrize("algorithm, task_index", [("ita", 2), ("iel", 0), ("iel", 3)])
def test_penalty_gradients_equal_autograd(algorithm, task_index):
    generator = torch.Generator().manual_seed(2)
    out, inp, rank = 6, 5, 2
    a = torch.randn(inp, inp, generator=generator, dtype=torch.float64)
    g = torch.randn(out, out, generator=generator, dtype=torch.float64)
    a, g = a @ a.T, g @ g.T
    past = torch.randn(out, inp, generator=generator, dtype=torch.float64)
    lora_a = torch.randn(rank, inp, generator=generator, dtype=torch.float64, requires_grad=True)
    lora_b = torch.randn(out, rank, generator=generator, dtype=torch.float64, requires_grad=True)
    tau = lora_b @ lora_a
    value = kfac_penalty(tau, a, g, algorithm, 3.0, prior=1e-2, past=past, task_index=task_index)
    grad_a, grad_b = torch.autograd.grad(value, [lora_a, lora_b])
    dense = kfac_penalty_grad(tau.detach(), a, g, algorithm, 3.0, prior=1e-2, past=past, task_index=task_index)
    ours = lora_grads(dense, lora_a.detach(), lora_b.detach())
    torch.testing.assert_close(ours["lora_A"], grad_a)
    torch.testing.assert_close(ours["lora_B"], grad_b)


def test_a_layer_whose_forward_does_not_run_is_named(model_and_data):
    model, x, y = model_and_data
    with pytest.raises(ValueError, match="`layers`.*'head'.*applied another way"):
        kronecker_sums(_Unused(), [(x, y)], ["head"])


class _Unused(nn.Module):
    """A classifier with a linear layer it never calls."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(768, 5).double(), nn.Linear(5, 5).double()

    def forward(self, x):
        return self.body(x.flatten(1))


def test_factor_memory_of_vit_b16():
    d = 768
    shapes = {f"blocks.{b}.{n}": s for b in range(12)
              for n, s in (("attn.qkv", (3 * d, d)), ("attn.proj", (d, d)), ("mlp.fc1", (4 * d, d)),
                           ("mlp.fc2", (d, 4 * d)))}
    # per block: qkv d² + 9d², proj 2d², fc1 d² + 16d², fc2 16d² + d²
    assert factor_memory(shapes) == 12 * 46 * d * d
