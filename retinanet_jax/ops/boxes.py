"""Box geometry in JAX: area, IoU, GIoU, clipping, format conversion.

All boxes are ``xyxy`` unless a name says otherwise. Arithmetic is done in at least float32
(bf16 inputs are upcast, like torchvision's ``_upcast``), so IoU is never computed in bf16.
Formulas follow ``torchvision.ops.boxes`` operation for operation, so results agree to float
rounding; the only intended difference is that 0/0 gives 0 instead of nan.
"""

from __future__ import annotations

import jax.numpy as jnp


def _f32(x: jnp.ndarray) -> jnp.ndarray:
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _safe_div(num: jnp.ndarray, den: jnp.ndarray) -> jnp.ndarray:
    # Zero-area boxes give 0/0; the double where keeps both the value and its gradient finite.
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


def box_area(boxes: jnp.ndarray) -> jnp.ndarray:
    """Area of ``boxes: [..., 4]`` xyxy -> ``[...]``. Mirrors torchvision.ops.box_area."""
    b = _f32(boxes)
    return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


def box_inter_union(boxes1: jnp.ndarray, boxes2: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Pairwise intersection and union areas: ``[..., N, 4], [..., M, 4] -> ([..., N, M], [..., N, M])``.

    Mirrors torchvision.ops.boxes._box_inter_union.
    """
    b1, b2 = _f32(boxes1), _f32(boxes2)
    area1, area2 = box_area(b1), box_area(b2)
    lt = jnp.maximum(b1[..., :, None, :2], b2[..., None, :, :2])
    rb = jnp.minimum(b1[..., :, None, 2:], b2[..., None, :, 2:])
    wh = jnp.maximum(rb - lt, 0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[..., :, None] + area2[..., None, :] - inter
    return inter, union


def box_iou(boxes1: jnp.ndarray, boxes2: jnp.ndarray) -> jnp.ndarray:
    """Pairwise IoU: ``boxes1 [..., N, 4], boxes2 [..., M, 4]`` xyxy -> ``[..., N, M]``.

    Mirrors torchvision.ops.box_iou; a zero union (two empty boxes) gives 0, not nan.
    """
    inter, union = box_inter_union(boxes1, boxes2)
    return _safe_div(inter, union)


def generalized_box_iou(boxes1: jnp.ndarray, boxes2: jnp.ndarray) -> jnp.ndarray:
    """Pairwise GIoU: ``[..., N, 4], [..., M, 4]`` xyxy -> ``[..., N, M]`` in [-1, 1].

    Mirrors torchvision.ops.generalized_box_iou; 0/0 terms (empty boxes) are taken as 0.
    """
    b1, b2 = _f32(boxes1), _f32(boxes2)
    inter, union = box_inter_union(b1, b2)
    iou = _safe_div(inter, union)
    lti = jnp.minimum(b1[..., :, None, :2], b2[..., None, :, :2])
    rbi = jnp.maximum(b1[..., :, None, 2:], b2[..., None, :, 2:])
    whi = jnp.maximum(rbi - lti, 0)
    areai = whi[..., 0] * whi[..., 1]
    return iou - _safe_div(areai - union, areai)


def clip_boxes(boxes: jnp.ndarray, image_hw) -> jnp.ndarray:
    """Clamp ``boxes [..., 4]`` xyxy pixels: x into [0, w], y into [0, h].

    ``image_hw`` is (h, w): Python ints or arrays broadcastable to ``boxes[..., 0]``.
    Mirrors torchvision.ops.clip_boxes_to_image.
    """
    b = _f32(boxes)
    h = jnp.asarray(image_hw[0], b.dtype)
    w = jnp.asarray(image_hw[1], b.dtype)
    x1 = jnp.clip(b[..., 0], 0, w)
    y1 = jnp.clip(b[..., 1], 0, h)
    x2 = jnp.clip(b[..., 2], 0, w)
    y2 = jnp.clip(b[..., 3], 0, h)
    return jnp.stack([x1, y1, x2, y2], axis=-1)


def xyxy_to_cxcywh(boxes: jnp.ndarray) -> jnp.ndarray:
    """``[..., 4]`` xyxy -> ``[..., 4]`` (cx, cy, w, h). Mirrors torchvision's _box_xyxy_to_cxcywh."""
    b = _f32(boxes)
    x1, y1, x2, y2 = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    return jnp.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=-1)


def cxcywh_to_xyxy(boxes: jnp.ndarray) -> jnp.ndarray:
    """``[..., 4]`` (cx, cy, w, h) -> ``[..., 4]`` xyxy. Mirrors torchvision's _box_cxcywh_to_xyxy."""
    b = _f32(boxes)
    cx, cy, w, h = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)
