"""Inference latency of a composed model: merged vs the plain pre-trained model vs unmerged compositions.

Run from the repository root (2-3 minutes on 2 busy CPU cores):

    HF_HUB_OFFLINE=1 python benchmarks/inference.py --device cpu
    HF_HUB_OFFLINE=1 python benchmarks/inference.py --model vit_small_patch16_224 --img-size 64 --in-chans 3

All in one process, on the same inputs, it builds

- ``plain``: the pre-trained timm model θ0 (default: the embedded tiny ViT with its shipped weights; any
  other timm name gets random weights, which does not change its speed);
- ``plain (copy)``: a second copy of it, a control: its ratio shows the noise of the measurement;
- ``merged``: a plain timm model of the same architecture holding the merged weights ``θ0 + Σ_s w_s τ_s``
  of the largest composition below (what ``lightning-taylor edit --export`` writes and plain timm loads);
- ``merged-in-place``: the largest composition merged with ``TaskDeltas.merge()`` into the model that still
  carries the deltas' forward hooks (they return at once while merged);
- ``unmerged T=…``: the uniform composition of ``T`` LoRA task deltas (rank ``--rank``, qkv ``3·rank``)
  computed by the hooks, as a loaded run is: ``T − 1`` banked deltas pre-summed and folded with ``W0`` into
  one weight per layer, the last one in the live slot applied low-rank (``x Aᵀ Bᵀ``).

Timing: ``--warmup`` untimed forwards per model, then ``--repeats`` rounds; in every round each model runs
``--inner`` forwards in a freshly shuffled order (so that load from other processes hits them all alike).
Reported per model: the median time of one forward, and the median over rounds of its time divided by the
plain model's time in the same round (the ratio the acceptance check uses: merged ≤ 1.02).
Before timing, the merged models' logits are compared with the unmerged composition's (max abs difference);
the script exits with status 1 if they differ beyond float tolerance.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from lightning_taylor.model.backbone import embedded_metadata, embedded_weights  # noqa: E402
from lightning_taylor.deltas import TaskDeltas, merged_state_dict  # noqa: E402
from lightning_taylor.deltas.composition import uniform  # noqa: E402


def build_plain(args: argparse.Namespace) -> tuple[nn.Module, dict]:
    if args.model == "embedded":
        meta = embedded_metadata()
        name, kwargs = meta["model_name"], {**json.loads(meta["model_kwargs"]), "num_classes": args.num_classes}
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(embedded_weights())),
                                  **kwargs)
    else:
        name = args.model
        kwargs = dict(img_size=args.img_size, in_chans=args.in_chans, num_classes=args.num_classes)
        if args.patch_size:
            kwargs["patch_size"] = args.patch_size
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, **kwargs)
    return model.eval().requires_grad_(False), {"model_name": name, **kwargs}


def with_deltas(plain: nn.Module, tasks: int, args: argparse.Namespace) -> tuple[nn.Module, TaskDeltas]:
    """A copy of ``plain`` with ``tasks`` random non-zero LoRA deltas, composed uniformly (hooks active)."""
    model = copy.deepcopy(plain)
    deltas = TaskDeltas(model, style="lora", rank=args.rank)
    generator = torch.Generator().manual_seed(tasks)
    with torch.no_grad():
        for task in range(tasks):
            deltas.begin_task(task)
            for p in deltas.slot_parameters():
                p.copy_(args.delta_scale * torch.randn(p.shape, generator=generator))
    deltas.bank()
    deltas.compose(uniform(range(tasks)))
    return model, deltas


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", default="embedded", help="'embedded' (the shipped tiny ViT) or a timm model name")
    parser.add_argument("--img-size", type=int, default=64, help="for a timm model name")
    parser.add_argument("--patch-size", type=int, default=None, help="for a timm model name (default: its own)")
    parser.add_argument("--in-chans", type=int, default=3, help="for a timm model name")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--delta-scale", type=float, default=0.05, help="std of the random LoRA factors")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--inner", type=int, default=2, help="forwards per timed measurement")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (1 is the most stable on a shared machine; 0 keeps torch's default)")
    parser.add_argument("--max-ratio", type=float, default=1.02, help="acceptance bound of merged / plain")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    plain, spec = build_plain(args)
    composed = {t: with_deltas(plain, t, args) for t in sorted(set(args.tasks))}
    largest = max(composed)
    unmerged_big, deltas_big = composed[largest]

    merged = copy.deepcopy(plain)
    merged.load_state_dict(merged_state_dict(unmerged_big, deltas_big, uniform(range(largest))))  # the export path
    in_place_model, in_place_deltas = with_deltas(plain, largest, args)
    in_place_deltas.merge()

    models: dict[str, nn.Module] = {"plain": plain, "plain (copy)": copy.deepcopy(plain), "merged": merged,
                                    "merged-in-place": in_place_model}
    models.update({f"unmerged T={t}": model for t, (model, _) in composed.items()})
    for model in models.values():
        model.to(device=device, dtype=dtype)
    in_chans, img_size = plain.patch_embed.proj.in_channels, plain.patch_embed.img_size
    x = torch.randn(args.batch_size, in_chans, *img_size, generator=torch.Generator().manual_seed(1)).to(device, dtype)

    print(f"torch {torch.__version__}, timm {timm.__version__}, {platform.processor() or platform.machine()}, "
          f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", threads {torch.get_num_threads()}, dtype {args.dtype}")
    print(f"model {spec}, batch {args.batch_size}, LoRA rank {args.rank} (qkv {3 * args.rank}), "
          f"{len(deltas_big.names)} target layers")

    # -- correctness: merged logits equal the unmerged composition's --------------------------------------
    with torch.inference_mode():
        reference = unmerged_big(x).float()
        base = plain(x).float()
        scale = float(reference.abs().max())
        tolerance = (1e-4 if dtype == torch.float32 else 2e-2) * max(1.0, scale)
        ok = True
        for name in ("merged", "merged-in-place"):
            diff = float((models[name](x).float() - reference).abs().max())
            ok &= diff <= tolerance
            print(f"max |logits({name}) - logits(unmerged T={largest})| = {diff:.3g} "
                  f"(max |logit| {scale:.3g}, tolerance {tolerance:.3g}): {'OK' if diff <= tolerance else 'MISMATCH'}")
        print(f"(the composition moves the logits by up to {float((reference - base).abs().max()):.3g} from θ0)")

    # -- timing ----------------------------------------------------------------------------------------------
    def timed(model: nn.Module) -> float:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(args.inner):
            model(x)
        synchronize(device)
        return (time.perf_counter() - start) / args.inner

    order = list(models)
    times: dict[str, list[float]] = {name: [] for name in order}
    rng = random.Random(0)
    with torch.inference_mode():
        for name in order:
            for _ in range(args.warmup):
                models[name](x)
        for _ in range(args.repeats):
            rng.shuffle(order)
            for name in order:
                times[name].append(timed(models[name]))

    print(f"\n{args.repeats} rounds x {args.inner} forwards, shuffled order each round")
    print(f"{'model':<18} {'median ms':>10} {'ratio vs plain':>15} {'IQR of ratios':>16} {'ratio of medians':>17}")
    results = {}
    for name in models:
        ratios = sorted(t / p for t, p in zip(times[name], times["plain"]))
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        results[name] = statistics.median(ratios)
        of_medians = statistics.median(times[name]) / statistics.median(times["plain"])
        print(f"{name:<18} {1000 * statistics.median(times[name]):>10.2f} {results[name]:>15.3f} "
              f"{f'[{quartiles[0]:.3f}, {quartiles[2]:.3f}]':>16} {of_medians:>17.3f}")
    verdict = results["merged"] <= args.max_ratio
    print(f"\nmerged / plain = {results['merged']:.3f} (bound {args.max_ratio}): {'PASS' if verdict else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
