"""Host-side (numpy / PIL) training transforms: resize, flip, pad to a canvas bucket, pad boxes.

Sizes (torchvision's resize rule) and canvas buckets come from ``retinanet_jax.imageprep.geometry``,
as for prediction and evaluation; boxes are scaled by float32 ratios new_size / old_size as
torchvision's ``resize_boxes`` does.

The *pixels* of training images are resized with PIL bilinear, which is much faster than a
numpy bilinear but differs slightly from torch's ``interpolate(mode="bilinear",
align_corners=False, antialias=False)``: identical sampling grid when upscaling (the usual
case), but PIL low-pass filters (antialiases) when downscaling. The torch-exact resize used
for prediction and evaluation is ``retinanet_jax.imageprep.normalize``'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from retinanet_jax.data.errors import DataError
from retinanet_jax.imageprep.geometry import resized_size

BOX_OVERFLOW = ("error", "truncate")


def resize_boxes(boxes: np.ndarray, old_hw: tuple[int, int], new_hw: tuple[int, int]) -> np.ndarray:
    """Scales float32 [N,4] xyxy boxes from ``old_hw`` to ``new_hw`` pixels (float32 ratios)."""
    ratio_h = np.float32(new_hw[0]) / np.float32(old_hw[0])
    ratio_w = np.float32(new_hw[1]) / np.float32(old_hw[1])
    ratios = np.array([ratio_w, ratio_h, ratio_w, ratio_h], np.float32)
    return np.asarray(boxes, np.float32) * ratios


def resize_image(image: np.ndarray, new_hw: tuple[int, int]) -> np.ndarray:
    """uint8 [H,W,3] -> uint8 [h,w,3] with PIL bilinear (see module doc for the difference
    from torch's bilinear)."""
    if tuple(image.shape[:2]) == tuple(new_hw):
        return image
    return np.asarray(Image.fromarray(image).resize((new_hw[1], new_hw[0]), Image.BILINEAR))


def hflip(image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirrors uint8 [H,W,3] and float32 [N,4] xyxy boxes left-right (x -> W - x)."""
    width = np.float32(image.shape[1])
    flipped = np.asarray(boxes, np.float32).copy()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return image[:, ::-1], flipped


def pad_image(
    image: np.ndarray, canvas_hw: tuple[int, int], where: str = "", out: np.ndarray | None = None
) -> np.ndarray:
    """Places uint8 [h,w,3] at the top-left of a zero uint8 [Hc,Wc,3] canvas.

    ``out``: an all-zero uint8 [Hc,Wc,3] array (e.g. a slice of a batch) to write into, which
    saves a canvas allocation and a copy per image.
    """
    h, w = image.shape[:2]
    if h > canvas_hw[0] or w > canvas_hw[1]:
        raise ValueError(f"{where}: image (h, w)=({h}, {w}) does not fit canvas {tuple(canvas_hw)}")
    canvas = np.zeros((canvas_hw[0], canvas_hw[1], 3), np.uint8) if out is None else out
    canvas[:h, :w] = image
    return canvas


def pad_boxes(
    boxes: np.ndarray, labels: np.ndarray, max_boxes: int, overflow: str = "error", where: str = ""
) -> tuple[np.ndarray, np.ndarray, int]:
    """Pads float32 [N,4] / int32 [N] to [max_boxes,4] / [max_boxes] with zeros / label -1.

    With more than ``max_boxes`` boxes: ``overflow="error"`` raises naming ``where``;
    ``"truncate"`` keeps the first ``max_boxes`` (source order). Returns
    (boxes, labels, number of boxes dropped).
    """
    if overflow not in BOX_OVERFLOW:
        raise ValueError(f"overflow must be one of {BOX_OVERFLOW}, got {overflow!r}")
    n = len(labels)
    dropped = max(n - max_boxes, 0)
    if dropped and overflow == "error":
        raise DataError(
            f"{where}: {n} boxes exceed max_boxes={max_boxes} (raise max_boxes or "
            f"use box_overflow='truncate')"
        )
    n = min(n, max_boxes)
    out_boxes = np.zeros((max_boxes, 4), np.float32)
    out_labels = np.full((max_boxes,), -1, np.int32)
    out_boxes[:n] = boxes[:n]
    out_labels[:n] = labels[:n]
    return out_boxes, out_labels, dropped


def train_transform(
    example: dict[str, Any],
    rng: np.random.Generator,
    *,
    min_sizes: Sequence[int],
    max_size: int,
    canvas_hw: tuple[int, int],
    max_boxes: int,
    hflip_prob: float = 0.5,
    box_overflow: str = "error",
    out: np.ndarray | None = None,
) -> dict[str, Any]:
    """One example -> {"image": uint8 [Hc,Wc,3], "image_size": int32 [2] (resized h, w),
    "boxes": float32 [G,4] xyxy resized pixels, "labels": int32 [G] (-1 = padding),
    "num_truncated": int}.

    min_size is drawn uniformly from ``min_sizes`` per image (torchvision's multi-scale
    training), then the image is flipped left-right with probability ``hflip_prob``.
    ``out``: optional all-zero canvas to write the image into (see ``pad_image``).
    """
    where = f"image_id {example.get('image_id')}"
    image = example["image"]
    old_hw = image.shape[:2]
    min_size = min_sizes[int(rng.integers(len(min_sizes)))] if len(min_sizes) > 1 else min_sizes[0]
    new_hw = resized_size(old_hw, min_size, max_size)
    image = resize_image(image, new_hw)
    boxes = resize_boxes(example["boxes"], old_hw, new_hw)
    if hflip_prob > 0 and rng.random() < hflip_prob:
        image, boxes = hflip(image, boxes)
    boxes, labels, truncated = pad_boxes(boxes, example["labels"], max_boxes, box_overflow, where)
    return {
        "image": pad_image(image, canvas_hw, where, out),
        "image_size": np.array(new_hw, np.int32),
        "boxes": boxes,
        "labels": labels,
        "num_truncated": truncated,
    }
