"""The ITA, IEL and head regularisers and how they are applied (docs/method.md §4), without autograd graphs.

- :mod:`~lightning_taylor.penalties.diagonal`: ITA / IEL with the diagonal Fisher;
- :mod:`~lightning_taylor.penalties.kfac`: the same in Kronecker form;
- :mod:`~lightning_taylor.penalties.head`: the head penalty;
- :mod:`~lightning_taylor.penalties.step`: the algorithm, IEL's composition size, the decoupled step.
"""

from lightning_taylor.penalties.diagonal import (
    delta_penalty,
    iel_penalty,
    iel_penalty_grad,
    ita_penalty,
    ita_penalty_grad,
    jensen_gap,
)
from lightning_taylor.penalties.head import head_penalty
from lightning_taylor.penalties.kfac import (
    LayerCurvature,
    kfac_delta_penalty,
    prepare_curvature,
)
from lightning_taylor.penalties.step import Algorithm, decoupled_step, iel_members

__all__ = [
    "Algorithm", "LayerCurvature", "decoupled_step", "delta_penalty", "head_penalty", "iel_members", "iel_penalty",
    "iel_penalty_grad", "ita_penalty", "ita_penalty_grad", "jensen_gap", "kfac_delta_penalty", "prepare_curvature",
]
