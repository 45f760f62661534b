"""A synthetic "small custom dataset" in Pascal-VOC layout: aerial-looking tiles, many small objects.

Made to look like the datasets of issue 17 (tree crowns, vehicles, roofs on aerial tiles; a
few hundred 400x400 images, ~10-60 objects of 10-40 px each), so a from-scratch recipe can be
chosen and compared with torchvision without downloading anything.

Each image: a textured background (value noise over five octaves, 1/f amplitudes, mapped
between two ground colours drawn per image, plus pixel grain), then ``objects`` (uniform in
[lo, hi]) objects of three classes, each with a soft shadow, placed so that two boxes overlap
by at most IoU 0.2:
  crown    a round-ish blob, 12-40 px, green family, lit from the top left (radial shading)
  vehicle  a rotated 2:1 rectangle, 10-24 px long, saturated colours, a darker windscreen band
  roof     a rotated square-ish polygon, 14-36 px, grey/brown/red, a ridge line
Boxes are the tight boxes of the drawn object (not its shadow), in VOC's 1-based inclusive
pixel indices. Deterministic from ``seed``; train and val images come from separate streams.

    PYTHONPATH=. python benchmarks/small_data.py OUT_DIR [--train 300] [--val 100] [--seed 0]

writes ``OUT_DIR/{Annotations,JPEGImages,ImageSets/Main}`` (``train.txt``, ``val.txt``), the
layout ``configs/custom_voc_xml.py`` reads.
"""

from __future__ import annotations

import argparse
import math
import os
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("crown", "roof", "vehicle")
SIZE = 400
OBJECTS = (10, 60)
MAX_IOU = 0.2


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """float32 [size, size, 3] in 0..255: multi-octave value noise between two colours."""
    field = np.zeros((size, size), np.float32)
    for octave, cells in enumerate((3, 6, 12, 25, 50, 100)):
        grid = rng.normal(size=(cells, cells)).astype(np.float32)
        up = np.asarray(Image.fromarray(grid, mode="F").resize((size, size), Image.BICUBIC))
        field += up / (1.6**octave)
    field = (field - field.mean()) / (field.std() + 1e-6)
    t = 1 / (1 + np.exp(-1.5 * field))  # 0..1, soft two-tone
    ground = rng.uniform([90, 80, 50], [170, 150, 110])  # soil / dry grass
    green = rng.uniform([40, 70, 30], [100, 130, 70])  # vegetation
    img = ground * t[..., None] + green * (1 - t[..., None])
    img += rng.normal(0, 6, (size, size, 1)) + rng.normal(0, 3, (size, size, 3))  # grain
    return img.astype(np.float32)


def _rotated(cx: float, cy: float, w: float, h: float, angle: float) -> np.ndarray:
    corners = np.array([[-w, -h], [w, -h], [w, h], [-w, h]], np.float64) / 2
    c, s = math.cos(angle), math.sin(angle)
    return corners @ np.array([[c, s], [-s, c]]) + [cx, cy]


def _sample(rng: np.random.Generator, size: int) -> tuple[str, np.ndarray, dict]:
    """One object: class, outline polygon [V, 2] (x, y), drawing parameters."""
    cls = CLASSES[int(rng.integers(len(CLASSES)))]
    if cls == "crown":
        d = rng.uniform(12, 40)
        cx, cy = rng.uniform(d / 2, size - d / 2, 2)
        k = np.arange(24)
        r = d / 2 * (1 + 0.08 * np.sin(k * rng.uniform(2, 5) + rng.uniform(0, 6)))  # lobed edge
        th = k * 2 * math.pi / 24
        poly = np.stack([cx + r * np.cos(th), cy + r * np.sin(th)], 1)
        colour = rng.uniform([20, 60, 15], [70, 120, 50])
    elif cls == "vehicle":
        length = rng.uniform(10, 24)
        cx, cy = rng.uniform(length, size - length, 2)
        poly = _rotated(cx, cy, length, length / 2, rng.uniform(0, math.pi))
        colour = [(200, 30, 30), (230, 230, 235), (30, 60, 170), (220, 190, 40), (25, 25, 30)][
            int(rng.integers(5))
        ]
    else:
        side = rng.uniform(14, 36)
        cx, cy = rng.uniform(side, size - side, 2)
        poly = _rotated(cx, cy, side, side * rng.uniform(0.7, 1.0), rng.uniform(0, math.pi))
        colour = [(120, 120, 125), (140, 90, 60), (170, 60, 45), (200, 200, 190)][int(rng.integers(4))]
    return cls, poly, {"colour": np.asarray(colour, np.float64)}


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[None, :2], b[:, :2])
    rb = np.minimum(a[None, 2:], b[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = lambda x: np.prod(x[..., 2:] - x[..., :2], axis=-1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def make_image(rng: np.random.Generator, size: int = SIZE) -> tuple[np.ndarray, list[tuple[str, tuple]]]:
    """uint8 [size, size, 3] and [(class, (xmin, ymin, xmax, ymax) VOC 1-based inclusive)]."""
    img = Image.fromarray(np.clip(background(rng, size), 0, 255).astype(np.uint8))
    shadow = Image.new("L", (size, size), 0)
    objects, boxes = [], np.zeros((0, 4))
    for _ in range(int(rng.integers(OBJECTS[0], OBJECTS[1] + 1))):
        for _try in range(10):
            cls, poly, style = _sample(rng, size)
            box = np.concatenate([np.floor(poly.min(0)), np.ceil(poly.max(0))])  # pixel edges
            if len(boxes) == 0 or _iou(box, boxes).max() <= MAX_IOU:
                break
        else:
            continue
        boxes = np.vstack([boxes, box])
        objects.append((cls, poly, style))
    sd = ImageDraw.Draw(shadow)
    for _, poly, _ in objects:  # shadows first, cast to the bottom right
        sd.polygon([tuple(p) for p in poly + 3], fill=110)
    shadow = shadow.filter(ImageFilter.GaussianBlur(2))
    arr = np.asarray(img, np.float32) * (1 - np.asarray(shadow, np.float32)[..., None] / 255)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for cls, poly, style in objects:
        c = style["colour"] * rng.uniform(0.85, 1.15)
        draw.polygon([tuple(p) for p in poly], fill=tuple(int(v) for v in np.clip(c, 0, 255)))
        centre = poly.mean(0)
        if cls == "crown":  # lit from the top left: a lighter, smaller disc off-centre
            r = np.linalg.norm(poly - centre, axis=1).mean()
            hl = centre - r * 0.25
            lit = tuple(int(v) for v in np.clip(c * 1.35, 0, 255))
            draw.ellipse([hl[0] - r * 0.5, hl[1] - r * 0.5, hl[0] + r * 0.5, hl[1] + r * 0.5], fill=lit)
        elif cls == "vehicle":  # windscreen: a dark band a third of the way along
            a, b = poly[0] + (poly[1] - poly[0]) * 0.3, poly[3] + (poly[2] - poly[3]) * 0.3
            draw.line([tuple(a), tuple(b)], fill=(20, 20, 25), width=2)
        else:  # ridge along the longer axis
            m1, m2 = (poly[0] + poly[3]) / 2, (poly[1] + poly[2]) / 2
            draw.line([tuple(m1), tuple(m2)], fill=tuple(int(v * 0.6) for v in c), width=1)
    out = []
    for (cls, poly, _), box in zip(objects, boxes):
        x0, y0, x1, y1 = np.clip(box, 0, size).astype(int)
        out.append((cls, (x0 + 1, y0 + 1, x1, y1)))  # pixel edges -> VOC 1-based inclusive
    return np.asarray(img), out


def _xml(name: str, size: int, objects: list[tuple[str, tuple]]) -> str:
    objs = "".join(
        f"<object><name>{escape(c)}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin>"
        f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for c, b in objects
    )
    return (
        f"<annotation><filename>{name}.jpg</filename><size><width>{size}</width>"
        f"<height>{size}</height><depth>3</depth></size>{objs}</annotation>\n"
    )


def write_dataset(out: str, train: int = 300, val: int = 100, seed: int = 0, size: int = SIZE) -> None:
    """Writes ``train`` + ``val`` images and their XML to ``out`` (VOC layout)."""
    for sub in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    for split, n, stream in (("train", train, 0), ("val", val, 1)):
        names = []
        for i in range(n):
            rng = np.random.default_rng(np.random.SeedSequence([seed, stream, i]))
            img, objects = make_image(rng, size)
            name = f"{split}_{i:05d}"
            Image.fromarray(img).save(os.path.join(out, "JPEGImages", f"{name}.jpg"), quality=92)
            with open(os.path.join(out, "Annotations", f"{name}.xml"), "w") as f:
                f.write(_xml(name, size, objects))
            names.append(name)
        with open(os.path.join(out, "ImageSets", "Main", f"{split}.txt"), "w") as f:
            f.write("\n".join(names) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("--train", type=int, default=300)
    parser.add_argument("--val", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_dataset(args.out, args.train, args.val, args.seed)
    print(f"wrote {args.train} train + {args.val} val images to {args.out}")


if __name__ == "__main__":
    main()
