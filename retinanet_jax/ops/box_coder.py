"""Box <-> regression-delta coding, mirroring torchvision.models.detection._utils.BoxCoder.

The expressions (and their evaluation order) are the ones of torchvision's ``encode_boxes``
and ``BoxCoder.decode_single`` so float32 results agree to the last bit or two. Always
computed in float32 (bf16 inputs are upcast): exp() of a bf16 delta would move box edges by
several pixels.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

# torchvision BoxCoder default: never let a box grow more than 1000/16 times its anchor.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def _f32(x: jnp.ndarray) -> jnp.ndarray:
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def encode_boxes(
    gt: jnp.ndarray,
    anchors: jnp.ndarray,
    weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
) -> jnp.ndarray:
    """Regression targets of ``gt`` w.r.t. ``anchors``: ``[..., 4], [..., 4]`` xyxy -> ``[..., 4]``.

    Returns (dx, dy, dw, dh) = (wx * dcx / wa, wy * dcy / ha, ww * log(wg / wa), wh * log(hg / ha)).
    Mirrors torchvision ``BoxCoder.encode_single(reference_boxes=gt, proposals=anchors)``.
    Zero-size gt or anchors give inf / nan, exactly as torchvision does.
    """
    g, a = _f32(gt), _f32(anchors)
    wx, wy, ww, wh = weights
    ex_w = a[..., 2] - a[..., 0]
    ex_h = a[..., 3] - a[..., 1]
    ex_cx = a[..., 0] + 0.5 * ex_w
    ex_cy = a[..., 1] + 0.5 * ex_h
    gt_w = g[..., 2] - g[..., 0]
    gt_h = g[..., 3] - g[..., 1]
    gt_cx = g[..., 0] + 0.5 * gt_w
    gt_cy = g[..., 1] + 0.5 * gt_h
    dx = wx * (gt_cx - ex_cx) / ex_w
    dy = wy * (gt_cy - ex_cy) / ex_h
    dw = ww * jnp.log(gt_w / ex_w)
    dh = wh * jnp.log(gt_h / ex_h)
    return jnp.stack([dx, dy, dw, dh], axis=-1)


def decode_boxes(
    deltas: jnp.ndarray,
    anchors: jnp.ndarray,
    weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
    clamp: float = BBOX_XFORM_CLIP,
) -> jnp.ndarray:
    """Boxes from ``deltas [..., 4]`` (dx, dy, dw, dh) and ``anchors [..., 4]`` xyxy -> ``[..., 4]`` xyxy.

    Mirrors torchvision ``BoxCoder.decode_single``: dw, dh are clamped from above at ``clamp``
    before exp (they may go to -inf freely: exp gives 0), and the corners are
    ``ctr -/+ 0.5 * size``. Finite deltas give finite boxes and finite gradients.
    """
    d, a = _f32(deltas), _f32(anchors)
    a = a.astype(d.dtype)
    widths = a[..., 2] - a[..., 0]
    heights = a[..., 3] - a[..., 1]
    ctr_x = a[..., 0] + 0.5 * widths
    ctr_y = a[..., 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx = d[..., 0] / wx
    dy = d[..., 1] / wy
    dw = jnp.minimum(d[..., 2] / ww, clamp)
    dh = jnp.minimum(d[..., 3] / wh, clamp)
    pred_ctr_x = dx * widths + ctr_x
    pred_ctr_y = dy * heights + ctr_y
    pred_w = jnp.exp(dw) * widths
    pred_h = jnp.exp(dh) * heights
    half_w = 0.5 * pred_w
    half_h = 0.5 * pred_h
    return jnp.stack(
        [pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h], axis=-1
    )
