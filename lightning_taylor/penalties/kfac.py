"""The ITA and IEL penalties of the current slot with KFAC curvature, and their gradients, analytic per style.

Per target layer, with the curvature ``Σ_k Ā_k ⊗ Ḡ_k`` of :mod:`lightning_taylor.curvature.accumulators` (one term
when merged, one per task otherwise, none for ITA's first task) and the prior ``ε`` as for the diagonal:

    q(x, y) = Σ_k tr(Ḡ_k x Ā_k yᵀ) + ε ⟨x, y⟩
    ITA:  R = (α/2) q(τ, τ)
    IEL:  R = β [½ (1 − 1/T) q(τ, τ) − (1/T) q(τ, P)]

with ``T`` and ``P = Σ_{s<t} τ_s`` as in :mod:`lightning_taylor.penalties.diagonal` (the IEL diagonal penalty with
``F̄ ⊙`` replaced by the Kronecker form; up to a constant, ``β T`` times the Jensen gap of the uniform
composition under the quadratic model ``q``). Summed over layers. The quadratic term, per style, without
forming an ``out × in`` matrix for LoRA:

    lora  τ = B A:          q = Σ_k ⟨Bᵀ Ḡ_k B, A Ā_k Aᵀ⟩ + ε ⟨BᵀB, A Aᵀ⟩
                            ∂q/∂B = 2 Σ_k Ḡ_k B (A Ā_k Aᵀ) + 2ε B (A Aᵀ)
                            ∂q/∂A = 2 Σ_k (Bᵀ Ḡ_k B) A Ā_k + 2ε (BᵀB) A       O(r (in² + out²)) per step
    full  τ = D:            q = ⟨D, Σ_k Ḡ_k D Ā_k + ε D⟩,   ∂q/∂D = 2 (Σ_k Ḡ_k D Ā_k + ε D)
    ia3   τ = diag(u) W0,   q = uᵀ M u,   ∂q/∂s = 2 M u,
          u = s − 1:        M = Σ_k Ḡ_k ⊙ (W0 Ā_k W0ᵀ) + ε diag(‖W0_i‖²)          (out × out, once per task)

(our LoRA has no ``α/r`` scaling: ``τ = B A`` exactly). The cross term is linear in ``τ``:
``q(τ, P) = ⟨τ, C⟩`` with ``C = Σ_k Ḡ_k P Ā_k + ε P``, built once per task; its gradient is the style's chain
rule of ``C`` (``Bᵀ C``, ``C Aᵀ`` for LoRA). :func:`prepare_curvature` builds ``M`` and ``C`` at a task's
first step, :func:`kfac_delta_penalty` evaluates ``R`` and ``∂R/∂slot`` at every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

from lightning_taylor._checks import check_choice, check_non_negative
from lightning_taylor.curvature.accumulators import Factors
from lightning_taylor.deltas import TaskDeltas
from lightning_taylor.deltas.styles import IA3Delta, LinearDelta, LoRADelta
from lightning_taylor.penalties.step import Algorithm, iel_members
from lightning_taylor.precision import full_precision


@dataclass
class LayerCurvature:
    """One layer's prepared curvature: the Kronecker terms, the prior, IA3's ``M`` and IEL's ``C`` (or ``None``)."""

    terms: list[tuple[Tensor, Tensor]]
    prior: float
    rows: Tensor | None = None
    past: Tensor | None = None


@torch.no_grad()
def prepare_curvature(deltas: TaskDeltas, factors: Factors, algorithm: Algorithm, prior: float,
                      device: torch.device) -> dict[str, LayerCurvature]:
    """The per-task constants of :func:`kfac_delta_penalty` for every target layer of ``deltas``, on ``device``.

    Call it after the task has begun (``P`` is the sum of the deltas banked before ``deltas.current_task``).
    """
    check_choice("algorithm", algorithm, ("ita", "iel"))
    check_non_negative("prior", prior)
    prepared = {}
    with full_precision():
        for name, delta, linear in deltas.layers():
            weight = linear.weight
            terms = [(a.to(device, weight.dtype), g.to(device, weight.dtype)) for a, g in factors[name]]
            layer = LayerCurvature(terms, prior)
            if isinstance(delta, IA3Delta):
                layer.rows = torch.diag(prior * weight.square().sum(1))
                for a, g in terms:
                    layer.rows += g * (weight @ a @ weight.T)
            if algorithm == "iel" and deltas.current_task > 0:
                layer.past = _curved(deltas.past_sum(name), layer)
            prepared[name] = layer
    return prepared


def _curved(x: Tensor, curvature: LayerCurvature) -> Tensor:
    """``Σ_k Ḡ_k x Ā_k + ε x`` (dense; for ``full`` deltas and the once-per-task ``C``)."""
    out = curvature.prior * x
    for a, g in curvature.terms:
        out = out + g @ x @ a
    return out


def _quadratic(layer: LinearDelta, weight: Tensor, curvature: LayerCurvature) -> tuple[Tensor, dict[str, Tensor]]:
    """``q(τ, τ)`` of the slot and its gradient w.r.t. the slot tensors (module docstring, per style)."""
    if isinstance(layer, LoRADelta):
        a, b = layer.lora_A, layer.lora_B
        gram_a, gram_b = a @ a.T, b.T @ b  # r × r
        value = curvature.prior * (gram_b * gram_a).sum()
        grad_a, grad_b = 2 * curvature.prior * gram_b @ a, 2 * curvature.prior * b @ gram_a
        for fa, fg in curvature.terms:
            gb, af = fg @ b, a @ fa  # out × r, r × in
            inner_a, inner_b = af @ a.T, b.T @ gb  # A Ā Aᵀ, Bᵀ Ḡ B
            value = value + (inner_b * inner_a).sum()
            grad_a, grad_b = grad_a + 2 * inner_b @ af, grad_b + 2 * gb @ inner_a
        return value, {"lora_A": grad_a, "lora_B": grad_b}
    if isinstance(layer, IA3Delta):
        u = layer.scale - 1
        mu = curvature.rows @ u
        return torch.dot(u, mu), {"scale": 2 * mu}
    tau = layer.delta
    curved = _curved(tau, curvature)
    return (tau * curved).sum(), {"delta": 2 * curved}


def _cross(layer: LinearDelta, weight: Tensor, past: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """``⟨τ, C⟩`` of the slot and its gradient (``C`` = the prepared ``past``): the style's chain rule of ``C``."""
    grads = layer.slot_grads(past, weight)
    if isinstance(layer, LoRADelta):
        value = (layer.lora_A * grads["lora_A"]).sum()  # ⟨B A, C⟩ = ⟨A, Bᵀ C⟩
    elif isinstance(layer, IA3Delta):
        value = torch.dot(layer.scale - 1, grads["scale"])
    else:
        value = (layer.delta * past).sum()
    return value, grads


def kfac_delta_penalty(deltas: TaskDeltas, curvature: Mapping[str, LayerCurvature], algorithm: Algorithm,
                       strength: float) -> tuple[Tensor, dict[str, Tensor]]:
    """The ITA (``strength = α``) or IEL (``β``) Kronecker penalty of the current slot, summed over layers.

    The same contract as :func:`lightning_taylor.penalties.diagonal.delta_penalty`: a detached scalar and the gradient
    w.r.t. each slot tensor keyed like ``deltas.named_parameters()``, in the slot's dtype with autocast off.
    ``curvature`` is :func:`prepare_curvature`'s for the current task.
    """
    check_choice("algorithm", algorithm, ("ita", "iel"))
    check_non_negative("strength", float(strength))
    inv_t = 1.0 / iel_members(deltas.current_task)
    # R = w_q q(τ, τ) − w_c ⟨τ, C⟩
    w_q = 0.5 * strength if algorithm == "ita" else 0.5 * strength * (1.0 - inv_t)
    w_c = 0.0 if algorithm == "ita" else strength * inv_t
    values: list[Tensor] = []
    grads: dict[str, Tensor] = {}
    with torch.no_grad(), full_precision():
        for name, layer, linear in deltas.layers():
            prepared = curvature[name]
            value, layer_grads = _quadratic(layer, linear.weight, prepared)
            value = w_q * value
            layer_grads = {k: w_q * g for k, g in layer_grads.items()}
            if prepared.past is not None and w_c:
                cross, cross_grads = _cross(layer, linear.weight, prepared.past)
                value = value - w_c * cross
                layer_grads = {k: g - w_c * cross_grads[k] for k, g in layer_grads.items()}
            values.append(value)
            grads.update({f"{name}.{k}": g for k, g in layer_grads.items()})
    return torch.stack(values).sum(), grads
