"""Box geometry in JAX: area, IoU, paired GIoU, clipping.

All boxes are ``xyxy`` unless a name says otherwise. Arithmetic is done in at least float32
(bf16 inputs are upcast, like torchvision's ``_upcast``), so IoU is never computed in bf16.
Formulas follow ``torchvision.ops.boxes`` operation for operation, so results agree to float
rounding; the only intended difference is that 0/0 gives 0 instead of nan (the paired GIoU
keeps torchvision's ``eps`` instead, as its loss does).
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


def paired_generalized_iou(boxes1: jnp.ndarray, boxes2: jnp.ndarray, eps: float = 1e-7) -> jnp.ndarray:
    """GIoU of paired boxes (elementwise, not all-pairs): ``[..., 4], [..., 4]`` xyxy -> ``[...]``.

    The formula of ``torchvision.ops.generalized_box_iou_loss`` (whose loss is ``1 - this``):
    ``eps`` is added to the union and enclosing areas against 0/0 for degenerate boxes, and
    the intersection is zero unless both extents are positive.
    """
    b1 = _f32(boxes1)
    b2 = _f32(boxes2).astype(b1.dtype)
    x1, y1, x2, y2 = jnp.moveaxis(b1, -1, 0)
    x1g, y1g, x2g, y2g = jnp.moveaxis(b2, -1, 0)

    xi1 = jnp.maximum(x1, x1g)
    yi1 = jnp.maximum(y1, y1g)
    xi2 = jnp.minimum(x2, x2g)
    yi2 = jnp.minimum(y2, y2g)
    # torchvision zeroes the intersection unless both extents are positive (not a clamp: two
    # negative extents must not multiply into a positive area).
    overlaps = (yi2 > yi1) & (xi2 > xi1)
    inter = jnp.where(overlaps, (xi2 - xi1) * (yi2 - yi1), 0.0)
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - inter
    iou = inter / (union + eps)

    xc1 = jnp.minimum(x1, x1g)
    yc1 = jnp.minimum(y1, y1g)
    xc2 = jnp.maximum(x2, x2g)
    yc2 = jnp.maximum(y2, y2g)
    area_c = (xc2 - xc1) * (yc2 - yc1)
    return iou - (area_c - union) / (area_c + eps)


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
