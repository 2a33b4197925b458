"""Check every timm ViT family with task deltas and print the README's compatibility table.

    python scripts/vit_families.py

Each family is built with random weights at a tiny size (one or two blocks, 28–32 px images, float64,
CPU) and goes through :func:`check_family`, whose steps each raise on failure:

1. **attach**: ``TaskDeltas`` with the family's automatic targets, then the guard (every target's delta
   reaches the output, :meth:`~lightning_taylor.deltas.TaskDeltas.check_reach`);
2. **train**: one SGD step of the LoRA slot on a cross-entropy loss gives every target a non-zero delta;
3. **Fisher**: the diagonal Fisher at θ0 (deltas off) has a finite, non-zero sum for every target weight;
4. **merge**: with two non-zero task deltas composed, the merged model's output equals the hooked one's,
   and unmerging restores every weight bit for bit;
5. **export**: the merged weights load, with strict key matching, into a plain ``timm.create_model`` of the
   same family, which gives the merged model's output.

``tests/test_families.py`` runs the same function for every family.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lightning_taylor.curvature import diagonal_fisher
from lightning_taylor.deltas import TaskDeltas, export_merged

_VIT = dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2)
_VIT14 = dict(_VIT, img_size=28, patch_size=7)
_SWIN = dict(img_size=32, patch_size=4, embed_dim=16, depths=(1, 1), num_heads=(2, 2), window_size=4)

#: timm model name → constructor arguments that shrink it (the family's layout is kept).
FAMILIES: dict[str, dict[str, Any]] = {
    "deit_tiny_patch16_224": _VIT,
    "deit3_small_patch16_224": _VIT,
    "vit_small_patch14_dinov2": _VIT14,
    "vit_small_patch14_reg4_dinov2": _VIT14,
    "vit_base_patch16_clip_224": _VIT,
    "vit_base_patch16_siglip_224": _VIT,
    "vit_medium_patch16_gap_256": _VIT,
    "samvit_base_patch16": dict(_VIT, window_size=2, global_attn_indexes=(1,), neck_chans=16),
    "eva02_tiny_patch14_224": _VIT14,
    "eva02_large_patch14_224": _VIT14,  # separate q / k / v projections and a SwiGLU MLP (fc1_g / fc1_x)
    "beit_base_patch16_224": _VIT,
    "swin_tiny_patch4_window7_224": _SWIN,
    "swinv2_tiny_window8_256": _SWIN,
}

NUM_CLASSES = 5
STEPS = ("attach", "train", "Fisher", "merge", "export")


def build(name: str, seed: int = 0) -> torch.nn.Module:
    """The tiny float64 model of ``name``, every parameter perturbed so that none is degenerate.

    timm initialises some tensors to zero (e.g. Swin V2's post-norm scales), which would give zero
    gradients and Fisher through whole blocks.
    """
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **FAMILIES[name]).double().eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model.requires_grad_(False)


def _batch(name: str, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    size = FAMILIES[name]["img_size"]
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((4, 3, size, size), generator=generator, dtype=torch.float64)
    return x, torch.arange(4) % NUM_CLASSES


def check_family(name: str, directory: str) -> dict[str, Any]:
    """Run the five steps of the module docstring on ``name``; returns what the table shows."""
    model = build(name)
    x, y = _batch(name)

    # 1. attach and the guard
    deltas = TaskDeltas(model, style="lora", rank=2, seed=0)
    deltas.check_reach(model, x[:2])
    deltas.begin_task(0)
    deltas.compose({0: 1.0})

    # 2. one training step moves every delta
    slot = list(deltas.slot_parameters())
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, slot)
    with torch.no_grad():
        for p, g in zip(slot, grads):
            p -= 1.0 * g
    still = [n for n in deltas.names if not deltas.task_delta(n, 0).abs().max() > 0]
    if still:
        raise AssertionError(f"{name}: a training step left these deltas at zero: {still}")

    # 3. the Fisher at θ0 covers every target weight
    weights = [f"{n}.weight" for n in deltas.names]
    with deltas.disabled():
        fisher = diagonal_fisher(model, [x], weights)
    if sorted(fisher.sums) != sorted(weights):
        raise AssertionError(f"{name}: the Fisher has {sorted(fisher.sums)}, not every target {weights}")
    empty = [w for w in weights if not (torch.isfinite(fisher.sums[w]).all() and fisher.sums[w].abs().max() > 0)]
    if empty:
        raise AssertionError(f"{name}: the Fisher is zero or non-finite for {empty}")

    # 4. merge equals the hooked composition; unmerge is exact
    deltas.begin_task(1)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in deltas.slot_parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    composition = {0: 0.5, 1: 1.0}
    deltas.compose(composition)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        hooked = model(x)
        deltas.merge()
        merged = model(x)
        deltas.unmerge()
    torch.testing.assert_close(merged, hooked, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: merged ≠ hooked. {m}")
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    if changed:
        raise AssertionError(f"{name}: unmerge did not restore {changed}")

    # 5. export loads into plain timm with strict keys
    path = os.path.join(directory, f"{name}.safetensors")
    export_merged(model, deltas, path, composition, name, dict(FAMILIES[name], num_classes=NUM_CLASSES))
    plain = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **FAMILIES[name]).double().eval()
    plain.load_state_dict(load_file(path), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), hooked, rtol=1e-9, atol=1e-11,
                                   msg=lambda m: f"{name}: exported model ≠ hooked. {m}")
    return {"class": type(model).__name__, "targets": deltas.targets, "names": deltas.names,
            "adapted": deltas.adapted}


def _targets(patterns: tuple[str, ...]) -> str:
    """``blocks.*``: attn.qkv, … — the block prefix once, then the projections."""
    prefix = patterns[0].split(".attn.")[0].split(".mlp.")[0]
    return f"`{prefix}`: " + ", ".join(p[len(prefix) + 1 :] if p.startswith(prefix + ".") else p for p in patterns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="*", default=list(FAMILIES), help="timm model names (default: all)")
    args = parser.parse_args()
    print("| timm model | class | automatic targets | qkv applied by `F.linear` | " + " | ".join(STEPS) + " |")
    print("|---|---|---|---|" + "---|" * len(STEPS))
    with tempfile.TemporaryDirectory() as directory:
        for name in args.families:
            try:
                info = check_family(name, directory)
            except Exception as error:  # noqa: BLE001 (the table reports any failure)
                print(f"| `{name}` | | | | failed: {type(error).__name__}: {str(error)[:200]} |")
                continue
            adapted = "yes: adapted" if info["adapted"] else "no"
            print(f"| `{name}` | {info['class']} | {_targets(info['targets'])} | {adapted} | "
                  + " | ".join("✓" for _ in STEPS) + " |")


if __name__ == "__main__":
    main()
