"""The ITA and IEL regularisers with the diagonal Fisher (docs/method.md §4) and their gradients, without graphs.

Notation for one target layer: ``τ`` the current task's dense delta, ``P = Σ_{s<t} τ_s`` the sum of the
past deltas, ``F`` the accumulated diagonal Fisher mean (prior included), all of the weight's shape; every
sum runs over all elements. ``T = t + 1`` for task index ``t ≥ 1`` and ``T = 2`` at ``t = 0`` (the
pre-trained model is a phantom second member of the composition, as in the reference).

Penalties are applied per layer through the delta's chain rule (``∂R/∂A = Bᵀ G``, ``∂R/∂B = G Aᵀ`` for
LoRA, see :mod:`lightning_taylor.deltas.styles`), so a penalty step never builds a graph through the
network.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from lightning_taylor._checks import check_choice, check_non_negative
from lightning_taylor.deltas import TaskDeltas
from lightning_taylor.penalties.step import Algorithm, iel_members
from lightning_taylor.precision import full_precision


def ita_penalty(delta: Tensor, fisher_mean: Tensor, alpha: float) -> Tensor:
    """``R = (α/2) Σ F ⊙ τ²`` (sum over elements)."""
    return 0.5 * alpha * (fisher_mean * delta.square()).sum()


def ita_penalty_grad(delta: Tensor, fisher_mean: Tensor, alpha: float) -> Tensor:
    """``∂R/∂τ = α F ⊙ τ``."""
    return alpha * fisher_mean * delta


def iel_penalty(delta: Tensor, past_deltas_sum: Tensor, fisher_mean: Tensor, beta: float, task_index: int) -> Tensor:
    """``R = β [½ (1 − 1/T) Σ F ⊙ τ² − (1/T) Σ F ⊙ τ ⊙ P]`` (sum over elements).

    Up to terms constant in τ this is ``β · T ·`` the Jensen gap of the uniform composition of the ``T``
    members (see :func:`jensen_gap`).
    """
    inv_t = 1.0 / iel_members(task_index)
    quadratic = 0.5 * (1.0 - inv_t) * (fisher_mean * delta.square()).sum()
    cross = inv_t * (fisher_mean * delta * past_deltas_sum).sum()
    return beta * (quadratic - cross)


def iel_penalty_grad(delta: Tensor, past_deltas_sum: Tensor, fisher_mean: Tensor, beta: float, task_index: int) -> Tensor:
    """``∂R/∂τ = β F ⊙ [(1 − 1/T) τ − (1/T) P]``."""
    inv_t = 1.0 / iel_members(task_index)
    return beta * fisher_mean * ((1.0 - inv_t) * delta - inv_t * past_deltas_sum)


def jensen_gap(deltas: Sequence[Tensor], weights: Sequence[float], fisher_mean: Tensor) -> Tensor:
    """``½ Σ_t w_t (τ_t − τ̄)ᵀ F (τ_t − τ̄)`` with ``τ̄ = Σ_t w_t τ_t`` and diagonal ``F`` (``Σ w_t = 1``).

    For the local quadratic model of the loss at θ0 this is the mean of the members' losses minus the loss of
    their composition.
    """
    mean = sum(w * d for w, d in zip(weights, deltas))
    return 0.5 * sum(w * (fisher_mean * (d - mean).square()).sum() for w, d in zip(weights, deltas))


def _layer_penalty(tau: Tensor, fisher: Tensor, past: Tensor | None, strength: float, task_index: int
                   ) -> tuple[Tensor, Tensor]:
    """One layer's ``(R, ∂R/∂τ)`` of :func:`ita_penalty` (``past=None``) or :func:`iel_penalty`, sharing ``u = F ⊙ τ``.

    ITA: ``R = ½ α ⟨u, τ⟩``, ``G = α u``. IEL, with ``c = 1 − 1/T``:
    ``R = β (½ c ⟨u, τ⟩ − (1/T) ⟨u, P⟩)``, ``G = β (c u − (1/T) F ⊙ P)``. The same values as the functions
    above up to float rounding, in fewer elementwise passes (a fixed cost of every optimiser step).
    """
    u = fisher * tau
    flat_u = u.reshape(-1)
    if past is None:
        return 0.5 * strength * torch.dot(flat_u, tau.reshape(-1)), u.mul_(strength)
    inv_t = 1.0 / iel_members(task_index)
    c = 1.0 - inv_t
    value = strength * (0.5 * c * torch.dot(flat_u, tau.reshape(-1)) - inv_t * torch.dot(flat_u, past.reshape(-1)))
    grad = torch.add(u, fisher * past, alpha=-inv_t / c).mul_(strength * c)
    return value, grad


def delta_penalty(
    deltas: TaskDeltas,
    curvature: Mapping[str, Tensor],
    algorithm: Algorithm,
    strength: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The ITA (``strength = α``) or IEL (``β``) penalty of the current slot, summed over target layers.

    Per layer, the dense ``τ`` of the slot, ``R`` and ``G = ∂R/∂τ`` (:func:`ita_penalty` / :func:`iel_penalty`
    and their gradients, computed together), then the slot's chain rule (LoRA: ``Bᵀ G``, ``G Aᵀ``).

    Args:
        deltas: the task deltas; the task index is ``deltas.current_task``.
        curvature: ``F̄`` per target, keyed ``"<layer>.weight"`` (``F̄_<t`` for ITA, ``F̄_≤t`` for IEL).

    Returns:
        The penalty value (a detached scalar) and its gradient w.r.t. each slot tensor, keyed like
        ``deltas.named_parameters()``. Both are computed in the slot's dtype (float32 under mixed precision:
        the slot's master weights) with autocast off, whatever surrounds the call
        (:mod:`lightning_taylor.precision`).
    """
    check_choice("algorithm", algorithm, ("ita", "iel"))
    check_non_negative("strength", float(strength))
    task = deltas.current_task
    values: list[Tensor] = []
    grads: dict[str, Tensor] = {}
    with torch.no_grad(), full_precision():
        for name, layer, linear in deltas.layers():
            tau = layer.slot_delta(linear.weight)
            past = deltas.past_sum(name) if algorithm == "iel" else None
            value, dense_grad = _layer_penalty(tau, curvature[f"{name}.weight"], past, strength, task)
            values.append(value)
            for key, grad in layer.slot_grads(dense_grad, linear.weight).items():
                grads[f"{name}.{key}"] = grad
    return torch.stack(values).sum(), grads
