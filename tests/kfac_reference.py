"""The Kronecker-form ITA / IEL penalty of one dense layer, written directly: a reference for the tests.

``q(x, y) = tr(Ḡ x Ā yᵀ) + ε ⟨x, y⟩``; ITA ``(α/2) q(τ, τ)``; IEL ``β [½ (1 − 1/T) q(τ, τ) − (1/T) q(τ, P)]``
(T = 2 at task 0). The package's penalties (lightning_taylor/penalties/kfac.py) never form these dense terms.
"""

from torch import Tensor


def quadratic(x: Tensor, y: Tensor, a: Tensor, g: Tensor, prior: float = 0.0) -> Tensor:
    """``q(x, y) = tr(Ḡ x Ā yᵀ) + ε ⟨x, y⟩`` for deltas ``x, y`` (out × in), ``a = Ā`` (in × in), ``g = Ḡ``."""
    return (g @ x @ a * y).sum() + prior * (x * y).sum()


def kfac_penalty_grad(tau: Tensor, a: Tensor, g: Tensor, algorithm: str, strength: float, prior: float = 0.0,
                      past: Tensor | None = None, task_index: int = 0) -> Tensor:
    """``∂R/∂τ`` of one layer's ITA or IEL penalty in the Kronecker form (module docstring)."""
    curved = g @ tau @ a + prior * tau
    if algorithm == "ita":
        return strength * curved
    members = 2 if task_index == 0 else task_index + 1  # T = 2 at task 0, as for the diagonal (§4)
    past_curved = 0.0 if past is None else g @ past @ a + prior * past
    return strength * ((1 - 1 / members) * curved - past_curved / members)


def kfac_penalty(tau: Tensor, a: Tensor, g: Tensor, algorithm: str, strength: float, prior: float = 0.0,
                 past: Tensor | None = None, task_index: int = 0) -> Tensor:
    """The value whose gradient :func:`kfac_penalty_grad` is."""
    if algorithm == "ita":
        return 0.5 * strength * quadratic(tau, tau, a, g, prior)
    members = 2 if task_index == 0 else task_index + 1
    cross = 0.0 if past is None else quadratic(tau, past, a, g, prior)
    return strength * (0.5 * (1 - 1 / members) * quadratic(tau, tau, a, g, prior) - cross / members)


def lora_grads(dense_grad: Tensor, lora_a: Tensor, lora_b: Tensor) -> dict[str, Tensor]:
    """``∂/∂B = D A_lᵀ`` and ``∂/∂A_l = Bᵀ D`` for ``τ = B A_l`` (never forming more than ``D``)."""
    return {"lora_A": lora_b.T @ dense_grad, "lora_B": dense_grad @ lora_a.T}
