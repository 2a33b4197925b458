"""Will the KFAC factors fit? Their size per layer and pair, and the memory the device has left.

Per target layer of weight shape ``(out, in)`` one factor pair stores ``in² + out²`` numbers; a task
boundary adds the pairs of :func:`check_factor_memory`. Factors that would not fit are refused *before*
they are computed, naming ``curvature`` and the GiB needed.
"""

from __future__ import annotations

import os
from typing import Mapping

import torch

from lightning_taylor._checks import check_non_negative
from lightning_taylor.errors import expected


def factor_memory(shapes: Mapping[str, tuple[int, int]]) -> int:
    """Numbers stored by the factors of layers of shapes ``(out, in)``: ``Σ in² + out²``."""
    return sum(i * i + o * o for o, i in shapes.values())


def available_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on ``device``: CUDA's free memory, else the host's available RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:  # MemAvailable counts reclaimable page cache, unlike sysconf's free pages
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_factor_memory(shapes: Mapping[str, tuple[int, int]], pairs: int, dtype: torch.dtype,
                        device: torch.device, tasks: str) -> None:
    """Refuse, before computing, factors that would not fit: ``pairs · Σ (in² + out²)`` numbers of ``dtype``.

    ``pairs`` counts the factor pairs the next task adds (its sums, the penalty's means; ``per_task`` adds
    one more stored pair per task).
    """
    check_non_negative("pairs", pairs)
    needed = pairs * factor_memory(shapes) * torch.empty((), dtype=dtype).element_size()
    free = available_memory(device)
    if needed > free:
        hint = ("`kfac_tasks: merged` keeps one pair whatever the number of tasks; " if tasks == "per_task" else "")
        raise expected("curvature", f"a curvature whose factors fit in {device} ({free / 2**30:.2f} GiB free)",
                       "kfac", f"The KFAC factors of this task need {needed / 2**30:.2f} GiB ({pairs} pairs of "
                       f"{factor_memory(shapes):,} numbers, {dtype}). {hint}Use `curvature: diagonal`, fewer "
                       "`targets`, or a device with more memory.")
