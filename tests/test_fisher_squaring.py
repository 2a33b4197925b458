"""The diagonal Fisher's squaring forms (lightning_taylor.curvature._squaring) against the per-example definition.

``Σ_k Σ_b (g_kbᵀ a_b)²`` in float64, for both forms (direct, fused or not; Gram), block sizes down to one
element, and shapes where the token-pair blocks and the output blocks do not divide evenly.
"""

from __future__ import annotations

import pytest
import torch

import lightning_taylor.curvature._squaring as fisher


def brute_force(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``Σ_k Σ_b (g[k, b]ᵀ a[b])²``: every per-example gradient formed, squared and summed."""
    per_example = torch.einsum("kbno,bni->kboi", g, a)
    return per_example.square().sum(dim=(0, 1))


def random_inputs(rows: int, batch: int, tokens: int, out_features: int, in_features: int):
    generator = torch.Generator().manual_seed(rows * 1000 + tokens)
    g = torch.randn(rows, batch, tokens, out_features, generator=generator, dtype=torch.float64)
    a = torch.randn(batch, tokens, in_features, generator=generator, dtype=torch.float64)
    return g, a


@pytest.mark.parametrize("shape", [(1, 3, 5, 7, 6), (4, 2, 9, 5, 3), (12, 3, 4, 6, 5)])
@pytest.mark.parametrize("workspace", [1, 7, 40, 1 << 20])
@pytest.mark.parametrize("form", ["direct fused", "direct", "gram"])
def test_every_form_and_block_size_gives_the_per_example_squares(monkeypatch, shape, workspace, form):
    g, a = random_inputs(*shape)
    out = torch.zeros(shape[3], shape[4], dtype=torch.float64)
    if form == "gram":
        fisher._add_gram_squares(out, g, a, workspace)
    else:
        monkeypatch.setattr(fisher, "_FUSED_MIN", 0 if form == "direct fused" else 1 << 62)
        fisher._add_direct_squares(out, g, a, workspace)
    torch.testing.assert_close(out, brute_force(g, a), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("use_gram", [False, True])
def test_weight_squares_adds_to_what_is_there_and_handles_one_token(monkeypatch, use_gram):
    monkeypatch.setattr(fisher, "_use_gram", lambda *args: use_gram)
    for shape in [(3, 4, 6, 5, 7), (3, 4, 1, 5, 7)]:
        g, a = random_inputs(*shape)
        start = torch.rand(shape[3], shape[4], dtype=torch.float64)
        out = start.clone()
        fisher.add_weight_squares(out, g, a)
        torch.testing.assert_close(out, start + brute_force(g, a), rtol=1e-12, atol=1e-12)


def test_token_pair_blocks_cover_each_pair_once_with_its_weight():
    tokens, step = 7, 3
    seen = torch.zeros(tokens, tokens, dtype=torch.float64)
    for n0, n1, n, m, weights in fisher._pair_blocks(tokens, step, torch.device("cpu"), torch.float64):
        assert n1 - n0 <= step and bool((m >= n).all())
        seen.index_put_((n0 + n, n0 + m), weights.squeeze(1), accumulate=True)
    expected = torch.triu(torch.full((tokens, tokens), 2.0, dtype=torch.float64), 1) + torch.eye(tokens)
    assert torch.equal(seen, expected)
