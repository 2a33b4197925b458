"""NWPU-RESISC45 (Cheng et al., 2017): 31,500 aerial scenes of 256×256 px, 45 classes of 700 images.

Layout, as the archive ``NWPU-RESISC45.rar`` unpacks::

    root/NWPU-RESISC45/<class>/<class>_<nnn>.jpg      # airplane, airport, ..., wetland

There is no official split. The reference framework ships its split as ``resisc45_train.yaml`` and
``resisc45_test.yaml`` (keys ``data``: paths ending in ``<class>/<file>``, ``targets``: labels); put both in
``root/NWPU-RESISC45/`` to use it. Without them: a seeded stratified split. Labels: the sorted class names
(the reference's order); 9 tasks of 5 classes.
"""

from __future__ import annotations

from pathlib import Path

from lightning_taylor.data.benchmarks.base import (
    Benchmark,
    Index,
    SplitChoice,
    folder_index,
    require,
)
from lightning_taylor.data.benchmarks.files import read_yaml
from lightning_taylor.data.transforms import Recipe

RESISC45_CLASSES = (
    "airplane", "airport", "baseball_diamond", "basketball_court", "beach", "bridge", "chaparral", "church",
    "circular_farmland", "cloud", "commercial_area", "dense_residential", "desert", "forest", "freeway",
    "golf_course", "ground_track_field", "harbor", "industrial_area", "intersection", "island", "lake", "meadow",
    "medium_residential", "mobile_home_park", "mountain", "overpass", "palace", "parking_lot", "railway",
    "railway_station", "rectangular_farmland", "river", "roundabout", "runway", "sea_ice", "ship", "snowberg",
    "sparse_residential", "stadium", "storage_tank", "tennis_court", "terrace", "thermal_power_station", "wetland",
)
SPLIT_FILES = ("resisc45_train.yaml", "resisc45_test.yaml")


def _entries(file: Path, root: str) -> tuple[list, list]:
    content = read_yaml(RESISC45, root, file, ("data", "targets"))
    return content["data"], content["targets"]


def index(root: str, split: SplitChoice, test_fraction: float, split_seed: int) -> Index:
    folder = require(RESISC45, root, "NWPU-RESISC45", directory=True)
    files = [folder / name for name in SPLIT_FILES]
    return folder_index(RESISC45, root, folder, RESISC45_CLASSES, split, files, lambda file: _entries(file, root),
                        test_fraction, split_seed)


RESISC45 = Benchmark(
    name="resisc45", title="NWPU-RESISC45", num_classes=45, class_names=RESISC45_CLASSES, task_sizes=(5,) * 9,
    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),  # ImageNet statistics, as the reference
    recipe=Recipe("random_resized_crop", test_resize=(256, 256)),
    layout="root/NWPU-RESISC45/<class>/*.jpg",
    source="Get NWPU-RESISC45.rar (https://gcheng-nwpu.github.io/#Datasets) and unpack it in `root`; the "
           "reference split files are `resisc45_{train,test}.yaml` of the reference framework (mammoth), put in "
           "`root/NWPU-RESISC45/`.",
    index=index,
)
