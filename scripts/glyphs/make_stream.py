"""Build the shipped glyph stream: 100 held-out letters in the held-out fonts, 100 training + 20 test images each.

The code points are :func:`render.split`'s stream part (never pre-training classes nor look-alikes of
them), drawn only in the fonts held out from pre-training (FreeFont, Liberation). Every image is a fresh
augmentation (:func:`render.augment` without its pixel noise, seed ``--seed``) of a random covering font's
master, filled as in pre-training (``--style filled``, the shipped file) or drawn as an outline
(``--style outline``, :func:`render.outline`: a rendition the backbone never saw, measured and not adopted,
docs/learning_quality_glyphs.md). The file
(``np.savez_compressed``, no pickled objects) holds:

* ``train_images`` ``(100 * 100, 28, 28)`` and ``test_images`` ``(100 * 20, 28, 28)``: uint8, 0..255;
* ``train_labels`` / ``test_labels``: uint8 class index, ``codepoints[label]`` is the letter;
* ``train_fonts`` / ``test_fonts``: uint8 index into ``fonts`` (file names);
* ``codepoints`` (int32), ``fonts`` (str) and ``recipe`` (a JSON string: seeds, counts, command).

Reproduce::

    python scripts/glyphs/make_stream.py --output lightning_taylor/data/glyphs.npz
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import render  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output", default="lightning_taylor/data/glyphs.npz")
    p.add_argument("--train-per-class", type=int, default=100)
    p.add_argument("--test-per-class", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--style", choices=("outline", "filled"), default="filled",
                   help="filled: as pre-trained (the shipped file); outline: render.outline, an unseen rendition")
    p.add_argument("--sheet", default=None, help="also write a contact sheet PNG (a row per class) here")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    stream, _ = render.split(seed=args.split_seed)
    glyphs = render.render_set(stream["codepoints"], stream["fonts"], stream["cover"])
    generator = torch.Generator().manual_seed(args.seed)
    parts = {}
    for split, count in (("train", args.train_per_class), ("test", args.test_per_class)):
        # Without the pixel noise: it would be most of the compressed file (5.3 MB of 6.3 MB for the
        # training images), and the stream's own training jitter does not need it.
        x, y, f = render.sample(glyphs, count, generator, noise=False)
        images = (x[:, 0] * 255).round().to(torch.uint8).numpy()
        parts[f"{split}_images"] = render.outline(images) if args.style == "outline" else images
        parts[f"{split}_labels"] = y.to(torch.uint8).numpy()
        parts[f"{split}_fonts"] = f.to(torch.uint8).numpy()
    # The command as a user types it: the script and its settings, not where this machine put the outputs.
    command = ["python", "scripts/glyphs/make_stream.py", "--seed", str(args.seed), "--split-seed", str(args.split_seed),
               "--style", args.style]
    recipe = {"command": " ".join(command), "seed": args.seed, "split_seed": args.split_seed,
              "noise": False, "style": args.style,
              "train_per_class": args.train_per_class, "test_per_class": args.test_per_class,
              "masters": len(glyphs.masters), "renderer": "scripts/glyphs/render.py"}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    np.savez_compressed(args.output, **parts, codepoints=np.asarray(glyphs.codepoints, np.int32),
                        fonts=np.asarray(glyphs.fonts), recipe=np.asarray(json.dumps(recipe)))
    print(f"{args.output}: {os.path.getsize(args.output) / 1e6:.2f} MB, {len(glyphs.codepoints)} classes, "
          f"{len(glyphs.masters)} masters in {len(set(glyphs.master_font.tolist()))} fonts")
    if args.sheet:
        x = torch.as_tensor(parts["train_images"]).float().unsqueeze(1) / 255
        y = torch.as_tensor(parts["train_labels"])
        render.contact_sheet([x[y == c][:20] for c in range(len(glyphs.codepoints))], args.sheet)


if __name__ == "__main__":
    main()
