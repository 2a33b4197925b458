"""The benchmarks of the paper and its line of work, one module each, in one registry (:data:`BENCHMARKS`).

Each module states the benchmark's layout as its authors distribute it, its split (official, the reference
framework's split files, or a seeded fallback), its class order, task partition and reference transforms;
:class:`~lightning_taylor.data.benchmarks.base.Benchmark` is what they have in common.
"""

from lightning_taylor.data.benchmarks.base import (
                                                        Benchmark,
                                                        FileList,
                                                        Index,
                                                        SplitChoice,
                                                        seeded_split,
)
from lightning_taylor.data.benchmarks.cars196 import CARS196
from lightning_taylor.data.benchmarks.cropdisease import CROPDISEASE
from lightning_taylor.data.benchmarks.cub200 import CUB200
from lightning_taylor.data.benchmarks.eurosat import EUROSAT
from lightning_taylor.data.benchmarks.imagenet_r import IMAGENET_R
from lightning_taylor.data.benchmarks.isic import ISIC
from lightning_taylor.data.benchmarks.resisc45 import RESISC45

#: the benchmarks by ``dataset`` name
BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (IMAGENET_R, CUB200, CARS196, EUROSAT, ISIC, RESISC45,
                                                        CROPDISEASE)}

__all__ = ["BENCHMARKS", "Benchmark", "FileList", "Index", "SplitChoice", "seeded_split"]
