"""Curvature at the pre-trained weights θ0: the diagonal Fisher and KFAC, as sums and counts, across tasks.

- :mod:`~lightning_taylor.curvature.diagonal`: :func:`diagonal_fisher` (estimators ``exact``, ``mc``, ``topk``,
  ``empirical``) and :class:`FisherSums`;
- :mod:`~lightning_taylor.curvature.kfac`: :func:`kronecker_sums` and :class:`KroneckerSums`;
- :mod:`~lightning_taylor.curvature.kfac_file`: :func:`load_kfac`, the ``kfac.safetensors`` a fit writes;
- :mod:`~lightning_taylor.curvature.accumulators`: both across the tasks of a stream;
- :mod:`~lightning_taylor.curvature.memory`: whether KFAC factors fit the device.
"""

from lightning_taylor.curvature.accumulators import (
           FisherAccumulator,
           KFACTasks,
           KroneckerAccumulator,
)
from lightning_taylor.curvature.diagonal import Estimator, FisherSums, diagonal_fisher
from lightning_taylor.curvature.kfac import (
           KFACApprox,
           KFACEstimator,
           KroneckerSums,
           kronecker_sums,
)
from lightning_taylor.curvature.kfac_file import KFACFile, load_kfac
from lightning_taylor.curvature.memory import check_factor_memory, factor_memory

__all__ = ["Estimator", "FisherAccumulator", "FisherSums", "KFACApprox", "KFACEstimator", "KFACFile", "KFACTasks",
           "KroneckerAccumulator", "KroneckerSums", "check_factor_memory", "diagonal_fisher", "factor_memory",
           "kronecker_sums", "load_kfac"]
