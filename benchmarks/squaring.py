"""The exact Fisher's squaring forms on random cotangents: today's forms, the ones they replaced, the crossover.

Run from the repository root (a few minutes on 1 CPU thread):

    python benchmarks/squaring.py --threads 1

The squaring adds ``Σ_k Σ_b (g_kbᵀ a_b)²`` to a layer's Fisher sum (module docstring of
``lightning_taylor/curvature/_squaring.py``). The first table times, per case (K cotangents, B examples, N tokens,
out × in), medians of ``--repeats`` interleaved rounds after one warm-up:

* ``direct``: ``_add_direct_squares`` (per-example gradients, each added as ``out += P ⊙ P``), 2 MiB blocks;
* ``unfused``: the direct form before (the same products, each block squared in place and summed, two
  passes over it), with the same 2 MiB blocks;
* ``16 MiB``: today's direct form with the block size used before (``1 << 22`` elements);
* ``gram``: ``_add_gram_squares`` (per example, token pairs ``m ≥ n``, one 2-D transpose of the cotangents);
* ``gram before``: the Gram form before (all token pairs, one product over examples, after a strided 4-D
  permute of the cotangents), 16 MiB blocks as then.

The second table gives direct / Gram time over K for N = 17, 65, 197 and two layer shapes: where it
crosses 1 is where ``_use_gram`` should switch (its docstring quotes these figures).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from lightning_taylor.curvature import _squaring as fisher  # noqa: E402

SMALL, LARGE = 1 << 19, 1 << 22  # today's CPU block, and the block used before (elements)


def unfused_direct(out: Tensor, g: Tensor, a: Tensor, workspace: int) -> None:
    """The direct form before: per-example gradients of a block, squared in place, summed over the block."""
    rows, batch, tokens, out_features = g.shape
    in_features = a.shape[-1]
    step_o = max(1, min(out_features, workspace // (rows * in_features)))
    step_b = max(1, workspace // (rows * step_o * in_features))
    for b0 in range(0, batch, step_b):
        ab = a[b0 : b0 + step_b]
        nb = ab.shape[0]
        for o0 in range(0, out_features, step_o):
            gs = g[:, b0 : b0 + nb, :, o0 : o0 + step_o]
            no = gs.shape[-1]
            per_example = torch.bmm(gs.permute(1, 0, 3, 2).reshape(nb, rows * no, tokens), ab)
            out[o0 : o0 + no] += per_example.square_().view(nb * rows, no, in_features).sum(dim=0)


def previous_gram(out: Tensor, g: Tensor, a: Tensor, workspace: int = LARGE) -> None:
    """The Gram form before: every token pair, one product over a block of examples, 4-D permute of ``g``."""
    rows, batch, tokens, out_features = g.shape
    in_features = a.shape[-1]
    step_n = max(1, min(tokens, workspace // (tokens * in_features)))
    step_b = max(1, min(batch, workspace // (step_n * tokens * in_features)))
    for b0 in range(0, batch, step_b):
        ab, gb = a[b0 : b0 + step_b], g[:, b0 : b0 + step_b]
        nb = ab.shape[0]
        step_o = max(1, workspace // (nb * tokens * (step_n + rows)))
        for o0 in range(0, out_features, step_o):
            gs = gb[..., o0 : o0 + step_o].permute(3, 1, 2, 0).contiguous()
            for n0 in range(0, tokens, step_n):
                pairs = ab[:, n0 : n0 + step_n].unsqueeze(2) * ab.unsqueeze(1)
                gram = torch.matmul(gs[:, :, n0 : n0 + step_n], gs.transpose(-1, -2))
                out[o0 : o0 + gs.shape[0]].addmm_(gram.view(gs.shape[0], -1), pairs.view(-1, in_features))


def medians(methods: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds of each method over ``repeats`` interleaved rounds, after one warm-up call each."""
    for fn in methods.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def inputs(rows: int, batch: int, tokens: int, out_features: int, in_features: int) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    g = torch.randn(rows, batch, tokens, out_features, generator=generator)
    return torch.zeros(out_features, in_features), g, torch.randn(batch, tokens, in_features, generator=generator)


def forms_table(repeats: int) -> None:
    cases = [(1, 32, 17, 2304, 768), (1, 32, 17, 768, 3072), (10, 32, 17, 576, 192), (10, 32, 17, 192, 768),
             (50, 32, 17, 576, 192), (50, 32, 17, 192, 768), (200, 8, 17, 576, 192)]
    names = ("direct", "unfused", "16 MiB", "gram", "gram before")
    print(f"  {'K':>4}{'B':>4}{'N':>5}{'out × in':>12}" + "".join(f"{n + ' [ms]':>17}" for n in names))
    for case in cases:
        out, g, a = inputs(*case)
        methods = {
            "direct": lambda: fisher._add_direct_squares(out, g, a, SMALL),
            "unfused": lambda: unfused_direct(out, g, a, SMALL),
            "16 MiB": lambda: fisher._add_direct_squares(out, g, a, LARGE),
            "gram": lambda: fisher._add_gram_squares(out, g, a, SMALL),
            "gram before": lambda: previous_gram(out, g, a),
        }
        seconds = medians(methods, repeats)
        rows, batch, tokens, out_features, in_features = case
        print(f"  {rows:>4}{batch:>4}{tokens:>5}{f'{out_features} × {in_features}':>12}"
              + "".join(f"{1000 * seconds[n]:>17.1f}" for n in names), flush=True)


def crossover_table(repeats: int) -> None:
    print("\n  direct / Gram time (> 1: Gram is faster)")
    grid = [(17, (6, 9, 12, 16, 24), 16), (65, (24, 40, 68, 100), 2), (197, (100, 200, 400), 1)]
    for tokens, ks, batch in grid:
        for out_features, in_features in ((576, 192), (192, 768)):
            ratios = []
            for rows in ks:
                out, g, a = inputs(rows, batch, tokens, out_features, in_features)
                seconds = medians({"direct": lambda: fisher._add_direct_squares(out, g, a, SMALL),
                                   "gram": lambda: fisher._add_gram_squares(out, g, a, SMALL)}, repeats)
                ratios.append(f"K = {rows}: {seconds['direct'] / seconds['gram']:.2f}")
            print(f"  N = {tokens:>3}, {out_features} × {in_features}:  " + ",  ".join(ratios), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); medians of {args.repeats} rounds")
    forms_table(args.repeats)
    crossover_table(max(3, args.repeats // 2))


if __name__ == "__main__":
    main()
