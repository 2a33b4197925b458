"""Pre-train the small ViT backbone shipped with lightning-taylor.

Recipe
------
* Data: Fashion-MNIST (60k train / 10k test), read directly from the IDX
  ``.gz`` files of the Debian package ``dataset-fashion-mnist`` (no network).
* Model: ``timm`` ViT built from ``vit_tiny_patch16_224`` with
  ``MODEL_KWARGS`` below (28x28 grey images, 4x4 patches -> 49 tokens + CLS,
  width 96, 6 blocks, 3 heads, CLS-token pooling), trained from scratch.
* Inputs scaled to [0, 1] and normalised with mean = std = 0.5.
  Augmentation: random crop 28 with zero padding 2 + random horizontal flip.
* AdamW (lr 1e-3, weight decay 0.05), batch 128, linear warm-up then cosine
  decay (per step), label smoothing 0.1, fixed seed, CPU, 1 thread by default.
* The backbone is saved *without* its classification head (``head.*``) as
  safetensors, with the model kwargs, the recipe and the test accuracy in the
  file's metadata.  It loads back with::

      meta = safetensors.safe_open(path, "pt").metadata()
      model = timm.create_model(meta["model_name"], pretrained=False,
                                **json.loads(meta["model_kwargs"]))
      model.load_state_dict(safetensors.torch.load_file(path), strict=True)

Reproduce (about 20-25 minutes on one CPU thread)::

    python scripts/pretrain_backbone.py
"""
import argparse
import gzip
import json
import logging
import math
import os
import subprocess
import sys
import time

import numpy as np
import safetensors.torch
import timm
import torch
import torch.nn.functional as F

MODEL_NAME = "vit_tiny_patch16_224"
MODEL_KWARGS = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=96, depth=6, num_heads=3, num_classes=10)
MEAN, STD = 0.5, 0.5
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"  # default location of the Debian package
log = logging.getLogger("pretrain")


def default_data_dir():
    """Directory of the Fashion-MNIST IDX files installed by ``dataset-fashion-mnist``."""
    try:
        files = subprocess.run(["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True, text=True).stdout.split()
        for f in files:
            if f.endswith("train-images-idx3-ubyte.gz"):
                return os.path.dirname(f)
    except OSError:  # no dpkg on this system
        pass
    return DEBIAN_DIR


def read_idx(path):
    """Read a gzipped IDX file (big-endian header: magic, dims) into a uint8 array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = np.frombuffer(data, dtype=">u4", count=ndim, offset=4)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(data_dir, split):
    """Return (images float [N,1,28,28] in [0,1], labels long [N]) for split 'train' or 't10k'."""
    paths = [os.path.join(data_dir, f"{split}-{kind}-ubyte.gz") for kind in ("images-idx3", "labels-idx1")]
    for p in paths:
        if not os.path.isfile(p):
            sys.exit(f"Fashion-MNIST file not found: {p}\n"
                     f"Install it with `apt-get install dataset-fashion-mnist` or pass --data-dir.")
    x = torch.from_numpy(read_idx(paths[0]).astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(read_idx(paths[1]).astype(np.int64))
    return x, y


def augment(x, pad=2):
    """Random crop (zero padding ``pad``) and random horizontal flip of a batch [B,1,H,W] in [0,1]."""
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    dy, dx = torch.randint(0, 2 * pad + 1, (2, b)).tolist()
    x = torch.stack([xp[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
    flip = torch.rand(b) < 0.5
    x[flip] = x[flip].flip(-1)
    return x


@torch.no_grad()
def evaluate(model, x, y, batch_size=500):
    model.eval()
    correct = sum((model((x[i:i + batch_size] - MEAN) / STD).argmax(1) == y[i:i + batch_size]).sum().item()
                  for i in range(0, len(x), batch_size))
    return correct / len(x)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=None, help=f"Fashion-MNIST IDX .gz files (default: from dpkg, else {DEBIAN_DIR})")
    p.add_argument("--output", default="lightning_taylor/weights/vit_fmnist_tiny.safetensors")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--limit-train-batches", type=int, default=None, help="debug: stop each epoch after N batches")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    data_dir = args.data_dir or default_data_dir()
    x_train, y_train = load_split(data_dir, "train")
    x_test, y_test = load_split(data_dir, "t10k")
    log.info("data from %s: train %s, test %s", data_dir, tuple(x_train.shape), tuple(x_test.shape))

    model = timm.create_model(MODEL_NAME, pretrained=False, **MODEL_KWARGS)
    log.info("%s %s: %d parameters", MODEL_NAME, MODEL_KWARGS, sum(p.numel() for p in model.parameters()))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    if args.limit_train_batches:
        steps_per_epoch = min(steps_per_epoch, args.limit_train_batches)
    total = args.epochs * steps_per_epoch
    warmup = min(args.warmup_steps, total // 10 or 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))

    start, step = time.time(), 0
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_train))
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            x = (augment(x_train[idx]) - MEAN) / STD
            loss = F.cross_entropy(model(x), y_train[idx], label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 100 == 0 or i == steps_per_epoch - 1:
                log.info("epoch %d step %d/%d loss %.4f lr %.2e (%.0fs)", epoch + 1, step, total, loss.item(),
                         sched.get_last_lr()[0], time.time() - start)
        acc = evaluate(model, x_test, y_test)
        log.info("epoch %d test accuracy %.4f (%.0fs)", epoch + 1, acc, time.time() - start)
    train_time = time.time() - start
    log.info("final test accuracy %.4f, training time %.0fs", acc, train_time)

    hparams = {k: v for k, v in vars(args).items() if k not in ("data_dir", "output")}
    metadata = {
        "model_name": MODEL_NAME,
        "model_kwargs": json.dumps({**MODEL_KWARGS, "num_classes": 0}),
        "recipe": json.dumps({"command": " ".join(["python"] + sys.argv), "hparams": hparams,
                              "augmentation": "random crop 28 pad 2 + horizontal flip",
                              "optimizer": "AdamW", "schedule": "linear warm-up + cosine (per step)"}),
        "data": "Fashion-MNIST, 60k train / 10k test, Debian package dataset-fashion-mnist",
        "test_accuracy": f"{acc:.4f}",
        "mean": str(MEAN),
        "std": str(STD),
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
    }
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    safetensors.torch.save_file(state, args.output, metadata=metadata)
    log.info("saved %s (%.2f MB)", args.output, os.path.getsize(args.output) / 1e6)

    # Check: the file loads back strictly into a head-less model built from its own metadata.
    with safetensors.safe_open(args.output, "pt") as f:
        meta = f.metadata()
    backbone = timm.create_model(meta["model_name"], pretrained=False, **json.loads(meta["model_kwargs"]))
    backbone.load_state_dict(safetensors.torch.load_file(args.output), strict=True)
    model.eval()
    with torch.no_grad():
        xb = (x_test[:8] - MEAN) / STD
        assert torch.allclose(backbone.eval()(xb), model.forward_head(model.forward_features(xb), pre_logits=True))
    log.info("reload check passed")


if __name__ == "__main__":
    main()
