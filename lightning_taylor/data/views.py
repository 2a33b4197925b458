"""A view of a raw data set: some of its samples, with a transform and remapped labels, without copying.

The raw data sets (digits tensors, CIFAR-100 arrays, image files) are loaded once and never transformed
in place; every loader the stream serves is a :class:`TransformedSubset` over one of them, holding only
an index tensor and the remapped labels of those indices. So the training images of a task can be
served with augmentation to the optimiser and without it to the task-boundary callbacks, from the same
memory.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils.data import Dataset


class TransformedSubset(Dataset):
    """Samples ``indices`` of ``dataset`` as ``(transform(x), labels[i])``.

    Args:
        dataset: raw data set whose items are ``(x, original_label)``; the original label is ignored in
            favour of ``labels`` (remapped, and known without decoding any image).
        indices: positions in ``dataset`` to serve, in order.
        labels: remapped label of each position in ``indices`` (same length).
        transform: applied to ``x`` on every access; ``None`` serves ``x`` as stored.

    An item is asked for by position ``i``, or by ``(i, seed)`` (what
    :class:`~lightning_taylor.data.samplers.StreamSampler` yields): the transform's random draws then come from
    a generator seeded by ``seed``, not from the process's random state, so an augmented example is the same
    on any process, in any worker and after a resume.
    """

    def __init__(self, dataset: Dataset, indices: Tensor, labels: Tensor,
                 transform: Callable[[Any], Any] | None = None) -> None:
        if len(indices) != len(labels):
            raise ValueError(f"Expected one label per index, but got {len(indices)} indices and {len(labels)} labels.")
        self.dataset = dataset
        self.indices = torch.as_tensor(indices, dtype=torch.long)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, int]:
        i, seed = key if isinstance(key, tuple) else (key, None)
        x, _ = self.dataset[int(self.indices[i])]
        if self.transform is not None:
            if seed is None:
                x = self.transform(x)
            else:  # torchvision draws from the global CPU generator: seed it for this call only
                generator = torch.default_generator
                state = generator.get_state()
                generator.manual_seed(seed)
                try:
                    x = self.transform(x)
                finally:
                    generator.set_state(state)
        return x, int(self.labels[i])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={len(self)}, dataset={type(self.dataset).__name__}, "
                f"transform={self.transform})")
