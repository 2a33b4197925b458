"""The task boundary of docs/method.md §5, as the callbacks run it inside a Lightning fit.

At the start of task ``t`` (after the previous delta is banked and the new one begun):

1. :func:`pretune` — θ0's features of the task's training images (deltas off), class mixtures, linear probing
   and alignment of the head (:mod:`lightning_taylor.head.pretuning`), on a CPU float32 copy of ``h̃``; every
   rank then takes rank zero's head and mixtures, so all ranks train against the same ``h̃``;
2. :func:`curvature_pass` — what both curvature estimators share: θ0 with ``h̃`` installed over the classes
   seen so far, this process's shard of the task's images, and a generator of its own for sampled labels;
3. :func:`head_curvature` — the pre-tuned head's Fisher on synthetic features, ``ε + sum / count``.

Everything is checked finite before it is used; the errors name the task.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_taylor.callbacks.protocol import Classifier
from lightning_taylor.deltas import TaskDeltas
from lightning_taylor.finite import check_finite
from lightning_taylor.head import (
    ClassMixtures,
    PreTuning,
    extract_features,
    head_fisher,
    pretune_head,
)
from lightning_taylor.seeding import mix


class SeenLogits(nn.Module):
    """The model's logits restricted to the classes seen so far (the curvature's classifier)."""

    def __init__(self, model: Classifier, num_seen: int) -> None:
        super().__init__()
        self.model, self.num_seen = model, num_seen

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)[:, : self.num_seen]


#: Parameter and module names under :class:`SeenLogits` start with this; curvature is stored without it.
BACKBONE_PREFIX = "model.backbone."


def shard(loader: DataLoader, rank: int, world_size: int) -> DataLoader:
    """This process's strided share of ``loader``'s data set, without the padding of DistributedSampler."""
    if world_size == 1:
        return loader
    sampler = UnrepeatedDistributedSampler(loader.dataset, world_size, rank, shuffle=False)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn)


def pretune(trainer: L.Trainer, model: Classifier, deltas: TaskDeltas, loader: DataLoader, device: torch.device,
            pretuned: dict[str, Tensor], mixtures: ClassMixtures | None, task_classes: range, task: int,
            settings: PreTuning, seed: int, label: str) -> tuple[dict[str, Tensor], ClassMixtures]:
    """Steps 1–4 of docs/method.md §5 from the previous ``h̃`` (``pretuned``): the new ``h̃`` and mixtures."""
    with deltas.disabled():
        features, labels = extract_features(model, loader, device)
    head = nn.Linear(features.shape[1], pretuned["weight"].shape[0])
    head.load_state_dict(pretuned)
    mixtures = pretune_head(head, mixtures, features, labels, task_classes, task, settings, seed)
    # Pre-tuning is deterministic, but features computed on different devices may differ in the last bits.
    head_state, mixture_state = trainer.strategy.broadcast(
        ({k: v.detach().clone() for k, v in head.state_dict().items()}, mixtures.state_dict()), src=0)
    check_finite(head_state, f"the pre-tuned head of {label}",
                 "Its features come from θ0 on this task's training images: check the inputs and the weights.")
    return head_state, ClassMixtures.from_state_dict(mixture_state)


@dataclass
class CurvaturePass:
    """What a curvature estimator reads at a boundary (:func:`curvature_pass`)."""

    classifier: SeenLogits
    shard: DataLoader
    batches: Iterator[tuple[Tensor, Tensor]]
    generator: torch.Generator


@contextlib.contextmanager
def curvature_pass(trainer: L.Trainer, pl_module: L.LightningModule, model: Classifier, deltas: TaskDeltas,
                   pretuned: dict[str, Tensor], num_seen: int, loader: DataLoader, seed: int,
                   task: int) -> Iterator[CurvaturePass]:
    """θ0 (deltas off) with the pre-tuned head over the ``num_seen`` classes, this process's shard of ``loader``,
    and a generator for sampled labels (reproducible, independent across ranks); the trained head is put back
    afterwards. Call the estimator on the inner module, never a DDP wrapper (this is it)."""
    head = model.head
    trained = {k: v.detach().clone() for k, v in head.state_dict().items()}
    head.load_state_dict({k: v.to(head.weight) for k, v in pretuned.items()})
    part = shard(loader, trainer.global_rank, trainer.world_size)
    batches = ((batch[0].to(pl_module.device), batch[1].to(pl_module.device)) for batch in part)
    generator = torch.Generator().manual_seed(mix(mix(seed, task), trainer.global_rank))
    try:
        with deltas.disabled():
            yield CurvaturePass(SeenLogits(model, num_seen), part, batches, generator)
    finally:
        head.load_state_dict(trained)


def head_curvature(pretuned: dict[str, Tensor], mixtures: ClassMixtures, classes: range, samples: int, prior: float,
                   seed: int, task: int) -> dict[str, Tensor]:
    """``ε + F / n`` of the pre-tuned head on ``samples`` synthetic features per class of ``classes`` (only ``ε``
    without classes: IEL's first task)."""
    weight_sum = torch.zeros_like(pretuned["weight"])
    bias_sum = torch.zeros_like(pretuned["bias"])
    count = 0
    if len(classes):
        head = nn.Linear(weight_sum.shape[1], weight_sum.shape[0])
        head.load_state_dict(pretuned)
        generator = torch.Generator().manual_seed(seed * 104729 + task)
        features, _ = mixtures.sample(list(classes), samples, generator)
        weight_sum, bias_sum, count = head_fisher(head, features, list(classes))
    scale = 1.0 / count if count else 0.0
    return {"weight": prior + weight_sum * scale, "bias": prior + bias_sum * scale}
