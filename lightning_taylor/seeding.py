"""Seeds: the run's seed, and one derived integer per (seed, purpose), equal on every process and after a resume."""

from __future__ import annotations

import os

_U64 = 2**64 - 1


def run_seed(seed: int | None) -> int:
    """``seed``, or when ``None`` the one ``seed_everything`` set (``PL_GLOBAL_SEED``, which it exports to every
    process), else 0."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else seed


def mix(seed: int, value: int) -> int:
    """A 63-bit seed derived from ``seed`` and ``value`` (the SplitMix64 finaliser of ``seed·φ + value + 1``).

    Nearby inputs give unrelated outputs, so ``mix(seed, task)`` and ``mix(seed, task + 1)`` seed independent
    streams, unlike ``seed + task`` (which collides with ``seed + 1, task``).
    """
    z = (seed * 0x9E3779B97F4A7C15 + value + 1) & _U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
    return (z ^ (z >> 31)) >> 1
