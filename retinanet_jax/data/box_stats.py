"""Ground-truth boxes as the model sees them in training: resized by the training rule.

For anchor statistics (``ops.anchor_fit``): each example's boxes are scaled exactly as
``transforms.train_transform`` scales them (``imageprep.geometry.resized_size``, the one
resize rule, + ``transforms.resize_boxes``), once per ``min_sizes`` entry (multi-scale
training draws one of them per image), and each box comes with the canvas its image is padded
to in training (``geometry.image_bucket`` over ``TrainBatchIterator``'s buckets), whose anchor
grid is the one the matcher uses.

File-backed sources (``records`` with a known image size) are read from their annotations
without decoding any image; other sources are indexed (decoded) example by example.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from retinanet_jax.data import transforms
from retinanet_jax.data.canvas_stats import image_sizes
from retinanet_jax.imageprep import canvases, geometry


@dataclasses.dataclass(frozen=True)
class TrainingBoxes:
    """``boxes`` float32 [N,4] xyxy resized pixels; ``canvas_hw`` int [N,2] the training canvas
    of each box's image; ``num_images`` examples read; ``labels`` int32 [N]."""

    boxes: np.ndarray
    canvas_hw: np.ndarray
    labels: np.ndarray
    num_images: int


def _annotation(source: Any, i: int) -> tuple[tuple[int, int] | None, np.ndarray, np.ndarray]:
    """(original (h, w), boxes, labels) of example ``i``, without decoding where possible."""
    indices, inner = getattr(source, "indices", None), getattr(source, "source", None)
    if indices is not None and inner is not None:  # a subset view (training's NonEmptySubset)
        return _annotation(inner, int(indices[i]))
    records = getattr(source, "records", None)
    if records is not None and records[i].hw is not None:
        rec = records[i]
        return tuple(rec.hw), np.asarray(rec.boxes, np.float32), np.asarray(rec.labels, np.int32)
    ex = source[i]
    return (
        tuple(ex["image"].shape[:2]),
        np.asarray(ex["boxes"], np.float32).reshape(-1, 4),
        np.asarray(ex["labels"], np.int32).reshape(-1),
    )


def training_boxes(
    source: Any,
    min_sizes: int | Sequence[int],
    max_size: int,
    *,
    buckets: Sequence[tuple[int, int]] | None = None,
    max_images: int | None = None,
    seed: int = 0,
) -> TrainingBoxes:
    """The ground-truth boxes of ``source`` in the pixels the model trains on.

    ``min_sizes``/``max_size``: the training resize (``config.input.min_sizes`` / ``max_size``);
    ``buckets``: the training canvases (None: canvases fitted to the source's sizes,
    ``TrainBatchIterator``'s default up to its minimum of a global batch per canvas);
    ``max_images``: read only a seeded random sample of that many examples.
    """
    min_sizes = (int(min_sizes),) if np.ndim(min_sizes) == 0 else tuple(int(s) for s in min_sizes)
    top = max(min_sizes)
    if not buckets:
        buckets = canvases.select_canvases(image_sizes(source), top, max_size)
    buckets = [tuple(int(v) for v in b) for b in buckets]
    n = len(source)
    order = np.arange(n)
    if max_images is not None and n > max_images:
        order = np.sort(np.random.default_rng(seed).choice(n, int(max_images), replace=False))
    size_hint = getattr(source, "image_size", lambda i: None)
    out_boxes, out_canvas, out_labels = [], [], []
    for i in order:
        hw, boxes, labels = _annotation(source, int(i))
        hint = size_hint(int(i))
        # TrainBatchIterator adds the unknown-size canvas to its buckets when a size is unknown.
        canvas = geometry.image_bucket(
            hint, geometry.with_unknown_size_canvas(buckets, max_size, [hint]), top, max_size
        )
        for min_size in min_sizes:
            new_hw = geometry.resized_size(hw, min_size, max_size)
            out_boxes.append(transforms.resize_boxes(boxes, hw, new_hw))
            out_canvas.append(np.tile(np.asarray(canvas, np.int64), (len(boxes), 1)))
            out_labels.append(labels)
    if not out_boxes:
        return TrainingBoxes(
            np.zeros((0, 4), np.float32), np.zeros((0, 2), np.int64), np.zeros((0,), np.int32), 0
        )
    return TrainingBoxes(
        np.concatenate(out_boxes).reshape(-1, 4),
        np.concatenate(out_canvas).reshape(-1, 2),
        np.concatenate(out_labels),
        len(order),
    )
