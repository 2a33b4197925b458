"""How well the diagonal Fisher and KFAC see the curvature of the deltas ITA actually learns.

    HF_HUB_OFFLINE=1 python benchmarks/curvature.py runs/digits/ita/version_0 --examples 256

For a finished run, at θ0 with the run's final pre-tuned head over all its classes, on ``--examples``
training images of the whole stream, it compares three quadratic forms of each task's learned delta τ_t
(all target layers together, and per kind of layer):

- exact: the generalised Gauss-Newton form ``(1/n) Σ_x (J_x τ)ᵀ (diag p − p pᵀ) (J_x τ)`` (for softmax
  cross-entropy the GGN equals the true Fisher), from one Jacobian-vector product per batch (``torch.func``);
- diagonal: ``Σ F̄ ⊙ τ²`` with the exact diagonal Fisher of :mod:`lightning_taylor.fisher` on the same images;
- KFAC: ``Σ_layers tr(Ḡ τ Ā τᵀ)`` with the exact-cotangent Kronecker factors of :mod:`lightning_taylor.kfac`
  ("expand" and "reduce").

and prints each approximation's ratio to the exact form (1 = exact; the forms are per-example means, no
prior). The same for a random direction of the same norm per layer, as a control.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch.func import functional_call, jvp  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_taylor.fisher import diagonal_fisher  # noqa: E402
from lightning_taylor.kfac import kronecker_sums, quadratic  # noqa: E402
from lightning_taylor.run import load_run  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a finished ITA / IEL run directory")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = load_run(args.run)
    model, deltas, data = run.model.double(), run.deltas, run.datamodule
    head = model.head
    head.load_state_dict({k: v.to(head.weight) for k, v in
                          load_file(os.path.join(run.run_dir, "pretuned_head.safetensors")).items()})
    dataset = data.tasks_dataset(range(data.num_tasks), "train")
    generator = torch.Generator().manual_seed(0)
    index = torch.randperm(len(dataset), generator=generator)[: args.examples].tolist()
    batches = [(x.double(), y) for x, y in DataLoader(torch.utils.data.Subset(dataset, index),
                                                       batch_size=args.batch_size)]
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
