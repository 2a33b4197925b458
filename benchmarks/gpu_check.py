"""The CUDA path end to end: Fisher against a float64 reference, ITA / IEL streams, mixed precision, speed, DDP.

Run from the repository root on a machine with a GPU (at most about 8 minutes on one GPU):

    HF_HUB_OFFLINE=1 python benchmarks/gpu_check.py

or, without a GPU, the reduced CPU mode that CI runs (``tests/test_benchmarks.py``; about 20 s):

    HF_HUB_OFFLINE=1 python benchmarks/gpu_check.py --device cpu --reduced

Every part prints its figures and ends in checks (``yes`` / ``NO``); the exit status is 1 when a check fails.

1. **Fisher vs a float64 reference**: the exact Fisher of ``lightning_taylor.curvature.diagonal`` on the device in
   float32 against the reference algorithm (``benchmarks/fisher.py``: one backward per class) in float64 on
   the CPU, same model and data: relative error ``‖F̂ − F‖ / ‖F‖`` ≤ 1e-5.
2. **Streams**: 2-task ITA and IEL fits (tiny ViT, digits) on the device: the deltas are banked, everything
   is finite, and the task-boundary Fisher equals the same fit's on the CPU to 1e-4 (features of θ0 on two
   devices differ in the last bits, and the pre-tuned head with them).
3. **Mixed precision**: the same fits with ``precision="bf16-mixed"`` (and ``"16-mixed"`` on CUDA): the
   training forward runs in the low precision, the Fisher sums, the pre-tuned head, the head Fisher and the
   penalty stay float32 and equal those of a ``32-true`` fit (they are computed at θ0, before training).
4. **Fisher speed** at C = 10, 50, 200 (reduced: 10, 50): ``exact`` and ``mc`` (K = 1) against the reference
   algorithm, medians of round-robin runs (``benchmarks/fisher.py``'s tiny ViT). Target on a GPU: the
   reference at least 3× slower than ``exact``.
5. **DDP**: with two or more GPUs, a 2-process run of the ITA stream (``strategy="ddp"``) against one
   process with the same global batch: every rank holds the same state, the Fisher equal within 1e-5.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import lightning as L  # noqa: E402
import torch  # noqa: E402

import fisher as fisher_bench  # noqa: E402  (benchmarks/fisher.py: model, data and the reference algorithm)
from lightning_taylor.callbacks import IEL, ITA, PreTuning  # noqa: E402
from lightning_taylor.data import TaskStreamDataModule  # noqa: E402
from lightning_taylor.curvature import diagonal_fisher  # noqa: E402
from lightning_taylor.model.module import IncrementalViT  # noqa: E402

TINY = dict(img_size=16, patch_size=8, embed_dim=24, depth=2, num_heads=2, in_chans=1)
FAST_PRETUNING = PreTuning(probe_epochs=1, align_epochs=1, align_epochs_per_task=0, samples_per_class=16)
Checks = list[tuple[str, bool]]


def relative_error(estimate: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    diff = sum(float((estimate[k].double().cpu() - reference[k].double().cpu()).square().sum()) for k in reference)
    norm = sum(float(reference[k].double().cpu().square().sum()) for k in reference)
    if not norm:
        return 0.0 if not diff else float("inf")
    return (diff / norm) ** 0.5


def bench_args(args: argparse.Namespace, device: str, dtype: str, batch_size: int) -> argparse.Namespace:
    """The settings of ``benchmarks/fisher.py``'s model and data (its defaults, reduced for CI)."""
    small = args.reduced
    return argparse.Namespace(img_size=16 if small else 32, patch_size=8, embed_dim=48 if small else 192,
                              depth=2 if small else 4, heads=3, head_scale=10.0, device=device, dtype=dtype,
                              batch_size=batch_size)


# -- 1. Fisher against the float64 reference ------------------------------------------------------------
def fisher_against_reference(args: argparse.Namespace, checks: Checks) -> None:
    classes, examples = (10, 8) if args.reduced else (50, 64)
    cpu64 = bench_args(args, "cpu", "float64", 16)
    here = bench_args(args, args.device, "float32", 16)
    reference_model = fisher_bench.build_model(cpu64, classes)
    names = fisher_bench.target_names(reference_model)
    reference = fisher_bench.reference_fisher(reference_model, fisher_bench.make_batches(cpu64, examples, classes),
                                              names)
    model = fisher_bench.build_model(here, classes)
    ours = diagonal_fisher(model, fisher_bench.make_batches(here, examples, classes), names).sums
    error = relative_error(ours, reference)
    print(f"1. exact Fisher on {args.device} (float32) vs the reference algorithm on the CPU (float64), C = {classes}, "
          f"{examples} examples: relative error {error:.2e}")
    checks.append((f"Fisher on {args.device} equals the float64 CPU reference to 1e-5", error <= 1e-5))


# -- 2. and 3. streams ----------------------------------------------------------------------------------
class ForwardDtype(L.Callback):
    """The dtypes of the head's output inside training steps (what autocast made of the forward)."""

    def __init__(self) -> None:
        self.dtypes: set[torch.dtype] = set()
        self._handle = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self._handle = pl_module.head.register_forward_hook(lambda m, a, out: self.dtypes.add(out.dtype))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self._handle.remove()


def stream(algorithm: str, device: str, precision: str, save_dir: str) -> dict:
    """A 2-task fit of ``algorithm``; what it ends with."""
    L.seed_everything(0, verbose=False)
    data = TaskStreamDataModule("digits", num_tasks=5, epochs_per_task=1, batch_size=32, image_size=16)
    model = IncrementalViT("vit_tiny_patch16_224", pretrained=False, model_kwargs=TINY, num_classes=10,
                           classes_per_task=2, epochs_per_task=1, lr=1e-2, seed=0)
    kind = ITA if algorithm == "ita" else IEL
    callback = kind(1.0, rank=2, pretuning=FAST_PRETUNING, head_fisher_samples=16, save_dir=save_dir)
    spy = ForwardDtype()
    trainer = L.Trainer(accelerator=device, devices=1, max_epochs=2, precision=precision,
                        reload_dataloaders_every_n_epochs=1, num_sanity_val_steps=0, limit_train_batches=3,
                        limit_val_batches=0, enable_progress_bar=False, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, default_root_dir=save_dir, callbacks=[callback, spy])
    with contextlib.redirect_stdout(io.StringIO()):  # the fit's own messages
        trainer.fit(model, data)
    penalty = trainer.callback_metrics["train/penalty"]
    return {
        "banked": model.task_deltas.banked_tasks,
        "finite": all(bool(torch.isfinite(p).all()) for p in model.task_deltas.parameters()),
        "fisher": {k: v.cpu() for k, v in callback.accumulator.curvature(include_current=True).items()},
        "statistics": {**{f"pretuned.{k}": v for k, v in callback.pretuned_head.items()},
                       **{f"head_fisher.{k}": v for k, v in callback.head_curvature.items()},
                       **{f"fisher.{k}": v for k, v in callback.accumulator.current.items()},
                       **{f"fisher_past.{k}": v for k, v in callback.accumulator.past.items()}},
        "penalty": penalty,
        "forward": spy.dtypes,
    }


def streams(args: argparse.Namespace, checks: Checks, save_dir: str) -> None:
    print(f"2./3. 2-task streams on {args.device} (tiny ViT, digits, 3 steps per task)")
    precisions = ["bf16-mixed"] + (["16-mixed"] if args.device == "cuda" else [])
    low = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
    for algorithm in ("ita", "iel"):
        full = stream(algorithm, args.device, "32-true", save_dir)
        label = f"{algorithm.upper()} on {args.device}"
        checks.append((f"{label}: tasks 0 and 1 banked, deltas finite", full["banked"] == [0, 1] and full["finite"]))
        if args.device != "cpu":
            on_cpu = stream(algorithm, "cpu", "32-true", save_dir)
            error = relative_error(full["fisher"], on_cpu["fisher"])
            print(f"  {label}: curvature vs the same fit on the CPU, relative error {error:.2e}")
            checks.append((f"{label}: curvature equals the CPU fit's to 1e-4", error <= 1e-4))
        for precision in precisions:
            mixed = stream(algorithm, args.device, precision, save_dir)
            worst = max(relative_error({k: v}, {k: full["statistics"][k]}) for k, v in mixed["statistics"].items())
            dtypes = {v.dtype for v in mixed["statistics"].values()} | {mixed["penalty"].dtype}
            print(f"  {label}, {precision}: forward {sorted(map(str, mixed['forward']))}, statistics "
                  f"{sorted(map(str, dtypes))}, largest relative difference to 32-true {worst:.1e}, "
                  f"penalty {float(mixed['penalty']):.3g}")
            checks.append((f"{label}, {precision}: forward in {low[precision]}, Fisher / head / penalty in float32 "
                           "and equal to 32-true's (1e-6)",
                           mixed["forward"] == {low[precision]} and dtypes == {torch.float32} and worst <= 1e-6
                           and mixed["finite"] and bool(torch.isfinite(mixed["penalty"]))))


# -- 4. Fisher speed ------------------------------------------------------------------------------------
def speed(args: argparse.Namespace, checks: Checks) -> None:
    classes = (10, 50) if args.reduced else (10, 50, 200)
    examples, repeats = (16, 1) if args.reduced else (128, 3)
    settings = bench_args(args, args.device, "float32", 32)
    print(f"4. Fisher speed on {args.device}: {examples} examples, batch 32, median of {repeats} round-robin runs")
    print(f"  {'C':>5}{'reference [s]':>15}{'exact [s]':>11}{'mc K=1 [s]':>12}{'reference / exact':>19}"
          f"{'exact / mc':>12}")
    for num_classes in classes:
        model = fisher_bench.build_model(settings, num_classes)
        batches = fisher_bench.make_batches(settings, examples, num_classes)
        names = fisher_bench.target_names(model)
        methods = {
            "reference": lambda: fisher_bench.reference_fisher(model, batches, names),
            "exact": lambda: diagonal_fisher(model, batches, names).sums,
            "mc": lambda: diagonal_fisher(model, batches, names, estimator="mc",
                                          generator=torch.Generator().manual_seed(0)).sums,
        }
        medians, _ = fisher_bench.time_methods(methods, repeats, args.device)
        ratio = medians["reference"] / medians["exact"]
        print(f"  {num_classes:>5}{medians['reference']:>15.3f}{medians['exact']:>11.3f}{medians['mc']:>12.3f}"
              f"{ratio:>18.2f}x{medians['exact'] / medians['mc']:>11.1f}x")
        if args.device == "cuda":
            checks.append((f"C = {num_classes}: exact at least 3x faster than the reference on the GPU", ratio >= 3.0))


# -- 5. DDP ---------------------------------------------------------------------------------------------
def ddp_worker(out: Path, devices: int, batch_size: int) -> None:
    """One rank of the DDP check (Lightning starts the other ranks with the same command line)."""
    L.seed_everything(0, verbose=False)
    data = TaskStreamDataModule("digits", num_tasks=5, epochs_per_task=1, batch_size=batch_size, image_size=16)
    model = IncrementalViT("vit_tiny_patch16_224", pretrained=False, model_kwargs=TINY, num_classes=10,
                           classes_per_task=2, epochs_per_task=1, lr=1e-2, seed=0)
    ita = ITA(1.0, rank=2, pretuning=FAST_PRETUNING, head_fisher_samples=16, fisher_batch_size=16, save_dir=str(out))
    trainer = L.Trainer(accelerator="cuda", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        max_epochs=2, reload_dataloaders_every_n_epochs=1, num_sanity_val_steps=0,
                        limit_train_batches=3, limit_val_batches=0, enable_progress_bar=False, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, default_root_dir=str(out),
                        callbacks=[ita])
    trainer.fit(model, data)
    state = {"fisher": {k: v.cpu() for k, v in ita.accumulator.curvature(include_current=True).items()},
             "deltas": {k: v.cpu() for k, v in model.task_deltas.state_dict().items()}}
    torch.save(state, out / f"rank{trainer.global_rank}.pt")


def ddp(args: argparse.Namespace, checks: Checks, save_dir: str) -> None:
    if args.device != "cuda" or torch.cuda.device_count() < 2:
        print("5. DDP: skipped (fewer than two GPUs)")
        return
    results = {}
    for devices, batch_size in ((1, 32), (2, 16)):
        out = Path(save_dir) / f"ddp{devices}"
        out.mkdir()
        command = [sys.executable, __file__, "--ddp-worker", str(out), "--devices", str(devices),
                   "--batch-size", str(batch_size)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode:
            print(done.stderr[-3000:])
            checks.append((f"DDP: the {devices}-GPU run finishes", False))
            return
        results[devices] = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(devices)]
    ranks, single = results[2], results[1][0]
    same = all(torch.equal(v, ranks[1][part][k]) for part in ("fisher", "deltas") for k, v in ranks[0][part].items())
    error = relative_error(ranks[0]["fisher"], single["fisher"])
    print(f"5. DDP, 2 GPUs vs 1 (same global batch): ranks identical {same}, Fisher relative error {error:.2e}")
    checks.append(("DDP: both ranks hold the same state", same))
    checks.append(("DDP: 2-GPU Fisher equals the 1-GPU Fisher to 1e-5", error <= 1e-5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reduced", action="store_true", help="small shapes and class counts (the CI mode)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--ddp-worker", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=32, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ddp_worker is not None:
        ddp_worker(args.ddp_worker, args.devices, args.batch_size)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device (use --device cpu --reduced without one)")
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # the fits' start-up notes
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"torch {torch.__version__}, device {args.device} ({name}), {'reduced' if args.reduced else 'full'} mode")
    start = time.perf_counter()
    checks: Checks = []
    with tempfile.TemporaryDirectory() as save_dir:
        fisher_against_reference(args, checks)
        streams(args, checks, save_dir)
        speed(args, checks)
        ddp(args, checks, save_dir)
    print("\nchecks")
    for text, ok in checks:
        print(f"  {'yes' if ok else 'NO '}  {text}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    sys.exit(0 if all(ok for _, ok in checks) else 1)


if __name__ == "__main__":
    main()
