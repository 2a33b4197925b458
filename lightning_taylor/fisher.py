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
squaring into blocks of about :func:`_workspace` elements.

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
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from lightning_taylor._checks import check_choice, check_non_negative, check_positive_int, expected
from lightning_taylor.deltas.adapters import routed
from lightning_taylor.precision import full_precision

Estimator = Literal["exact", "mc", "topk", "empirical"]

#: Largest number of elements of one squaring block (per-example gradients or Gram matrices) on the CPU
#: (:func:`_workspace`): 2 MiB of float32, which stays in a core's cache.
_WORKSPACE = 1 << 19
#: Fewest elements of one per-example gradient block row for which the direct form adds each gradient's
#: square by its own fused call (:func:`_add_direct_squares`).
_FUSED_MIN = 1 << 16
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


def _probabilities(logits: Tensor) -> Tensor:
    """Softmax in at least float32, returned in the logits' dtype (float64 stays float64)."""
    return logits.detach().to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1).to(logits.dtype)


def _topk_classes(probs: Tensor, top_k: int) -> Tensor:
    """The reference's truncation: the ``top_k`` classes most often among the examples' ``top_k`` most
    probable classes (ties: lower class index first)."""
    top = probs.topk(min(top_k, probs.shape[1]), dim=1).indices
    counts = torch.bincount(top.reshape(-1), minlength=probs.shape[1])
    return counts.argsort(descending=True, stable=True)[:top_k]


def _cotangents(
    probs: Tensor, estimator: str, classes: Tensor | None, uniforms: Tensor | None, labels: Tensor | None
) -> Tensor:
    """The estimator's cotangents on the logits, ``K × B × C`` (see the module docstring)."""
    num_classes = probs.shape[1]
    if estimator in ("exact", "topk"):
        chosen = torch.arange(num_classes, device=probs.device) if classes is None else classes.to(probs.device)
        onehot = F.one_hot(chosen, num_classes).to(probs.dtype)                     # K × C
        return probs[:, chosen].T.sqrt().unsqueeze(-1) * (onehot.unsqueeze(1) - probs)  # K × B × C
    if estimator == "mc":
        # Inverse-CDF sampling from uniforms drawn per batch: the same draws whatever the micro-batching.
        cdf = probs.double().cumsum(dim=1)
        sampled = torch.searchsorted(cdf, uniforms.to(probs.device), right=True).clamp_(max=num_classes - 1)
        onehot = F.one_hot(sampled.T, num_classes).to(probs.dtype)                  # S × B × C
        return (onehot - probs) / math.sqrt(sampled.shape[1])
    labels = labels.to(probs.device)
    if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
        raise expected("batches", f"labels in [0, {num_classes})", labels.tolist())
    return (F.one_hot(labels, num_classes).to(probs.dtype) - probs).unsqueeze(0)


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


def _use_gram(rows: int, tokens: int, in_features: int) -> bool:
    """Whether the Gram form is the faster one for ``K = rows`` cotangents, ``N = tokens`` tokens and
    ``in_features`` inputs.

    By operation counts, Gram (``N(N+1)/2·out·in``, the token pairs ``m ≥ n`` only) beats direct
    (``K·N·out·in``) once ``K > (N+1)/2``; but direct's batched product runs ever closer to peak speed as
    ``N`` grows, while Gram adds its small Gram products and the gathers of the pairs (relatively more
    for a narrow input). Measured on CPU (``benchmarks/squaring.py``: 1 thread, out × in = 576 × 192 and
    192 × 768; two runs), the two forms cost the same at ``K ≈ 10–12`` and ``8–9.5`` for ``N = 17`` tokens
    (in = 192, 768), ``85–95`` and ``50–55`` for ``N = 65``, above ``400`` and ``230–370`` for ``N = 197``:
    ``K ≈ 0.11·N^1.5·(768 / in)^¼`` within the noise.
    """
    return rows > 0.11 * tokens**1.5 * (768 / in_features) ** 0.25


def _workspace(device: torch.device) -> int:
    """Elements of one squaring block: ``_WORKSPACE`` on the CPU, where blocks that stay in the cache made the
    direct form 20–60 % faster than 16 MiB blocks streamed through memory (``benchmarks/squaring.py``); 8×
    that on an accelerator, where fewer and larger kernels pay (the size used everywhere before; not
    re-measured: no GPU so far)."""
    return _WORKSPACE if device.type == "cpu" else 8 * _WORKSPACE


def _add_weight_squares(out: Tensor, g: Tensor, a: Tensor) -> None:
    """``out += Σ_k Σ_b (Σ_n g[k, b, n] ⊗ a[b, n])²`` for ``g`` (K × B × N × out) and ``a`` (B × N × in).

    Blocked so that no intermediate holds much more than :func:`_workspace` elements (besides one
    example's cotangents, transposed, in the Gram form).
    """
    workspace = _workspace(out.device)
    rows, batch, tokens, out_features = g.shape
    in_features = a.shape[-1]
    if tokens == 1:  # (g a)² = g² a²: sum the squares over cotangents first, then one matrix product
        step_b = max(1, workspace // (rows * out_features + in_features))
        for b0 in range(0, batch, step_b):
            out.addmm_(g[:, b0 : b0 + step_b, 0].square().sum(dim=0).T, a[b0 : b0 + step_b, 0].square())
    elif _use_gram(rows, tokens, in_features):
        _add_gram_squares(out, g, a, workspace)
    else:
        _add_direct_squares(out, g, a, workspace)


def _add_direct_squares(out: Tensor, g: Tensor, a: Tensor, workspace: int) -> None:
    """Direct form of :func:`_add_weight_squares`: the per-example gradients ``P = g_kᵀ a`` (one batched
    product per block of examples and output units), squared and summed into ``out``.

    Where a block's output rows are wide (at least ``_FUSED_MIN`` elements, e.g. ``K = 1``), each gradient
    is added by one fused ``out += P ⊙ P`` pass (``addcmul_``), about 1.5× faster than squaring the block in
    place and summing it, which reads it twice; with many narrow rows (large ``K``) the per-call cost of
    that loop outweighs the saving, and the block is squared and summed in one reduction instead
    (``benchmarks/squaring.py``).
    """
    rows, batch, tokens, out_features = g.shape
    in_features = a.shape[-1]
    step_o = max(1, min(out_features, workspace // (rows * in_features)))
    step_b = max(1, workspace // (rows * step_o * in_features))
    fused = step_o * in_features >= _FUSED_MIN
    for b0 in range(0, batch, step_b):
        ab = a[b0 : b0 + step_b]
        nb = ab.shape[0]
        for o0 in range(0, out_features, step_o):
            gs = g[:, b0 : b0 + nb, :, o0 : o0 + step_o]
            no = gs.shape[-1]
            per_example = torch.bmm(gs.permute(1, 0, 3, 2).reshape(nb, rows * no, tokens), ab)  # b × (K·o) × in
            gradients = per_example.view(nb * rows, no, in_features)
            block = out[o0 : o0 + no]
            if fused:
                for gradient in gradients:
                    block.addcmul_(gradient, gradient)
            else:
                block += gradients.square_().sum(dim=0)


def _pair_blocks(tokens: int, step_n: int, device: torch.device, dtype: torch.dtype
                 ) -> list[tuple[int, int, Tensor, Tensor, Tensor]]:
    """The token pairs ``(n, m)`` with ``m ≥ n``, in blocks of ``step_n`` first tokens ``n0 ≤ n < n1``: per
    block ``(n0, n1, n − n0, m − n0, w)`` with the weights ``w`` (pairs × 1) of
    ``Σ_{n,m} = Σ_{n=m} + 2 Σ_{m>n}``, exact for terms symmetric in ``n, m``."""
    blocks = []
    for n0 in range(0, tokens, step_n):
        n1 = min(tokens, n0 + step_n)
        n, m = torch.triu_indices(n1 - n0, tokens - n0, device=device)
        blocks.append((n0, n1, n, m, torch.where(n == m, 1.0, 2.0).to(dtype).unsqueeze(1)))
    return blocks


def _add_gram_squares(out: Tensor, g: Tensor, a: Tensor, workspace: int) -> None:
    """Gram form of :func:`_add_weight_squares` (:func:`_add_example_gram_squares`), example by example,
    in blocks of first tokens and output units whose Gram matrices and pair products hold at most about
    ``workspace`` elements."""
    _, batch, tokens, out_features = g.shape
    in_features = a.shape[-1]
    step_n = max(1, min(tokens, workspace // (tokens * in_features)))
    step_o = max(1, min(out_features, workspace // (step_n * tokens)))
    blocks = _pair_blocks(tokens, step_n, a.device, a.dtype)
    for b in range(batch):
        _add_example_gram_squares(out, g[:, b], a[b], blocks, step_o)


def _add_example_gram_squares(out: Tensor, g: Tensor, a: Tensor,
                              blocks: list[tuple[int, int, Tensor, Tensor, Tensor]], step_o: int) -> None:
    """Gram form for one example (``g``: K × N × out, ``a``: N × in):

        Σ_k (Σ_n g_kn,o a_n,i)² = Σ_{m≥n} w_nm · G_o[n, m] · a_n,i a_m,i,    G_o = Σ_k g_k,·o g_k,·oᵀ  (N × N),

    ``w_nm = 1`` on the diagonal and 2 above it, so that each pair's ``in``-wide product is made once: a
    matrix product of the Gram entries (out × pairs) with the token-pair products (pairs × in), per block
    of first tokens (:func:`_pair_blocks`) and of ``step_o`` output units. The cotangents are transposed
    once, by a 2-D transpose, so that ``K`` is the contiguous dimension of the Gram products (a strided
    4-D permute costs more than the products themselves).
    """
    rows, tokens, out_features = g.shape
    gk = g.reshape(rows, -1).T.contiguous().view(tokens, out_features, rows).transpose(0, 1)  # out × N × K
    for n0, n1, n, m, weights in blocks:
        pairs = a[n0 + n] * (a[n0 + m] * weights)                                        # pairs × in
        for o0 in range(0, out_features, step_o):
            gb = gk[o0 : o0 + step_o]
            gram = torch.bmm(gb[:, n0:n1], gb[:, n0:].transpose(1, 2))                   # o × n × (N − n0)
            out[o0 : o0 + gb.shape[0]].addmm_(gram[:, n, m], pairs)


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
                    probs = torch.cat([_probabilities(functional_call(model, detached, (x[s],))) for s in micro])
                classes = _topk_classes(probs, top_k)
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
                probs = _probabilities(logits)
                if estimator == "topk" and classes is None:  # one micro-batch: the whole batch
                    classes = _topk_classes(probs, top_k)
                cotangents = _cotangents(probs, estimator, classes,
                                         None if uniforms is None else uniforms[s], None if y is None else y[s])
                outputs = [store[name][1] for name in module_names]
                for k0 in range(0, cotangents.shape[0], rows):  # several backwards only when K > rows
                    grads = dict(zip(module_names, _vjp(logits, outputs, cotangents[k0 : k0 + rows], vectorize)))
                    for pname, (module_name, attr) in resolved.items():
                        g = grads[module_name]
                        g = g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])  # K × b × N × out
                        if attr == "bias":
                            sums[pname] += g.sum(dim=2).square().sum(dim=(0, 1))
                        else:
                            a = store[module_name][0]
                            _add_weight_squares(sums[pname], g, a.reshape(a.shape[0], -1, a.shape[-1]))
                    del grads
                del store, logits, outputs
            count += size
            if progress is not None:
                progress(count)
    finally:
        model.train(was_training)
    settings = {"samples": samples} if estimator == "mc" else {"top_k": top_k} if estimator == "topk" else {}
    return FisherSums(sums, count, estimator, settings)


class FisherAccumulator(nn.Module):
    """Fisher sums and counts across tasks: ``past`` = Σ_{s<t} (F_s, n_s) and ``current`` = (F_t, n_t).

    ITA at task t uses ``F̄_<t = ε + Σ_{s<t} F_s / Σ_{s<t} n_s`` (only ε at t = 0); IEL uses
    ``F̄_≤t = ε + Σ_{s≤t} F_s / Σ_{s≤t} n_s``. Counts are true example counts (the reference's ITA
    normaliser counts task 0 twice; we do not). The state is checkpointed as plain tensors and numbers.
    ``records`` keeps, per task, how its Fisher was made: ``{"task", "estimator", "count", "settings"}``.
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
        self.records: list[dict[str, Any]] = []

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
        self.records.append({"task": task, "estimator": fisher.estimator, "count": fisher.count,
                             "settings": dict(fisher.settings)})

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
            "records": self.records,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def extra_repr(self) -> str:
        return (f"prior={self.prior}, current_task={self.current_task}, past_count={self.past_count}, "
                f"current_count={self.current_count}, tensors={len(self.current)}")
