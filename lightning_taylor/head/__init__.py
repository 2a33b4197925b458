"""The classifier head at a task boundary: class mixtures, probing and alignment, its Fisher, drift compensation.

- :mod:`~lightning_taylor.head.mixtures`: per-class Gaussian mixtures of θ0 features (synthetic features);
- :mod:`~lightning_taylor.head.probing`: linear probing and alignment of the head rows;
- :mod:`~lightning_taylor.head.fisher`: the head's diagonal Fisher in closed form (the head penalty's weights);
- :mod:`~lightning_taylor.head.pretuning`: the pre-tuning of docs/method.md §5, its settings and features;
- :mod:`~lightning_taylor.head.drift`: moving old classes' mixtures with the composed backbone;
- :mod:`~lightning_taylor.head.pretuned_file`: ``pretuned_head.safetensors``, every boundary's pre-tuned head.
"""

from lightning_taylor.head.drift import compensate_drift
from lightning_taylor.head.fisher import head_fisher
from lightning_taylor.head.mixtures import ClassMixtures, fit_class_mixtures
from lightning_taylor.head.pretuned_file import (
           PRETUNED_FILE,
           PretunedHeads,
           load_pretuned_heads,
           pretuned_tensors,
)
from lightning_taylor.head.pretuning import PreTuning, extract_features, pretune_head
from lightning_taylor.head.probing import align_head, alignment_epochs, linear_probe

__all__ = ["PRETUNED_FILE", "ClassMixtures", "PreTuning", "PretunedHeads", "align_head", "alignment_epochs",
           "compensate_drift", "extract_features", "fit_class_mixtures", "head_fisher", "linear_probe",
           "load_pretuned_heads", "pretune_head", "pretuned_tensors"]
