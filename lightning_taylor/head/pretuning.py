"""Head pre-tuning at a task boundary (docs/method.md §5, steps 1–4), as a configurable component.

At the start of task ``t``:

1. CLS features (after the final norm) of the frozen pre-trained backbone θ0 for the task's training images;
2. per class, a Gaussian mixture with ``n_components`` diagonal components;
3. linear probing of head slice ``t`` on the real features (SGD, task-local cross-entropy);
4. alignment of all head slices ``0..t`` on synthetic features drawn from the mixtures of all seen classes
   (SGD with cosine annealing over ``align_epochs + align_epochs_per_task · t`` epochs, cross-entropy on
   logits normalised as ``z / (temperature ‖z‖₂)``).

The result is the pre-tuned head ``h̃``; it carries over from task to task. Every step is deterministic in
the seed and runs on the CPU in float32, so every process of a DDP job computes the same head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_taylor.finite import check_finite_examples
from lightning_taylor.head.mixtures import ClassMixtures, fit_class_mixtures
from lightning_taylor.head.probing import align_head, alignment_epochs, linear_probe


@dataclass
class PreTuning:
    """Settings of the head pre-tuning (reference values of docs/method.md §5).

    Args:
        n_components: diagonal Gaussian components per class.
        probe_epochs: linear-probing epochs on the real features (1 for CropDisease in the reference).
        probe_lr: SGD learning rate of the linear probe (no momentum).
        align_epochs: alignment epochs at task 0; ``align_epochs_per_task`` more for each later task.
        align_epochs_per_task: see ``align_epochs``.
        align_lr: initial SGD learning rate of the alignment (cosine-annealed).
        samples_per_class: synthetic features per class per alignment epoch.
        batch_size: batch size of probing and alignment.
        temperature: logit normalisation of the alignment loss.
    """

    n_components: int = 5
    probe_epochs: int = 3
    probe_lr: float = 0.01
    align_epochs: int = 10
    align_epochs_per_task: int = 5
    align_lr: float = 0.01
    samples_per_class: int = 256
    batch_size: int = 128
    temperature: float = 0.1


@torch.no_grad()
def extract_features(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[Tensor, Tensor]:
    """Pre-logits features (``model.features(x)``: timm's CLS token after the final norm) and labels, on the CPU.

    Non-finite inputs or features are an error naming the examples' positions in the loader (one
    ``isfinite`` per batch), not a late and unrelated error of the mixtures fitted to them.
    """
    was_training = model.training
    model.eval()
    features, labels, seen = [], [], 0
    try:
        for batch in loader:
            x = batch[0].to(device)
            check_finite_examples("inputs", x, seen)
            features.append(model.features(x).float().cpu())
            check_finite_examples("features", features[-1], seen)
            labels.append(torch.as_tensor(batch[1]).cpu())
            seen += len(x)
    finally:
        model.train(was_training)
    return torch.cat(features), torch.cat(labels)


def pretune_head(
    head: nn.Linear,
    mixtures: ClassMixtures | None,
    features: Tensor,
    labels: Tensor,
    task_classes: range,
    task: int,
    settings: PreTuning,
    seed: int,
) -> ClassMixtures:
    """Steps 2–4 on ``head`` (a CPU float32 copy of ``h̃``, trained in place); returns the updated mixtures."""
    new = fit_class_mixtures(features, labels, n_components=settings.n_components, seed=seed + task)
    if mixtures is None:
        mixtures = new
    else:
        mixtures.update(new)  # keep the mixtures of every class seen so far
    generator = torch.Generator().manual_seed(seed * 7919 + task)
    linear_probe(head, features, labels, task_classes, lr=settings.probe_lr, epochs=settings.probe_epochs,
                 batch_size=settings.batch_size, generator=generator)
    seen = list(range(task_classes.stop))
    align_head(head, mixtures, seen,
               epochs=alignment_epochs(task, settings.align_epochs, settings.align_epochs_per_task),
               lr=settings.align_lr, batch_size=settings.batch_size, per_class=settings.samples_per_class,
               temperature=settings.temperature, generator=generator)
    return mixtures
