"""Class-conditional Gaussian mixtures of features: what the head's pre-tuning and alignment sample from.

At each task boundary every class of the task gets one diagonal Gaussian mixture fitted to its CLS features
at θ0 (:func:`fit_class_mixtures`, scikit-learn); :class:`ClassMixtures` keeps the mixtures of every class
seen so far (checkpointed as plain tensors) and draws synthetic features from them, so no old image is kept.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from lightning_taylor._checks import check_non_negative_int, check_positive_int
from lightning_taylor.errors import expected
from lightning_taylor.head._rows import check_features_labels, class_list


class ClassMixtures(nn.Module):
    """Per-class diagonal Gaussian mixtures of features, for all classes seen so far.

    Class ``c`` has ``K_c`` components with weights ``π`` (``K_c``), means ``μ`` (``K_c × D``) and variances
    ``σ²`` (``K_c × D``); its density is ``Σ_k π_k N(x; μ_k, diag σ²_k)``. ``K_c`` may differ per class (a
    class with fewer samples than requested components gets fewer components).

    The state is plain tensors, ints and lists, kept as the module's extra state: :meth:`state_dict` /
    :meth:`from_state_dict` (or ``load_state_dict``) round-trip through ``torch.load(weights_only=True)``,
    and a parent module checkpoints it with its own ``state_dict``. The tensors live where they were fitted
    (the CPU); ``.to(device)`` leaves them there and :meth:`sample` moves them to the generator's device.
    """

    def __init__(self) -> None:
        super().__init__()
        self._weights: dict[int, Tensor] = {}
        self._means: dict[int, Tensor] = {}
        self._variances: dict[int, Tensor] = {}

    @property
    def classes(self) -> list[int]:
        """The classes with a fitted mixture, sorted."""
        return sorted(self._means)

    @property
    def feature_dim(self) -> int | None:
        """``D``, or ``None`` while no class is fitted."""
        return next(iter(self._means.values())).shape[1] if self._means else None

    def __len__(self) -> int:
        return len(self._means)

    def __contains__(self, label: object) -> bool:
        return label in self._means

    def components(self, label: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(weights K, means K × D, variances K × D)`` of class ``label``."""
        self._check_known([label])
        return self._weights[label], self._means[label], self._variances[label]

    def add(self, label: int, weights: Tensor, means: Tensor, variances: Tensor) -> None:
        """Store (or replace) the mixture of class ``label``."""
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise expected("label", "an int >= 0", label)
        if means.ndim != 2 or weights.shape != means.shape[:1] or variances.shape != means.shape:
            raise expected("weights, means, variances", "shapes (K,), (K, D), (K, D)",
                           (tuple(weights.shape), tuple(means.shape), tuple(variances.shape)))
        dims = {m.shape[1] for c, m in self._means.items() if c != label}
        if dims and means.shape[1] not in dims:
            raise expected("means", f"means of feature dimension {dims.pop()} (as the other classes')", means.shape[1])
        self._weights[label] = weights.detach().clone()
        self._means[label] = means.detach().clone()
        self._variances[label] = variances.detach().clone()

    def update(self, other: ClassMixtures) -> None:
        """Add the classes of ``other``; a class present in both takes ``other``'s (newer) mixture."""
        for label in other.classes:
            self.add(label, *other.components(label))

    def _check_known(self, classes: Sequence[int]) -> None:
        unknown = [c for c in classes if c not in self._means]
        if unknown:
            raise expected("classes", f"classes with fitted mixtures {self.classes}", unknown)

    @torch.no_grad()
    def sample(
        self, classes: Sequence[int], per_class: int, generator: torch.Generator, dtype: torch.dtype | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draw ``per_class`` features from the mixture of each class in ``classes``.

        Per sample: a component ``k ~ Categorical(π)``, then ``x = μ_k + σ_k ⊙ ε`` with ``ε ~ N(0, I)``.
        Only ``generator`` is used (on its device), so equal generator states give equal samples on every
        process.

        Returns:
            ``features`` (``len(classes) · per_class × D``, on the generator's device, in ``dtype`` or the
            stored dtype) and ``labels`` (int64), grouped by class in the order of ``classes``.
        """
        classes = class_list("classes", classes)
        check_positive_int("per_class", per_class)
        self._check_known(classes)
        device = generator.device
        features, labels = [], []
        for label in classes:
            weights, means, variances = (t.to(device) for t in self.components(label))
            component = torch.multinomial(weights, per_class, replacement=True, generator=generator)
            noise = torch.randn((per_class, means.shape[1]), generator=generator, dtype=means.dtype, device=device)
            features.append(means[component] + variances[component].sqrt() * noise)
            labels.append(torch.full((per_class,), label, dtype=torch.long, device=device))
        out = torch.cat(features)
        return (out if dtype is None else out.to(dtype)), torch.cat(labels)

    def get_extra_state(self) -> dict[str, Any]:
        classes = self.classes
        return {
            "classes": classes,
            "weights": [self._weights[c] for c in classes],
            "means": [self._means[c] for c in classes],
            "variances": [self._variances[c] for c in classes],
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._weights, self._means, self._variances = {}, {}, {}
        for label, w, m, v in zip(state["classes"], state["weights"], state["means"], state["variances"], strict=True):
            self.add(int(label), w, m, v)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ClassMixtures:
        """Rebuild from :meth:`state_dict` (e.g. after ``torch.load(..., weights_only=True)``)."""
        mixtures = cls()
        mixtures.load_state_dict(state)
        return mixtures

    def extra_repr(self) -> str:
        counts = [len(self._weights[c]) for c in self.classes]
        return f"classes={self.classes}, feature_dim={self.feature_dim}, components={counts}"


def fit_class_mixtures(
    features: Tensor,
    labels: Tensor,
    n_components: int = 5,
    seed: int = 0,
    *,
    reg_covar: float = 1e-6,
    max_iter: int = 100,
) -> ClassMixtures:
    """Fit one diagonal Gaussian mixture per class present in ``labels`` (scikit-learn, float64, CPU).

    Each class gets ``GaussianMixture(min(n_components, n_c), covariance_type="diag", random_state=seed)``
    with ``n_c`` its number of samples: a class with fewer samples than ``n_components`` gets one component
    per sample (scikit-learn cannot fit more components than samples). ``reg_covar`` is added to every
    variance (scikit-learn's regulariser; it is the whole variance of a one-sample class).

    Args:
        features: ``N × D`` features (e.g. CLS features of the frozen backbone).
        labels: ``N`` integer class labels.

    Returns:
        A :class:`ClassMixtures` with the classes of ``labels``, stored in ``features``' dtype (at least
        float32: a half-precision variance would lose the small ones).
    """
    from sklearn.mixture import (
        GaussianMixture,  # imported here: scikit-learn is slow to import
    )

    check_positive_int("n_components", n_components)
    check_non_negative_int("seed", seed)
    check_positive_int("max_iter", max_iter)
    check_features_labels(features, labels)
    if not features.is_floating_point():
        raise expected("features", "a floating-point tensor", features.dtype)
    data = features.detach().cpu().double().numpy()
    dtype = torch.promote_types(features.dtype, torch.float32)
    targets = labels.detach().cpu()
    mixtures = ClassMixtures()
    for label in targets.unique().tolist():
        rows = data[(targets == label).numpy()]
        gmm = GaussianMixture(
            n_components=min(n_components, rows.shape[0]), covariance_type="diag", random_state=seed,
            reg_covar=reg_covar, max_iter=max_iter,
        ).fit(rows)
        mixtures.add(
            int(label),
            torch.from_numpy(gmm.weights_).to(dtype),
            torch.from_numpy(gmm.means_).to(dtype),
            torch.from_numpy(gmm.covariances_).to(dtype),
        )
    return mixtures
