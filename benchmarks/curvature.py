"""How well the diagonal Fisher and KFAC see the curvature of the deltas ITA actually learns.

    HF_HUB_OFFLINE=1 python benchmarks/curvature.py runs/digits/ita/version_0 --examples 256

For a finished run, at θ0 with the run's final pre-tuned head over all its classes, on ``--examples``
training images of the whole stream, it compares three quadratic forms of each task's learned delta τ_t
(all target layers together, and per kind of layer):

- exact: the generalised Gauss-Newton form ``(1/n) Σ_x (J_x τ)ᵀ (diag p − p pᵀ) (J_x τ)`` (for softmax
  cross-entropy the GGN equals the true Fisher), from one Jacobian-vector product per batch (``torch.func``);
- diagonal: ``Σ F̄ ⊙ τ²`` with the exact diagonal Fisher of :mod:`lightning_taylor.curvature.diagonal` on the same images;
- KFAC: ``Σ_layers tr(Ḡ τ Ā τᵀ)`` with the exact-cotangent Kronecker factors of :mod:`lightning_taylor.curvature.kfac`
  ("expand" and "reduce").

and prints each approximation's ratio to the exact form (1 = exact; the forms are per-example means, no
prior). The same for a random direction of the same norm per layer, as a control.

Cost, in one process, KFAC against the diagonal (ratios; float32 as in training):

    python benchmarks/curvature.py runs/digits/ita/version_0 --cost --examples 256
    python benchmarks/curvature.py --penalty-model vit_base_patch16_224 --rank 16

``--cost`` times the part of a task boundary that differs (the backbone curvature pass at θ0 with the run's
pre-tuned head: :func:`~lightning_taylor.curvature.diagonal.diagonal_fisher` against
:func:`~lightning_taylor.curvature.kfac.kronecker_sums`, same images, estimator ``exact`` and ``mc``) and the per-step
penalty (:func:`~lightning_taylor.penalties.diagonal.delta_penalty` against
:func:`~lightning_taylor.penalties.kfac.kfac_delta_penalty`, ITA and IEL) of the run's last task.
``--penalty-model`` times the per-step penalty alone for a timm model with random weights, LoRA deltas
and random factors (the cost does not depend on the values), e.g. at the size of the paper's ViT-B/16.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.func import functional_call, jvp  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_taylor.deltas import TaskDeltas  # noqa: E402
from lightning_taylor.curvature import diagonal_fisher  # noqa: E402
from lightning_taylor.curvature import kronecker_sums  # noqa: E402
from lightning_taylor.penalties.kfac import kfac_delta_penalty, prepare_curvature  # noqa: E402
from lightning_taylor.penalties import delta_penalty  # noqa: E402
from lightning_taylor.runs.load import load_run  # noqa: E402


def quadratic(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """KFAC's ``tr(Ḡ x Ā yᵀ)`` of deltas ``x, y`` (out × in), ``a = Ā``, ``g = Ḡ``."""
    return (g @ x @ a * y).sum()


def ggn_form(model: torch.nn.Module, batches: list, tangents: dict[str, torch.Tensor]) -> float:
    """``(1/n) Σ_x (J τ)ᵀ (diag p − p pᵀ)(J τ)`` for the weight tangents ``tangents`` (by parameter name)."""
    params = dict(model.named_parameters())
    names = list(tangents)
    total, count = 0.0, 0
    for x in batches:
        def logits_of(*weights: torch.Tensor) -> torch.Tensor:
            return functional_call(model, {**params, **dict(zip(names, weights))}, (x,))

        with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention kernel has no forward-mode derivative
            logits, direction = jvp(logits_of, tuple(params[n] for n in names), tuple(tangents[n] for n in names))
        p = logits.softmax(-1)
        total += float(((direction.square() * p).sum(-1) - (direction * p).sum(-1).square()).sum())
        count += x.shape[0]
    return total / count


def best_time(fn, repeats: int) -> float:
    """The fastest of ``repeats`` calls of ``fn`` (seconds): the least disturbed by other processes."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def penalty_times(deltas: TaskDeltas, factors: dict, steps: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Per-step seconds of the diagonal and the KFAC penalty (value and slot gradients), ITA and IEL.

    ``factors`` are ``{layer: [(Ā, Ḡ)]}``; the diagonal penalty gets a positive ``F̄`` of the weights' shapes.
    """
    fisher = {f"{name}.weight": torch.rand_like(linear.weight) for name, _, linear in deltas.layers()}
    out = {}
    for algorithm in ("ita", "iel"):
        prepared = prepare_curvature(deltas, factors, algorithm, 1e-5, torch.device("cpu"))

        def diagonal() -> None:
            for _ in range(steps):
                delta_penalty(deltas, fisher, algorithm, 1.0)

        def kfac() -> None:
            for _ in range(steps):
                kfac_delta_penalty(deltas, prepared, algorithm, 1.0)

        out[algorithm] = (best_time(diagonal, repeats) / steps, best_time(kfac, repeats) / steps)
    return out


def print_penalty_times(times: dict[str, tuple[float, float]]) -> None:
    print("| penalty step | diagonal (ms) | KFAC (ms) | KFAC / diagonal |")
    print("|---|---|---|---|")
    for algorithm, (diagonal, kfac) in times.items():
        print(f"| {algorithm.upper()} | {1e3 * diagonal:.3f} | {1e3 * kfac:.3f} | {kfac / diagonal:.2f} |")


def penalty_model(args: argparse.Namespace) -> None:
    """``--penalty-model``: the per-step penalty of a timm model with random weights and random factors."""
    import timm

    model = timm.create_model(args.penalty_model, pretrained=False).eval().requires_grad_(False)
    deltas = TaskDeltas(model, rank=args.rank)
    for task in range(3):  # two banked tasks, so that IEL has a past sum
        deltas.begin_task(task)
        with torch.no_grad():
            for p in deltas.slot_parameters():
                p.normal_(0, 0.01)
    generator = torch.Generator().manual_seed(0)

    def spd(n: int) -> torch.Tensor:
        return torch.eye(n) + 0.01 * torch.randn(n, n, generator=generator).square()

    factors = {name: [(spd(linear.in_features), spd(linear.out_features))] for name, _, linear in deltas.layers()}
    print(f"{args.penalty_model}: {len(deltas.names)} LoRA targets, rank {args.rank} (qkv {3 * args.rank}), "
          f"{args.threads} thread(s), float32")
    print_penalty_times(penalty_times(deltas, factors, args.steps, args.repeats))


def cost(run, batches: list, args: argparse.Namespace) -> None:
    """``--cost``: the backbone curvature pass and the per-step penalty, KFAC against the diagonal."""
    model, deltas = run.model, run.deltas
    names = deltas.names
    weights = [f"backbone.{n}.weight" for n in names]
    layers = [f"backbone.{n}" for n in names]
    print(f"{args.run}: {sum(len(x) for x, _ in batches)} training images, {len(names)} target layers, "
          f"{args.threads} thread(s), float32, best of {args.repeats}")
    print("| boundary pass (θ0, pre-tuned head) | diagonal (s) | KFAC expand (s) | KFAC / diagonal |")
    print("|---|---|---|---|")
    with deltas.disabled():
        for estimator in ("exact", "mc"):
            diagonal = best_time(lambda: diagonal_fisher(model, batches, weights, estimator=estimator,
                                                         generator=torch.Generator().manual_seed(0)), args.repeats)
            kfac = best_time(lambda: kronecker_sums(model, batches, layers, estimator=estimator,
                                                    generator=torch.Generator().manual_seed(0)), args.repeats)
            print(f"| {estimator} | {diagonal:.2f} | {kfac:.2f} | {kfac / diagonal:.2f} |")
        factors = {n[len("backbone."):]: [pair] for n, pair in kronecker_sums(model, batches, layers).factors().items()}
    print_penalty_times(penalty_times(deltas, factors, args.steps, args.repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", nargs="?", help="a finished ITA / IEL run directory")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cost", action="store_true", help="time KFAC against the diagonal instead")
    parser.add_argument("--penalty-model", help="time the per-step penalty of this timm model (no run needed)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank for --penalty-model")
    parser.add_argument("--steps", type=int, default=20, help="penalty steps per timing")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.penalty_model:
        penalty_model(args)
        return
    if args.run is None:
        parser.error("a run directory is needed (or --penalty-model)")
    run = load_run(args.run)
    model, deltas, data = run.model, run.deltas, run.datamodule
    head = model.head
    head.load_state_dict({k: v.to(head.weight) for k, v in run.pretuned_heads().last.items()})
    dataset = data.tasks_dataset(range(data.num_tasks), "train")
    generator = torch.Generator().manual_seed(0)
    index = torch.randperm(len(dataset), generator=generator)[: args.examples].tolist()
    batches = list(DataLoader(torch.utils.data.Subset(dataset, index), batch_size=args.batch_size))
    if args.cost:
        cost(run, batches, args)
        return
    model = model.double()
    batches = [(x.double(), y) for x, y in batches]
    names = deltas.names
    weights = [f"backbone.{n}.weight" for n in names]
    with deltas.disabled():
        for p in model.parameters():
            p.requires_grad_(False)
        fisher = diagonal_fisher(model, batches, weights).mean()
        kfac = {approx: kronecker_sums(model, batches, [f"backbone.{n}" for n in names], approx=approx).factors()
                for approx in ("expand", "reduce")}
        directions = {f"τ_{t}": {n: deltas.task_delta(n, t).double() for n in names} for t in deltas.tasks}
        directions["random"] = {n: torch.randn(tau.shape, generator=generator, dtype=torch.float64)
                                * tau.norm() / tau.numel() ** 0.5 for n, tau in directions["τ_0"].items()}
        print(f"{args.run}: {len(index)} training images, {len(names)} target layers, θ0 + pre-tuned head")
        print("| direction | layers | exact GGN form | diagonal / exact | KFAC expand / exact | KFAC reduce / exact |")
        print("|---|---|---|---|---|---|")
        kinds = sorted({n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in names})
        for label, tau in directions.items():
            for kind in ["all", *kinds]:
                chosen = [n for n in names if kind == "all" or n.endswith(kind)]
                exact = ggn_form(model, [x for x, _ in batches], {f"backbone.{n}.weight": tau[n] for n in chosen})
                diagonal = sum(float((fisher[f"backbone.{n}.weight"] * tau[n].square()).sum()) for n in chosen)
                ratios = [sum(float(quadratic(tau[n], tau[n], *kfac[a][f"backbone.{n}"])) for n in chosen) / exact
                          for a in ("expand", "reduce")]
                print(f"| {label} | {kind} | {exact:.3e} | {diagonal / exact:.3f} | {ratios[0]:.3f} | {ratios[1]:.3f} |")


if __name__ == "__main__":
    main()
