"""Per-task deltas on the target ``nn.Linear`` layers of a model: attach, bank, compose, merge, unmerge.

``TaskDeltas`` owns one :class:`~lightning_taylor.deltas.styles.LinearDelta` per target layer, mirrored
under the same dotted name (``blocks.0.attn.qkv.lora_A``), and adds their contribution to the base layers
through forward hooks (and an instance-level ``forward`` that folds the banked deltas into the weight, see
:class:`~lightning_taylor.deltas.styles.LinearDelta`). The base model is left untouched: its ``state_dict``
keeps timm's keys, so a plain timm checkpoint loads into it and a merged model loads back into plain timm.

Attention blocks that apply their ``qkv`` weight with ``F.linear`` instead of calling the layer (EVA, BEiT,
Swin V2) are adapted while attached, so that the layer's forward, and with it the delta, runs
(:mod:`~lightning_taylor.deltas.adapters`); :meth:`TaskDeltas.check_reach` verifies with one forward that
every target's delta reaches the model's output.
"""

from __future__ import annotations

import contextlib
import functools
import math
from fnmatch import fnmatchcase
from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_taylor._checks import (
    check_choice,
    check_non_negative_int,
    check_positive_int,
)
from lightning_taylor.deltas.adapters import route_through_qkv, split_bias_attentions
from lightning_taylor.deltas.composition import Composition
from lightning_taylor.deltas.presets import (  # noqa: F401
    DEFAULT_TARGETS,
    default_targets,
    family,
    linear_names,
)
from lightning_taylor.deltas.reach import check_reach
from lightning_taylor.deltas.styles import DeltaStyle, LinearDelta, make_delta
from lightning_taylor.errors import expected


def find_targets(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names of the ``nn.Linear`` modules of ``model`` matching any glob in ``patterns``, in model order.

    Raises a ``ValueError`` for a pattern that matches no linear layer, listing some real layer names.
    """
    if isinstance(patterns, str) or not patterns:
        raise expected("targets", "a non-empty list of glob patterns", patterns)
    linears = linear_names(model)
    for pattern in patterns:
        if not any(fnmatchcase(name, pattern) for name in linears):
            raise expected(
                "targets", f"glob patterns that match nn.Linear layers of {family(model)}", pattern,
                f"Some linear layers of the model: {linears[:8]}.",
            )
    return [name for name in linears if any(fnmatchcase(name, p) for p in patterns)]


class TaskDeltas(nn.Module):
    """One trainable slot and a bank of finished per-task deltas for each target layer of ``model``.

    Args:
        model: the network whose ``nn.Linear`` targets get deltas (frozen by the caller).
        style: ``"lora"`` (``τ = B A``), ``"full"`` (``τ = D``) or ``"ia3"`` (``τ = (s − 1) ⊙ W0``).
        rank: LoRA rank ``r``.
        targets: glob patterns over module names; ``None``: the attention and MLP projections of every
            block, named as in the model's family (:func:`~lightning_taylor.deltas.presets.default_targets`).
        qkv_rank_factor: LoRA rank multiplier for layers named ``*qkv`` (the reference uses ``3r``).
        seed: seeds the slot initialisation of each task, identically on every process.

    Typical stream: ``begin_task(0)``, train the slot, ``begin_task(1)`` (banks task 0, resets the slot),
    …, ``bank()`` at the end. ``compose`` decides what the forward adds: e.g. ``{t: 1.0}`` (the current
    delta alone, ITA training) or :func:`~lightning_taylor.deltas.composition.uniform` over the seen tasks.
    """

    def __init__(
        self,
        model: nn.Module,
        style: DeltaStyle = "lora",
        rank: int = 16,
        targets: Sequence[str] | None = None,
        qkv_rank_factor: int = 3,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_choice("style", style, ("lora", "full", "ia3"))
        check_positive_int("rank", rank)
        check_positive_int("qkv_rank_factor", qkv_rank_factor)
        check_non_negative_int("seed", seed)
        self.style, self.rank, self.qkv_rank_factor, self.seed = style, rank, qkv_rank_factor, seed
        self.targets = default_targets(model) if targets is None else tuple(targets)
        self.names = find_targets(model, self.targets)
        # Plain dicts: the base layers belong to `model`, not to this module's parameters or state_dict.
        self._linears: dict[str, nn.Linear] = {name: model.get_submodule(name) for name in self.names}
        self._attentions: dict[str, nn.Module] = split_bias_attentions(model, self.names)
        self._handles: list[RemovableHandle] = []
        self._past_sums: dict[str, tuple[tuple, Tensor]] = {}
        for name, linear in self._linears.items():
            rank_here = rank * (qkv_rank_factor if name.endswith("qkv") else 1)
            self._add_layer(name, make_delta(style, linear, rank_here))
        # -1 until the first task begins; a buffer so that checkpoints restore it.
        self.register_buffer("_current_task", torch.tensor(-1))
        self.attach()

    def _load_from_state_dict(self, *args, **kwargs):  # noqa: ANN002, ANN003
        self._past_sums.clear()  # banks may change under the same task indices
        super()._load_from_state_dict(*args, **kwargs)

    def _add_layer(self, name: str, delta: LinearDelta) -> None:
        # Registered through `_modules` (what `add_module` does after its checks): a model's top-level name may
        # be an attribute of this class (Swin's `layers`), and the state_dict key must still be the layer's name.
        parent: nn.Module = self
        *path, leaf = name.split(".")
        for part in path:
            parent = parent._modules.setdefault(part, nn.Module())
        parent._modules[leaf] = delta

    # -- access ---------------------------------------------------------------------------------------
    def layer(self, name: str) -> LinearDelta:
        """The delta of target layer ``name`` (looked up in ``_modules``: see ``_add_layer``)."""
        if name not in self._linears:
            raise expected("name", f"one of the target layers {self.names[:4]}…", name)
        module: nn.Module = self
        for part in name.split("."):
            module = module._modules[part]
        return module

    def layers(self) -> Iterator[tuple[str, LinearDelta, nn.Linear]]:
        """``(name, delta, base layer)`` for every target layer."""
        for name in self.names:
            yield name, self.layer(name), self._linears[name]

    def slot_parameters(self) -> Iterator[nn.Parameter]:
        """The current task's trainable tensors (the same objects for the whole fit)."""
        for _, delta, _ in self.layers():
            yield from delta.slot_state().values()

    @property
    def adapted(self) -> list[str]:
        """Attention blocks adapted to call their ``qkv`` target (see :mod:`~lightning_taylor.deltas.adapters`)."""
        return list(self._attentions)

    @property
    def current_task(self) -> int:
        return int(self._current_task)

    @property
    def banked_tasks(self) -> list[int]:
        return self.layer(self.names[0]).banked_tasks

    @property
    def tasks(self) -> list[int]:
        """Banked tasks and the slot's task, if any."""
        tasks = set(self.banked_tasks)
        if self.current_task >= 0:
            tasks.add(self.current_task)
        return sorted(tasks)

    def task_delta(self, name: str, task: int) -> Tensor:
        """Dense delta of ``task`` in layer ``name`` (the live slot for the current task)."""
        delta, linear = self.layer(name), self._linears[name]
        if task == self.current_task:
            return delta.slot_delta(linear.weight)
        return delta.task_delta(task, linear.weight)

    def past_sum(self, name: str) -> Tensor:
        """``P = Σ_{s<t} τ_s`` in layer ``name`` over the banked tasks before the current one (cached)."""
        delta, linear = self.layer(name), self._linears[name]
        past = tuple(t for t in self.banked_tasks if t < self.current_task)
        key = (past, linear.weight.device, linear.weight.dtype)
        cached = self._past_sums.get(name)
        if cached is None or cached[0] != key:
            total = torch.zeros_like(linear.weight)
            with torch.no_grad():
                for task in past:
                    total += delta.task_delta(task, linear.weight)
            self._past_sums[name] = cached = (key, total)
        return cached[1]

    # -- task boundary --------------------------------------------------------------------------------
    @torch.no_grad()
    def bank(self) -> None:
        """Copy the slot into the bank of the current task."""
        if self.current_task < 0:
            raise RuntimeError("No task has begun: call `begin_task(0)` first.")
        for _, delta, _ in self.layers():
            delta.bank(self.current_task)

    @torch.no_grad()
    def begin_task(self, task: int) -> None:
        """Bank the slot's task (if any), then reset the slot for ``task`` (deterministic in seed and task).

        The composition is cleared; call :meth:`compose` before the next forward.
        """
        check_non_negative_int("task", task)
        if self.merged:
            raise RuntimeError("Cannot begin a task while deltas are merged: call `unmerge()` first.")
        if self.current_task >= 0:
            self.bank()
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + task)
        for name, delta, linear in self.layers():
            delta.reset_slot(generator)
            delta.set_composition({}, 0.0, linear.weight)
        self._current_task.fill_(task)

    # -- composition ----------------------------------------------------------------------------------
    def compose(self, composition: Composition | Mapping[int, float]) -> None:
        """Set the forward to ``θ0 + Σ_s w_s τ_s``; banked tasks are pre-summed, the slot stays live."""
        if not isinstance(composition, Composition):
            composition = Composition(dict(composition))
        unknown = sorted(set(composition.weights) - set(self.tasks))
        if unknown:
            raise expected("composition", f"weights over the known tasks {self.tasks}", dict(composition.weights),
                           f"Unknown tasks: {unknown}.")
        if self.merged:
            raise RuntimeError("Cannot change the composition while merged: call `unmerge()` first.")
        for name, delta, linear in self.layers():
            weights = composition.for_layer(name)
            slot_weight = weights.pop(self.current_task, 0.0)
            delta.set_composition(weights, slot_weight, linear.weight)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the base model θ0 alone (e.g. for the Fisher at the pre-trained weights)."""
        previous = [delta.enabled for _, delta, _ in self.layers()]
        for _, delta, _ in self.layers():
            delta.enabled = False
        try:
            yield
        finally:
            for (_, delta, _), enabled in zip(self.layers(), previous):
                delta.enabled = enabled

    # -- merge / unmerge ------------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return any(delta.merged is not None for _, delta, _ in self.layers())

    @torch.no_grad()
    def merge(self, safe: bool = True) -> None:
        """Add the current composition into the base weights: inference then costs what θ0 costs.

        The original weights are kept, so :meth:`unmerge` restores them bit for bit. With ``safe``, every
        task's delta is checked for non-finite values first and the culprit is named.
        """
        if self.merged:
            raise RuntimeError("Deltas are already merged.")
        if safe:
            self.check_finite()
        for _, delta, linear in self.layers():
            dense = delta.composed_delta(linear.weight).to(linear.weight.dtype)
            delta.merged = linear.weight.detach().clone()
            linear.weight += dense

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weights saved by :meth:`merge`."""
        for _, delta, linear in self.layers():
            if delta.merged is not None:
                linear.weight.copy_(delta.merged)
                delta.merged = None

    def merged_weights(self) -> dict[str, Tensor]:
        """``W0 + Σ_s w_s τ_s`` of every target layer for the current composition, keyed ``"<layer>.weight"``."""
        with torch.no_grad():
            return {f"{name}.weight": linear.weight + delta.composed_delta(linear.weight).to(linear.weight.dtype)
                    for name, delta, linear in self.layers()}

    def check_finite(self) -> None:
        for name, _, _ in self.layers():
            for task in self.tasks:
                if not torch.isfinite(self.task_delta(name, task)).all():
                    raise ValueError(f"The delta of task {task} in layer `{name}` has non-finite values.")

    # -- hooks ----------------------------------------------------------------------------------------
    def attach(self) -> None:
        """Register the forward hooks on the base layers and adapt the attention blocks that apply a target's
        weight without calling it (done at construction)."""
        if not self._handles:
            self._handles = [linear.register_forward_hook(delta.hook) for _, delta, linear in self.layers()]
            for _, delta, linear in self.layers():  # an instance attribute: the class's forward is untouched
                linear.forward = functools.partial(delta.base_forward, linear)
            for attention in self._attentions.values():
                self._handles += route_through_qkv(attention)

    def detach(self) -> None:
        """Remove the hooks and adapters: the model is plain θ0 (or the merged model) again."""
        for handle in self._handles:
            handle.remove()
        for _, _, linear in self.layers():
            linear.__dict__.pop("forward", None)
        self._handles = []

    def check_reach(self, model: nn.Module, probe: Tensor | Sequence | None = None) -> None:
        """Run ``model`` (the one these deltas were built on) once on ``probe`` and raise a ``ValueError``
        naming any target whose delta would not reach the output (:func:`~lightning_taylor.deltas.check_reach`);
        ``probe=None`` makes a random image batch of the model's input size."""
        for name in self.names:
            if model.get_submodule(name) is not self._linears[name]:
                raise expected("model", "the model these deltas were attached to", type(model).__name__,
                               f"Its layer `{name}` is another module.")
        if not self._handles:
            raise RuntimeError("The deltas are detached: call `attach()` before `check_reach`.")
        check_reach(model, self.names, probe)

    def num_slot_parameters(self) -> int:
        return sum(math.prod(p.shape) for p in self.slot_parameters())

    def extra_repr(self) -> str:
        return (f"style={self.style!r}, rank={self.rank}, layers={len(self.names)}, "
                f"slot_parameters={self.num_slot_parameters()}, current_task={self.current_task}, "
                f"banked={self.banked_tasks}")
