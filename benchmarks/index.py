"""Time to index a benchmark folder of 30,000 images: the cost of ``TaskStreamDataModule.setup()``.

Run from the repository root (about 10 s, most of it writing the folder):

    python benchmarks/index.py --repeats 5

It writes an ImageNet-R layout of ``--images`` files (``root/imagenet-r/<wnid>/*.jpg``, 200 class folders;
every file the same 8×8 JPEG, so writing is fast) into a temporary directory, plus the reference split files
(80 / 20, as the reference's ``imagenet-r_{train,test}.yaml``), and prints the median and maximum wall time of
``setup()`` of a fresh data module over ``--repeats`` runs, for the reference split (its YAML files read and
checked against the folder listing) and for the seeded split (listing only). The target is under 2 s for
30,000 images; no image is decoded (``read_image`` is replaced by a function that fails if called).
Finally it checks that the index is built once per data module, not per epoch or task: the loaders of
every task and the validation loader are built and the number of index builds is printed (expected 1).
The folder is read warm (just written, in the page cache); a cold disk adds its listing latency.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402
from PIL import Image  # noqa: E402

import lightning_taylor.data.benchmarks.base as base  # noqa: E402
from lightning_taylor.data import TaskStreamDataModule  # noqa: E402
from lightning_taylor.data.benchmarks import BENCHMARKS  # noqa: E402


def write_folder(root: Path, images: int) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 60, 30)).save(buffer, format="JPEG")
    data = buffer.getvalue()
    wnids = BENCHMARKS["imagenet_r"].class_names
    per_class = images // len(wnids)
    split = {"train": {"data": [], "targets": []}, "test": {"data": [], "targets": []}}
    for label, wnid in enumerate(wnids):
        folder = root / "imagenet-r" / wnid
        folder.mkdir(parents=True)
        for i in range(per_class):
            (folder / f"art_{i}.jpg").write_bytes(data)
            part = split["test" if i % 5 == 0 else "train"]
            part["data"].append(f"data/imagenet-r/{wnid}/art_{i}.jpg")
            part["targets"].append(label)
    for part, content in split.items():
        (root / f"imagenet-r_{part}.yaml").write_text(yaml.safe_dump(content))


def time_setup(root: Path, split: str, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        data = TaskStreamDataModule("imagenet_r", root=str(root), split=split)
        start = time.perf_counter()
        data.setup()
        times.append(time.perf_counter() - start)
        assert len(data._raw.train) + len(data._raw.test) > 0
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=30_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    def refuse(path: str):
        raise RuntimeError(f"an image was decoded while indexing: {path}")

    base.read_image = refuse  # FileList decodes through this name: indexing must never call it
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        write_folder(root, args.images)
        print(f"wrote {args.images} images in 200 class folders in {time.perf_counter() - start:.1f} s")
        for split in ("reference", "seeded"):
            times = time_setup(root, split, args.repeats)
            print(f"setup() with the {split} split: median {statistics.median(times):.3f} s, "
                  f"max {max(times):.3f} s over {args.repeats} runs ({args.images} images, no image decoded)")
        builds = 0
        index = BENCHMARKS["imagenet_r"].index

        def counted(*a, **k):
            nonlocal builds
            builds += 1
            return index(*a, **k)

        object.__setattr__(BENCHMARKS["imagenet_r"], "index", counted)
        data = TaskStreamDataModule("imagenet_r", root=str(root))
        for task in range(data.num_tasks):
            data.set_task(task)
            data.train_dataloader()
            data.val_dataloader()
        print(f"index builds for the loaders of {data.num_tasks} tasks: {builds}")


if __name__ == "__main__":
    main()
