"""EuroSAT RGB (Helber et al., 2019): 27,000 Sentinel-2 land-cover patches of 64×64 px in 10 classes.

Layout: torchvision's (``torchvision.datasets.EuroSAT``, which ``download: true`` uses to fetch it)::

    root/eurosat/2750/<Class>/<Class>_<n>.jpg         # AnnualCrop, Forest, ..., SeaLake

There is no official split. The reference framework uses the split of CoOp (Zhou et al.),
``split_zhou_EuroSAT.json`` (keys ``train`` / ``val`` / ``test``, rows ``[<Class>/<file>, label, name]``;
mammoth saves it as ``split.json``): put it in ``root/eurosat/`` under either name to use its ``train`` and
``test`` rows. Without it: a seeded stratified split. Labels: the sorted folder names (as in that file);
5 tasks of 2 classes.
"""

from __future__ import annotations

from pathlib import Path

from lightning_taylor.data.benchmarks.base import (
    Benchmark,
    Index,
    SplitChoice,
    choose_split,
    class_folders,
    listed_split,
    require,
    split_index,
)
from lightning_taylor.data.benchmarks.files import read_json
from lightning_taylor.data.transforms import Recipe

EUROSAT_CLASSES = ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
                   "PermanentCrop", "Residential", "River", "SeaLake")
SPLIT_FILES = ("split_zhou_EuroSAT.json", "split.json")


def index(root: str, split: SplitChoice, test_fraction: float, split_seed: int) -> Index:
    folder = require(EUROSAT, root, "eurosat", "2750", directory=True)
    paths, targets = class_folders(EUROSAT, root, folder)
    file = next((Path(root, "eurosat", n) for n in SPLIT_FILES if Path(root, "eurosat", n).is_file()),
                Path(root, "eurosat", SPLIT_FILES[0]))
    if not choose_split(EUROSAT, root, split, [file]):
        return split_index(paths, targets, EUROSAT_CLASSES, test_fraction, split_seed, "eurosat")
    content = read_json(EUROSAT, root, file, ("train", "test"), same_length=False)
    listed, halves = set(paths), []
    for part in ("train", "test"):
        rows = content[part]
        bad = next((row for row in rows if not isinstance(row, list) or len(row) < 2), None)
        if bad is not None:
            raise EUROSAT.missing(root, f"The split file `{file}` has the {part} row {bad!r}, not "
                                  "`[<Class>/<file>, label, name]`.")
        halves.append(listed_split(EUROSAT, root, file, [r[0] for r in rows], [r[1] for r in rows], folder,
                                   EUROSAT_CLASSES, listed))
    (train_paths, train_targets), (test_paths, test_targets) = halves
    return Index(train_paths, train_targets, test_paths, test_targets, EUROSAT_CLASSES, "reference",
                 f"reference split file {file.name} (CoOp)")


def download(root: str) -> None:
    """Fetch EuroSAT RGB into ``root/eurosat/2750`` with torchvision (about 90 MB) unless it is there."""
    from torchvision.datasets import EuroSAT

    EuroSAT(root, download=True)


EUROSAT = Benchmark(
    name="eurosat", title="EuroSAT RGB", num_classes=10, class_names=EUROSAT_CLASSES, task_sizes=(2,) * 5,
    mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711),  # CLIP's, as the reference
    recipe=Recipe("random_resized_crop", crop_scale=(0.08, 1.0), test_resize=224),
    layout="root/eurosat/2750/<Class>/*.jpg",
    source="Pass `download: true` to fetch it with torchvision, or unpack EuroSAT_RGB.zip "
           "(https://zenodo.org/records/7711810) as `root/eurosat/2750/`; the reference split is CoOp's "
           "`split_zhou_EuroSAT.json` (https://github.com/KaiyangZhou/CoOp), put in `root/eurosat/`.",
    index=index, download=download,
)
