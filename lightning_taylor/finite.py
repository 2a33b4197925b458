"""Finiteness checks: one fused test for the common case, the first offending tensor named otherwise.

A run that goes numerically wrong must stop before it writes anything (the README's "Failure behaviour").
Checking every tensor element by element at every optimiser step would cost a device synchronisation per
tensor; instead :func:`all_finite` reduces each tensor to its sum — a NaN or ±inf element makes the sum
non-finite — and tests the stacked sums at once (one synchronisation). A sum can also overflow from large
finite values (beyond about 3e38 in float32), so a failed fast test is confirmed element by element by
:func:`first_non_finite` before anything is reported.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import Tensor

from lightning_taylor.errors import NonFiniteError, expected


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """True when every element of every floating-point tensor in ``tensors`` is finite (one sync per device)."""
    sums: dict[torch.device, list[Tensor]] = {}
    for tensor in tensors:
        if tensor.is_floating_point() and tensor.numel():
            sums.setdefault(tensor.device, []).append(tensor.detach().sum(dtype=torch.float32))
    return all(bool(torch.isfinite(torch.stack(group)).all()) for group in sums.values())


def describe_non_finite(tensor: Tensor) -> str:
    """E.g. ``"3 of 512 values are NaN, 1 is inf"``."""
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    parts = [f"{nan} {'is' if nan == 1 else 'are'} NaN"] if nan else []
    if inf:
        parts.append(f"{inf} {'is' if inf == 1 else 'are'} inf")
    return f"{nan + inf} of {tensor.numel()} values: " + ", ".join(parts)


def first_non_finite(named: Iterable[tuple[str, Tensor]]) -> tuple[str, str] | None:
    """``(name, description)`` of the first floating-point tensor with a non-finite element, else ``None``."""
    for name, tensor in named:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name, describe_non_finite(tensor)
    return None


def check_finite(named: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]], where: str, hint: str = "") -> None:
    """Raise :class:`NonFiniteError` naming ``where`` and the first non-finite tensor of ``named``.

    Args:
        named: ``{name: tensor}`` or ``(name, tensor)`` pairs; non-floating tensors are ignored.
        where: what holds them, e.g. ``"the Fisher of task 2"`` or ``"checkpoint runs/x/last.ckpt"``.
        hint: what the user can do about it, appended to the message.
    """
    pairs = list(named.items()) if isinstance(named, Mapping) else list(named)
    if all_finite(tensor for _, tensor in pairs):
        return
    found = first_non_finite(pairs)
    if found is not None:
        name, description = found
        raise NonFiniteError(f"Non-finite values in {where}: `{name}` has {description}. {hint}".rstrip())


def flatten_tensors(value: object, prefix: str = "") -> Iterable[tuple[str, Tensor]]:
    """``(dotted.name, tensor)`` for every tensor nested in dicts / lists / tuples of ``value`` (checkpoint state)."""
    if isinstance(value, Tensor):
        yield prefix, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from flatten_tensors(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from flatten_tensors(item, f"{prefix}.{index}" if prefix else str(index))


def check_finite_examples(what: str, values: Tensor, start: int) -> None:
    """Refuse non-finite rows of ``values``, a batch whose first example is example ``start`` of a loader: an
    input error naming the examples (bad data, not a numerical failure; one ``isfinite`` per batch)."""
    finite = torch.isfinite(values.flatten(1)).all(1)
    if not bool(finite.all()):
        bad = (start + torch.nonzero(~finite).flatten()).tolist()
        raise expected(f"the task-boundary {what}", "finite", f"NaN or inf in examples {bad[:10]} of the loader "
                       "(in loader order)",
                       "These feed the class mixtures and the Fisher; check the data of this task.")
