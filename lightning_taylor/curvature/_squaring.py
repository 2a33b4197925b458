"""The squares of per-example weight gradients of a linear layer, summed: the diagonal Fisher's inner loop.

For ``K`` cotangents ``g_k`` (``N`` tokens × out) at a layer's output and its input ``a`` (``N`` × in) per
example, :func:`add_weight_squares` adds ``Σ_k (Σ_n g_kn ⊗ a_n)²`` (the elementwise square of the per-example
gradient ``g_kᵀ a``) over a batch, by one of two exact forms chosen per shape (:func:`_use_gram`):

* direct: the ``K`` per-example gradients ``g_kᵀ a`` (``K·N·out·in`` multiply-adds), squared and summed;
* Gram: ``Σ_k (Σ_n g_kn,o a_n,i)² = Σ_{n,m} G_o[n, m] · a_n,i a_m,i`` with ``G_o = Σ_k g_k,·o g_k,·oᵀ``
  (``N × N`` per example and output unit), symmetric in ``n, m``: per example one matrix product over the
  token pairs ``m ≥ n`` whose cost (``N(N+1)/2·out·in``) does not grow with ``K``.

Both are blocked so that no intermediate holds much more than :func:`_workspace` elements. Every form and
block size is checked against the per-example definition in float64 (tests/test_fisher_squaring.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Largest number of elements of one squaring block (per-example gradients or Gram matrices) on the CPU
#: (:func:`_workspace`): 2 MiB of float32, which stays in a core's cache.
_WORKSPACE = 1 << 19
#: Fewest elements of one per-example gradient block row for which the direct form adds each gradient's
#: square by its own fused call (:func:`_add_direct_squares`).
_FUSED_MIN = 1 << 16
def _use_gram(rows: int, tokens: int, in_features: int) -> bool:
    """Whether the Gram form is the faster one for ``K = rows`` cotangents, ``N = tokens`` tokens and
    ``in_features`` inputs.

    By operation counts, Gram (``N(N+1)/2·out·in``, the token pairs ``m ≥ n`` only) beats direct
    (``K·N·out·in``) once ``K > (N+1)/2``; but direct's batched product runs ever closer to peak speed as
    ``N`` grows, while Gram adds its small Gram products and the gathers of the pairs (relatively more
    for a narrow input). Measured on CPU (``benchmarks/squaring.py``: 1 thread, out × in = 576 × 192 and
    192 × 768; two runs), the two forms cost the same at ``K ≈ 10–12`` and ``8–9.5`` for ``N = 17`` tokens
    (in = 192, 768), ``85–95`` and ``50–55`` for ``N = 65``, above ``400`` and ``230–370`` for ``N = 197``:
    ``K ≈ 0.11·N^1.5·(768 / in)^¼`` within the noise.
    """
    return rows > 0.11 * tokens**1.5 * (768 / in_features) ** 0.25


def _workspace(device: torch.device) -> int:
    """Elements of one squaring block: ``_WORKSPACE`` on the CPU, where blocks that stay in the cache made the
    direct form 20–60 % faster than 16 MiB blocks streamed through memory (``benchmarks/squaring.py``); 8×
    that on an accelerator, where fewer and larger kernels pay (the size used everywhere before; not
    re-measured: no GPU so far)."""
    return _WORKSPACE if device.type == "cpu" else 8 * _WORKSPACE


def add_weight_squares(out: Tensor, g: Tensor, a: Tensor) -> None:
    """``out += Σ_k Σ_b (Σ_n g[k, b, n] ⊗ a[b, n])²`` for ``g`` (K × B × N × out) and ``a`` (B × N × in).

    Blocked so that no intermediate holds much more than :func:`_workspace` elements (besides one
    example's cotangents, transposed, in the Gram form).
    """
    workspace = _workspace(out.device)
    rows, batch, tokens, out_features = g.shape
    in_features = a.shape[-1]
    if tokens == 1:  # (g a)² = g² a²: sum the squares over cotangents first, then one matrix product
        step_b = max(1, workspace // (rows * out_features + in_features))
        for b0 in range(0, batch, step_b):
            out.addmm_(g[:, b0 : b0 + step_b, 0].square().sum(dim=0).T, a[b0 : b0 + step_b, 0].square())
    elif _use_gram(rows, tokens, in_features):
        _add_gram_squares(out, g, a, workspace)
    else:
        _add_direct_squares(out, g, a, workspace)


def _add_direct_squares(out: Tensor, g: Tensor, a: Tensor, workspace: int) -> None:
    """Direct form of :func:`add_weight_squares`: the per-example gradients ``P = g_kᵀ a`` (one batched
    product per block of examples and output units), squared and summed into ``out``.

    Where a block's output rows are wide (at least ``_FUSED_MIN`` elements, e.g. ``K = 1``), each gradient
    is added by one fused ``out += P ⊙ P`` pass (``addcmul_``), about 1.5× faster than squaring the block in
    place and summing it, which reads it twice; with many narrow rows (large ``K``) the per-call cost of
    that loop outweighs the saving, and the block is squared and summed in one reduction instead
    (``benchmarks/squaring.py``).
    """
    rows, batch, tokens, out_features = g.shape
    in_features = a.shape[-1]
    step_o = max(1, min(out_features, workspace // (rows * in_features)))
    step_b = max(1, workspace // (rows * step_o * in_features))
    fused = step_o * in_features >= _FUSED_MIN
    for b0 in range(0, batch, step_b):
        ab = a[b0 : b0 + step_b]
        nb = ab.shape[0]
        for o0 in range(0, out_features, step_o):
            gs = g[:, b0 : b0 + nb, :, o0 : o0 + step_o]
            no = gs.shape[-1]
            per_example = torch.bmm(gs.permute(1, 0, 3, 2).reshape(nb, rows * no, tokens), ab)  # b × (K·o) × in
            gradients = per_example.view(nb * rows, no, in_features)
            block = out[o0 : o0 + no]
            if fused:
                for gradient in gradients:
                    block.addcmul_(gradient, gradient)
            else:
                block += gradients.square_().sum(dim=0)


def _pair_blocks(tokens: int, step_n: int, device: torch.device, dtype: torch.dtype
                 ) -> list[tuple[int, int, Tensor, Tensor, Tensor]]:
    """The token pairs ``(n, m)`` with ``m ≥ n``, in blocks of ``step_n`` first tokens ``n0 ≤ n < n1``: per
    block ``(n0, n1, n − n0, m − n0, w)`` with the weights ``w`` (pairs × 1) of
    ``Σ_{n,m} = Σ_{n=m} + 2 Σ_{m>n}``, exact for terms symmetric in ``n, m``."""
    blocks = []
    for n0 in range(0, tokens, step_n):
        n1 = min(tokens, n0 + step_n)
        n, m = torch.triu_indices(n1 - n0, tokens - n0, device=device)
        blocks.append((n0, n1, n, m, torch.where(n == m, 1.0, 2.0).to(dtype).unsqueeze(1)))
    return blocks


def _add_gram_squares(out: Tensor, g: Tensor, a: Tensor, workspace: int) -> None:
    """Gram form of :func:`add_weight_squares` (:func:`_add_example_gram_squares`), example by example,
    in blocks of first tokens and output units whose Gram matrices and pair products hold at most about
    ``workspace`` elements."""
    _, batch, tokens, out_features = g.shape
    in_features = a.shape[-1]
    step_n = max(1, min(tokens, workspace // (tokens * in_features)))
    step_o = max(1, min(out_features, workspace // (step_n * tokens)))
    blocks = _pair_blocks(tokens, step_n, a.device, a.dtype)
    for b in range(batch):
        _add_example_gram_squares(out, g[:, b], a[b], blocks, step_o)


def _add_example_gram_squares(out: Tensor, g: Tensor, a: Tensor,
                              blocks: list[tuple[int, int, Tensor, Tensor, Tensor]], step_o: int) -> None:
    """Gram form for one example (``g``: K × N × out, ``a``: N × in):

        Σ_k (Σ_n g_kn,o a_n,i)² = Σ_{m≥n} w_nm · G_o[n, m] · a_n,i a_m,i,    G_o = Σ_k g_k,·o g_k,·oᵀ  (N × N),

    ``w_nm = 1`` on the diagonal and 2 above it, so that each pair's ``in``-wide product is made once: a
    matrix product of the Gram entries (out × pairs) with the token-pair products (pairs × in), per block
    of first tokens (:func:`_pair_blocks`) and of ``step_o`` output units. The cotangents are transposed
    once, by a 2-D transpose, so that ``K`` is the contiguous dimension of the Gram products (a strided
    4-D permute costs more than the products themselves).
    """
    rows, tokens, out_features = g.shape
    gk = g.reshape(rows, -1).T.contiguous().view(tokens, out_features, rows).transpose(0, 1)  # out × N × K
    for n0, n1, n, m, weights in blocks:
        pairs = a[n0 + n] * (a[n0 + m] * weights)                                        # pairs × in
        for o0 in range(0, out_features, step_o):
            gb = gk[o0 : o0 + step_o]
            gram = torch.bmm(gb[:, n0:n1], gb[:, n0:].transpose(1, 2))                   # o × n × (N − n0)
            out[o0 : o0 + gb.shape[0]].addmm_(gram[:, n, m], pairs)
