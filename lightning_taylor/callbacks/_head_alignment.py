"""``head_alignment="drift_compensated"``: at the end of each task, the deployed head aligned on the composed model.

Every seen head row is re-aligned (the pre-tuning's alignment step and settings, docs/method.md §5 step 4) on
class mixtures of the *deployed* composition's features: task ``t``'s classes fitted on its images under
``θ0 + (1/(t+1)) Σ_{s≤t} τ_s``, every older class's mixture moved by the drift those images show between the
compositions without and with ``τ_t`` (:func:`~lightning_taylor.head.compensate_drift`). No old image is kept.

Runs on every rank on the same in-order data, like the pre-tuning; every rank then takes rank zero's rows and
mixtures. Rows of unseen classes are not written.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_taylor.callbacks.protocol import Classifier
from lightning_taylor.deltas import TaskDeltas, uniform
from lightning_taylor.finite import check_finite
from lightning_taylor.head import (
    ClassMixtures,
    PreTuning,
    align_head,
    alignment_epochs,
    compensate_drift,
    extract_features,
    fit_class_mixtures,
)
from lightning_taylor.seeding import mix


def align_to_composition(trainer: L.Trainer, model: Classifier, deltas: TaskDeltas, loader: DataLoader,
                         device: torch.device, composed: ClassMixtures | None, seen_classes: list[int], task: int,
                         settings: PreTuning, seed: int, label: str) -> ClassMixtures:
    """Re-align ``model.head``'s rows of ``seen_classes`` in place; returns the mixtures of the composed features.

    ``composed`` holds the mixtures of the previous end of task (``None`` at the first); the deltas are left
    composed uniformly over their tasks (the caller restores its training forward).
    """
    tasks = deltas.tasks
    deltas.compose(uniform(tasks))
    after, labels = extract_features(model, loader, device)
    seed = mix(seed, 1_000 + task)  # a stream apart from the pre-tuning's
    mixtures = fit_class_mixtures(after, labels, n_components=settings.n_components, seed=seed % 2**32)
    if composed is not None and len(tasks) > 1:
        deltas.compose(uniform(tasks[:-1]))
        before, _ = extract_features(model, loader, device)
        moved = compensate_drift(composed, before, after)
        moved.update(mixtures)
        mixtures = moved
    # Aligned on a CPU float32 copy, as the pre-tuning is, so every rank computes the same rows.
    head = nn.Linear(model.head.in_features, model.head.out_features, bias=model.head.bias is not None)
    head.load_state_dict({k: v.detach().float().cpu() for k, v in model.head.state_dict().items()})
    align_head(head, mixtures, seen_classes,
               epochs=alignment_epochs(task, settings.align_epochs, settings.align_epochs_per_task),
               lr=settings.align_lr, batch_size=settings.batch_size, per_class=settings.samples_per_class,
               temperature=settings.temperature, generator=torch.Generator().manual_seed(seed))
    aligned, state = trainer.strategy.broadcast(
        ({k: v.detach().clone() for k, v in head.state_dict().items()}, mixtures.state_dict()), src=0)
    check_finite(aligned, f"the head aligned at the end of {label}",
                 "Its features come from the composed model on this task's training images.")
    rows = torch.tensor(seen_classes)
    with torch.no_grad():
        for name, value in aligned.items():
            target = getattr(model.head, name)
            target[rows.to(target.device)] = value[rows].to(target)
    return ClassMixtures.from_state_dict(state)
