"""Diagonal Fisher of a classifier w.r.t. the weights and biases of its ``nn.Linear`` layers (docs/method.md §3).

For a classifier with logits ``z(x)`` and softmax outputs ``p(x)`` over ``C`` classes, the diagonal of the
true Fisher, *summed* over a data set, is

    F = Σ_x Σ_c p_c(x) · (∂ log p_c(x) / ∂θ)²          (elementwise square of per-example gradients)

Every estimator is a set of ``K`` *cotangents* ``v`` on the logits of each example: the per-example
gradient ``g_v(x) = J(x)ᵀ v`` (``J = ∂z/∂θ``) is formed for each, squared and summed:
``F̂ = Σ_x Σ_v g_v(x)²``. Since ``∂ log p_c / ∂z = e_c − p``, the exact Fisher needs
``Σ_v v vᵀ = Σ_c p_c (e_c − p)(e_c − p)ᵀ = diag(p) − p pᵀ``, which is also ``E_{y~p}[(e_y − p)(e_y − p)ᵀ]``.

=============  ======================================  =============================================  ========
estimator      cotangents ``v`` of one example         bias and variance                              ``K``
=============  ======================================  =============================================  ========
``exact``      ``√p_c (e_c − p)`` for every class c    none                                           ``C``
``mc``         ``(e_y − p) / √S`` for ``S`` labels     unbiased, ``E[F̂] = F``; the relative error     ``S``
               ``y ~ p(x)`` drawn per example          shrinks like ``1/√(n·S)`` over ``n`` examples
               (``samples = S``)
``topk``       ``√p_c (e_c − p)`` for the ``k``        biased low (drops the other classes' terms,    ``k``
               classes most frequent among the         each ``≥ 0``); exact when ``k ≥ C``
               examples' top-``k`` sets of the batch
               (the reference's truncation)
``empirical``  ``e_y − p``, ``y`` the true label       biased: the "empirical Fisher" of EWC, not     ``1``
                                                       the Fisher (it ignores the model's p)
=============  ======================================  =============================================  ========

**Cost.** One forward per example for every estimator, then ``K`` backward rows per example (all of the
example's cotangents in one vectorised backward), then the squaring below. The reference algorithm costs
one forward and ``C`` separate backward passes per batch; ``mc`` with ``S = 1`` and ``empirical`` cost
about one training step.

**Computation.** Per (micro-)batch:

1. one forward with every parameter detached and the graph starting at the target layers' inputs (no
   parameter needs ``requires_grad``; nothing upstream of the first target layer is differentiated),
   recording each target layer's input ``a`` (``N`` tokens × in) and output (attention blocks that apply
   a target's weight by ``F.linear`` call the layer for this pass, :mod:`lightning_taylor.deltas.adapters`;
   a target whose layer is still not called is refused by name);
2. one vectorised backward (``torch.func.vmap`` over ``torch.autograd.grad``) of all ``K`` cotangents to the
   target outputs, giving output cotangents ``g_k`` (``N`` × out) per example. (``is_grads_batched=True``
   would loop over the cotangents inside layer norm, GELU and attention; for the same reason the forward
   uses PyTorch's math attention kernel when ``K > 1``.)
3. per target layer, with tokens summed *before* squaring (the per-example gradient of a linear layer
   applied to a sequence is ``gᵀ a``):

       weight:  Σ_x Σ_k (Σ_n g_kn ⊗ a_n)²        bias:  Σ_x Σ_k (Σ_n g_kn)²

   The weight term is evaluated one of two exact ways, whichever is cheaper for the layer:

   * direct: the ``K`` per-example gradients ``g_kᵀ a`` (``K·N·out·in`` multiply-adds), squared and summed;
   * Gram: ``Σ_k (Σ_n g_kn,o a_n,i)² = Σ_{n,m} G_o[n, m] · a_n,i a_m,i`` with ``G_o = Σ_k g_k,·o g_k,·oᵀ``
     (``N × N`` per example and output unit), symmetric in ``n, m``: per example one matrix product over
     the token pairs ``m ≥ n`` (off-diagonal ones counted twice) whose cost (``N(N+1)/2·out·in``) does not
     grow with ``K`` — much cheaper when ``K`` is large and ``N`` small.

Memory is bounded: a batch is split into micro-batches of at most ``chunk_size`` (cotangent, example)
rows per backward (the results do not depend on it: examples are independent in eval mode), and the
squaring into blocks (:mod:`lightning_taylor.curvature._squaring`).

**Distributed.** Each process passes only its own shard (every example exactly once: no padded duplicates,
which e.g. ``DistributedSampler`` adds to even out shards), then calls :meth:`FisherSums.all_reduce`, which
sums the sums and the counts; means are formed only after that (:meth:`FisherSums.mean`), so 1 process and
N processes give the same Fisher. ``mc`` draws its labels from ``generator``: seed it differently per
process, or the shards reuse one stream of uniforms.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call

from lightning_taylor._checks import check_choice, check_positive_int
from lightning_taylor.curvature._cotangents import (
    cotangents,
    probabilities,
    topk_classes,
)
from lightning_taylor.curvature._squaring import add_weight_squares
from lightning_taylor.deltas.adapters import routed
from lightning_taylor.errors import expected
from lightning_taylor.precision import full_precision

Estimator = Literal["exact", "mc", "topk", "empirical"]

#: With ``chunk_size=None``: bytes of target-output cotangents one vectorised backward may produce (on a
#: CUDA device: at least an eighth of its free memory).
_ROWS_BYTES = 1 << 27


@dataclass
class FisherSums:
    """Per-parameter sums of per-example diagonal Fisher terms over ``count`` examples.

    ``estimator`` and ``settings`` (e.g. ``{"samples": 4}`` for ``mc``) record how the sums were made;
    keep them with every saved Fisher.
    """

    sums: dict[str, Tensor]
    count: int
    estimator: str = "exact"
    settings: dict[str, Any] = field(default_factory=dict)

    def mean(self, prior: float = 0.0) -> dict[str, Tensor]:
        """``prior + sums / count`` (``prior`` alone when no example was seen)."""
        return {k: prior + (s / self.count if self.count else torch.zeros_like(s)) for k, s in self.sums.items()}

    def all_reduce(self, group: Any = None) -> FisherSums:
        """Sum ``sums`` and ``count`` in place over the processes of ``group`` (no-op outside torch.distributed).

        Every process must call it, with the same parameter names in the same order; each contributes the
        sums over its own examples, so the reduced ``sums / count`` is the Fisher over all of them. The
        sums are reduced as one flat buffer per dtype, the count exactly (float64 holds integers < 2**53).
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self
        values = [self.sums[name] for name in sorted(self.sums)]
        device = values[0].device if values else torch.device("cpu")
        for dtype in sorted({v.dtype for v in values}, key=str):
            same = [v for v in values if v.dtype == dtype]
            flat = torch.cat([v.reshape(-1) for v in same])
            dist.all_reduce(flat, group=group)
            for value, reduced in zip(same, flat.split([v.numel() for v in same])):
                value.copy_(reduced.view_as(value))
        count = torch.tensor([self.count], dtype=torch.float64, device=device)
        dist.all_reduce(count, group=group)
        self.count = int(count.item())
        return self


def _resolve(model: nn.Module, param_names: Sequence[str]) -> dict[str, tuple[str, str]]:
    """Map each parameter name to ``(linear module name, "weight" | "bias")``."""
    if isinstance(param_names, str) or not param_names:
        raise expected("param_names", "a non-empty list of parameter names", param_names)
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
    """Record each module's input and output during a forward.

    An input that is not yet part of an autograd graph (at the first target on the path) is replaced by a
    leaf that requires grad, so the graph starts at the first target layer. Refused, since the per-example
    gradient would then not be ``gᵀ a``: a module called twice per forward, and an input or output that the
    model modifies in place after the layer.
    """
    versions: dict[str, tuple[int, int]] = {}

    def pre_hook(module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...] | None:
        if args[0].requires_grad:
            return None
        return (args[0].detach().requires_grad_(), *args[1:])

    def hook(name: str):
        def fn(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            if name in store:
                raise expected("param_names", "layers called once per forward", name,
                               "Shared layers called several times per forward are not supported.")
            store[name] = (args[0].detach(), output)
            versions[name] = (args[0]._version, output._version)
        return fn

    handles = []
    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(pre_hook))
        handles.append(module.register_forward_hook(hook(name)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
    for name, (inputs, output) in store.items():
        if (inputs._version, output._version) != versions[name]:
            raise expected("param_names", "layers whose input and output are not modified in place", name,
                           "The model changes this layer's input or output in place after the layer.")


def _check_called(model: nn.Module, module_names: Sequence[str], store: Mapping[str, object]) -> None:
    """Refuse a target layer that the forward did not call (its weight applied some other way, e.g. by
    ``F.linear`` on ``layer.weight``): its per-example gradient cannot be formed from the layer's input."""
    for name in module_names:
        if name not in store:
            parent = model.get_submodule(name.rpartition(".")[0])
            owner = type(parent).__name__ + ("" if parent is model else f" (in {type(model).__name__})")
            raise expected("param_names", "weights of layers whose forward runs in the model's forward", name,
                           f"{owner} applies this weight without calling the layer, so its Fisher cannot be "
                           "formed from the layer's input and output; leave it out.")


def _math_attention() -> contextlib.AbstractContextManager:
    """Selects PyTorch's math attention kernel, whose backward has vmap batching rules (the fused CPU and CUDA
    kernels' backwards do not, so vmap would loop over the cotangents); a no-op on old PyTorch versions."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # PyTorch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def _vjp(logits: Tensor, outputs: list[Tensor], cotangents: Tensor, vectorize: list[bool]) -> list[Tensor]:
    """``∂⟨v_k, logits⟩ / ∂output`` for every cotangent ``v_k``, stacked: ``K × output.shape`` per output
    (zeros for an output that does not influence the logits).

    One vectorised backward (``torch.func.vmap`` over the K cotangents, whose batching rules cover the
    backward of the usual layers); where the backend lacks a rule for some operator, ``vectorize[0]`` is
    cleared and one backward per cotangent is run instead (same values).
    """
    def backward(v: Tensor) -> tuple[Tensor, ...]:
        return torch.autograd.grad(logits, outputs, v, retain_graph=True, materialize_grads=True)

    if cotangents.shape[0] > 1 and vectorize[0]:
        try:
            return list(torch.func.vmap(backward)(cotangents))
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:
            vectorize[0] = False
    if cotangents.shape[0] == 1:  # mc with one sample, empirical: a view, not a copy of every target output
        return [grad.unsqueeze(0) for grad in backward(cotangents[0])]
    return [torch.stack(grads) for grads in zip(*(backward(v) for v in cotangents))]


def _probe(model: nn.Module, modules: Mapping[str, nn.Module], params: dict[str, Tensor], x: Tensor) -> tuple[int, int]:
    """Number of classes and bytes of all target outputs for one example (one no-grad forward of ``x[:1]``)."""
    sizes: dict[str, int] = {}

    def hook(name: str):
        def fn(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            sizes[name] = output.numel() * output.element_size()
        return fn

    handles = [m.register_forward_hook(hook(name)) for name, m in modules.items()]
    try:
        with torch.no_grad(), routed(model, list(modules)):
            logits = functional_call(model, params, (x[:1],))
    finally:
        for handle in handles:
            handle.remove()
    return logits.shape[-1], sum(sizes.values())


def _split(total: int, size: int) -> list[slice]:
    """``total`` items in equal-as-possible consecutive slices of at most ``size``."""
    parts = max(1, math.ceil(total / size))
    step = math.ceil(total / parts)
    return [slice(s, min(s + step, total)) for s in range(0, total, step)]


@full_precision()  # sums of squares in the weights' dtype, whatever autocast surrounds the call
def diagonal_fisher(
    model: nn.Module,
    batches: Iterable[Tensor | tuple[Tensor, Tensor] | Sequence[Tensor]],
    param_names: Sequence[str],
    *,
    estimator: Estimator = "exact",
    samples: int = 1,
    top_k: int = 10,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> FisherSums:
    """Sum of per-example diagonal Fisher terms of ``model`` over ``batches``, w.r.t. ``param_names``.

    Returns ``F = Σ_x Σ_v (J(x)ᵀ v)²`` summed (not averaged) over the examples, with the estimator's
    cotangents ``v`` (module docstring), and the number of examples: divide only after every reduction.

    Args:
        model: ``model(x)`` returns logits (B × C); run in eval mode here (its mode is restored after), with
            its parameters detached (none needs ``requires_grad``; none gets a ``.grad``). Pass the inner
            module, not a DDP wrapper. Target layers take batch-first inputs (``B × … × in``).
        batches: input tensors, or ``(x, y)`` pairs (labels are used by ``empirical`` only).
        param_names: weights / biases of ``nn.Linear`` modules, as in ``model.named_parameters()``.
        estimator: ``"exact"``, ``"mc"`` (``samples`` labels per example), ``"topk"`` (``top_k`` classes)
            or ``"empirical"`` (see the module docstring for their formula, bias and cost).
        generator: random source of ``mc`` sampling (a CPU generator; the global one when ``None``).
        chunk_size: most (cotangent, example) rows back-propagated together; a batch is split into
            micro-batches of ``max(1, chunk_size // K)`` examples for ``K`` cotangents per example (and
            one example's cotangents into several backwards when ``K > chunk_size``); results do not
            depend on it. ``None`` sizes it so that one backward's cotangents of the target outputs take
            about 128 MiB (on CUDA, an eighth of the free memory).
        progress: called after each batch with the number of examples processed so far (this process).

    Returns:
        :class:`FisherSums` with one sum per name (the parameter's shape and dtype), the example count,
        the estimator and its settings.
    """
    check_choice("estimator", estimator, ("exact", "mc", "topk", "empirical"))
    check_positive_int("samples", samples)
    check_positive_int("top_k", top_k)
    if chunk_size is not None:
        check_positive_int("chunk_size", chunk_size)
    if torch.is_inference_mode_enabled():
        raise RuntimeError("diagonal_fisher needs autograd: call it outside torch.inference_mode().")
    resolved = _resolve(model, param_names)
    params = dict(model.named_parameters())
    detached = {name: p.detach() for name, p in params.items()}  # no graph through any parameter
    module_names = list(dict.fromkeys(module for module, _ in resolved.values()))
    modules = {name: model.get_submodule(name) for name in module_names}
    sums = {p: torch.zeros_like(params[p], memory_format=torch.contiguous_format).detach() for p in resolved}
    count, rows, per_example, vectorize = 0, 0, 0, [True]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
            if estimator == "empirical" and y is None:
                raise expected("batches", "(x, y) pairs for the empirical estimator", "input tensors only")
            size = x.shape[0]
            if size == 0:
                continue
            if not rows:  # first batch: the number of classes and the per-example size of the target outputs
                num_classes, example_bytes = _probe(model, modules, detached, x)
                per_example = {"exact": num_classes, "mc": samples, "topk": min(top_k, num_classes),
                               "empirical": 1}[estimator]
                budget = _ROWS_BYTES
                if x.device.type == "cuda":
                    budget = max(budget, torch.cuda.mem_get_info(x.device)[0] // 8)
                rows = chunk_size or max(1, budget // max(1, example_bytes))
            micro = _split(size, max(1, rows // per_example))  # micro-batches of whole examples
            classes = uniforms = None
            if estimator == "topk" and len(micro) > 1:  # the class choice is made on the whole batch
                with torch.no_grad():
                    probs = torch.cat([probabilities(functional_call(model, detached, (x[s],))) for s in micro])
                classes = topk_classes(probs, top_k)
            elif estimator == "mc":  # drawn per batch: the same labels whatever the micro-batching
                uniforms = torch.rand(size, samples, generator=generator, dtype=torch.float64)
            for s in micro:
                store: dict[str, tuple[Tensor, Tensor]] = {}
                attention = _math_attention() if per_example > 1 and rows > 1 else contextlib.nullcontext()
                with torch.enable_grad(), routed(model, module_names), _capture(modules, store), attention:
                    logits = functional_call(model, detached, (x[s].detach(),))
                _check_called(model, module_names, store)
                if logits.ndim != 2:
                    raise expected("model", "a classifier returning B × C logits", tuple(logits.shape))
                probs = probabilities(logits)
                if estimator == "topk" and classes is None:  # one micro-batch: the whole batch
                    classes = topk_classes(probs, top_k)
                vectors = cotangents(probs, estimator, classes,
                                     None if uniforms is None else uniforms[s], None if y is None else y[s])
                outputs = [store[name][1] for name in module_names]
                for k0 in range(0, vectors.shape[0], rows):  # several backwards only when K > rows
                    grads = dict(zip(module_names, _vjp(logits, outputs, vectors[k0 : k0 + rows], vectorize)))
                    for pname, (module_name, attr) in resolved.items():
                        g = grads[module_name]
                        g = g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])  # K × b × N × out
                        if attr == "bias":
                            sums[pname] += g.sum(dim=2).square().sum(dim=(0, 1))
                        else:
                            a = store[module_name][0]
                            add_weight_squares(sums[pname], g, a.reshape(a.shape[0], -1, a.shape[-1]))
                    del grads
                del store, logits, outputs
            count += size
            if progress is not None:
                progress(count)
    finally:
        model.train(was_training)
    settings = {"samples": samples} if estimator == "mc" else {"top_k": top_k} if estimator == "topk" else {}
    return FisherSums(sums, count, estimator, settings)
