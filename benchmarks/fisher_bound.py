"""The exact Fisher against its physical bound: one forward plus C backward rows per example.

Run from the repository root (a few minutes on 2 CPU cores):

    HF_HUB_OFFLINE=1 python benchmarks/fisher_bound.py --classes 10 50 200 --threads 1

Whatever the algorithm, the exact diagonal Fisher of C classes needs, per example, one forward and the C
vector-Jacobian products of the logits to the target layers' outputs (the output cotangents ``g_c``), and
then the squaring ``Σ_c (g_cᵀ a)²``. The *bound* measured here is the first two parts alone, done as barely
as PyTorch allows on the same model (``benchmarks/fisher.py``'s tiny ViT), data and micro-batches as
``diagonal_fisher``: a forward recording the target outputs, then one ``torch.func.vmap`` over
``torch.autograd.grad`` of the C cotangents ``√p_c (e_c − p)`` (PyTorch's math attention kernel, as the
Fisher uses, since the fused kernels' backwards have no vmap rule), nothing squared or summed. The printed
ratio *bound / exact* is the share of the Fisher's time that no algorithm can save (target ≥ 0.7); the
rest is the squaring and the bookkeeping. Medians of ``--repeats`` round-robin runs after one warm-up each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import fisher as fisher_bench  # noqa: E402  (benchmarks/fisher.py: model and data)
from lightning_taylor.curvature import diagonal as lt_fisher  # noqa: E402
from lightning_taylor.curvature import diagonal_fisher  # noqa: E402


def micro_batches(model: nn.Module, modules: dict[str, nn.Module], batch: Tensor, num_classes: int) -> list[slice]:
    """The micro-batches ``diagonal_fisher`` makes of ``batch`` for the exact estimator (same row budget)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    _, example_bytes = lt_fisher._probe(model, modules, params, batch)
    rows = max(1, lt_fisher._ROWS_BYTES // max(1, example_bytes))
    return lt_fisher._split(batch.shape[0], max(1, rows // num_classes))


def bound(model: nn.Module, modules: dict[str, nn.Module], batches: list[Tensor], splits: list[list[slice]]) -> float:
    """Forward + vmap'd VJP of every example's C cotangents to the target outputs; returns a checksum."""
    total = 0.0
    for x, micro in zip(batches, splits):
        for s in micro:
            outputs: list[Tensor] = []
            handles = [m.register_forward_hook(lambda mod, a, out: outputs.append(out)) for m in modules.values()]
            try:
                with torch.enable_grad(), lt_fisher._math_attention():
                    logits = model(x[s].detach().requires_grad_())
            finally:
                for handle in handles:
                    handle.remove()
            p = logits.detach().softmax(-1)
            eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
            cotangents = p.T.sqrt().unsqueeze(-1) * (eye.unsqueeze(1) - p)                 # C × b × C

            def backward(v: Tensor) -> tuple[Tensor, ...]:
                return torch.autograd.grad(logits, outputs, v, retain_graph=True)

            grads = torch.func.vmap(backward)(cotangents)
            total += float(grads[-1].sum())
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 50, 200])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = argparse.Namespace(img_size=32, patch_size=8, embed_dim=192, depth=4, heads=3, head_scale=10.0,
                                  device=args.device, dtype="float32", batch_size=args.batch_size)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.device}; tiny ViT (width 192, "
          f"4 blocks, 17 tokens), {args.examples} examples, median of {args.repeats} round-robin runs")
    print(f"  {'C':>5}{'exact [s]':>11}{'bound [s]':>11}{'bound / exact':>15}")
    for num_classes in args.classes:
        model = fisher_bench.build_model(settings, num_classes)
        data = fisher_bench.make_batches(settings, args.examples, num_classes)
        names = fisher_bench.target_names(model)
        modules = {n.rpartition(".")[0]: model.get_submodule(n.rpartition(".")[0]) for n in names}
        inputs = [x for x, _ in data]
        splits = [micro_batches(model, modules, x, num_classes) for x in inputs]
        methods = {
            "exact": lambda: diagonal_fisher(model, data, names).sums,
            "bound": lambda: bound(model, modules, inputs, splits),
        }
        times: dict[str, list[float]] = {name: [] for name in methods}
        for fn in methods.values():
            fn()  # warm-up
        for _ in range(args.repeats):
            for name, fn in methods.items():
                fisher_bench.synchronize(args.device)
                start = time.perf_counter()
                fn()
                fisher_bench.synchronize(args.device)
                times[name].append(time.perf_counter() - start)
        exact, low = (statistics.median(times[k]) for k in ("exact", "bound"))
        ratios = [b / e for b, e in zip(times["bound"], times["exact"])]
        print(f"  {num_classes:>5}{exact:>11.3f}{low:>11.3f}{low / exact:>15.2f}   (per round "
              f"{min(ratios):.2f}–{max(ratios):.2f})")


if __name__ == "__main__":
    main()
