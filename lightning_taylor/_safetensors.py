"""Reading a safetensors file of the project's (KFAC factors, pre-tuned heads): its tensors and metadata, or one
:class:`~lightning_taylor.errors.InputError` naming the file and what it should have held."""

from __future__ import annotations

import os

from safetensors import SafetensorError, safe_open
from torch import Tensor

from lightning_taylor.errors import expected


def read_tensors(path: str | os.PathLike, what: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of ``path``; ``what`` says what the file holds (``"KFAC factors"``)."""
    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})
    except (OSError, SafetensorError) as error:
        raise expected("path", f"a readable safetensors file of {what}", path, str(error)) from None
