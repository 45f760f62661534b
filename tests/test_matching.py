"""retinanet_jax.objective.matching against torchvision's Matcher(0.5, 0.4,
allow_low_quality_matches=True)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.detection._utils import Matcher

from retinanet_jax.objective.matching import match_anchors
from retinanet_jax.ops.anchors import anchors_for_image


def tv_match(anchors, gt_boxes, fg=0.5, bg=0.4, low_quality=True):
    """What torchvision's RetinaNet.compute_loss computes for one image (no padding)."""
    if len(gt_boxes) == 0:
        return np.full(len(anchors), -1, np.int64)
    iou = torchvision.ops.box_iou(torch.tensor(gt_boxes), torch.tensor(anchors))
    return Matcher(fg, bg, allow_low_quality_matches=low_quality)(iou).numpy()


def pad_gt(boxes, labels, n_pad, rng=None):
    """Appends ``n_pad`` padding rows (junk boxes if rng, else zeros), label -1."""
    if rng is None:
        pad_boxes = np.zeros((n_pad, 4), np.float32)
    else:
        pad_boxes = random_boxes(rng, n_pad, 200.0)
    return (
        np.concatenate([boxes, pad_boxes]).astype(np.float32),
        np.concatenate([labels, np.full(n_pad, -1)]).astype(np.int32),
    )


def random_boxes(rng, n, scale, integer=False):
    xy = rng.random((n, 2)) * scale
    wh = rng.random((n, 2)) * scale * 0.6 + 4
    boxes = np.concatenate([xy, xy + wh], axis=1)
    if integer:
        boxes = np.round(boxes)
    return boxes.astype(np.float32)


ANCHORS = anchors_for_image((128, 160))  # real anchor set: many exact IoU ties between anchors


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("integer", [False, True])
def test_matches_torchvision_on_random_gt(seed, integer):
    rng = np.random.default_rng(seed)
    g = int(rng.integers(1, 12))
    gt = random_boxes(rng, g, 140.0, integer=integer)
    if integer and g > 1:
        gt[-1] = gt[0]  # duplicate box: argmax tie must pick the first
    labels = rng.integers(0, 5, g).astype(np.int32)
    ref = tv_match(ANCHORS, gt)
    ours = np.asarray(match_anchors(ANCHORS, gt, labels))
    assert ours.dtype == np.int32
    np.testing.assert_array_equal(ours, ref)
    assert (ref >= 0).any() and (ref == -1).any()


def test_matches_torchvision_without_low_quality_and_other_thresholds():
    rng = np.random.default_rng(10)
    gt = random_boxes(rng, 7, 140.0, integer=True)
    labels = np.zeros(7, np.int32)
    for fg, bg, lq in [(0.5, 0.4, False), (0.6, 0.3, True), (0.5, 0.5, True)]:
        ours = np.asarray(match_anchors(ANCHORS, gt, labels, fg_iou=fg, bg_iou=bg, allow_low_quality=lq))
        np.testing.assert_array_equal(ours, tv_match(ANCHORS, gt, fg, bg, lq))


def test_threshold_boundaries_and_ties():
    anchors = np.array(
        [
            [0, 0, 10, 10],  # IoU 0.5 exactly with gt0 -> foreground (>= 0.5)
            [0, 0, 10, 10],  # duplicate anchor
            [0, 20, 10, 30],  # IoU 0.4 exactly with gt1 -> between (>= 0.4, < 0.5)
            [100, 100, 110, 110],  # touches nothing
        ],
        np.float32,
    )
    gt = np.array([[0, 0, 10, 5], [0, 20, 10, 24], [0, 0, 10, 5]], np.float32)  # gt2 == gt0
    labels = np.array([3, 4, 5], np.int32)
    ours = np.asarray(match_anchors(anchors, gt, labels, allow_low_quality=False))
    np.testing.assert_array_equal(ours, [0, 0, -2, -1])
    np.testing.assert_array_equal(ours, tv_match(anchors, gt, low_quality=False))
    # Low-quality: gt1's best anchor (IoU 0.4) is re-matched to gt1.
    ours = np.asarray(match_anchors(anchors, gt, labels))
    np.testing.assert_array_equal(ours, [0, 0, 1, -1])
    np.testing.assert_array_equal(ours, tv_match(anchors, gt))


def test_low_quality_match_goes_to_the_anchors_best_gt():
    """set_low_quality_matches_ restores the anchor's argmax, not the gt that selected it."""
    anchors = np.array([[0, 0, 10, 10], [0, -2, 10, 3], [50, 50, 60, 60]], np.float32)
    # gt0: IoU 0.3 with anchor0, 0.6 with anchor1 (its best). gt1: IoU 0.2 with anchor0, its
    # best, so anchor0 is re-matched -- to its own argmax gt0, not to gt1.
    gt = np.array([[0, 0, 10, 3], [0, 8, 10, 10]], np.float32)
    labels = np.array([1, 2], np.int32)
    ours = np.asarray(match_anchors(anchors, gt, labels))
    np.testing.assert_array_equal(ours, [0, 0, -1])
    np.testing.assert_array_equal(ours, tv_match(anchors, gt))


def test_low_quality_ties_all_anchors_matched():
    gt = np.array([[37, 41, 45, 47]], np.float32)  # tiny: best IoU well below 0.4, many ties
    ref = tv_match(ANCHORS, gt)
    ours = np.asarray(match_anchors(ANCHORS, gt, np.zeros(1, np.int32)))
    np.testing.assert_array_equal(ours, ref)
    assert (ours == 0).sum() >= 2  # several anchors tie for the best IoU


def test_zero_area_gt_matches_torchvision():
    # IoU 0 with every anchor, so every anchor ties for its best: torchvision matches them all.
    gt = np.array([[30, 30, 80, 90], [50, 50, 50, 70]], np.float32)
    ours = np.asarray(match_anchors(ANCHORS, gt, np.array([1, 2], np.int32)))
    np.testing.assert_array_equal(ours, tv_match(ANCHORS, gt))


@pytest.mark.parametrize("junk", [False, True])
def test_padding_invariance(junk):
    rng = np.random.default_rng(4)
    gt = random_boxes(rng, 5, 140.0, integer=True)
    labels = np.arange(5, dtype=np.int32)
    results = []
    for n_pad in (0, 5, 95):
        b, lab = pad_gt(gt, labels, n_pad, rng if junk else None)
        results.append(np.asarray(match_anchors(ANCHORS, b, lab)))
    np.testing.assert_array_equal(results[1], results[0])
    np.testing.assert_array_equal(results[2], results[0])
    np.testing.assert_array_equal(results[0], tv_match(ANCHORS, gt))


def test_interleaved_padding_indexes_the_padded_rows():
    rng = np.random.default_rng(5)
    gt = random_boxes(rng, 4, 140.0)
    padded = np.zeros((9, 4), np.float32)
    labels = np.full(9, -1, np.int32)
    rows = np.array([1, 3, 4, 8])
    padded[rows] = gt
    padded[[0, 2, 5, 6, 7]] = random_boxes(rng, 5, 140.0)  # junk under padding labels
    labels[rows] = 0
    ours = np.asarray(match_anchors(ANCHORS, padded, labels))
    ref = tv_match(ANCHORS, gt)
    np.testing.assert_array_equal(ours, np.where(ref >= 0, rows[np.maximum(ref, 0)], ref))


def test_no_valid_boxes_is_all_background():
    rng = np.random.default_rng(6)
    junk = random_boxes(rng, 6, 140.0)
    ours = np.asarray(match_anchors(ANCHORS, junk, np.full(6, -1, np.int32)))
    np.testing.assert_array_equal(ours, np.full(len(ANCHORS), -1))
    empty = np.asarray(match_anchors(ANCHORS, np.zeros((0, 4), np.float32), np.zeros(0, np.int32)))
    np.testing.assert_array_equal(empty, np.full(len(ANCHORS), -1))


def test_batched_under_jit_equals_per_image():
    rng = np.random.default_rng(7)
    boxes, labels = [], []
    for g in (3, 0, 7):
        b, lab = pad_gt(random_boxes(rng, g, 140.0), rng.integers(0, 3, g), 10 - g, rng)
        boxes.append(b)
        labels.append(lab)
    boxes, labels = np.stack(boxes), np.stack(labels)
    # The loss matches a batch as vmap(match_anchors) over images sharing one anchor set.
    batched = jax.jit(jax.vmap(match_anchors, in_axes=(None, 0, 0)))(jnp.asarray(ANCHORS), boxes, labels)
    assert batched.shape == (3, len(ANCHORS)) and batched.dtype == jnp.int32
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(batched[i]), tv_match(ANCHORS, boxes[i][labels[i] >= 0]))


def test_bg_above_fg_raises():
    with pytest.raises(ValueError):
        match_anchors(ANCHORS, np.zeros((1, 4), np.float32), np.zeros(1, np.int32), fg_iou=0.4, bg_iou=0.5)
