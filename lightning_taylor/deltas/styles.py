"""Per-task weight deltas of one frozen ``nn.Linear``, in three styles (docs/method.md §2).

A layer with frozen weight ``W0`` (out × in) gets one delta ``τ_t`` (out × in, dense view) per task:

=========  ==============================  ===================================
style      trainable slot                  dense delta τ
=========  ==============================  ===================================
``lora``   ``lora_A`` (r × in),            ``τ = B A`` (no α/r scaling)
           ``lora_B`` (out × r)
``full``   ``delta`` (out × in)            ``τ = D``
``ia3``    ``scale`` (out), starts at 1    ``τ = (s − 1) ⊙ W0`` (row scaling)
=========  ==============================  ===================================

The current task trains one fixed *slot* (the same ``nn.Parameter`` objects for the whole fit, so DDP and
optimisers never see parameters appear). A finished task is *banked*: its slot values are copied into
non-trainable buffers named ``<slot name>_task<t>``, which are saved with the module's ``state_dict`` and
re-created on load.
"""

from __future__ import annotations

import math
import re
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DeltaStyle = Literal["lora", "full", "ia3"]

_BANK_KEY = re.compile(r"^(?P<slot>\w+?)_task(?P<task>\d+)$")


class LinearDelta(nn.Module):
    """Slot and bank of per-task deltas for one ``nn.Linear``; subclasses define the parametrisation.

    The forward is ``y = x (W0 + C)ᵀ + b + w_slot · x τ_slotᵀ`` where ``C = Σ_s w_s τ_s`` is the banked part
    of the current composition, pre-summed once into a dense buffer. :meth:`base_forward` replaces the base
    layer's forward while attached and folds ``C`` into the weight (one matmul instead of two, forward and
    backward: IEL trains through the composition); :meth:`hook`, a forward hook on the base layer, adds the
    slot term, computed without forming ``τ_slot`` where the style allows it (LoRA: ``(x Aᵀ) Bᵀ``).
    """

    slot_names: tuple[str, ...] = ()
    #: The slot term reads the base output ``x W0ᵀ + b`` (IA3): ``C`` is then added separately, not folded.
    reads_base_output = False

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        # Banked part of the composition (Σ_s w_s τ_s), rebuilt by `set_composition`, never saved.
        self.register_buffer("composed", None, persistent=False)
        self.slot_weight = 0.0
        self.enabled = True
        # The base weight as it was before a merge (None when unmerged).
        self.register_buffer("merged", None, persistent=False)
        # W0 + C for `base_forward`, with the identity of the W0 it was built from (rebuilt when W0 changes).
        self.register_buffer("folded", None, persistent=False)
        self._folded_key: tuple | None = None
        self._folded_now = False  # set by `base_forward` for the `hook` of the same call

    # -- style-specific -------------------------------------------------------------------------------
    def reset_slot(self, generator: torch.Generator) -> None:
        """Re-initialise the slot so that its delta is zero (docs/method.md §2 initialisation)."""
        raise NotImplementedError

    def dense(self, state: dict[str, Tensor], weight: Tensor) -> Tensor:
        """Dense delta τ (out × in) of slot-shaped ``state``; ``weight`` is the frozen W0."""
        raise NotImplementedError

    def slot_output(self, x: Tensor, base_output: Tensor, module: nn.Linear) -> Tensor:
        """``x τ_slotᵀ`` for the live slot, without forming τ when avoidable."""
        raise NotImplementedError

    def slot_grads(self, dense_grad: Tensor, weight: Tensor) -> dict[str, Tensor]:
        """Chain rule: gradients of a penalty R w.r.t. the slot tensors, given ``G = ∂R/∂τ``."""
        raise NotImplementedError

    # -- slot and bank --------------------------------------------------------------------------------
    def slot_state(self) -> dict[str, nn.Parameter]:
        return {name: getattr(self, name) for name in self.slot_names}

    def task_state(self, task: int) -> dict[str, Tensor]:
        if task not in self.banked_tasks:
            raise KeyError(f"Task {task} is not banked; banked tasks: {self.banked_tasks}.")
        return {name: getattr(self, f"{name}_task{task}") for name in self.slot_names}

    @property
    def banked_tasks(self) -> list[int]:
        tasks = {int(m["task"]) for key in self._buffers if (m := _BANK_KEY.match(key))}
        return sorted(tasks)

    def slot_delta(self, weight: Tensor) -> Tensor:
        return self.dense(dict(self.slot_state()), weight)

    def task_delta(self, task: int, weight: Tensor) -> Tensor:
        return self.dense(self.task_state(task), weight)

    @torch.no_grad()
    def bank(self, task: int) -> None:
        """Copy the slot into the (non-trainable) bank of ``task``, overwriting an earlier copy."""
        for name, value in self.slot_state().items():
            self.register_buffer(f"{name}_task{task}", value.detach().clone())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        # Banks are created lazily, so a fresh module must make room for the ones in a checkpoint.
        for key, value in state_dict.items():
            local = key[len(prefix) :] if key.startswith(prefix) else None
            if local and "." not in local and _BANK_KEY.match(local) and local not in self._buffers:
                self.register_buffer(local, torch.empty_like(value, device=self._device()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _device(self) -> torch.device:
        return next(iter(self.slot_state().values())).device

    # -- composition, forward, merge ------------------------------------------------------------------
    @torch.no_grad()
    def set_composition(self, banked_weights: dict[int, float], slot_weight: float, weight: Tensor) -> None:
        """Pre-sum the banked tasks' deltas with their weights; the slot enters the forward live."""
        composed = None
        for task, w in banked_weights.items():
            if w == 0:
                continue
            term = w * self.task_delta(task, weight)
            composed = term if composed is None else composed + term
        self.composed = composed
        self.folded, self._folded_key = None, None
        self.slot_weight = float(slot_weight)

    def composed_delta(self, weight: Tensor) -> Tensor:
        """The dense delta of the current composition: ``C + w_slot τ_slot``."""
        delta = torch.zeros_like(weight) if self.composed is None else self.composed.clone()
        if self.slot_weight:
            delta += self.slot_weight * self.slot_delta(weight).detach()
        return delta

    def _fold(self, weight: Tensor) -> bool:
        """Whether this forward uses ``W0 + C`` (and builds it when ``C`` or ``W0`` changed)."""
        if (not self.enabled or self.merged is not None or self.composed is None or self.reads_base_output
                or weight.requires_grad):  # a trainable W0 keeps its own gradient path
            return False
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        if self._folded_key != key:
            with torch.no_grad():
                self.folded = weight + self.composed.to(weight.dtype)
            self._folded_key = key
        return True

    def base_forward(self, module: nn.Linear, x: Tensor) -> Tensor:
        """The base layer's forward while attached: ``x (W0 + C)ᵀ + b``, or ``x W0ᵀ + b`` when nothing is folded
        (deltas disabled or merged, no banked part, IA3, a trainable ``W0``): then exactly ``nn.Linear``'s."""
        self._folded_now = self._fold(module.weight)
        return F.linear(x, self.folded if self._folded_now else module.weight, module.bias)

    def hook(self, module: nn.Linear, args: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
        """Forward hook of the base layer: add the composition's remaining terms to its output."""
        folded, self._folded_now = self._folded_now, False
        if not self.enabled or self.merged is not None:
            return None
        x, base_output = args[0], output
        if self.composed is not None and not folded:
            output = output + F.linear(x, self.composed)
        if self.slot_weight:
            output = output + self.slot_weight * self.slot_output(x, base_output, module)
        return output

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{n}={tuple(t.shape)}" for n, t in self.slot_state().items())
        return f"in={self.in_features}, out={self.out_features}, slot({shapes}), banked={self.banked_tasks}"


class LoRADelta(LinearDelta):
    """Low-rank delta ``τ = B A``; A ~ U(−b, b) with ``b = 1/sqrt(r·in)``, B = 0 (so τ = 0 at a task start)."""

    slot_names = ("lora_A", "lora_B")

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__(in_features, out_features)
        self.rank = rank
        self.lora_A = nn.Parameter(torch.zeros(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))

    @torch.no_grad()
    def reset_slot(self, generator: torch.Generator) -> None:
        bound = 1.0 / math.sqrt(self.rank * self.in_features)
        a = torch.rand(self.lora_A.shape, generator=generator, dtype=torch.float64) * 2 * bound - bound
        self.lora_A.copy_(a)
        self.lora_B.zero_()

    def dense(self, state: dict[str, Tensor], weight: Tensor) -> Tensor:
        return state["lora_B"] @ state["lora_A"]

    def slot_output(self, x: Tensor, base_output: Tensor, module: nn.Linear) -> Tensor:
        return F.linear(F.linear(x, self.lora_A), self.lora_B)

    def slot_grads(self, dense_grad: Tensor, weight: Tensor) -> dict[str, Tensor]:
        return {"lora_A": self.lora_B.T @ dense_grad, "lora_B": dense_grad @ self.lora_A.T}


class FullDelta(LinearDelta):
    """Dense delta ``τ = D``, initialised to zero."""

    slot_names = ("delta",)

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
        self.delta = nn.Parameter(torch.zeros(out_features, in_features))

    @torch.no_grad()
    def reset_slot(self, generator: torch.Generator) -> None:
        self.delta.zero_()

    def dense(self, state: dict[str, Tensor], weight: Tensor) -> Tensor:
        return state["delta"]

    def slot_output(self, x: Tensor, base_output: Tensor, module: nn.Linear) -> Tensor:
        return F.linear(x, self.delta)

    def slot_grads(self, dense_grad: Tensor, weight: Tensor) -> dict[str, Tensor]:
        return {"delta": dense_grad}


class IA3Delta(LinearDelta):
    """Row scaling ``W = diag(s) W0``, i.e. ``τ = (s − 1) ⊙ W0`` row-wise; ``s`` starts at 1."""

    slot_names = ("scale",)
    reads_base_output = True

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
        self.scale = nn.Parameter(torch.ones(out_features))

    @torch.no_grad()
    def reset_slot(self, generator: torch.Generator) -> None:
        self.scale.fill_(1.0)

    def dense(self, state: dict[str, Tensor], weight: Tensor) -> Tensor:
        return (state["scale"] - 1).unsqueeze(1) * weight

    def slot_output(self, x: Tensor, base_output: Tensor, module: nn.Linear) -> Tensor:
        # x τᵀ = (x W0ᵀ) ⊙ (s − 1); the base output already holds x W0ᵀ + b.
        linear = base_output if module.bias is None else base_output - module.bias
        return linear * (self.scale - 1)

    def slot_grads(self, dense_grad: Tensor, weight: Tensor) -> dict[str, Tensor]:
        return {"scale": (dense_grad * weight).sum(dim=1)}


def make_delta(style: DeltaStyle, linear: nn.Linear, rank: int) -> LinearDelta:
    """The per-layer delta module of ``style`` for ``linear``, on its device and dtype."""
    if style == "lora":
        delta: LinearDelta = LoRADelta(linear.in_features, linear.out_features, rank)
    elif style == "full":
        delta = FullDelta(linear.in_features, linear.out_features)
    else:
        delta = IA3Delta(linear.in_features, linear.out_features)
    return delta.to(device=linear.weight.device, dtype=linear.weight.dtype)
