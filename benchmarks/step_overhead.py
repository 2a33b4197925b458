"""Per-step overhead of ITA and IEL: their training step against a plain LoRA step of the same module and batch.

Run from the repository root (a few minutes on 2 CPU cores):

    HF_HUB_OFFLINE=1 python benchmarks/step_overhead.py --model embedded --threads 1
    HF_HUB_OFFLINE=1 python benchmarks/step_overhead.py --model vit_b16 --depth 2 --batch-size 4 --steps 6 --rounds 3 --threads 1

Every variant is a real ``trainer.fit`` over tasks 0 and 1 of a random-image stream (``RandomStream``:
fixed random images of the model's input size, ``--classes-per-task`` classes per task), on the same module
built from the same seed. The optimiser steps of task 1 are timed (``on_train_batch_start`` →
``on_train_batch_end``: forward, backward, the callback's ``on_before_optimizer_step``, AdamW) after
``--warmup`` steps of each epoch. The variants:

- ``lora``: the plain LoRA step, the reference: the same slot on ``θ0 + τ_1``, no penalty and no guard
  (ITA with ``on_before_backward`` and ``on_before_optimizer_step`` replaced by no-ops);
- ``ita``: ITA, decoupled penalty step, the non-finite guard on;
- ``iel``: IEL, decoupled; the forward is the composition ``θ0 + ½ (τ_0 + τ_1)``, guard on;
- ``iel_coupled``: IEL with ``penalty_mode="coupled"``.

Each round runs every variant once, in an order rotated from round to round (so a load change on a shared
machine hits all variants alike); the printed ratio is median(variant steps) / median(lora steps) over all
rounds, with the range of the per-round ratios as its spread. The time spent in the callback's per-step hooks
(``on_before_backward`` and ``on_before_optimizer_step``: penalty, head penalty, guard, decoupled step) is
timed inside the steps too, as a fraction of the step: the robust part of the overhead (the rest is the
forward and backward of the composition). ``--profile`` first prints a ``torch.profiler`` table per variant.

Models: ``embedded`` is the shipped tiny ViT (6 blocks, width 96, 28 px grey, 50 tokens); ``vit_b16`` is
``vit_base_patch16_224`` with random weights (width 768, MLP 3072, 224 px, 197 tokens), ``--depth`` of its
12 blocks (the per-layer costs, and with them the ratios, do not depend on the depth).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_taylor.callbacks import IEL, ITA, PreTuning  # noqa: E402
from lightning_taylor.model.module import IncrementalViT  # noqa: E402

VARIANTS = ("lora", "ita", "iel", "iel_coupled")
FAST_PRETUNING = PreTuning(probe_epochs=1, align_epochs=1, align_epochs_per_task=0, samples_per_class=16)


class RandomStream(L.LightningDataModule):
    """Two tasks of fixed random images (``images`` per task, labels cycling over the task's classes).

    ``current_task`` follows the epoch; ``task_dataloader`` serves the task-boundary passes (pre-tuning and
    Fisher), the protocol of :mod:`lightning_taylor.callbacks.protocol`.
    """

    def __init__(self, input_size: tuple[int, int, int], classes_per_task: int, images: int, batch_size: int,
                 epochs_per_task: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.classes_per_task, self.num_tasks, self.epochs_per_task = classes_per_task, 2, epochs_per_task
        self.batch_size = batch_size
        self.data = []
        for task in range(self.num_tasks):
            x = torch.randn(images, *input_size, generator=generator)
            y = task * classes_per_task + torch.arange(images) % classes_per_task
            self.data.append(TensorDataset(x, y))

    @property
    def current_task(self) -> int:
        return min(self.trainer.current_epoch // self.epochs_per_task, self.num_tasks - 1)

    def task_dataloader(self, task: int, split: str = "train", batch_size: int | None = None, **_: object):
        return DataLoader(self.data[task], batch_size=batch_size or self.batch_size)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data[self.current_task], batch_size=self.batch_size, shuffle=False)


class StepTimer(L.Callback):
    """Wall time of every optimiser step of task 1 after ``warmup`` steps of each epoch, and the part of it
    spent in the method's per-step hooks (the growth of ``hook_bucket`` during the step)."""

    def __init__(self, first_epoch: int, warmup: int, hook_bucket: list[float]) -> None:
        self.first_epoch, self.warmup, self.bucket = first_epoch, warmup, hook_bucket
        self.times: list[float] = []
        self.hook_times: list[float] = []
        self._start, self._hooks_before = 0.0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self._hooks_before = sum(self.bucket)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.current_epoch >= self.first_epoch and batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self._start)
            self.hook_times.append(sum(self.bucket) - self._hooks_before)


def timed(function, bucket: list[float]):  # noqa: ANN001, ANN201
    def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            bucket.append(time.perf_counter() - start)
    return wrapper


def make_callback(variant: str, save_dir: str, rank: int) -> L.Callback:
    common = dict(rank=rank, fisher_estimator="mc", pretuning=FAST_PRETUNING, head_fisher_samples=16,
                  save_dir=save_dir)
    if variant == "lora" or variant == "ita":
        callback = ITA(alpha=100.0, lambda_fisher=1.0, **common)
        if variant == "lora":  # the same slot and forward, nothing of the method per step
            callback.on_before_backward = lambda *args, **kwargs: None
            callback.on_before_optimizer_step = lambda *args, **kwargs: None
        return callback
    mode = "coupled" if variant == "iel_coupled" else "decoupled"
    return IEL(beta=20.0, lambda_fisher=1.0, penalty_mode=mode, **common)


def make_module(args: argparse.Namespace) -> IncrementalViT:
    num_classes = 2 * args.classes_per_task
    kwargs = dict(num_classes=num_classes, classes_per_task=args.classes_per_task, epochs_per_task=args.epochs,
                  seed=0, lr=3e-4)
    if args.model == "embedded":
        return IncrementalViT(**kwargs)
    return IncrementalViT("vit_base_patch16_224", pretrained=False, model_kwargs={"depth": args.depth}, **kwargs)


def one_fit(variant: str, args: argparse.Namespace, save_dir: str, profile: bool = False
            ) -> tuple[list[float], list[float]]:
    """Tasks 0 and 1 with ``variant``; the step times of task 1 and the time of its per-step hooks in them."""
    L.seed_everything(0, verbose=False)
    module = make_module(args)
    data = RandomStream(module.input_size, args.classes_per_task, args.batch_size * args.steps, args.batch_size,
                        args.epochs)
    callback, bucket = make_callback(variant, save_dir, args.rank), []
    callback.on_before_backward = timed(callback.on_before_backward, bucket)
    callback.on_before_optimizer_step = timed(callback.on_before_optimizer_step, bucket)
    timer = StepTimer(args.epochs, args.warmup, bucket)
    trainer = L.Trainer(max_epochs=2 * args.epochs, reload_dataloaders_every_n_epochs=1, limit_val_batches=0,
                        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[callback, timer])
    with contextlib.redirect_stdout(io.StringIO()):  # the fit's own messages
        if not profile:
            trainer.fit(module, data)
            return timer.times, timer.hook_times
        from torch.profiler import profile as torch_profile

        with torch_profile() as prof:
            trainer.fit(module, data)
    print(f"\n--- profile of `{variant}` (whole fit, task boundaries included) ---")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return timer.times, timer.hook_times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("embedded", "vit_b16"), default="embedded")
    parser.add_argument("--depth", type=int, default=4, help="blocks of vit_b16 (of 12)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="optimiser steps per epoch")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per task")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each epoch of task 1")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank r (qkv gets 3r)")
    parser.add_argument("--classes-per-task", type=int, default=2)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table per variant")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = ["lora"] + [v for v in args.variants if v != "lora"]
    times: dict[str, list[float]] = {v: [] for v in variants}
    hooks: dict[str, list[float]] = {v: [] for v in variants}
    per_round: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as save_dir:  # the fits' saved deltas are not wanted
        if args.profile:
            for variant in variants:
                one_fit(variant, args, save_dir, profile=True)
        for round_ in range(args.rounds):
            order = variants[round_ % len(variants):] + variants[: round_ % len(variants)]
            for variant in order:
                steps, in_hooks = one_fit(variant, args, save_dir)
                times[variant] += steps
                hooks[variant] += in_hooks
                per_round[variant].append(statistics.median(steps))
    if not args.rounds:
        return
    reference = statistics.median(times["lora"])
    print(f"{args.model} (batch {args.batch_size}, rank {args.rank}, {args.threads} thread(s), {args.rounds} rounds, "
          f"{len(times['lora'])} timed steps per variant): median optimiser step of task 1")
    print(f"{'variant':<12} {'median ms':>10} {'/ lora':>8}   {'per-round ratios':<16} {'hooks ms':>9} {'hooks / step':>13}")
    for variant in variants:
        median = statistics.median(times[variant])
        ratios = [v / r for v, r in zip(per_round[variant], per_round["lora"])]
        hook = statistics.median(hooks[variant])
        print(f"{variant:<12} {1e3 * median:10.2f} {median / reference:8.3f}   "
              f"{min(ratios):.3f}–{max(ratios):<10.3f} {1e3 * hook:9.2f} {100 * sum(hooks[variant]) / sum(times[variant]):12.1f} %")


if __name__ == "__main__":
    main()
