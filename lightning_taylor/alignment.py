"""Head pre-tuning at a task boundary (docs/method.md §5): class mixtures, linear probing, alignment, head Fisher.

At the start of task ``t``, with the frozen pre-trained backbone's CLS features of the task's images:

1. :func:`fit_class_mixtures` fits one diagonal Gaussian mixture per class; :meth:`ClassMixtures.update`
   adds them to the mixtures of the classes of earlier tasks (all kept, checkpointed as plain tensors).
2. :func:`linear_probe` trains head slice ``t`` on the real features (task-local cross-entropy, plain SGD).
3. :func:`align_head` trains all seen slices ``0..t`` on synthetic features drawn fresh each epoch from the
   mixtures (cross-entropy on logits normalised to norm ``1/temperature``, SGD with a cosine schedule over
   :func:`alignment_epochs` ``= 10 + 5t`` epochs).
4. :func:`head_fisher` gives the exact diagonal Fisher of the pre-tuned head on synthetic features, in
   closed form, for the head penalty of docs/method.md §4.

Everything here is pure PyTorch (plus scikit-learn for the fit) and deterministic given ``seed`` /
``generator``; nothing touches the global random state. Head rows outside the classes being trained are
never written, so they stay bit-for-bit unchanged.

Under DDP every rank must pre-tune on the same inputs to end with the same head: gather the features of all
ranks before :func:`fit_class_mixtures` (or fit on one rank and broadcast :meth:`ClassMixtures.state_dict`),
and give every rank a generator with the same seed; sampling then draws identical features on every rank.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_taylor._checks import check_non_negative_int, check_positive_int, expected

#: Added to the logits' norm before dividing, as in the reference (guards an all-zero logit row).
_NORM_EPS = 1e-7


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
        classes = _class_list("classes", classes)
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
    from sklearn.mixture import GaussianMixture  # imported here: scikit-learn is slow to import

    check_positive_int("n_components", n_components)
    check_non_negative_int("seed", seed)
    check_positive_int("max_iter", max_iter)
    _check_features_labels(features, labels)
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


def linear_probe(
    head: nn.Linear,
    features: Tensor,
    labels: Tensor,
    classes: range,
    lr: float = 0.01,
    epochs: int = 3,
    batch_size: int = 128,
    generator: torch.Generator | None = None,
) -> None:
    """Train the rows of ``head`` for ``classes`` on real features, in place (docs/method.md §5, step 3).

    Loss per batch: the mean over the batch of the task-local cross-entropy
    ``−log softmax(z_classes)[y − classes.start]``, with ``z_classes`` the logits of ``classes`` only.
    Plain SGD (no momentum, no weight decay): ``h ← h − lr · ∇``, one step per batch of ``batch_size``
    (the last batch of an epoch may be smaller; every sample is used once per epoch). The order is
    reshuffled each epoch with ``generator`` (``None``: a fresh CPU generator seeded with 0).

    Only the rows of ``classes`` (weight and bias) are written; every other row stays bit-for-bit equal.
    """
    index = _row_index(head, classes)
    _check_features_labels(features, labels)
    _check_training("lr", lr, epochs, batch_size)
    local = _local_labels(labels, classes)
    generator = _generator(generator)

    def schedule(epoch: int) -> float:
        return lr

    def epoch_data(epoch: int) -> tuple[Tensor, Tensor]:
        return features, local

    _train_rows(head, index, epochs, batch_size, schedule, epoch_data, generator, temperature=None)


def alignment_epochs(task: int, base: int = 10, per_task: int = 5) -> int:
    """Epochs of head alignment at task ``task``: ``base + per_task · task`` (10 + 5t in the reference)."""
    check_non_negative_int("task", task)
    check_non_negative_int("base", base)
    check_non_negative_int("per_task", per_task)
    return base + per_task * task


def align_head(
    head: nn.Linear,
    mixtures: ClassMixtures,
    classes: Sequence[int],
    epochs: int,
    lr: float = 0.01,
    batch_size: int = 128,
    per_class: int = 256,
    temperature: float = 0.1,
    generator: torch.Generator | None = None,
) -> None:
    """Align the head rows of all seen ``classes`` on synthetic features, in place (docs/method.md §5, step 4).

    Each epoch draws ``per_class`` fresh features per class from ``mixtures`` and shuffles them (both with
    ``generator``; ``None``: a fresh CPU generator seeded with 0). Loss per batch: the batch mean of the
    cross-entropy of the normalised logits ``z / (temperature · (‖z‖₂ + 1e-7))``, with ``z`` the logits of
    ``classes`` (in their order; the label of class ``classes[i]`` is ``i``). Plain SGD, one step per batch
    (the last batch may be smaller), with a cosine schedule stepped **per epoch** as in the reference:
    ``lr_e = lr · (1 + cos(π e / epochs)) / 2`` for epoch ``e = 0 .. epochs − 1``.

    Only the rows of ``classes`` are written; rows of unseen classes stay bit-for-bit equal.
    """
    classes = _class_list("classes", classes)
    index = _row_index(head, classes)
    mixtures._check_known(classes)
    _check_training("lr", lr, epochs, batch_size)
    check_positive_int("per_class", per_class)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise expected("temperature", "a float > 0", temperature)
    generator = _generator(generator)
    position = {c: i for i, c in enumerate(classes)}

    def schedule(epoch: int) -> float:
        return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))

    def epoch_data(epoch: int) -> tuple[Tensor, Tensor]:
        features, labels = mixtures.sample(classes, per_class, generator)
        local = torch.tensor([position[c] for c in classes], device=labels.device).repeat_interleave(per_class)
        return features, local

    _train_rows(head, index, epochs, batch_size, schedule, epoch_data, generator, temperature=float(temperature))


@torch.no_grad()
def head_fisher(head: nn.Linear, features: Tensor, classes: Sequence[int]) -> tuple[Tensor, Tensor | None, int]:
    """Exact diagonal Fisher of ``head`` over the seen ``classes``, summed over ``features``, in closed form.

    With ``z = W_S h + b_S`` the logits of the seen classes ``S`` and ``p = softmax(z)``,
    ``∂ log p_c / ∂z_o = δ_co − p_o``, so ``Σ_c p_c (δ_co − p_o)² = p_o (1 − p_o)`` and

        F_W[o, i] = Σ_x p_o(x) (1 − p_o(x)) h_i(x)²,     F_b[o] = Σ_x p_o(x) (1 − p_o(x))      (o ∈ S)

    (the true Fisher ``Σ_x Σ_c p_c (∂ log p_c / ∂θ)²``, per example, summed over examples). Rows of
    classes outside ``S`` are zero. The head penalty uses ``ε + sum / count``.

    Returns:
        ``(sum_weight, sum_bias, count)``: sums of ``head.weight``'s and ``head.bias``'s shape and dtype
        (``sum_bias`` is ``None`` for a head without bias) and the number of features.
    """
    index = _row_index(head, _class_list("classes", classes))
    if features.ndim != 2 or features.shape[1] != head.in_features:
        raise expected("features", f"a tensor of shape (N, {head.in_features})", tuple(features.shape))
    weight = head.weight.detach()
    h = features.detach().to(device=weight.device, dtype=weight.dtype)
    logits = h @ weight[index].T
    if head.bias is not None:
        logits = logits + head.bias.detach()[index]
    # Softmax in at least float32 even for a half-precision head.
    probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1)
    curvature = (probs * (1.0 - probs)).to(weight.dtype)  # N × |S|
    sum_weight = torch.zeros_like(weight)
    sum_weight[index] = curvature.T @ h.square()
    sum_bias = None
    if head.bias is not None:
        sum_bias = torch.zeros_like(head.bias.detach())
        sum_bias[index] = curvature.sum(dim=0)
    return sum_weight, sum_bias, int(h.shape[0])


# --------------------------------------------------------------------------------------------- helpers


def _train_rows(
    head: nn.Linear,
    index: Tensor,
    epochs: int,
    batch_size: int,
    schedule: Callable[[int], float],
    epoch_data: Callable[[int], tuple[Tensor, Tensor]],
    generator: torch.Generator,
    temperature: float | None,
) -> None:
    """SGD on copies of the rows ``index`` of ``head``; the rows are written back once at the end.

    Training copies (rather than masking gradients) guarantees that no other row is ever written, and
    ``torch.autograd.grad`` leaves the head's ``.grad`` fields alone.
    """
    device, dtype = head.weight.device, head.weight.dtype
    # Pre-tuning may be called from a no-grad or inference-mode hook; it always needs gradients.
    with torch.inference_mode(False), torch.enable_grad():
        weight = head.weight.detach()[index].clone().requires_grad_(True)
        bias = head.bias.detach()[index].clone().requires_grad_(True) if head.bias is not None else None
        params = [weight] if bias is None else [weight, bias]
        for epoch in range(epochs):
            lr = schedule(epoch)
            features, targets = epoch_data(epoch)
            order = torch.randperm(targets.shape[0], generator=generator, device=generator.device)
            for start in range(0, targets.shape[0], batch_size):
                batch = order[start : start + batch_size].to(features.device)
                x = features[batch].to(device=device, dtype=dtype)
                y = targets[batch].to(device)
                logits = x @ weight.T if bias is None else torch.addmm(bias, x, weight.T)
                if temperature is not None:
                    logits = logits / (temperature * (logits.norm(dim=-1, keepdim=True) + _NORM_EPS))
                loss = F.cross_entropy(logits, y)
                grads = torch.autograd.grad(loss, params)
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        p.add_(g, alpha=-lr)
        with torch.no_grad():
            head.weight.index_copy_(0, index, weight.detach())
            if bias is not None:
                head.bias.index_copy_(0, index, bias.detach())


def _generator(generator: torch.Generator | None) -> torch.Generator:
    """The given generator, or a fresh CPU one seeded with 0 (never the global random state)."""
    return torch.Generator().manual_seed(0) if generator is None else generator


def _class_list(name: str, classes: Sequence[int]) -> list[int]:
    """``classes`` as a non-empty list of distinct ints >= 0."""
    raw = list(classes.tolist() if isinstance(classes, Tensor) else classes)
    if not raw:
        raise expected(name, "a non-empty sequence of class labels", raw)
    try:  # ints and int-like scalars (numpy integers), never bools or floats
        values = [operator.index(c) for c in raw if not isinstance(c, bool)]
    except TypeError:
        values = []
    if len(values) != len(raw) or min(values) < 0:
        raise expected(name, "class labels (ints >= 0)", raw)
    if len(set(values)) != len(values):
        raise expected(name, "distinct class labels", values)
    return values


def _row_index(head: nn.Linear, classes: Sequence[int]) -> Tensor:
    """The head rows of ``classes`` as an index tensor on the head's device."""
    if not isinstance(head, nn.Linear):
        raise TypeError(f"Expected `head` to be an nn.Linear, but got {type(head).__name__}.")
    values = _class_list("classes", classes)
    if max(values) >= head.out_features:
        raise expected("classes", f"rows of the head (< {head.out_features})", values)
    return torch.tensor(values, dtype=torch.long, device=head.weight.device)


def _check_features_labels(features: Tensor, labels: Tensor) -> None:
    if features.ndim != 2:
        raise expected("features", "a 2-D tensor (N × D)", tuple(features.shape))
    if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise expected("labels", f"a 1-D tensor of {features.shape[0]} labels (one per feature row)",
                       tuple(labels.shape))
    if labels.is_floating_point() or labels.is_complex():
        raise expected("labels", "an integer tensor", labels.dtype)
    if features.shape[0] == 0:
        raise expected("features", "at least one row", tuple(features.shape))


def _local_labels(labels: Tensor, classes: range) -> Tensor:
    """Positions of ``labels`` in ``classes`` (``y − classes.start`` for a unit-step range)."""
    values = _class_list("classes", classes)
    lookup = torch.full((max(values) + 1,), -1, dtype=torch.long)
    lookup[torch.tensor(values)] = torch.arange(len(values))
    cpu = labels.detach().cpu().long()
    outside = (cpu < 0) | (cpu > max(values))
    local = torch.where(outside, -1, lookup[cpu.clamp(0, max(values))])
    if (local < 0).any():
        bad = sorted(set(cpu[local < 0].tolist()))
        raise expected("labels", f"labels of `classes` {classes}", bad)
    return local.to(labels.device)


def _check_training(lr_name: str, lr: float, epochs: int, batch_size: int) -> None:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise expected(lr_name, "a float > 0", lr)
    check_non_negative_int("epochs", epochs)
    check_positive_int("batch_size", batch_size)
