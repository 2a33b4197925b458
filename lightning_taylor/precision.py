"""Full precision for the method's statistics under mixed-precision training (``bf16-mixed``, ``16-mixed``).

Lightning's mixed precision runs the training forward under ``torch.autocast``. The Fisher, the penalty
and the head statistics are sums of many small squared terms, so they are computed in the dtype of the
master weights (float32 under ``*-mixed``) whatever the surrounding autocast: :func:`full_precision`
switches autocast off for the block.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Autocast off on the CPU and on CUDA for the block (a no-op where it was off)."""
    with contextlib.ExitStack() as stack:
        for device_type in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield
