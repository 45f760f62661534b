"""retinanet_jax.objective.retinanet_loss against torchvision's RetinaNet.compute_loss, padding
and empty images."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchvision.models.detection import retinanet as tv_retinanet
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.image_list import ImageList

from retinanet_jax.objective.retinanet_loss import compute_losses, retinanet_losses
from retinanet_jax.ops.anchors import anchors_for_image

# Sums over ~4k anchors x K classes in float32, in a different order than torch.
RTOL = 1e-5

IMAGE_HW = (96, 128)
ANCHORS = anchors_for_image(IMAGE_HW)
NUM_CLASSES = 5


def _boxes(rng, n, hw=IMAGE_HW):
    h, w = hw
    xy = rng.random((n, 2)) * [w * 0.8, h * 0.8]
    wh = 8 + rng.random((n, 2)) * [w * 0.5, h * 0.5]
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def make_batch(seed=0, counts=(4, 0, 2), max_boxes=6):
    """Head outputs [B,A,K], [B,A,4] and padded targets; counts = real boxes per image."""
    rng = np.random.default_rng(seed)
    b, a = len(counts), len(ANCHORS)
    cls_logits = (rng.standard_normal((b, a, NUM_CLASSES)) * 2 - 3).astype(np.float32)
    bbox_regression = (rng.standard_normal((b, a, 4)) * 0.3).astype(np.float32)
    boxes = np.zeros((b, max_boxes, 4), np.float32)
    labels = np.full((b, max_boxes), -1, np.int32)
    for i, n in enumerate(counts):
        boxes[i, :n] = _boxes(rng, n)
        labels[i, :n] = rng.integers(0, NUM_CLASSES, n)
    return cls_logits, bbox_regression, boxes, labels


def pad_more(boxes, labels, extra, seed=1):
    """Appends ``extra`` padding rows with junk boxes (they must change nothing)."""
    rng = np.random.default_rng(seed)
    b = boxes.shape[0]
    junk = np.stack([_boxes(rng, extra) for _ in range(b)]) if extra else np.zeros((b, 0, 4), np.float32)
    return (
        np.concatenate([boxes, junk], axis=1),
        np.concatenate([labels, np.full((b, extra), -1, np.int32)], axis=1),
    )


def tv_targets(boxes, labels):
    return [
        {"boxes": torch.tensor(b[lab >= 0]), "labels": torch.tensor(lab[lab >= 0]).long()}
        for b, lab in zip(boxes, labels)
    ]


def tv_compute_loss(cls_logits, bbox_regression, anchors, boxes, labels, loss_type, with_grad=False):
    """torchvision RetinaNet.compute_loss on given head outputs, without building a backbone."""
    head = tv_retinanet.RetinaNetHead(8, 9, cls_logits.shape[-1])
    head.regression_head._loss_type = loss_type
    fake_model = types.SimpleNamespace(
        proposal_matcher=Matcher(0.5, 0.4, allow_low_quality_matches=True), head=head
    )
    outs = {
        "cls_logits": torch.tensor(cls_logits, requires_grad=with_grad),
        "bbox_regression": torch.tensor(bbox_regression, requires_grad=with_grad),
    }
    anchors_t = [torch.tensor(np.asarray(anchors))] * len(boxes)
    losses = tv_retinanet.RetinaNet.compute_loss(fake_model, tv_targets(boxes, labels), outs, anchors_t)
    values = {k: float(v.detach()) for k, v in losses.items()}
    if not with_grad:
        return values
    (losses["classification"] + losses["bbox_regression"]).backward()
    return values, outs["cls_logits"].grad.numpy(), outs["bbox_regression"].grad.numpy()


def jax_value_and_grad(cls_logits, bbox_regression, boxes, labels, **kw):
    def total(c, r):
        out = retinanet_losses(c, r, ANCHORS, boxes, labels, **kw)
        return out["classification"] + out["bbox_regression"], out

    (_, out), grads = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(cls_logits, bbox_regression)
    return {k: float(v) for k, v in out.items()}, np.asarray(grads[0]), np.asarray(grads[1])


@pytest.mark.parametrize("box_loss", ["l1", "smooth_l1", "giou"])
def test_matches_torchvision_compute_loss_with_gradients(box_loss):
    cls_logits, bbox_regression, boxes, labels = make_batch()
    ours, g_cls, g_box = jax_value_and_grad(cls_logits, bbox_regression, boxes, labels, box_loss=box_loss)
    ref, r_cls, r_box = tv_compute_loss(
        cls_logits, bbox_regression, ANCHORS, boxes, labels, box_loss, with_grad=True
    )
    for k in ("classification", "bbox_regression"):
        np.testing.assert_allclose(ours[k], ref[k], rtol=RTOL, err_msg=k)
    assert ours["bbox_regression"] > 0
    # Per-element gradients: tiny values, so an absolute floor relative to their scale.
    np.testing.assert_allclose(g_cls, r_cls, rtol=1e-4, atol=1e-6 * np.abs(r_cls).max())
    np.testing.assert_allclose(g_box, r_box, rtol=1e-4, atol=1e-6 * np.abs(r_box).max())


def test_matches_torchvision_with_focal_options():
    cls_logits, bbox_regression, boxes, labels = make_batch(seed=3, counts=(1, 5, 3))
    ours = retinanet_losses(
        cls_logits, bbox_regression, ANCHORS, boxes, labels, focal_alpha=0.5, focal_gamma=1.5
    )
    # torchvision's head hard-codes the defaults; patch the focal function it calls.
    orig = tv_retinanet.sigmoid_focal_loss
    try:
        tv_retinanet.sigmoid_focal_loss = lambda x, t, reduction: orig(
            x, t, alpha=0.5, gamma=1.5, reduction=reduction
        )
        ref = tv_compute_loss(cls_logits, bbox_regression, ANCHORS, boxes, labels, "l1")
    finally:
        tv_retinanet.sigmoid_focal_loss = orig
    np.testing.assert_allclose(float(ours["classification"]), ref["classification"], rtol=RTOL)


def test_global_normalization():
    cls_logits, bbox_regression, boxes, labels = make_batch(seed=4, counts=(5, 0, 1))
    per_image_sums, total_fg = {"classification": 0.0, "bbox_regression": 0.0}, 0
    for i in range(len(boxes)):
        one = slice(i, i + 1)
        ref = tv_compute_loss(cls_logits[one], bbox_regression[one], ANCHORS, boxes[one], labels[one], "l1")
        valid = labels[i] >= 0
        n_fg = 0
        if valid.any():
            iou = tv_retinanet.box_ops.box_iou(torch.tensor(boxes[i][valid]), torch.tensor(ANCHORS))
            n_fg = int((Matcher(0.5, 0.4, True)(iou) >= 0).sum())
        for k in per_image_sums:
            per_image_sums[k] += ref[k] * max(1, n_fg)  # undo torchvision's per-image division
        total_fg += n_fg
    ours = retinanet_losses(cls_logits, bbox_regression, ANCHORS, boxes, labels, normalization="global")
    for k in per_image_sums:
        np.testing.assert_allclose(float(ours[k]), per_image_sums[k] / max(1, total_fg), rtol=RTOL, err_msg=k)
    per_image = retinanet_losses(cls_logits, bbox_regression, ANCHORS, boxes, labels)
    assert abs(float(per_image["classification"]) - float(ours["classification"])) > 1e-3


def test_padding_invariance_of_losses_and_gradients():
    cls_logits, bbox_regression, boxes, labels = make_batch(seed=5)
    results = []
    for extra in (0, 5, 95):
        b, lab = pad_more(boxes, labels, extra)
        for box_loss in ("l1", "giou"):
            results.append(jax_value_and_grad(cls_logits, bbox_regression, b, lab, box_loss=box_loss))
    base = results[:2]
    for i, (vals, g_cls, g_box) in enumerate(results):
        ref_vals, ref_cls, ref_box = base[i % 2]
        assert vals == ref_vals
        np.testing.assert_array_equal(g_cls, ref_cls)
        np.testing.assert_array_equal(g_box, ref_box)


@pytest.mark.parametrize("box_loss", ["l1", "smooth_l1", "giou"])
def test_all_empty_batch(box_loss):
    cls_logits, bbox_regression, _, _ = make_batch(seed=6, counts=(0, 0))
    for g in (0, 4):
        boxes = np.zeros((2, g, 4), np.float32)
        labels = np.full((2, g), -1, np.int32)
        vals, g_cls, g_box = jax_value_and_grad(cls_logits, bbox_regression, boxes, labels, box_loss=box_loss)
        ref = tv_compute_loss(cls_logits, bbox_regression, ANCHORS, boxes, labels, box_loss)
        assert np.isfinite(vals["classification"]) and vals["classification"] > 0
        np.testing.assert_allclose(vals["classification"], ref["classification"], rtol=RTOL)
        assert vals["bbox_regression"] == 0.0 and ref["bbox_regression"] == 0.0
        assert np.all(np.isfinite(g_cls)) and np.any(g_cls != 0)
        np.testing.assert_array_equal(g_box, 0.0)


def test_extreme_head_outputs_give_finite_gradients():
    cls_logits, bbox_regression, boxes, labels = make_batch(seed=7)
    rng = np.random.default_rng(7)
    cls_logits = np.where(rng.random(cls_logits.shape) < 0.5, 1e4, -1e4).astype(np.float32)
    bbox_regression = (rng.standard_normal(bbox_regression.shape) * 1e3).astype(np.float32)
    for box_loss in ("l1", "smooth_l1", "giou"):
        vals, g_cls, g_box = jax_value_and_grad(cls_logits, bbox_regression, boxes, labels, box_loss=box_loss)
        assert all(np.isfinite(v) for v in vals.values()), (box_loss, vals)
        assert np.all(np.isfinite(g_cls)) and np.all(np.isfinite(g_box)), box_loss


def test_bf16_inputs_are_computed_in_f32_and_jit_matches_eager():
    cls_logits, bbox_regression, boxes, labels = make_batch(seed=8)
    c16 = jnp.asarray(cls_logits, jnp.bfloat16)
    r16 = jnp.asarray(bbox_regression, jnp.bfloat16)
    fn = jax.jit(lambda c, r, b, lab: retinanet_losses(c, r, ANCHORS, b, lab, box_loss="giou"))
    out16 = fn(c16, r16, boxes, labels)
    ref = retinanet_losses(
        c16.astype(jnp.float32), r16.astype(jnp.float32), ANCHORS, boxes, labels, box_loss="giou"
    )
    for k in ref:
        assert out16[k].dtype == jnp.float32
        np.testing.assert_allclose(float(out16[k]), float(ref[k]), rtol=1e-6, err_msg=k)


def test_class_weights_scale_classification_only():
    cls_logits, bbox_regression, boxes, labels = make_batch(seed=9)
    plain = retinanet_losses(cls_logits, bbox_regression, ANCHORS, boxes, labels)
    twos = np.full(NUM_CLASSES, 2.0)
    doubled = retinanet_losses(cls_logits, bbox_regression, ANCHORS, boxes, labels, class_weights=twos)
    np.testing.assert_allclose(
        float(doubled["classification"]), 2 * float(plain["classification"]), rtol=1e-6
    )
    assert float(doubled["bbox_regression"]) == float(plain["bbox_regression"])
    w = np.zeros(NUM_CLASSES, np.float32)
    w[0] = 1.0
    only0 = retinanet_losses(cls_logits, bbox_regression, ANCHORS, boxes, labels, class_weights=w)
    assert 0 < float(only0["classification"]) < float(plain["classification"])


def test_bad_arguments_raise():
    cls_logits, bbox_regression, boxes, labels = make_batch(seed=10)
    with pytest.raises(ValueError):
        retinanet_losses(cls_logits, bbox_regression, ANCHORS, boxes, labels, box_loss="iou")
    with pytest.raises(ValueError):
        retinanet_losses(cls_logits, bbox_regression, ANCHORS, boxes, labels, normalization="batch")
    with pytest.raises(ValueError):
        retinanet_losses(cls_logits, bbox_regression, ANCHORS[:-9], boxes, labels)


# ---- end to end: compute_losses on converted torchvision models --------------------------------


def test_compute_losses_uses_the_models_anchors():
    from retinanet_jax.models.retinanet import RetinaNet

    sizes = ((12, 16), (24, 32), (48, 64), (96, 128), (192, 256))
    ratios = ((0.5, 1.0, 2.0),) * 5
    model = RetinaNet(
        num_classes=3,
        backbone="resnet18",
        fpn_channels=32,
        num_anchors=6,
        anchor_sizes=sizes,
        aspect_ratios=ratios,
    )
    images = jnp.asarray(np.random.default_rng(0).normal(size=(1, 64, 96, 3)), jnp.float32)
    variables = model.init(jax.random.key(0), images)
    boxes = np.array([[[4, 6, 20, 18], [30, 10, 80, 60]]], np.float32)
    labels = np.array([[0, 2]], np.int32)
    got = compute_losses(model, variables, images, {"boxes": boxes, "labels": labels})
    out = model.apply(variables, images)
    want = retinanet_losses(
        out["cls_logits"],
        out["bbox_regression"],
        anchors_for_image((64, 96), sizes, ratios),
        boxes,
        labels,
        box_loss="l1",
    )
    for k in want:
        np.testing.assert_allclose(float(got[k]), float(want[k]), rtol=1e-6, err_msg=k)
    with pytest.raises(ValueError, match="num_anchors=9 but anchor_sizes"):
        model.clone(num_anchors=9).init(jax.random.key(0), images)


E2E_HW = (160, 224)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_compute_losses_matches_torchvision_model(variant):
    from tv_utils import make_jax_from_tv, nchw_to_nhwc, random_images

    tv_model, model, variables = make_jax_from_tv(variant)
    images = random_images(2, *E2E_HW, seed=11)
    rng = np.random.default_rng(11)
    boxes = np.zeros((2, 4, 4), np.float32)
    labels = np.full((2, 4), -1, np.int32)
    boxes[0, :3] = _boxes(rng, 3, E2E_HW)
    labels[0, :3] = [1, 17, 90]  # image 1 has no boxes

    with torch.no_grad():
        feats = list(tv_model.backbone(images).values())
        head_outputs = tv_model.head(feats)
        image_list = ImageList(images, [E2E_HW] * 2)
        anchors = tv_model.anchor_generator(image_list, feats)
        ref = tv_model.compute_loss(tv_targets(boxes, labels), head_outputs, anchors)
    np.testing.assert_array_equal(anchors[0].numpy(), anchors_for_image(E2E_HW))

    targets = {"boxes": boxes, "labels": labels}
    ours = jax.jit(lambda v, x, t: compute_losses(model, v, x, t))(variables, nchw_to_nhwc(images), targets)
    for k in ("classification", "bbox_regression"):
        assert float(ref[k]) > 0, k
        np.testing.assert_allclose(float(ours[k]), float(ref[k]), rtol=1e-4, err_msg=k)
