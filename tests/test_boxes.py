"""Box geometry and box coding against torchvision.ops / BoxCoder, plus identities and gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.detection._utils import BoxCoder

from retinanet_jax.ops import box_coder as _box_coder
from retinanet_jax.ops import boxes as _boxes


class _Jitted:
    """The module's functions under jax.jit: one compile per test instead of one per op."""

    def __init__(self, module, static=()):
        self._m, self._static = module, static

    def __getattr__(self, name):
        fn = getattr(self._m, name)
        return jax.jit(fn, static_argnums=self._static) if callable(fn) else fn


class _Helpers:
    """Box helpers the package does not need (pairwise GIoU, format conversions), kept as the
    torchvision formulas and checked against torchvision here."""

    @staticmethod
    def generalized_box_iou(boxes1, boxes2):
        """Pairwise GIoU ``[..., N, 4], [..., M, 4] -> [..., N, M]``; 0/0 terms are 0."""
        b1, b2 = jnp.asarray(boxes1, jnp.float32), jnp.asarray(boxes2, jnp.float32)
        inter, union = _boxes.box_inter_union(b1, b2)
        iou = _safe_div(inter, union)
        lti = jnp.minimum(b1[..., :, None, :2], b2[..., None, :, :2])
        rbi = jnp.maximum(b1[..., :, None, 2:], b2[..., None, :, 2:])
        whi = jnp.maximum(rbi - lti, 0)
        areai = whi[..., 0] * whi[..., 1]
        return iou - _safe_div(areai - union, areai)

    @staticmethod
    def xyxy_to_cxcywh(boxes):
        x1, y1, x2, y2 = jnp.moveaxis(jnp.asarray(boxes, jnp.float32), -1, 0)
        return jnp.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=-1)

    @staticmethod
    def cxcywh_to_xyxy(boxes):
        cx, cy, w, h = jnp.moveaxis(jnp.asarray(boxes, jnp.float32), -1, 0)
        return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def _safe_div(num, den):
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


B = _Jitted(_boxes)
H = _Jitted(_Helpers)
box_coder = _Jitted(_box_coder, static=(2,))


def _rand_boxes(rng, n, size=500.0, max_wh=200.0):
    xy = rng.uniform(-20, size, (n, 2))
    wh = rng.uniform(0.5, max_wh, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_box_iou_and_area_match_torchvision(rng):
    a, b = _rand_boxes(rng, 60), _rand_boxes(rng, 70)
    # Some exact overlaps and touching boxes.
    b[:5] = a[:5]
    b[5] = [a[5, 2], a[5, 1], a[5, 2] + 10, a[5, 3]]
    ref = torchvision.ops.box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    got = np.asarray(B.box_iou(a, b))
    assert got.shape == (60, 70)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
    assert (got > 0).sum() > 50  # the data has real overlaps
    np.testing.assert_allclose(
        np.asarray(B.box_area(a)), torchvision.ops.box_area(torch.from_numpy(a)).numpy(), rtol=1e-6
    )


def test_box_iou_batched_leading_axes(rng):
    a, b = _rand_boxes(rng, 24).reshape(2, 12, 4), _rand_boxes(rng, 10).reshape(2, 5, 4)
    got = np.asarray(B.box_iou(a, b))
    for i in range(2):
        np.testing.assert_allclose(got[i], np.asarray(B.box_iou(a[i], b[i])), rtol=0, atol=0)


def test_box_iou_identity_and_zero_area():
    boxes = np.array([[0, 0, 10, 10], [3.5, 2.0, 7.25, 100.0], [5, 5, 5, 5], [1, 1, 1, 9]], np.float32)
    iou = np.asarray(B.box_iou(boxes, boxes))
    np.testing.assert_allclose(np.diag(iou)[:2], 1.0, rtol=0, atol=0)
    # 0/0 (two empty boxes) is 0, not nan.
    assert np.isfinite(iou).all()
    np.testing.assert_array_equal(iou[2:, 2:], 0.0)


def test_box_iou_bf16_computed_in_f32(rng):
    a = _rand_boxes(rng, 8)
    got = B.box_iou(jnp.asarray(a, jnp.bfloat16), jnp.asarray(a, jnp.bfloat16))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.diag(np.asarray(got)), 1.0, rtol=0, atol=0)


def test_generalized_box_iou_matches_torchvision(rng):
    a, b = _rand_boxes(rng, 40), _rand_boxes(rng, 30)
    ref = torchvision.ops.generalized_box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    got = np.asarray(H.generalized_box_iou(a, b))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert got.min() < -0.5  # far-apart pairs exercise the enclosing-box term
    np.testing.assert_allclose(np.diag(np.asarray(H.generalized_box_iou(a, a))), 1.0, atol=1e-6)


def test_clip_boxes_matches_torchvision(rng):
    boxes = rng.uniform(-100, 700, (50, 4)).astype(np.float32)
    ref = torchvision.ops.clip_boxes_to_image(torch.from_numpy(boxes), (480, 640)).numpy()
    np.testing.assert_array_equal(np.asarray(B.clip_boxes(boxes, (480, 640))), ref)
    # Traced sizes work too (postprocess clips per image under vmap).
    got = B.clip_boxes(boxes, jnp.array([480, 640]))
    np.testing.assert_array_equal(np.asarray(got), ref)


def test_conversions_match_torchvision_and_roundtrip(rng):
    boxes = _rand_boxes(rng, 20)
    cxcywh = np.asarray(H.xyxy_to_cxcywh(boxes))
    ref = torchvision.ops.box_convert(torch.from_numpy(boxes), "xyxy", "cxcywh").numpy()
    np.testing.assert_allclose(cxcywh, ref, rtol=1e-6)
    back = np.asarray(H.cxcywh_to_xyxy(cxcywh))
    ref_back = torchvision.ops.box_convert(torch.from_numpy(ref), "cxcywh", "xyxy").numpy()
    np.testing.assert_allclose(back, ref_back, rtol=1e-6)
    np.testing.assert_allclose(back, boxes, atol=1e-4)


def test_iou_gradients_finite_for_degenerate_boxes():
    a = jnp.array(
        [[0, 0, 0, 0], [5, 5, 5, 9], [0, 0, 10, 10], [1e4, 1e4, 1e4 + 1e-3, 1e4 + 1e-3]], jnp.float32
    )
    for fn in (_boxes.box_iou, _Helpers.generalized_box_iou):
        g = jax.jit(jax.grad(lambda x: fn(x, x).sum() + fn(x, a[::-1]).sum()))(a)
        assert np.isfinite(np.asarray(g)).all(), fn.__name__


def test_encode_matches_torchvision(rng):
    anchors, gt = _rand_boxes(rng, 200, max_wh=300), _rand_boxes(rng, 200, max_wh=300)
    for weights in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]:
        ref = BoxCoder(weights).encode_single(torch.from_numpy(gt), torch.from_numpy(anchors)).numpy()
        got = np.asarray(box_coder.encode_boxes(gt, anchors, weights))
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_decode_matches_torchvision(rng):
    anchors = _rand_boxes(rng, 300, max_wh=300)
    deltas = rng.normal(0, 1.0, (300, 4)).astype(np.float32)
    deltas[:10, 2:] = 20.0  # beyond bbox_xform_clip: clamped
    deltas[10:20, 2:] = -30.0
    for weights in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]:
        ref = BoxCoder(weights).decode_single(torch.from_numpy(deltas), torch.from_numpy(anchors)).numpy()
        got = np.asarray(box_coder.decode_boxes(deltas, anchors, weights))
        # Within a few float32 ulps of coordinates up to ~3e4 (clamped exp(4.135) * 300).
        np.testing.assert_allclose(got, ref, rtol=2e-6, atol=1e-4)
    assert box_coder.BBOX_XFORM_CLIP == BoxCoder((1, 1, 1, 1)).bbox_xform_clip == math.log(1000.0 / 16)


def test_encode_decode_identity(rng):
    # Size ratios stay below the 1000/16 clamp, so decode inverts encode.
    anchors = _rand_boxes(rng, 100, max_wh=200)
    anchors[:, 2:] += 16
    gt = _rand_boxes(rng, 100, max_wh=200)
    for weights in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]:
        deltas = box_coder.encode_boxes(gt, anchors, weights)
        back = np.asarray(box_coder.decode_boxes(deltas, anchors, weights))
        np.testing.assert_allclose(back, gt, rtol=1e-5, atol=2e-3)
    d = rng.normal(0, 1, (100, 4)).astype(np.float32)
    back = box_coder.encode_boxes(box_coder.decode_boxes(d, anchors), anchors)
    np.testing.assert_allclose(np.asarray(back), d, atol=1e-4)


def test_decode_extreme_deltas_finite_with_finite_grads():
    anchors = jnp.array([[0, 0, 32, 32], [10, 10, 10, 10], [0, 0, 1e3, 1e3]], jnp.float32)
    deltas = jnp.array([[1e6, -1e6, 1e4, -1e4], [3.0, 3.0, 50.0, 50.0], [0, 0, -1e30, 1e30]], jnp.float32)
    out = box_coder.decode_boxes(deltas, anchors)
    assert np.isfinite(np.asarray(out)).all()
    # The clamp caps the size at 1000/16 times the anchor.
    np.testing.assert_allclose(np.asarray(out[0, 3] - out[0, 1]), 0.0, atol=1e-3)
    np.testing.assert_allclose(np.asarray(out[2, 3] - out[2, 1]), 1e3 * 1000 / 16, rtol=1e-5)
    g = jax.jit(jax.grad(lambda d: _box_coder.decode_boxes(d, anchors).sum()))(deltas)
    assert np.isfinite(np.asarray(g)).all()


def test_decode_bf16_inputs_computed_in_f32(rng):
    anchors = _rand_boxes(rng, 16)
    d = rng.normal(0, 1, (16, 4)).astype(np.float32)
    d16 = jnp.asarray(d, jnp.bfloat16)
    out = box_coder.decode_boxes(d16, anchors)
    assert out.dtype == jnp.float32
    ref = box_coder.decode_boxes(np.asarray(d16.astype(jnp.float32)), anchors)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
