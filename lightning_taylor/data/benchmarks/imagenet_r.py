"""ImageNet-R (Hendrycks et al., 2021): 200 ImageNet classes as renditions (art, cartoons, ...), 30,000 images.

Layout, as the official tar (https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar) unpacks::

    root/imagenet-r/<wnid>/<rendition>_<n>.jpg        # 200 folders named by WordNet id

There is no official split. The reference framework (mammoth) ships its 24,000 / 6,000 split as
``datasets/imagenet_r_utils/imagenet-r_train.yaml`` and ``imagenet-r_test.yaml`` (keys ``data``: image
paths ending in ``imagenet-r/<wnid>/<file>``, ``targets``: labels); copy both into ``root/`` to use it.
Without them: a seeded stratified split (``test_fraction``, 0.2 as the reference's 80 / 20).
Label order: the reference's (:data:`IMAGENET_R_WNIDS`), 10 tasks of 20 classes.
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

#: WordNet ids of the 200 classes in the reference's label order (label i is IMAGENET_R_WNIDS[i]), as its
#: split files number them.
IMAGENET_R_WNIDS: tuple[str, ...] = (
    "n02165456", "n03594945", "n02325366", "n02814860", "n02966193", "n02480495", "n02106030", "n02088364", "n02066245",
    "n02843684", "n04591713", "n02110185", "n02092339", "n02980441", "n01833805", "n03947888", "n03602883", "n03649909",
    "n02841315", "n01855672", "n02007558", "n03424325", "n03710193", "n02992529", "n12267677", "n02233338", "n04254680",
    "n07714990", "n01644373", "n02077923", "n02138441", "n03498962", "n01484850", "n01847000", "n02113799", "n02129165",
    "n02119022", "n07697537", "n02480855", "n02009912", "n07693725", "n02445715", "n04487394", "n02802426", "n09835506",
    "n04133789", "n02113023", "n02091134", "n02110341", "n02317335", "n02607072", "n07768694", "n07880968", "n01843383",
    "n02769748", "n03494278", "n02106166", "n04086273", "n01944390", "n02098286", "n01806143", "n01514859", "n01498041",
    "n07614500", "n04465501", "n02398521", "n02117135", "n02808440", "n02112018", "n02906734", "n02486410", "n07720875",
    "n02110958", "n03124170", "n01632777", "n01986214", "n02437616", "n04192698", "n02134084", "n02655020", "n02086240",
    "n03345487", "n02395406", "n04147183", "n01748264", "n02113624", "n03272010", "n03495258", "n02128385", "n03467068",
    "n02096585", "n04310018", "n04146614", "n04536866", "n07745940", "n02088238", "n02363005", "n02364673", "n02226429",
    "n07753592", "n02510455", "n04266014", "n02948072", "n07695742", "n02099712", "n02112137", "n07873807", "n02102318",
    "n02106662", "n01774750", "n02219486", "n02114367", "n01614925", "n07734744", "n01770393", "n01616318", "n04275548",
    "n03452741", "n02950826", "n02883205", "n02279972", "n03775071", "n01443537", "n02088466", "n04325704", "n02129604",
    "n02091032", "n07714571", "n02085620", "n04347754", "n01677366", "n04118538", "n01882714", "n07697313", "n01820546",
    "n02097298", "n02088094", "n03372029", "n02108915", "n02797295", "n01531178", "n03930630", "n02268443", "n02823750",
    "n02106550", "n01494475", "n02190166", "n02346627", "n02130308", "n02481823", "n07718472", "n04522168", "n07753275",
    "n01910747", "n02447366", "n02109525", "n02099601", "n01784675", "n04141076", "n04389033", "n03481172", "n02483362",
    "n02749479", "n04552348", "n02123045", "n01860187", "n03676483", "n02526121", "n02236044", "n04409515", "n02423022",
    "n02206856", "n02108089", "n02051845", "n10565667", "n07749582", "n01630670", "n02128757", "n02939185", "n02672831",
    "n02951358", "n07920052", "n01518878", "n02793495", "n03773504", "n01694178", "n09472597", "n02909870", "n02701002",
    "n03888257", "n01983481", "n02356798", "n02410509", "n07742313", "n02391049", "n03630383", "n02094433", "n02056570",
    "n02071294", "n01534433",
)

SPLIT_FILES = ("imagenet-r_train.yaml", "imagenet-r_test.yaml")


def _entries(file: Path, root: str) -> tuple[list, list]:
    content = read_yaml(IMAGENET_R, root, file, ("data", "targets"))
    return content["data"], content["targets"]


def index(root: str, split: SplitChoice, test_fraction: float, split_seed: int) -> Index:
    folder = require(IMAGENET_R, root, "imagenet-r", directory=True)
    files = [Path(root, name) for name in SPLIT_FILES]
    return folder_index(IMAGENET_R, root, folder, IMAGENET_R_WNIDS, split, files, lambda file: _entries(file, root),
                        test_fraction, split_seed)


IMAGENET_R = Benchmark(
    name="imagenet_r", title="ImageNet-R", num_classes=200, class_names=IMAGENET_R_WNIDS, task_sizes=(20,) * 10,
    mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),  # the reference serves ImageNet-R unnormalised
    recipe=Recipe("random_resized_crop", test_resize=(256, 256)),
    layout="root/imagenet-r/<wnid>/*.jpg",
    source="Get it from https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar and unpack it in `root`; "
           "the reference split files are mammoth's `datasets/imagenet_r_utils/imagenet-r_{train,test}.yaml` "
           "(https://github.com/aimagelab/mammoth), copied into `root`.",
    index=index,
)
