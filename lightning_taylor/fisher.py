"""Diagonal Fisher of a classifier w.r.t. the weights and biases of its ``nn.Linear`` layers (METHOD.md §3).

For a classifier with softmax outputs ``p(x)`` the true Fisher's diagonal, summed over a data set, is

    F = Σ_x Σ_c p_c(x) · (∂ log p_c(x) / ∂θ)²          (elementwise square of per-example gradients)

Every estimator here is a set of *cotangents* ``v`` on the logits, one row per example: the per-example
gradient ``g_v(x) = J(x)ᵀ v(x)`` is formed for each, squared and summed, ``F ≈ Σ_x Σ_v g_v(x)²``. Since
``∂ log p_c / ∂z = e_c − p``:

============  ====================================================  =====================================
estimator     cotangents                                            bias and cost
============  ====================================================  =====================================
``exact``     ``√p_c (e_c − p)`` for every class ``c``              exact; C backward passes per batch
``topk``      the same, only for the ``k`` classes most often       biased low (drops classes);
              top-1 in the batch (the reference's truncation)       k backward passes
``mc``        ``√(1/K) (e_y − p)``, ``y ~ p``, ``K`` samples        unbiased; K backward passes
``empirical`` ``e_y − p`` with the true label ``y``                 biased (not the Fisher); 1 pass
============  ====================================================  =====================================

Per-example gradients of a linear layer applied to a token sequence are summed over tokens *before*
squaring: with layer input ``a`` (N × in) and output cotangent ``g`` (N × out), the weight gradient is
``gᵀ a``. The gradients are taken w.r.t. the layers' outputs only, so no parameter needs ``requires_grad``
and nothing outside the path from the first target to the logits is differentiated.

Results are *sums* with an example count (:class:`FisherSums`); means are formed only after every
reduction (across batches, tasks and processes), which makes 1 process and N processes agree exactly.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Literal, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_taylor._checks import check_choice, check_non_negative, check_positive_int, expected

Estimator = Literal["exact", "mc", "topk", "empirical"]


@dataclass
class FisherSums:
    """Per-parameter sums of per-example diagonal Fisher terms over ``count`` examples."""

    sums: dict[str, Tensor]
    count: int
    estimator: str = "exact"
    settings: dict[str, Any] = field(default_factory=dict)

    def mean(self, prior: float = 0.0) -> dict[str, Tensor]:
        """``prior + sums / count`` (``prior`` alone when no example was seen)."""
        return {k: prior + (s / self.count if self.count else torch.zeros_like(s)) for k, s in self.sums.items()}

    def all_reduce(self, group: Any = None) -> FisherSums:
        """Sum ``sums`` and ``count`` over the processes of ``group`` (no-op outside torch.distributed)."""
        if not (dist.is_available() and dist.is_initialized()):
            return self
        for value in self.sums.values():
            dist.all_reduce(value, group=group)
        count = torch.tensor([self.count], dtype=torch.float64, device=next(iter(self.sums.values())).device)
        dist.all_reduce(count, group=group)
        self.count = int(count.item())
        return self


def _resolve(model: nn.Module, param_names: Sequence[str]) -> dict[str, tuple[str, str]]:
    """Map each parameter name to ``(linear module name, "weight" | "bias")``."""
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    known = dict(model.named_parameters())
    resolved = {}
    for pname in param_names:
        module_name, _, attr = pname.rpartition(".")
        if pname not in known:
            raise expected("param_names", "names of parameters of the model", pname,
                           f"Some parameter names: {list(known)[:6]}.")
        if module_name not in linears or attr not in ("weight", "bias"):
            raise expected("param_names", "weights or biases of nn.Linear layers", pname)
        resolved[pname] = (module_name, attr)
    return resolved


@contextlib.contextmanager
def _capture(modules: Mapping[str, nn.Module], store: dict[str, tuple[Tensor, Tensor]]) -> Iterator[None]:
    """Record each module's input and output during the forward (each module is called once per forward)."""
    def hook(name: str):
        def fn(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            store[name] = (args[0].detach(), output)
        return fn

    handles = [m.register_forward_hook(hook(name)) for name, m in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _cotangents(
    logits: Tensor, labels: Tensor | None, estimator: str, samples: int, top_k: int, generator: torch.Generator | None
) -> Iterator[Tensor]:
    """The estimator's cotangents ``v`` (B × C) on the logits, one tensor per backward pass."""
    # Softmax in at least float32, returned in the logits' dtype (float64 stays float64).
    probs = logits.detach().to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1).to(logits.dtype)
    num_classes = probs.shape[1]
    eye = torch.eye(num_classes, dtype=probs.dtype, device=probs.device)
    if estimator in ("exact", "topk"):
        classes = range(num_classes)
        if estimator == "topk" and top_k < num_classes:
            counts = torch.bincount(probs.argmax(dim=1), minlength=num_classes)
            classes = counts.argsort(descending=True, stable=True)[:top_k].tolist()
        for c in classes:
            yield probs[:, c : c + 1].sqrt() * (eye[c] - probs)
    elif estimator == "mc":
        sampled = torch.multinomial(probs.double().cpu(), samples, replacement=True, generator=generator)
        for k in range(samples):
            yield (eye[sampled[:, k].to(probs.device)] - probs) / samples**0.5
    else:
        if labels is None:
            raise expected("batches", "(x, y) pairs for the empirical estimator", "input tensors only")
        yield eye[labels] - probs


def _square_per_example(grad_out: Tensor, inputs: Tensor, attr: str) -> Tensor:
    """``Σ_b (Σ_n g_bn ⊗ a_bn)²`` for the weight, ``Σ_b (Σ_n g_bn)²`` for the bias (tokens summed first)."""
    batch = grad_out.shape[0]
    g = grad_out.reshape(batch, -1, grad_out.shape[-1])
    if attr == "bias":
        return g.sum(dim=1).square().sum(dim=0)
    a = inputs.reshape(batch, -1, inputs.shape[-1])
    if g.shape[1] == 1:  # one token per example: (g a)² = g² a², a plain matrix product
        return g[:, 0].square().T @ a[:, 0].square()
    return torch.einsum("bno,bni->boi", g, a).square().sum(dim=0)


def diagonal_fisher(
    model: nn.Module,
    batches: Iterable[Tensor | tuple[Tensor, Tensor] | Sequence[Tensor]],
    param_names: Sequence[str],
    *,
    estimator: Estimator = "exact",
    samples: int = 1,
    top_k: int = 10,
    generator: torch.Generator | None = None,
) -> FisherSums:
    """Sum of per-example diagonal Fisher terms of ``model`` over ``batches``, w.r.t. ``param_names``.

    Args:
        model: ``model(x)`` returns logits (B × C); run in eval mode here (its mode is restored after).
        batches: input tensors, or ``(x, y)`` pairs (labels are used by ``empirical`` only).
        param_names: weights / biases of ``nn.Linear`` modules, as in ``model.named_parameters()``.
        estimator: ``"exact"``, ``"mc"`` (``samples`` labels per example), ``"topk"`` (``top_k`` classes)
            or ``"empirical"`` (see the module docstring for their bias and cost).
        generator: random source of ``mc`` sampling (CPU generator).

    Returns:
        :class:`FisherSums` with one sum per name (the parameter's shape and dtype) and the example count.
    """
    check_choice("estimator", estimator, ("exact", "mc", "topk", "empirical"))
    check_positive_int("samples", samples)
    check_positive_int("top_k", top_k)
    resolved = _resolve(model, param_names)
    params = dict(model.named_parameters())
    modules = {name: model.get_submodule(name) for name, _ in set(resolved.values())}
    sums = {p: torch.zeros_like(params[p], memory_format=torch.contiguous_format).detach() for p in resolved}
    count = 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
            store: dict[str, tuple[Tensor, Tensor]] = {}
            with torch.enable_grad(), _capture(modules, store):
                if x.is_floating_point():
                    x = x.detach().requires_grad_()
                logits = model(x)
            names = list(modules)
            outputs = [store[name][1] for name in names]
            for v in _cotangents(logits, y, estimator, samples, top_k, generator):
                grads = torch.autograd.grad(logits, outputs, grad_outputs=v, retain_graph=True)
                by_module = dict(zip(names, grads))
                for pname, (module_name, attr) in resolved.items():
                    sums[pname] += _square_per_example(by_module[module_name], store[module_name][0], attr)
            count += logits.shape[0]
    finally:
        model.train(was_training)
    settings = {"samples": samples} if estimator == "mc" else {"top_k": top_k} if estimator == "topk" else {}
    return FisherSums(sums, count, estimator, settings)


class FisherAccumulator(nn.Module):
    """Fisher sums and counts across tasks: ``past`` = Σ_{s<t} (F_s, n_s) and ``current`` = (F_t, n_t).

    ITA at task t uses ``F̄_<t = ε + Σ_{s<t} F_s / Σ_{s<t} n_s`` (only ε at t = 0); IEL uses
    ``F̄_≤t = ε + Σ_{s≤t} F_s / Σ_{s≤t} n_s``. Counts are true example counts (the reference's ITA
    normaliser counts task 0 twice; we do not). The state is checkpointed as plain tensors and numbers.
    """

    def __init__(self, prior: float = 1e-5) -> None:
        super().__init__()
        check_non_negative("prior", prior)
        self.prior = prior
        self.past: dict[str, Tensor] = {}
        self.past_count = 0
        self.current: dict[str, Tensor] = {}
        self.current_count = 0
        self.current_task = -1
        self.estimators: list[str] = []

    def set_task(self, task: int, fisher: FisherSums) -> None:
        """Record ``F_task``; the previous task's sums move into ``past`` first."""
        if task <= self.current_task:
            raise expected("task", f"an index after the last recorded task {self.current_task}", task)
        if self.current_task >= 0:
            for key, value in self.current.items():
                self.past[key] = self.past[key] + value if key in self.past else value.clone()
            self.past_count += self.current_count
        self.current = {k: v.detach().clone() for k, v in fisher.sums.items()}
        self.current_count = fisher.count
        self.current_task = task
        self.estimators.append(fisher.estimator)

    def curvature(self, include_current: bool) -> dict[str, Tensor]:
        """``ε + Σ F / Σ n`` over past tasks, plus the current one when ``include_current`` (IEL)."""
        out = {}
        for key, current in self.current.items():
            total, count = self.past.get(key, torch.zeros_like(current)), self.past_count
            if include_current:
                total, count = total + current, count + self.current_count
            out[key] = self.prior + (total / count if count else torch.zeros_like(total))
        return out

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "prior": self.prior, "past": self.past, "past_count": self.past_count, "current": self.current,
            "current_count": self.current_count, "current_task": self.current_task, "estimators": self.estimators,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def extra_repr(self) -> str:
        return (f"prior={self.prior}, current_task={self.current_task}, past_count={self.past_count}, "
                f"current_count={self.current_count}, tensors={len(self.current)}")
