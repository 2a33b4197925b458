"""Task-boundary cost: features + pre-tuning + backbone Fisher + head Fisher, as a fraction of one epoch.

Run from the repository root (a few minutes on 2 CPU cores with the reduced shapes below):

    HF_HUB_OFFLINE=1 python benchmarks/boundary_cost.py --classes 10 100 200 --estimators mc --threads 1
    HF_HUB_OFFLINE=1 python benchmarks/boundary_cost.py --classes 10 --estimators exact mc --threads 1
    HF_HUB_OFFLINE=1 python benchmarks/boundary_cost.py --classes 10 --estimators mc --img-size 224 --profile

For each class count C and Fisher estimator, one ITA fit of one task with C classes (so the Fisher runs over
C seen classes) on ``vit_base_patch16_224`` with random weights (``--depth`` of its 12 blocks, ``--img-size``
pixels) and ``--per-class`` random images per class. The four parts of the task boundary
(:meth:`~lightning_taylor.callbacks.SecondOrder.begin_task`) are timed by wrapping them in the fit, and the
first training epoch that follows (the same images, ``--batch-size``) is timed from its start to its end.
It prints each part's seconds and the boundary's total as a fraction of that epoch (target with ``mc``:
≤ 1 epoch). Ratios of parts measured in the same fit: other load moves them less than absolute times.
``--profile`` also prints, after each row, the functions that took the most time of their own (cProfile)
inside the backbone Fisher: where its time goes (forward, backward, squaring).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
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
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_taylor.callbacks import ITA, PreTuning  # noqa: E402
from lightning_taylor.callbacks import _boundary as boundary  # noqa: E402
from lightning_taylor.callbacks._curvature import DiagonalCurvature  # noqa: E402
from lightning_taylor.model.module import IncrementalViT  # noqa: E402

PARTS = ("features", "pre-tuning", "backbone Fisher", "head Fisher")


class OneTask(L.LightningDataModule):
    """One task of ``classes`` classes, ``per_class`` fixed random images each."""

    def __init__(self, input_size: tuple[int, int, int], classes: int, per_class: int, batch_size: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(classes * per_class, *input_size, generator=generator)
        y = torch.arange(classes * per_class) % classes
        self.data, self.batch_size = TensorDataset(x, y), batch_size
        self.classes_per_task, self.num_tasks, self.current_task = classes, 1, 0

    def task_dataloader(self, task: int, split: str = "train", batch_size: int | None = None, **_: object):
        return DataLoader(self.data, batch_size=batch_size or self.batch_size)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size)


class EpochTimer(L.Callback):
    """Wall time of the first training epoch (after the boundary, which runs in the ITA callback's
    ``on_train_epoch_start``: this callback comes after it in the list)."""

    def __init__(self) -> None:
        self.seconds, self._start = 0.0, 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.seconds = time.perf_counter() - self._start


@contextlib.contextmanager
def timed_parts(times: dict[str, float], profile: cProfile.Profile | None = None):  # noqa: ANN201
    """Wrap the boundary's four parts (module functions and callback methods) to add up their time;
    with ``profile``, the backbone Fisher runs under it."""
    def wrap(function, part):  # noqa: ANN001, ANN202
        def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            profiled = profile is not None and part == "backbone Fisher"
            start = time.perf_counter()
            if profiled:
                profile.enable()
            try:
                return function(*args, **kwargs)
            finally:
                if profiled:
                    profile.disable()
                times[part] = times.get(part, 0.0) + time.perf_counter() - start
        return wrapper

    saved = (boundary.extract_features, boundary.pretune_head, DiagonalCurvature.estimate, boundary.head_curvature)
    boundary.extract_features = wrap(saved[0], "features")
    boundary.pretune_head = wrap(saved[1], "pre-tuning")
    DiagonalCurvature.estimate = wrap(saved[2], "backbone Fisher")
    boundary.head_curvature = wrap(saved[3], "head Fisher")
    try:
        yield
    finally:
        (boundary.extract_features, boundary.pretune_head, DiagonalCurvature.estimate,
         boundary.head_curvature) = saved


def one_fit(args: argparse.Namespace, classes: int, estimator: str, save_dir: str,
            profile: cProfile.Profile | None = None) -> tuple[dict[str, float], float]:
    L.seed_everything(0, verbose=False)
    module = IncrementalViT("vit_base_patch16_224", pretrained=False, num_classes=classes, classes_per_task=classes,
                            epochs_per_task=1, seed=0,
                            model_kwargs={"depth": args.depth, "img_size": args.img_size})
    data = OneTask(module.input_size, classes, args.per_class, args.batch_size)
    ita = ITA(alpha=1.0, rank=args.rank, fisher_estimator=estimator, fisher_batch_size=args.batch_size,
              pretuning=PreTuning(), save_dir=save_dir)
    timer = EpochTimer()
    trainer = L.Trainer(max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ita, timer])
    times: dict[str, float] = {}
    with timed_parts(times, profile), contextlib.redirect_stdout(io.StringIO()):
        trainer.fit(module, data)
    return times, timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100, 200])
    parser.add_argument("--estimators", nargs="+", choices=("exact", "mc"), default=["exact", "mc"])
    parser.add_argument("--depth", type=int, default=1, help="blocks of vit_base_patch16_224 (of 12)")
    parser.add_argument("--img-size", type=int, default=64, help="224 for the real token count (197)")
    parser.add_argument("--per-class", type=int, default=8, help="images per class (the mixtures need >= 5)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="cProfile of the backbone Fisher after each row")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import sklearn.mixture  # noqa: F401  (imported by the first pre-tuning: ~0.4 s, not a cost of the boundary)
    tokens = (args.img_size // 16) ** 2 + 1
    print(f"vit_base_patch16_224 shapes, {args.depth} of 12 blocks, {args.img_size} px ({tokens} tokens), "
          f"{args.per_class} images per class, batch {args.batch_size}, {args.threads} thread(s)")
    print(f"  {'C':>4} {'estimator':<9} {'images':>6} " + "".join(f"{p + ' [s]':>21}" for p in PARTS)
          + f"{'epoch [s]':>11}{'boundary / epoch':>18}")
    with tempfile.TemporaryDirectory() as save_dir:
        for classes in args.classes:
            for estimator in args.estimators:
                profile = cProfile.Profile() if args.profile else None
                times, epoch = one_fit(args, classes, estimator, save_dir, profile)
                total = sum(times.get(p, 0.0) for p in PARTS)
                print(f"  {classes:>4} {estimator:<9} {classes * args.per_class:>6} "
                      + "".join(f"{times.get(p, 0.0):>21.2f}" for p in PARTS)
                      + f"{epoch:>11.2f}{total / epoch:>17.2f}x", flush=True)
                if profile is not None:
                    pstats.Stats(profile, stream=sys.stdout).sort_stats("tottime").print_stats(8)


if __name__ == "__main__":
    main()
