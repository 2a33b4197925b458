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

from lightning_taylor.errors import expected


class TransformedSubset(Dataset):
    """Samples ``indices`` of ``dataset`` as ``(transform(x), labels[i])``.

    Args:
        dataset: raw data set whose items are ``(x, original_label)``; the original label is ignored in
            favour of ``labels`` (remapped, and known without decoding any image).
        indices: positions in ``dataset`` to serve, in order.
        labels: remapped label of each position in ``indices`` (same length).
        transform: applied to ``x`` on every access; ``None`` serves ``x`` as stored.
        name: how errors call ``dataset`` (e.g. ``"digits train"``); its class name by default.

    A served float tensor with a NaN or infinite value is an error naming ``name`` and the item's index in
    ``dataset`` (one ``isfinite`` per item, small next to decoding and transforming it): left alone it would
    surface much later, e.g. as an unrelated error of the mixtures fitted to the features.

    An item is asked for by position ``i``, or by ``(i, seed)`` (what
    :class:`~lightning_taylor.data.samplers.StreamSampler` yields): the transform's random draws then come from
    a generator seeded by ``seed``, not from the process's random state, so an augmented example is the same
    on any process, in any worker and after a resume.
    """

    def __init__(self, dataset: Dataset, indices: Tensor, labels: Tensor,
                 transform: Callable[[Any], Any] | None = None, name: str | None = None) -> None:
        if len(indices) != len(labels):
            raise ValueError(f"Expected one label per index, but got {len(indices)} indices and {len(labels)} labels.")
        self.dataset = dataset
        self.indices = torch.as_tensor(indices, dtype=torch.long)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.transform = transform
        self.name = name or type(dataset).__name__

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, int]:
        i, seed = key if isinstance(key, tuple) else (key, None)
        index = int(self.indices[i])
        x, _ = self.dataset[index]
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
        if isinstance(x, Tensor) and x.is_floating_point() and not bool(torch.isfinite(x).all()):
            samples = getattr(self.dataset, "samples", None)  # an ImageFolder's (path, label) pairs
            where = f" ({samples[index][0]})" if samples else ""
            raise expected(f"{self.name}[{index}]{where}", "an input with finite values (after the transform)",
                           f"{int(x.isnan().sum())} NaN and {int(x.isinf().sum())} infinite of {x.numel()} values",
                           "Check the data source and the transform (e.g. `std`) of this example.")
        return x, int(self.labels[i])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={len(self)}, dataset={type(self.dataset).__name__}, "
                f"transform={self.transform})")
