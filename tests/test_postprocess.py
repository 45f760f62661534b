"""postprocess equals torchvision RetinaNet.postprocess_detections on the same head outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.detection import retinanet as tv_retinanet

from retinanet_jax.inference.postprocess import postprocess
from retinanet_jax.ops.anchors import anchors_for_image, num_anchors_per_level

K = 91
HW = (160, 224)  # padded canvas


@pytest.fixture(scope="module")
def tv_model():
    # The head is not used: postprocess_detections only reads the thresholds and the box coder.
    # A tiny stand-in backbone keeps the model cheap; the defaults are torchvision's.
    torch.manual_seed(0)
    backbone = torch.nn.Module()
    backbone.out_channels = 4
    return tv_retinanet.RetinaNet(backbone, num_classes=K).eval()


def _head_outputs(rng, batch, logit_mean, logit_std=1.2):
    anchors = anchors_for_image(HW)
    a = anchors.shape[0]
    logits = rng.normal(logit_mean, logit_std, (batch, a, K)).astype(np.float32)
    # Distinct scores: torchvision's order among ties is unspecified.
    logits += rng.uniform(0, 1e-3, logits.shape).astype(np.float32)
    deltas = rng.normal(0, 0.4, (batch, a, 4)).astype(np.float32)
    return logits, deltas, anchors


_TV_DEFAULTS = dict(score_thresh=0.05, topk_candidates=1000, nms_thresh=0.5, detections_per_img=300)


def _torchvision(model, logits, deltas, anchors, image_sizes, **overrides):
    levels = list(num_anchors_per_level(HW))
    split = lambda x: list(torch.from_numpy(x).split(levels, dim=1))  # noqa: E731
    head = {"cls_logits": split(logits), "bbox_regression": split(deltas)}
    anc = [list(torch.from_numpy(anchors.copy()).split(levels))] * len(logits)
    for name, value in {**_TV_DEFAULTS, **overrides}.items():
        setattr(model, name, value)
    with torch.no_grad():
        return model.postprocess_detections(head, anc, [tuple(map(int, s)) for s in image_sizes])


def _check_equal(out, ref):
    boxes, scores, labels, num = (np.asarray(x) for x in out)
    d = boxes.shape[1]
    for i, r in enumerate(ref):
        n = int(num[i])
        assert n == len(r["scores"]), (i, n, len(r["scores"]))
        np.testing.assert_array_equal(labels[i, :n], r["labels"].numpy())
        np.testing.assert_allclose(scores[i, :n], r["scores"].numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(boxes[i, :n], r["boxes"].numpy(), rtol=1e-6, atol=1e-4)
        # Padding rows.
        np.testing.assert_array_equal(boxes[i, n:], np.zeros((d - n, 4)))
        np.testing.assert_array_equal(scores[i, n:], 0)
        np.testing.assert_array_equal(labels[i, n:], -1)


def test_matches_torchvision_many_candidates(tv_model):
    # ~4% of scores pass 0.05: every level but P7 is cut by the top-1000 rule, ~4k candidates
    # reach NMS (torchvision's per-class batched_nms path), and 300 detections come out.
    rng = np.random.default_rng(0)
    logits, deltas, anchors = _head_outputs(rng, 2, -5.0)
    sizes = np.array([[150, 224], [160, 97]], np.int32)
    ref = _torchvision(tv_model, logits, deltas, anchors, sizes)
    out = postprocess(logits, deltas, anchors, num_anchors_per_level(HW), sizes)
    assert [len(r["scores"]) for r in ref] == [300, 300]
    _check_equal(out, ref)
    # Clipping to each image's own size happened.
    assert np.asarray(out[0])[1, :, 0::2].max() <= 97
    # All NMS survivors, so that every one of the per-level top-1000 candidates matters.
    ref = _torchvision(tv_model, logits, deltas, anchors, sizes, detections_per_img=5000)
    out = postprocess(logits, deltas, anchors, num_anchors_per_level(HW), sizes, detections_per_img=5000)
    assert all(len(r["scores"]) > 2000 for r in ref)
    _check_equal(out, ref)


def test_matches_torchvision_few_candidates(tv_model):
    # Few hundred candidates (torchvision's coordinate-trick NMS path), fewer than 300 kept.
    rng = np.random.default_rng(1)
    logits, deltas, anchors = _head_outputs(rng, 2, -5.5)
    logits[:, :, 3:] -= 10  # only three lively classes: same-class overlaps for NMS to resolve
    sizes = np.array([[160, 224], [131, 200]], np.int32)
    ref = _torchvision(tv_model, logits, deltas, anchors, sizes)
    out = postprocess(logits, deltas, anchors, num_anchors_per_level(HW), sizes)
    assert all(50 < len(r["scores"]) < 300 for r in ref)
    _check_equal(out, ref)


def test_class_agnostic_matches_torchvision_with_plain_nms(tv_model, monkeypatch):
    rng = np.random.default_rng(2)
    logits, deltas, anchors = _head_outputs(rng, 1, -5.0)
    sizes = np.array([[160, 224]], np.int32)
    monkeypatch.setattr(tv_retinanet.box_ops, "batched_nms", lambda b, s, i, t: torchvision.ops.nms(b, s, t))
    ref = _torchvision(tv_model, logits, deltas, anchors, sizes)
    out = postprocess(logits, deltas, anchors, num_anchors_per_level(HW), sizes, class_agnostic=True)
    _check_equal(out, ref)
    aware = postprocess(logits, deltas, anchors, num_anchors_per_level(HW), sizes)
    assert int(out[3][0]) < int(aware[3][0]) or not np.array_equal(np.asarray(out[2]), np.asarray(aware[2]))


def test_overrides_and_empty_image(tv_model):
    rng = np.random.default_rng(3)
    logits, deltas, anchors = _head_outputs(rng, 2, -5.0)
    logits[1] = -20.0  # nothing passes the score threshold
    sizes = np.array([[160, 224], [160, 224]], np.int32)
    kw = dict(score_thresh=0.2, topk_candidates=150, nms_thresh=0.3, detections_per_img=50)
    ref = _torchvision(tv_model, logits, deltas, anchors, sizes, **kw)
    out = postprocess(logits, deltas, anchors, num_anchors_per_level(HW), sizes, **kw)
    assert np.asarray(out[0]).shape == (2, 50, 4)
    assert int(out[3][0]) == 50 and int(out[3][1]) == 0
    _check_equal(out, ref)


def test_batch_rows_independent_under_jit():
    rng = np.random.default_rng(4)
    logits, deltas, anchors = _head_outputs(rng, 3, -6.0)
    sizes = np.array([[160, 224], [120, 224], [160, 150]], np.int32)
    levels = num_anchors_per_level(HW)
    # Inside an outer jit, bf16 inputs (computed in float32), level sizes as a list.
    full = jax.jit(lambda lg, dl: postprocess(lg, dl, anchors, list(levels), sizes))(
        jnp.asarray(logits, jnp.bfloat16), jnp.asarray(deltas, jnp.bfloat16)
    )
    assert full[0].dtype == full[1].dtype == jnp.float32 and full[2].dtype == full[3].dtype == jnp.int32
    logits = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
    deltas = np.asarray(jnp.asarray(deltas, jnp.bfloat16).astype(jnp.float32))
    for i in range(3):
        one = postprocess(logits[i : i + 1], deltas[i : i + 1], anchors, levels, sizes[i : i + 1])
        for a, b in zip(full, one):
            np.testing.assert_array_equal(np.asarray(a)[i], np.asarray(b)[0])


def test_rejects_wrong_level_sizes():
    rng = np.random.default_rng(5)
    logits, deltas, anchors = _head_outputs(rng, 1, -6.0)
    with pytest.raises(ValueError, match="level_sizes"):
        postprocess(logits, deltas, anchors, (10, 20), np.array([[160, 224]]))
