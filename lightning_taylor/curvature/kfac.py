"""Kronecker-factored (KFAC) curvature of a classifier's ``nn.Linear`` weights, and its ITA / IEL penalties.

For a target layer ``y = W a`` applied to the ``T`` tokens of an example, the Fisher block of ``vec(W)`` is
approximated by one Kronecker product (Martens & Grosse 2015; for weight sharing over tokens, Eschenhagen
et al. 2023: "expand" and "reduce"):

    F_W ≈ Ā ⊗ Ḡ        Ā = A / (n·s),   Ḡ = G / n

with ``n`` examples and sums over the same cotangents ``v`` on the logits that the diagonal Fisher uses
(:mod:`lightning_taylor.curvature.diagonal`: ``exact`` ``√p_c (e_c − p)`` for every class, ``mc`` sampled labels,
``empirical`` the true label), ``g_v`` the cotangent at the layer's output:

    expand:  A = Σ_r Σ_t a_rt a_rtᵀ           (s = T)        G = Σ_r Σ_v Σ_t g_vrt g_vrtᵀ
    reduce:  A = Σ_r ā_r ā_rᵀ, ā_r = mean_t a_rt  (s = 1)        G = Σ_r Σ_v ĝ_vr ĝ_vrᵀ, ĝ_vr = Σ_t g_vrt

where ``r`` runs over the *rows* of the layer's input ``(R, t_1, …, in)`` and ``t`` over its weight-sharing
positions, ``T = t_1 ⋯`` (the input's size without its first and last dimensions). **The token count ``T`` is
per layer**: a Swin block applies ``attn.qkv`` to windows, an input ``(B·W, 49, in)`` with ``T = 49``, and its
``mlp.fc1`` to the whole stage, ``(B, H·W', in)`` with ``T = H·W'`` (a stage of ``W`` windows per example).
Rows are examples for a plain ViT (``R = B``) and windows for windowed attention (``R = B·W``); ``n`` counts
examples in every case. This is curvlinops' ``KFACLinearOperator`` convention, which divides each layer's
``A`` by ``n`` times that layer's own ``T`` — for a windowed layer the window's tokens, not the example's
``W·T`` — and reduces (``reduce``) over each row's tokens. It is matched exactly, layer by layer
(tests/test_kfac.py, tests/test_kfac_families.py).

Sums and counts are kept apart (:class:`KroneckerSums`: the sums, ``n``, and ``T`` per layer), summed across
processes, and divided afterwards, as for the diagonal Fisher. ``Ā ⊗ Ḡ`` is the per-example mean curvature:
``n`` times it is curvlinops' ``KFACLinearOperator`` for a summed cross-entropy (the test oracle).

The quadratic form of a delta ``τ`` (out × in) is ``vec(τ)ᵀ (Ā ⊗ Ḡ) vec(τ) = tr(Ḡ τ Ā τᵀ)``, so the penalties
of docs/method.md §4 become, per layer (ε the prior, as ``ε ‖τ‖²`` terms):

    ITA:  (α/2) [tr(Ḡ τ Ā τᵀ) + ε ‖τ‖²]                        ∂/∂τ = α (Ḡ τ Ā + ε τ)
    IEL:  β [½ (1 − 1/T) q(τ, τ) − (1/T) q(τ, P)],  q(x, y) = tr(Ḡ x Ā yᵀ) + ε ⟨x, y⟩

and for LoRA ``τ = B A_l`` the gradients never form a dense ``Ḡ τ Ā`` of the slot's rank:
``∂/∂B = D A_lᵀ``, ``∂/∂A_l = Bᵀ D`` with ``D = ∂/∂τ``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Literal, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_taylor._checks import check_choice, check_positive_int
from lightning_taylor.curvature._cotangents import cotangents, probabilities
from lightning_taylor.errors import expected

KFACApprox = Literal["expand", "reduce"]
KFACEstimator = Literal["exact", "mc", "empirical"]


@dataclass
class KroneckerSums:
    """Per-layer ``A`` and ``G`` sums (see the module docstring), the example count and the token counts.

    ``tokens`` maps every layer to its ``T``, the weight-sharing positions per row of its input (the ``expand``
    divisor). A single number (the format of checkpoints before per-layer counts) is read as that count for
    every layer.
    """

    inputs: dict[str, Tensor] = field(default_factory=dict)
    grads: dict[str, Tensor] = field(default_factory=dict)
    count: int = 0
    tokens: dict[str, int] = field(default_factory=dict)
    estimator: str = "exact"
    approx: str = "expand"

    def __post_init__(self) -> None:
        if isinstance(self.tokens, int):  # one count for the whole pass: older checkpoints and callers
            self.tokens = {name: self.tokens for name in self.inputs}
        self.tokens = dict(self.tokens)
        missing = [name for name in self.inputs if name not in self.tokens]
        if missing:
            raise expected("tokens", "a token count for every layer of the Kronecker sums", sorted(self.tokens),
                           f"`{missing[0]}` has none.")

    @property
    def sums(self) -> dict[str, Tensor]:
        """Every sum by name, ``"<layer>.A"`` and ``"<layer>.G"`` (like ``FisherSums.sums``: for checks and files)."""
        return {**{f"{k}.A": v for k, v in self.inputs.items()}, **{f"{k}.G": v for k, v in self.grads.items()}}

    def scale(self, name: str) -> int:
        """The divisor ``s`` of layer ``name``'s ``A`` besides the examples: its ``T`` (expand) or 1 (reduce)."""
        return self.tokens[name] if self.approx == "expand" else 1

    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{layer: (Ā, Ḡ)}``, the per-example means ``A / (n·s)`` and ``G / n`` (``s`` of :meth:`scale`)."""
        if self.count < 1:
            raise expected("count", "at least one example in the Kronecker sums", self.count)
        return {name: (self.inputs[name] / (self.count * self.scale(name)), self.grads[name] / self.count)
                for name in self.inputs}

    def all_reduce(self, group: object = None) -> KroneckerSums:
        """Sum the sums and the counts over the processes (in place; no-op outside ``torch.distributed``).

        The token counts are shapes, the same on every process for the same model and image size; a process
        that saw other counts (e.g. another image size) is an error rather than a silently wrong divisor.
        """
        if dist.is_available() and dist.is_initialized():
            for tensors in (self.inputs, self.grads):
                for value in tensors.values():
                    dist.all_reduce(value, group=group)
            device = next(iter(self.inputs.values())).device
            count = torch.tensor([self.count], dtype=torch.float64, device=device)
            dist.all_reduce(count, group=group)
            self.count = int(count.item())
            names = sorted(self.tokens)
            low = torch.tensor([self.tokens[n] for n in names], dtype=torch.float64, device=device)
            high = low.clone()
            dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
            dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
            for name, lo, hi in zip(names, low.tolist(), high.tolist()):
                if lo != hi:
                    raise expected("tokens", f"the same token count of `{name}` on every process",
                                   f"{int(lo)} to {int(hi)}", "Every process must use the same image size.")
        return self


def kronecker_sums(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], layers: Sequence[str],
                   estimator: KFACEstimator = "exact", approx: KFACApprox = "expand", samples: int = 1,
                   generator: torch.Generator | None = None) -> KroneckerSums:
    """``A`` and ``G`` sums of the ``nn.Linear`` modules ``layers`` of ``model`` (a classifier of logits ``B × C``).

    Each batch is ``(x, y)``; ``y`` is used by ``empirical`` only. The model runs in eval mode, as for the
    diagonal Fisher (its mode is restored after); its parameters need not require grad (the graph starts at
    the layers' outputs).
    """
    check_choice("estimator", estimator, ("exact", "mc", "empirical"))
    check_choice("approx", approx, ("expand", "reduce"))
    check_positive_int("samples", samples)
    modules = {name: model.get_submodule(name) for name in layers}
    for name, module in modules.items():
        if not isinstance(module, nn.Linear):
            raise expected("layers", "names of nn.Linear modules", name, f"`{name}` is a {type(module).__name__}.")
    result = KroneckerSums(estimator=estimator, approx=approx)
    captured: dict[str, tuple[Tensor, Tensor]] = {}

    def hook(name: str):  # noqa: ANN202
        def record(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
            # The gradient w.r.t. a zero added to the output is the output's gradient, and unlike a detached
            # copy it keeps the paths from earlier targets through this layer.
            zero = torch.zeros_like(output, requires_grad=True)
            captured[name] = (args[0].detach(), zero)
            return output + zero
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in modules.items()]
    was_training = model.training
    model.eval()  # dropout off: the curvature of the deterministic network at θ0
    try:
        for x, y in batches:
            captured.clear()
            with torch.enable_grad():
                logits = model(x)
                missing = [name for name in layers if name not in captured]
                if missing:
                    raise expected("layers", "layers whose forward runs in the model's forward", missing[0],
                                   "Its weight is applied another way (e.g. F.linear on `.weight`).")
                uniforms = (torch.rand(x.shape[0], samples, generator=generator, dtype=torch.float64)
                            if estimator == "mc" else None)
                rows = cotangents(probabilities(logits), estimator, None, uniforms, y)
                outputs = [captured[name][1] for name in layers]
                for k in range(rows.shape[0]):
                    grads = torch.autograd.grad(logits, outputs, rows[k], retain_graph=k + 1 < rows.shape[0])
                    for name, g in zip(layers, grads):
                        g = g.reshape(g.shape[0], -1, g.shape[-1])
                        g = g.reshape(-1, g.shape[-1]) if approx == "expand" else g.sum(1)
                        _add(result.grads, name, g.T @ g)
            for name in layers:
                a = captured[name][0]
                a = a.reshape(a.shape[0], -1, a.shape[-1])  # rows (examples, or windows) × T × in
                _set_tokens(result.tokens, name, a.shape[1])
                a = a.reshape(-1, a.shape[-1]) if approx == "expand" else a.mean(1)
                _add(result.inputs, name, a.T @ a)
            result.count += int(x.shape[0])
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return result


def _set_tokens(tokens: dict[str, int], name: str, count: int) -> None:
    """Record layer ``name``'s token count; a count that changes between batches has no single divisor."""
    if tokens.setdefault(name, count) != count:
        raise expected("batches", f"batches of one image size (`{name}` saw {tokens[name]} tokens per row)", count,
                       "The expand divisor of a layer is its token count; use one image size per pass.")


def _add(store: dict[str, Tensor], name: str, value: Tensor) -> None:
    store[name] = value if name not in store else store[name] + value
