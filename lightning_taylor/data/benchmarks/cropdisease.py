"""CropDisease (Mohanty et al., 2016, PlantVillage; the cross-domain benchmark of Guo et al., 2020): leaves.

Layout: one folder per class, named as the reference framework names its 35 classes, under ``images/``::

    root/cropdisease/images/<Crop___Disease>/<image>.jpg     # Apple___Apple_scab, ..., Tomato___healthy
    root/cropdisease/train.json, test.json                   # optional: the reference split

The reference framework (mammoth) uses 35 of the PlantVillage classes and its own split, distributed with
its copy of the data as ``train.json`` / ``test.json`` (keys ``data``: paths under ``images/`` ending in
``<class>/<image>``, ``labels``: labels); put them in ``root/cropdisease/`` to use it. Without them: a
seeded stratified split. Labels: the reference's order (:data:`CROPDISEASE_CLASSES`); 7 tasks of 5.
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
from lightning_taylor.data.benchmarks.files import read_json
from lightning_taylor.data.transforms import Recipe

CROPDISEASE_CLASSES = (
    "Apple___Apple_scab", "Apple___Black_rot", "Apple___healthy", "Blueberry___healthy", "Cherry___Powdery_mildew",
    "Cherry___healthy", "Corn___Cercospora_leaf_spot Gray_leaf_spot", "Corn___Common_rust",
    "Corn___Northern_Leaf_Blight", "Corn___healthy", "Grape___Black_rot", "Grape___Esca_(Black_Measles)",
    "Grape___Leaf_blight_(Isariopsis_Leaf_Spot)", "Grape___healthy", "Orange___Haunglongbing_(Citrus_greening)",
    "Peach___Bacterial_spot", "Pepper,_bell___Bacterial_spot", "Pepper,_bell___healthy", "Potato___Early_blight",
    "Potato___Late_blight", "Raspberry___healthy", "Soybean___healthy", "Squash___Powdery_mildew",
    "Strawberry___Leaf_scorch", "Strawberry___healthy", "Tomato___Bacterial_spot", "Tomato___Early_blight",
    "Tomato___Late_blight", "Tomato___Leaf_Mold", "Tomato___Septoria_leaf_spot",
    "Tomato___Spider_mites Two-spotted_spider_mite", "Tomato___Target_Spot", "Tomato___Tomato_Yellow_Leaf_Curl_Virus",
    "Tomato___Tomato_mosaic_virus", "Tomato___healthy",
)
SPLIT_FILES = ("train.json", "test.json")


def _entries(file: Path, root: str) -> tuple[list, list]:
    content = read_json(CROPDISEASE, root, file, ("data", "labels"))
    return content["data"], content["labels"]


def index(root: str, split: SplitChoice, test_fraction: float, split_seed: int) -> Index:
    folder = require(CROPDISEASE, root, "cropdisease", "images", directory=True)
    files = [Path(root, "cropdisease", name) for name in SPLIT_FILES]
    return folder_index(CROPDISEASE, root, folder, CROPDISEASE_CLASSES, split, files, lambda file: _entries(file, root),
                        test_fraction, split_seed)


CROPDISEASE = Benchmark(
    name="cropdisease", title="CropDisease", num_classes=35, class_names=CROPDISEASE_CLASSES, task_sizes=(5,) * 7,
    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),  # ImageNet statistics, as the reference
    recipe=Recipe("random_resized_crop", test_resize=(224, 224)),
    layout="root/cropdisease/images/<Crop___Disease>/*.jpg",
    source="The images are PlantVillage's (e.g. Kaggle `emmarex/plantdisease` or the CD-FSL benchmark's "
           "CropDisease); arrange the 35 classes as `root/cropdisease/images/<class>/`, or use the reference "
           "framework's copy (mammoth's `seq-cropdisease` download), whose `train.json` / `test.json` go in "
           "`root/cropdisease/`.",
    index=index,
)
