"""Synthetic shapes detection dataset: procedural, deterministic from (seed, split, index).

Each image has a smooth random-colour background (a bilinearly upsampled 4x4 colour field)
with pixel noise over the whole image, and 0..``max_objects`` filled shapes of 5 classes
(circle, square, triangle, hexagon, star), each with a random colour kept apart from the
background colour under it, a random rotation, and a size (circumscribed diameter)
log-uniform in ``object_size`` x the image's short side, so tiny and large objects are both
common. A fraction ``empty_fraction`` of images has no objects.

Occlusion rule: shapes are drawn in order, later ones over earlier ones. A shape whose visible
pixel count is below ``min_visible`` (default 0.5) of its area is mostly hidden: it is
removed from the image altogether (not drawn), so every visible shape is labelled and no
unlabelled fragments remain. The box of every kept shape is the tight box of its *visible*
pixels after occlusion, in pixel-edge coordinates (a shape covering pixel columns 3..7 has
x1=3, x2=8), like COCO boxes around the visible object.

Placement avoids heavy overlap (a new shape may cover at most half of another's box, and
vice versa, within a few tries), so most images have some partial occlusion but few
removals. Generating one 256x256 image takes ~1 ms.

Splits: ``"train"`` and ``"validation"`` draw from independent random streams
(``np.random.SeedSequence([seed, split_code, index])``), so they never share an image.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

CLASS_NAMES = ("circle", "square", "triangle", "hexagon", "star")
SPLITS = {"train": 0, "validation": 1}
DEFAULT_NUM_IMAGES = {"train": 20000, "validation": 500}

_PLACEMENT_TRIES = 5
_MAX_BOX_COVER = 0.5
_MIN_COLOR_DISTANCE = 150  # L1 distance in RGB between a shape and the background under it
_NOISE = 16  # +- amplitude of the uniform pixel noise


def _vertices(cls: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray | None:
    """Polygon vertices float [V, 2] (x, y) for polygon classes; None for the circle."""
    if cls == "circle":
        return None
    if cls == "star":
        k = np.arange(10)
        radii = np.where(k % 2 == 0, r, 0.45 * r)
        theta = angle + k * (math.pi / 5)
    else:
        sides = {"square": 4, "triangle": 3, "hexagon": 6}[cls]
        radii = np.full(sides, r)
        theta = angle + np.arange(sides) * (2 * math.pi / sides)
    return np.stack([cx + radii * np.cos(theta), cy + radii * np.sin(theta)], axis=1)


def _area(vertices: np.ndarray | None, r: float) -> float:
    if vertices is None:
        return math.pi * r * r
    x, y = vertices[:, 0], vertices[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _draw(draw: ImageDraw.ImageDraw, shape: dict, fill) -> None:
    if shape["vertices"] is None:
        cx, cy, r = shape["cx"], shape["cy"], shape["r"]
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([tuple(v) for v in shape["vertices"]], fill=fill)


def _cover(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of box b's area covered by box a (xyxy)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    return iw * ih / max((b[2] - b[0]) * (b[3] - b[1]), 1e-6)


class ShapesSource:
    """Random-access synthetic detection source; ``source[i]`` is the same for the same args.

    Args:
      split: "train" or "validation" (independent random streams).
      num_images: length; default 20000 (train) / 500 (validation).
      image_size: int (square) or (h, w).
      max_objects: objects per non-empty image are uniform in 1..max_objects (before removal
        of mostly hidden ones).
      object_size: (lo, hi) fractions of the short side for the shape's circumscribed diameter.
      empty_fraction: probability of an image without objects.
      min_visible: occlusion rule threshold (see module doc).
      seed: base seed.
    """

    def __init__(
        self,
        split: str = "train",
        num_images: int | None = None,
        image_size: int | tuple[int, int] = 256,
        max_objects: int = 6,
        object_size: tuple[float, float] = (0.08, 0.5),
        empty_fraction: float = 0.05,
        min_visible: float = 0.5,
        seed: int = 0,
    ):
        if split not in SPLITS:
            raise ValueError(f"ShapesSource: split must be one of {list(SPLITS)}, got {split!r}")
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        lo, hi = object_size
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"ShapesSource: object_size must satisfy 0 < lo <= hi <= 1, got {object_size}")
        if not 0 <= max_objects <= 254:  # shape ids live in a uint8 map
            raise ValueError(f"ShapesSource: max_objects must be in 0..254, got {max_objects}")
        self.class_names = list(CLASS_NAMES)
        self.split = split
        self.num_images = DEFAULT_NUM_IMAGES[split] if num_images is None else int(num_images)
        self.image_hw = (int(image_size[0]), int(image_size[1]))
        self.max_objects = int(max_objects)
        self.object_size = (float(lo), float(hi))
        self.empty_fraction = float(empty_fraction)
        self.min_visible = float(min_visible)
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.num_images

    def image_size(self, i: int) -> tuple[int, int]:
        """(h, w) of every image."""
        return self.image_hw

    def _sample_shapes(self, rng: np.random.Generator, field: np.ndarray) -> list[dict]:
        h, w = self.image_hw
        if self.max_objects == 0 or rng.random() < self.empty_fraction:
            return []
        count = int(rng.integers(1, self.max_objects + 1))
        short = min(h, w)
        log_lo = math.log(self.object_size[0] * short)
        log_hi = math.log(self.object_size[1] * short)
        shapes: list[dict] = []
        for _ in range(count):
            label = int(rng.integers(len(CLASS_NAMES)))
            r = 0.5 * math.exp(rng.uniform(log_lo, log_hi))
            angle = float(rng.uniform(0, 2 * math.pi))
            for _ in range(_PLACEMENT_TRIES):
                # Centres keep the whole shape inside the image.
                cx = float(rng.uniform(r, max(w - r, r + 1e-3)))
                cy = float(rng.uniform(r, max(h - r, r + 1e-3)))
                box = np.array([cx - r, cy - r, cx + r, cy + r])
                if all(
                    _cover(box, s["box"]) <= _MAX_BOX_COVER and _cover(s["box"], box) <= _MAX_BOX_COVER
                    for s in shapes
                ):
                    break
            else:
                continue
            under = field[
                min(int(cy * field.shape[0] / h), field.shape[0] - 1),
                min(int(cx * field.shape[1] / w), field.shape[1] - 1),
            ].astype(int)
            for _ in range(10):
                color = rng.integers(_NOISE, 256 - _NOISE, 3)
                if np.abs(color - under).sum() >= _MIN_COLOR_DISTANCE:
                    break
            else:
                color = 255 - under  # the complement is always far enough
            vertices = _vertices(CLASS_NAMES[label], cx, cy, r, angle)
            shapes.append(
                {
                    "label": label,
                    "cx": cx,
                    "cy": cy,
                    "r": r,
                    "box": box,
                    "vertices": vertices,
                    "area": _area(vertices, r),
                    "color": tuple(int(c) for c in color),
                }
            )
        return shapes

    def _id_map(self, shapes: list[dict]) -> np.ndarray:
        """uint8 [H, W]: 1 + index of the shape visible at each pixel, 0 for background."""
        h, w = self.image_hw
        ids = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(ids)
        for k, shape in enumerate(shapes):
            _draw(draw, shape, k + 1)
        return np.asarray(ids)

    def _window(self, shape: dict) -> tuple[slice, slice]:
        """The shape's box grown by a pixel margin and clipped: all its pixels lie inside."""
        h, w = self.image_hw
        x0, y0, x1, y1 = shape["box"]
        return (
            slice(max(int(y0) - 1, 0), min(int(y1) + 2, h)),
            slice(max(int(x0) - 1, 0), min(int(x1) + 2, w)),
        )

    def _noise(self) -> np.ndarray:
        """A fixed uint8 noise tile in [0, 2*_NOISE], larger than the image; images use
        random crops of it (drawing fresh noise per image would dominate the cost)."""
        if getattr(self, "_noise_tile", None) is None:
            h, w = self.image_hw
            rng = np.random.default_rng([self.seed, SPLITS[self.split], 2**31])
            self._noise_tile = rng.integers(0, 2 * _NOISE + 1, (h + 64, w + 64, 3), np.uint8)
        return self._noise_tile

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.generate(i)[0]

    def generate(self, i: int) -> tuple[dict[str, Any], np.ndarray]:
        """(example ``i``, uint8 [H, W] map of the visible shapes: 0 background, k + 1 where
        the shape of box k is visible)."""
        if not 0 <= i < self.num_images:
            raise IndexError(f"ShapesSource({self.split}): index {i} out of range [0, {self.num_images})")
        rng = np.random.default_rng([self.seed, SPLITS[self.split], int(i)])
        h, w = self.image_hw
        # Colours stay in [_NOISE, 255 - _NOISE] so adding the noise cannot overflow uint8.
        field = rng.integers(_NOISE, 256 - _NOISE, (4, 4, 3), dtype=np.uint8)
        background = Image.fromarray(field).resize((w, h), Image.BILINEAR)
        shapes = self._sample_shapes(rng, field)

        # Remove mostly hidden shapes, then recompute visibility without them (removing a
        # shape only uncovers others, so no kept shape falls below the threshold).
        ids = self._id_map(shapes)
        visible = [np.count_nonzero(ids[self._window(s)] == k + 1) for k, s in enumerate(shapes)]
        kept = [s for s, v in zip(shapes, visible) if v >= max(self.min_visible * s["area"], 1)]
        if len(kept) != len(shapes):
            shapes = kept
            ids = self._id_map(shapes)

        boxes = np.zeros((len(shapes), 4), np.float32)
        for k, shape in enumerate(shapes):
            rows_sl, cols_sl = self._window(shape)
            mask = ids[rows_sl, cols_sl] == k + 1
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            boxes[k] = (
                cols_sl.start + cols[0],
                rows_sl.start + rows[0],
                cols_sl.start + cols[-1] + 1,
                rows_sl.start + rows[-1] + 1,
            )

        draw = ImageDraw.Draw(background)
        for shape in shapes:
            _draw(draw, shape, shape["color"])
        dy, dx = rng.integers(0, 64, 2)
        image = np.add(np.asarray(background), self._noise()[dy : dy + h, dx : dx + w])
        image -= _NOISE
        return {
            "image": image,
            "boxes": boxes,
            "labels": np.array([s["label"] for s in shapes], np.int32),
            "image_id": int(i),
        }, ids
