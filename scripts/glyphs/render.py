"""Rendered glyphs: choose fonts and code points, split them into pre-training and stream, render and augment.

The regime this builds is a small copy of the paper's (a backbone pre-trained on a large label space, then a
class-incremental stream of classes it never saw):

* **Fonts** come from the Debian packages ``fonts-dejavu``, ``fonts-noto-core``, ``fonts-freefont-ttf`` and
  ``fonts-liberation``. DejaVu and Noto are the *pre-training* fonts; FreeFont and Liberation are held out
  for the *stream* (:data:`STREAM_FAMILIES`), so the stream's glyphs are drawn by type designs the backbone
  never saw.
* **Classes** are Unicode code points of letters (general category ``Lu``, ``Ll``, ``Lt`` or ``Lo``) without a
  compatibility decomposition (no ``<font>``, ``<circle>``, ``<wide>``, ... variants of other letters). No
  digits or other numbers, so MNIST stays a domain shift. A font *covers* a code point when its ``cmap``
  maps it to a glyph other than ``.notdef`` (:func:`cmap_codepoints`) and that glyph does not render blank.
* **Look-alikes** are removed: a candidate whose reference rendering has cosine similarity above
  :data:`MAX_SIMILARITY` to an already kept class is dropped (``O`` / ``О`` / ``Ο``, ``o`` / ``O`` once
  scaled, ...), within the stream, within pre-training and across the two, so a stream class is not a
  pre-training class under another code point.
* **Images** follow MNIST's layout: the glyph is scaled so that its longer side is 20 px, centred by its
  centre of mass in 28 × 28, white on black in ``[0, 1]``. Masters are rendered once per (code point, font)
  at twice that resolution; :func:`augment` then draws random images from them (affine: rotation, shear,
  anisotropic scale and shift; elastic distortion; stroke width by dilation / erosion; blur; contrast; noise).

``python scripts/glyphs/render.py --sheet sheet.png`` prints the split and writes a contact sheet (one row
per class, stream classes first) to look at. The pre-training script and the stream builder import the
functions here, so one module says how a glyph image is made.
"""

from __future__ import annotations

import argparse
import math
import random
import struct
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/truetype/noto",
             "/usr/share/fonts/truetype/freefont", "/usr/share/fonts/truetype/liberation")
#: Font file name prefixes held out from pre-training: the stream is drawn in these only.
STREAM_FAMILIES = ("Free", "Liberation")
#: Letters only; numbers (``N*``), marks, punctuation and symbols are never classes.
LETTER_CATEGORIES = ("Lu", "Ll", "Lt", "Lo")
MAX_SIMILARITY = 0.85
SIZE = 28          # served image side, as MNIST
BOX = 20           # longer side of the glyph inside it, as MNIST
SCALE = 2          # masters are rendered at SCALE x SIZE and reduced after augmentation
RENDER_PX = 96     # font size of the first rendering, before cropping and scaling
MIN_STREAM_FONTS = 6
MIN_PRETRAIN_FONTS = 2
MAX_PER_BLOCK_STREAM = 20     # spread the stream over scripts rather than one long Latin block
MAX_PER_BLOCK_PRETRAIN = 40   # likewise for pre-training (Egyptian hieroglyphs alone would fill it)


# ------------------------------------------------------------------------------------------------ fonts


def font_files() -> list[Path]:
    """Every ``.ttf`` / ``.otf`` of :data:`FONT_DIRS`, sorted by file name (the order is part of the recipe)."""
    files = [p for d in FONT_DIRS if Path(d).is_dir() for p in Path(d).iterdir() if p.suffix in (".ttf", ".otf")]
    if not files:
        raise SystemExit("No fonts found: apt-get install fonts-noto-core fonts-dejavu fonts-freefont-ttf "
                         "fonts-liberation")
    return sorted(files, key=lambda p: p.name)


def is_stream_font(path: Path) -> bool:
    return path.name.startswith(STREAM_FAMILIES)


def cmap_codepoints(path: Path) -> set[int]:
    """Code points the font's ``cmap`` maps to a real glyph (id != 0), from its Unicode subtable.

    Reads the OpenType table directory, then the best Unicode subtable: format 12 (full range, platform 3
    encoding 10 or platform 0) before format 4 (BMP; segments of ``startCode..endCode`` mapped through
    ``idDelta`` or, with ``idRangeOffset``, through ``glyphIdArray``).
    """
    data = path.read_bytes()
    num_tables = struct.unpack_from(">H", data, 4)[0]
    tables = {data[12 + 16 * i:16 + 16 * i]: struct.unpack_from(">I", data, 20 + 16 * i)[0] for i in range(num_tables)}
    cmap = tables[b"cmap"]
    subtables = []
    for i in range(struct.unpack_from(">H", data, cmap + 2)[0]):
        platform, encoding, offset = struct.unpack_from(">HHI", data, cmap + 4 + 8 * i)
        fmt = struct.unpack_from(">H", data, cmap + offset)[0]
        if (platform, encoding) in ((3, 10), (3, 1)) or platform == 0:
            subtables.append((fmt == 12, fmt, cmap + offset))
    if not subtables:
        return set()
    _, fmt, at = max(subtables)
    covered: set[int] = set()
    if fmt == 12:
        (groups,) = struct.unpack_from(">I", data, at + 12)
        for g in range(groups):
            start, end, glyph = struct.unpack_from(">III", data, at + 16 + 12 * g)
            covered.update(c for c in range(start, end + 1) if glyph + c - start != 0)
    elif fmt == 4:
        segments = struct.unpack_from(">H", data, at + 6)[0] // 2
        ends = struct.unpack_from(f">{segments}H", data, at + 14)
        starts = struct.unpack_from(f">{segments}H", data, at + 16 + 2 * segments)
        deltas = struct.unpack_from(f">{segments}h", data, at + 16 + 4 * segments)
        range_at = at + 16 + 6 * segments
        offsets = struct.unpack_from(f">{segments}H", data, range_at)
        for s in range(segments):
            for c in range(starts[s], ends[s] + 1):
                if c == 0xFFFF:
                    continue
                if offsets[s] == 0:
                    glyph = (c + deltas[s]) & 0xFFFF
                else:
                    glyph = struct.unpack_from(">H", data, range_at + 2 * s + offsets[s] + 2 * (c - starts[s]))[0]
                    glyph = (glyph + deltas[s]) & 0xFFFF if glyph else 0
                if glyph:
                    covered.add(c)
    return covered


def is_letter(cp: int) -> bool:
    """A letter class: category in :data:`LETTER_CATEGORIES`, no compatibility decomposition, not Hangul/CJK."""
    ch = chr(cp)
    if unicodedata.category(ch) not in LETTER_CATEGORIES or unicodedata.decomposition(ch).startswith("<"):
        return False
    name = unicodedata.name(ch, "")
    return bool(name) and not name.startswith(("CJK", "HANGUL SYLLABLE", "TANGUT", "YI SYLLABLE"))


def block_of(cp: int) -> str:
    """A coarse script label: the first word of the character's Unicode name (``LATIN``, ``CYRILLIC``, ...)."""
    return unicodedata.name(chr(cp)).split()[0]


# -------------------------------------------------------------------------------------------- rendering


def render_master(font: ImageFont.FreeTypeFont, cp: int) -> np.ndarray | None:
    """The glyph in MNIST's layout at ``SCALE * SIZE`` px (uint8), or ``None`` when it renders blank.

    Longer side of the ink box scaled to ``SCALE * BOX`` px (antialiased), then placed so that its centre of
    mass is the image centre (clipped at the border, as MNIST's own preprocessing).
    """
    canvas = Image.new("L", (3 * RENDER_PX, 3 * RENDER_PX), 0)
    ImageDraw.Draw(canvas).text((RENDER_PX, RENDER_PX), chr(cp), fill=255, font=font)
    box = canvas.getbbox()
    if box is None:
        return None
    glyph = canvas.crop(box)
    w, h = glyph.size
    if max(w, h) < 4:  # a dot: nothing to learn from
        return None
    side = SCALE * BOX
    w2, h2 = max(1, round(w * side / max(w, h))), max(1, round(h * side / max(w, h)))
    glyph = np.asarray(glyph.resize((w2, h2), Image.LANCZOS), dtype=np.float32)
    total = glyph.sum()
    if total <= 0:
        return None
    ys, xs = np.indices(glyph.shape)
    cy, cx = (ys * glyph).sum() / total, (xs * glyph).sum() / total
    out = np.zeros((SCALE * SIZE, SCALE * SIZE), np.float32)
    top, left = round(SCALE * SIZE / 2 - cy), round(SCALE * SIZE / 2 - cx)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + h2, out.shape[0]), min(left + w2, out.shape[1])
    out[y0:y1, x0:x1] = glyph[y0 - top:y1 - top, x0 - left:x1 - left]
    return np.clip(out, 0, 255).astype(np.uint8)


def load_font(path: Path) -> ImageFont.FreeTypeFont:
    # BASIC layout: one code point, one glyph (no shaping into ligatures or contextual forms).
    return ImageFont.truetype(str(path), RENDER_PX, layout_engine=ImageFont.Layout.BASIC)


def signature(master: np.ndarray) -> np.ndarray:
    """The master reduced to 14 × 14, centred and scaled to unit norm: their dot product is a correlation.

    Centring matters: raw non-negative images all correlate (two random letters in DejaVu Sans score about
    0.7 uncentred, about 0.4 centred), while ``O`` / ``О`` score 1.0 and ``o`` / ``O`` 0.93 either way.
    """
    x = F.avg_pool2d(torch.as_tensor(master, dtype=torch.float32)[None, None] / 255, 4).flatten()
    x = x - x.mean()
    return (x / x.norm().clamp_min(1e-6)).numpy()


# ------------------------------------------------------------------------------------------ augmentation


def augment(masters: torch.Tensor, generator: torch.Generator, strength: float = 1.0,
            noise: bool = True, keep_ink: bool = True) -> torch.Tensor:
    """Random glyph images ``(B, 1, SIZE, SIZE)`` in ``[0, 1]`` from uint8 masters ``(B, SCALE*SIZE, SCALE*SIZE)``.

    Per image: affine (rotation ±12°, shear ±0.25, scale 0.8-1.1 per axis, shift ±2 px), elastic distortion
    (a random 4 × 4 displacement field, bicubically upsampled, up to ±1.5 px), stroke width (erode, keep,
    dilate once or twice at the master resolution with probabilities 0.2, 0.4, 0.3, 0.1; erosion only where it
    keeps half of the ink), reduction to ``SIZE`` by 2 × 2 averaging and the brightest pixel scaled to 1, blur (mixing with a 3 × 3 box, weight 0-0.6), contrast 0.6-1 and Gaussian
    noise (σ 0-0.08; only with ``noise``). ``keep_ink=False`` skips the erosion guard and the rescaling to 1
    (how the shipped glyph backbone was pre-trained: 4 % of such images are nearly blank). ``strength`` scales every geometric and photometric range (0: the
    clean master).
    """
    b, n = masters.shape[0], masters.shape[-1]
    x = masters.float().unsqueeze(1) / 255

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*(shape or (b,)), generator=generator)

    s = strength
    angle = u(-12, 12) * s * math.pi / 180
    shear = u(-0.25, 0.25) * s
    sx, sy = 1 + u(-0.2, 0.1) * s, 1 + u(-0.2, 0.1) * s
    tx, ty = u(-2, 2) * s * 2 / SIZE, u(-2, 2) * s * 2 / SIZE
    cos, sin = torch.cos(angle), torch.sin(angle)
    # theta maps output coordinates to input ones: the inverse of (rotate . shear . scale).
    theta = torch.stack([torch.stack([cos / sx, (-sin + shear * cos) / sx, tx], 1),
                         torch.stack([sin / sy, (cos + shear * sin) / sy, ty], 1)], 1)
    grid = F.affine_grid(theta, (b, 1, n, n), align_corners=False)
    field = F.interpolate(u(-1, 1, b, 2, 4, 4), size=(n, n), mode="bicubic", align_corners=False)
    grid = grid + field.permute(0, 2, 3, 1) * (1.5 * s * 2 / SIZE)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    stroke = torch.multinomial(torch.tensor([0.2, 0.4, 0.3, 0.1]), b, replacement=True, generator=generator)
    if s == 0:
        stroke.fill_(1)
    dilated = F.max_pool2d(x, 3, stride=1, padding=1)
    twice = F.max_pool2d(dilated, 3, stride=1, padding=1)
    eroded = -F.max_pool2d(-x, 3, stride=1, padding=1)
    # Erosion can wipe out a hairline font: it is kept only where it leaves half of the ink.
    erode = (stroke == 0) & ((eroded.flatten(1).sum(1) >= 0.5 * x.flatten(1).sum(1)) | (not keep_ink))
    stroke = torch.where((stroke == 0) & ~erode, torch.ones_like(stroke), stroke)
    choice = stroke.view(b, 1, 1, 1)
    x = torch.where(choice == 0, eroded, torch.where(choice == 2, dilated, torch.where(choice == 3, twice, x)))
    x = F.avg_pool2d(x, SCALE)
    # Brightest pixel back to 1 before the contrast factor, so thin glyphs are not also faint ones.
    if keep_ink:
        x = x / x.flatten(1).amax(1).clamp_min(1e-6).view(b, 1, 1, 1)

    blur = u(0, 0.6).view(b, 1, 1, 1) * s
    x = (1 - blur) * x + blur * F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    x = x * (1 - u(0, 0.4) * s).view(b, 1, 1, 1)
    sigma = u(0, 0.08) * s  # drawn either way, so noise=False changes nothing else
    if noise:
        x = x + torch.randn(x.shape, generator=generator) * sigma.view(b, 1, 1, 1)
    return x.clamp(0, 1)


def outline(images: np.ndarray) -> np.ndarray:
    """The outline rendition of uint8 glyph images ``(N, H, W)``: the 3 × 3 morphological gradient
    ``max₃ₓ₃(x) − min₃ₓ₃(x)``, which keeps a stroke's two edges and hollows its inside.

    ``make_stream.py --style outline`` draws the stream this way, which the backbone never saw (it was
    pre-trained on filled glyphs): a change of rendition of the same shapes, as ImageNet-R's renditions are
    of ImageNet's classes, meant to give fine-tuning something every task shares to learn. Measured and not
    adopted (docs/learning_quality_glyphs.md).
    """
    x = torch.as_tensor(images).float().unsqueeze(1)
    gradient = F.max_pool2d(x, 3, stride=1, padding=1) + F.max_pool2d(-x, 3, stride=1, padding=1)
    return gradient.clamp(0, 255)[:, 0].round().to(torch.uint8).numpy()


# ---------------------------------------------------------------------------------------------- the split


@dataclass
class GlyphSet:
    """Classes (code points) with, for each, the fonts that draw it and one uint8 master per (class, font)."""

    codepoints: list[int]
    fonts: list[str]                 # file names
    masters: np.ndarray              # (M, SCALE*SIZE, SCALE*SIZE) uint8
    master_class: np.ndarray         # (M,) class index of each master
    master_font: np.ndarray          # (M,) font index of each master


def _coverage(fonts: list[Path]) -> dict[int, list[int]]:
    """code point -> indices of the fonts whose cmap covers it (letters only)."""
    cover: dict[int, list[int]] = {}
    for i, path in enumerate(fonts):
        for cp in cmap_codepoints(path):
            if is_letter(cp):
                cover.setdefault(cp, []).append(i)
    return cover


def _select(candidates: list[int], cover: dict[int, list[int]], fonts: list[Path], count: int,
            per_block: int, rng: random.Random, kept_signatures: list[np.ndarray], cache: dict) -> list[int]:
    """``count`` code points in random order, at most ``per_block`` per script, none a look-alike.

    A candidate is rendered in its first covering font; it is kept when it renders, its signature has cosine
    ``<= MAX_SIMILARITY`` with every kept one (``kept_signatures`` grows), and its script is not full.
    """
    order = candidates[:]
    rng.shuffle(order)
    chosen, per = [], {}
    bank = np.stack(kept_signatures) if kept_signatures else np.zeros((0, (SIZE // 2) ** 2), np.float32)
    for cp in order:
        if len(chosen) == count:
            break
        block = block_of(cp)
        if per.get(block, 0) >= per_block:
            continue
        font_index = cover[cp][0]
        if font_index not in cache:
            cache[font_index] = load_font(fonts[font_index])
        master = render_master(cache[font_index], cp)
        if master is None:
            continue
        sig = signature(master)
        if len(bank) and float((bank @ sig).max()) > MAX_SIMILARITY:
            continue
        bank = np.concatenate([bank, sig[None]])
        chosen.append(cp)
        per[block] = per.get(block, 0) + 1
    if len(chosen) < count:
        raise SystemExit(f"only {len(chosen)} of {count} classes found; relax the coverage or block limits")
    kept_signatures[:] = list(bank)
    return chosen


def split(num_pretrain: int = 1000, num_stream: int = 100, seed: int = 0) -> tuple[dict, dict]:
    """Choose the stream's and pre-training's code points and fonts: ``({"codepoints", "fonts"}, same)``.

    Stream first: letters covered by at least :data:`MIN_STREAM_FONTS` held-out fonts and by no more than
    one pre-training font's look-alike. Then pre-training: letters not in the stream, covered by at least
    :data:`MIN_PRETRAIN_FONTS` pre-training fonts, no look-alike of a stream class or of each other.
    """
    rng = random.Random(seed)
    fonts = font_files()
    stream_fonts = [f for f in fonts if is_stream_font(f)]
    pre_fonts = [f for f in fonts if not is_stream_font(f)]
    stream_cover, pre_cover = _coverage(stream_fonts), _coverage(pre_fonts)
    signatures: list[np.ndarray] = []
    stream_cands = sorted(cp for cp, fs in stream_cover.items() if len(fs) >= MIN_STREAM_FONTS)
    stream = _select(stream_cands, stream_cover, stream_fonts, num_stream, MAX_PER_BLOCK_STREAM, rng,
                     signatures, {})
    taken = set(stream)
    pre_cands = sorted(cp for cp, fs in pre_cover.items() if len(fs) >= MIN_PRETRAIN_FONTS and cp not in taken)
    pre = _select(pre_cands, pre_cover, pre_fonts, num_pretrain, MAX_PER_BLOCK_PRETRAIN, rng, signatures, {})
    return ({"codepoints": sorted(stream), "fonts": [f.name for f in stream_fonts], "cover": stream_cover},
            {"codepoints": sorted(pre), "fonts": [f.name for f in pre_fonts], "cover": pre_cover})


def render_set(codepoints: list[int], font_names: list[str], cover: dict[int, list[int]]) -> GlyphSet:
    """One master per (class, covering font) that renders non-blank; every class keeps at least one."""
    paths = {p.name: p for p in font_files()}
    loaded = [load_font(paths[name]) for name in font_names]
    masters, classes, font_ids = [], [], []
    for c, cp in enumerate(codepoints):
        for f in cover[cp]:
            master = render_master(loaded[f], cp)
            if master is not None:
                masters.append(master)
                classes.append(c)
                font_ids.append(f)
    missing = set(range(len(codepoints))) - set(classes)
    if missing:
        raise SystemExit(f"classes without a master: {[hex(codepoints[c]) for c in sorted(missing)]}")
    return GlyphSet(codepoints, font_names, np.stack(masters), np.asarray(classes, np.int64),
                    np.asarray(font_ids, np.int64))


def sample(glyphs: GlyphSet, per_class: int, generator: torch.Generator, strength: float = 1.0,
           noise: bool = True) -> tuple:
    """``per_class`` augmented images of every class, each from a random one of its masters (fonts)."""
    images, labels, fonts = [], [], []
    by_class = [np.flatnonzero(glyphs.master_class == c) for c in range(len(glyphs.codepoints))]
    for c, rows in enumerate(by_class):
        pick = torch.as_tensor(rows)[torch.randint(len(rows), (per_class,), generator=generator)]
        images.append(augment(torch.as_tensor(glyphs.masters[pick.numpy()]), generator, strength, noise))
        labels.append(torch.full((per_class,), c))
        fonts.append(torch.as_tensor(glyphs.master_font[pick.numpy()]))
    return torch.cat(images), torch.cat(labels), torch.cat(fonts)


def contact_sheet(rows: list[torch.Tensor], path: str) -> None:
    """Save rows of ``(K, 1, SIZE, SIZE)`` images as one grey PNG (one row per tensor)."""
    sheet = torch.cat([torch.cat(list(r[:, 0]), dim=1) for r in rows], dim=0)
    Image.fromarray((sheet.numpy() * 255).astype(np.uint8)).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sheet", default=None, help="write a contact sheet PNG here")
    parser.add_argument("--rows", type=int, default=24, help="classes per part on the sheet")
    args = parser.parse_args()
    stream, pre = split(seed=args.seed)
    for name, part in (("stream", stream), ("pre-training", pre)):
        blocks: dict[str, int] = {}
        for cp in part["codepoints"]:
            blocks[block_of(cp)] = blocks.get(block_of(cp), 0) + 1
        fonts_per = [len(part["cover"][cp]) for cp in part["codepoints"]]
        print(f"{name}: {len(part['codepoints'])} classes in {len(blocks)} scripts, {len(part['fonts'])} fonts, "
              f"fonts per class min {min(fonts_per)} median {sorted(fonts_per)[len(fonts_per) // 2]}; "
              + ", ".join(f"{k} {v}" for k, v in sorted(blocks.items(), key=lambda kv: -kv[1])[:12]))
    if args.sheet:
        g = torch.Generator().manual_seed(args.seed)
        rows = []
        for part in (stream, pre):
            subset = part["codepoints"][:: max(1, len(part["codepoints"]) // args.rows)][: args.rows]
            glyphs = render_set(subset, part["fonts"], part["cover"])
            x, y, _ = sample(glyphs, 16, g)
            rows += [x[y == c] for c in range(len(subset))]
        contact_sheet(rows, args.sheet)
        print("sheet:", args.sheet)


if __name__ == "__main__":
    main()
