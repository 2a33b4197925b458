"""How many intra-op threads a CPU run uses: the cores left free by other work, shared among our processes.

PyTorch starts one intra-op thread per core. On a machine where other processes already keep the cores
busy, those threads wait on each other (a one-minute demo was measured at twenty minutes on a loaded
2-core machine, and at two with one thread). So the ``lightning-taylor`` command chooses, for runs on the
CPU,

    threads = max(1, (cores − round(load)) // processes)

with ``cores`` the cores this process may run on, ``load`` the 1-minute load average (the work of other
processes when the run starts) and ``processes`` the trainer's CPU processes on this machine (its
``devices``). ``--threads N`` sets it; an ``OMP_NUM_THREADS`` in the environment is left as it is.
"""

from __future__ import annotations

import os

from lightning_taylor._checks import check_positive_int


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS tells, else the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def current_load() -> float:
    """The 1-minute load average (runnable processes), 0 where the OS does not report it."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def auto_threads(cores: int, load: float, processes: int = 1) -> int:
    """``max(1, (cores − round(load)) // processes)``: the free cores, shared by ``processes``."""
    check_positive_int("cores", cores)
    check_positive_int("processes", processes)
    free = cores - int(round(max(0.0, load)))
    return max(1, min(cores, free) // processes)
