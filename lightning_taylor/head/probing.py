"""Training the head at a task boundary (docs/method.md §5, steps 3–4): linear probing and alignment.

- :func:`linear_probe` trains head slice ``t`` on the real θ0 features (task-local cross-entropy, plain SGD);
- :func:`align_head` trains all seen slices ``0..t`` on synthetic features drawn fresh each epoch from the
  class mixtures (cross-entropy on logits normalised to norm ``1/temperature``, SGD with a cosine schedule over
  :func:`alignment_epochs` ``= 10 + 5t`` epochs).

Both train copies of the rows concerned and write them back at the end, so every other row stays bit-for-bit
unchanged, and both draw only from the given generator (deterministic, identical on every DDP rank).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_taylor._checks import check_non_negative_int, check_positive_int
from lightning_taylor.errors import expected
from lightning_taylor.head._rows import (
    check_features_labels,
    class_list,
    local_labels,
    row_index,
)
from lightning_taylor.head.mixtures import ClassMixtures

#: Added to the logits' norm before dividing, as in the reference (guards an all-zero logit row).
_NORM_EPS = 1e-7


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
    index = row_index(head, classes)
    check_features_labels(features, labels)
    _check_training("lr", lr, epochs, batch_size)
    local = local_labels(labels, classes)
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
    classes = class_list("classes", classes)
    index = row_index(head, classes)
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


def _check_training(lr_name: str, lr: float, epochs: int, batch_size: int) -> None:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise expected(lr_name, "a float > 0", lr)
    check_non_negative_int("epochs", epochs)
    check_positive_int("batch_size", batch_size)
