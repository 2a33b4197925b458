"""The training sampler of the task streams: an order that depends on the task and epoch alone.

Lightning shuffles a training set with a ``RandomSampler`` seeded from the global random state on one
process, and with a ``DistributedSampler`` seeded by ``seed + epoch`` under DDP, and augmentations draw from
each process's (or worker's) global random state. So the same stream gives different batches on one and two
processes, and a run resumed from a checkpoint sees other batches than the run it continues.

:class:`StreamSampler` fixes both. Epoch ``e`` of a task has the order ``randperm(n)`` drawn from
``mix(seed, e)`` on any number of processes, rank ``r`` of ``W`` takes positions ``r, r + W, …`` of it (padded
like ``DistributedSampler``, so every rank runs the same number of steps), and every example comes with its own
augmentation seed ``mix(mix(seed, e), index)``, which :class:`~lightning_taylor.data.views.TransformedSubset`
uses. Hence, whenever the task's size is a multiple of the global batch size:

- ``W`` processes with batch ``b`` see exactly the batches of one process with batch ``W·b``;
- a fit resumed at epoch ``e`` sees the batches of the uninterrupted fit;
- the data do not depend on ``num_workers``, nor on whether the stream runs as one ``fit`` or one per task.

A fit resumed *mid-epoch* (from the checkpoint written at a pre-emption) passes ``skip``: the first ``skip``
examples of this rank's share of that epoch are left out, so the resumed epoch trains on the batches the
interrupted one had not reached. ``len()`` stays the whole share, as Lightning expects of a resumed loader (it
counts the batches already done).

It subclasses ``DistributedSampler``, so Lightning keeps it instead of inserting its own under DDP, and calls
its ``set_epoch`` before every epoch.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Dataset, DistributedSampler

from lightning_taylor.seeding import mix


class StreamSampler(DistributedSampler):
    """Shuffles and shards one task's training set by ``(seed, epoch of the task)``; yields ``(index, seed)``.

    Args:
        dataset: the task's training set (its ``__getitem__`` takes the ``(index, seed)`` pairs).
        seed: seed of this task's stream (the DataModule derives it from its seed and the task).
        first_epoch: the trainer's epoch at which the task starts; ``set_epoch(e)`` selects epoch
            ``e − first_epoch`` of the task.
        num_replicas: number of processes ``W``.
        rank: this process's rank ``r``.
        skip: ``(epoch, n)``: in trainer epoch ``epoch`` only, leave out the first ``n`` examples of this rank's
            share (a mid-epoch resume); ``None`` leaves out nothing.
    """

    def __init__(self, dataset: Dataset, seed: int, first_epoch: int = 0, num_replicas: int = 1, rank: int = 0,
                 skip: tuple[int, int] | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.first_epoch = first_epoch
        self.epoch = first_epoch
        self.skip = skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch_seed = mix(self.seed, self.epoch - self.first_epoch)
        n = len(self.dataset)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed)).tolist()
        # Pad with the order's start (as DistributedSampler does) so that every rank gets as many examples.
        order = (order * -(-self.total_size // n))[: self.total_size]
        start = self.skip[1] if self.skip is not None and self.skip[0] == self.epoch else 0
        for index in order[self.rank : self.total_size : self.num_replicas][start:]:
            yield index, mix(epoch_seed, index)
