"""Pre-train the tiny ViT on rendered glyphs: ~1,000 letter classes of 53 scripts in the DejaVu and Noto fonts.

Recipe
------
* Classes and fonts: :func:`render.split` (seed ``--split-seed``): 1,000 pre-training letters (no digits),
  disjoint from the 100 stream letters and from their look-alikes; fonts DejaVu + Noto (FreeFont and
  Liberation are the stream's, never seen here). One master per (letter, covering font).
* Images: every epoch draws ``--per-class`` fresh augmented images of every class from a random one of its
  masters (:func:`render.augment`: affine, elastic, stroke width, blur, contrast, noise), so the set is
  unlimited like a large corpus. Validation: 10 images per class at a fixed seed, same fonts.
* Model: ``timm`` ``vit_tiny_patch16_224`` with ``--embed-dim`` / ``--depth`` / ``--heads``, 28 × 28 grey
  input, 4 × 4 patches (49 tokens + CLS), CLS pooling, from scratch; inputs normalised with mean = std = 0.5.
* AdamW (lr, weight decay 0.05), batch 128, linear warm-up then cosine decay per step, label smoothing 0.1.
* Saved *without* its head as safetensors (like ``scripts/pretrain_backbone.py``), after every epoch, with
  the model kwargs, the recipe, the seeds, the fonts and the code points in the metadata.

Reproduce (about 50 minutes on one CPU thread)::

    python scripts/glyphs/pretrain.py --output lightning_taylor/weights/vit_glyphs_tiny.safetensors
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time

import numpy as np
import safetensors.torch
import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import render  # noqa: E402  (the sibling module that says how a glyph image is made)

MODEL_NAME = "vit_tiny_patch16_224"
MEAN, STD = 0.5, 0.5
log = logging.getLogger("pretrain-glyphs")


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    model.eval()
    correct = sum((model((x[i:i + batch_size] - MEAN) / STD).argmax(1) == y[i:i + batch_size]).sum().item()
                  for i in range(0, len(x), batch_size))
    return correct / len(x)


def save(model: torch.nn.Module, path: str, metadata: dict[str, str]) -> None:
    """The backbone without ``head.*``, atomically (a reader never sees a half-written file)."""
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")}
    if not all(torch.isfinite(v).all() for v in state.values()):
        raise SystemExit("non-finite weights: not saved")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    safetensors.torch.save_file(state, path + ".tmp", metadata=metadata)
    os.replace(path + ".tmp", path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output", default="lightning_taylor/weights/vit_glyphs_tiny.safetensors")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--per-class", type=int, default=100, help="fresh images per class and epoch")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--embed-dim", type=int, default=96)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=500)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--augment-strength", type=float, default=1.0, help="scales render.augment's ranges")
    p.add_argument("--keep-ink", action="store_true",
                   help="render.augment's erosion guard and rescaling (off for the shipped weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--limit-train-batches", type=int, default=None, help="measure: stop each epoch after N batches")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    start = time.time()
    stream, pre = render.split(num_pretrain=args.classes, seed=args.split_seed)
    glyphs = render.render_set(pre["codepoints"], pre["fonts"], pre["cover"])
    log.info("%d classes, %d masters in %d fonts (%.0fs)", len(glyphs.codepoints), len(glyphs.masters),
             len(set(glyphs.master_font.tolist())), time.time() - start)
    x_val, y_val, _ = render.sample(glyphs, 10, torch.Generator().manual_seed(10_000 + args.seed))
    masters = torch.as_tensor(glyphs.masters)
    by_class = [torch.as_tensor(np.flatnonzero(glyphs.master_class == c)) for c in range(len(glyphs.codepoints))]

    kwargs = dict(img_size=render.SIZE, patch_size=4, in_chans=1, embed_dim=args.embed_dim, depth=args.depth,
                  num_heads=args.heads, num_classes=len(glyphs.codepoints))
    model = timm.create_model(MODEL_NAME, pretrained=False, **kwargs)
    log.info("%s %s: %d parameters", MODEL_NAME, kwargs, sum(p.numel() for p in model.parameters()))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    per_epoch = len(glyphs.codepoints) * args.per_class
    steps_per_epoch = math.ceil(per_epoch / args.batch_size)
    if args.limit_train_batches:
        steps_per_epoch = min(steps_per_epoch, args.limit_train_batches)
    total = args.epochs * steps_per_epoch
    warmup = min(args.warmup_steps, total // 10 or 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warmup if s < warmup else
                                              0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))

    hparams = {k: v for k, v in vars(args).items() if k != "output"}
    metadata = {
        "model_name": MODEL_NAME,
        "model_kwargs": json.dumps({**kwargs, "num_classes": 0}),
        # The command without --output's value: where it was written is no part of the recipe.
        "recipe": json.dumps({"command": " ".join(["python", "scripts/glyphs/pretrain.py"] + [
                                  a for i, a in enumerate(sys.argv[1:]) if a != "--output" and
                                  (i == 0 or sys.argv[i] != "--output")]), "hparams": hparams,
                              "augmentation": render.augment.__doc__.split("\n\n")[1].strip(),
                              "optimizer": "AdamW", "schedule": "linear warm-up + cosine (per step)"}),
        "data": f"rendered glyphs: {len(glyphs.codepoints)} letter code points, {len(pre['fonts'])} fonts "
                "(DejaVu, Noto), scripts/glyphs/render.py",
        "codepoints": json.dumps(glyphs.codepoints),
        "fonts": json.dumps(pre["fonts"]),
        "held_out_fonts": json.dumps(stream["fonts"]),
        "seed": str(args.seed),
        "split_seed": str(args.split_seed),
        "mean": str(MEAN),
        "std": str(STD),
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
    }

    step, t0 = 0, time.time()
    for epoch in range(args.epochs):
        model.train()
        # Every class per_class times, each from a random master (font) of it, in random order.
        labels = torch.arange(len(by_class)).repeat_interleave(args.per_class)
        labels = labels[torch.randperm(len(labels), generator=generator)]
        for i in range(steps_per_epoch):
            y = labels[i * args.batch_size:(i + 1) * args.batch_size]
            rows = torch.stack([by_class[c][torch.randint(len(by_class[c]), (1,), generator=generator)][0]
                                for c in y.tolist()])
            x = (render.augment(masters[rows], generator, args.augment_strength, keep_ink=args.keep_ink) - MEAN) / STD
            loss = F.cross_entropy(model(x), y, label_smoothing=args.label_smoothing)
            if not torch.isfinite(loss):
                raise SystemExit(f"non-finite loss at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 100 == 0 or i == steps_per_epoch - 1:
                log.info("epoch %d step %d/%d loss %.4f lr %.2e (%.0fs, %.3fs/step)", epoch + 1, step, total,
                         loss.item(), sched.get_last_lr()[0], time.time() - t0, (time.time() - t0) / step)
        acc = evaluate(model, x_val, y_val)
        log.info("epoch %d validation accuracy %.4f (%.0fs)", epoch + 1, acc, time.time() - t0)
        metadata.update(val_accuracy=f"{acc:.4f}", epochs_done=str(epoch + 1), train_seconds=f"{time.time() - t0:.0f}")
        save(model, args.output, metadata)
    log.info("final validation accuracy %.4f, training time %.0fs; saved %s (%.2f MB)", acc, time.time() - t0,
             args.output, os.path.getsize(args.output) / 1e6)

    # Check: the file loads back strictly into a head-less model built from its own metadata.
    with safetensors.safe_open(args.output, "pt") as f:
        meta = f.metadata()
    backbone = timm.create_model(meta["model_name"], pretrained=False, **json.loads(meta["model_kwargs"]))
    backbone.load_state_dict(safetensors.torch.load_file(args.output), strict=True)
    model.eval()
    with torch.no_grad():
        xb = (x_val[:8] - MEAN) / STD
        assert torch.allclose(backbone.eval()(xb), model.forward_head(model.forward_features(xb), pre_logits=True))
    log.info("reload check passed")


if __name__ == "__main__":
    main()
