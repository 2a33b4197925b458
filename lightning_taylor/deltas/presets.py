"""Which ``nn.Linear`` layers of a timm ViT get deltas: the attention and MLP projections of every block.

timm's families name them differently:

==========================================  ======================  =====================================
family                                      blocks                  projections
==========================================  ======================  =====================================
ViT, DeiT, DINOv2, CLIP, SigLIP, SAM, BEiT  ``blocks.*``            ``attn.qkv``, ``attn.proj``,
                                                                    ``mlp.fc1``, ``mlp.fc2``
EVA-02 (SwiGLU MLP)                         ``blocks.*``            ``mlp.fc1_g``, ``mlp.fc1_x`` (gate and
                                                                    value halves) instead of ``mlp.fc1``
EVA with separate q/k/v                     ``blocks.*``            ``attn.q_proj``, ``k_proj``, ``v_proj``
Swin, Swin V2                               ``layers.*.blocks.*``   as ViT
==========================================  ======================  =====================================

:func:`default_targets` keeps, for the block prefix that the model has, every projection pattern that
matches at least one of its linear layers; pass ``targets`` explicitly to choose other layers.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn

from lightning_taylor.errors import expected

#: Every ViT block's attention and MLP projections (timm names of ``VisionTransformer``).
DEFAULT_TARGETS: tuple[str, ...] = ("blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.mlp.fc1", "blocks.*.mlp.fc2")

#: Where the transformer blocks live: plain ViTs, then hierarchical ones (Swin's stages are ``layers``).
BLOCK_PREFIXES: tuple[str, ...] = ("blocks.*", "layers.*.blocks.*", "stages.*.blocks.*")

#: Projections inside a block, in the order they are applied. ``w12`` / ``w3`` are the SwiGLU names of
#: non-timm EVA code; timm's own are ``fc1_g`` / ``fc1_x``.
PROJECTIONS: tuple[str, ...] = (
    "attn.qkv", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.proj",
    "mlp.fc1", "mlp.fc1_g", "mlp.fc1_x", "mlp.w12", "mlp.w3", "mlp.fc2",
)


def linear_names(model: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` module of ``model``, in model order."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def family(model: nn.Module) -> str:
    """A readable name of the model family for messages: timm's architecture name, else the class name."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    architecture = cfg.get("architecture") if isinstance(cfg, dict) else None
    return f"{architecture} ({type(model).__name__})" if architecture else type(model).__name__


def default_targets(model: nn.Module) -> tuple[str, ...]:
    """The block projections of ``model`` as glob patterns (see the module docstring).

    ``DEFAULT_TARGETS`` for a plain ViT; e.g. ``layers.*.blocks.*.attn.qkv, …`` for Swin. Raises a
    ``ValueError`` naming the family and some layers when no block prefix of :data:`BLOCK_PREFIXES` matches.
    """
    linears = linear_names(model)
    for prefix in BLOCK_PREFIXES:
        patterns = tuple(f"{prefix}.{p}" for p in PROJECTIONS if any(fnmatchcase(n, f"{prefix}.{p}") for n in linears))
        if patterns:
            return patterns
    raise expected("targets", f"glob patterns of the linear layers that get deltas for {family(model)}", None,
                   f"No known block layout ({', '.join(BLOCK_PREFIXES)}) was found; some linear layers of the "
                   f"model: {linears[:8]}.")
