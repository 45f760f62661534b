"""Jit NMS keeps exactly what torchvision.ops.batched_nms / nms keep, in the same order."""

import functools

import jax
import numpy as np
import pytest
import torch
import torchvision

from retinanet_jax.ops.nms import _f32_threshold, batched_nms_padded


@functools.partial(
    jax.jit,
    static_argnames=(
        "iou_threshold",
        "max_output",
        "class_agnostic",
        "tile_size",
        "coordinate_trick_max_boxes",
    ),
)
def nms(
    boxes,
    scores,
    labels,
    valid,
    iou_threshold,
    max_output,
    class_agnostic=False,
    tile_size=256,
    coordinate_trick_max_boxes=1000,
):
    return batched_nms_padded(
        boxes,
        scores,
        labels,
        valid,
        iou_threshold,
        max_output,
        class_agnostic,
        tile_size=tile_size,
        coordinate_trick_max_boxes=coordinate_trick_max_boxes,
    )


def _scores(rng, n):
    # Distinct scores: torchvision's order among ties is unspecified.
    return (rng.permutation(n).astype(np.float32) + 1) / (n + 1)


def _uniform_boxes(rng, n, size=800.0, max_wh=150.0):
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(2, max_wh, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def _clustered_boxes(rng, n, clusters=40, size=800.0):
    # Many near-duplicates around a few objects: long suppression chains.
    centre = rng.uniform(0, size, (clusters, 2))
    wh = rng.uniform(20, 200, (clusters, 2))
    k = rng.integers(0, clusters, n)
    xy = centre[k] + rng.normal(0, 0.08, (n, 2)) * wh[k]
    w = wh[k] * np.exp(rng.normal(0, 0.1, (n, 2)))
    return np.concatenate([xy, xy + w], 1).astype(np.float32)


def _reference(boxes, scores, labels, thr, agnostic=False):
    b, s = torch.from_numpy(boxes), torch.from_numpy(scores)
    if agnostic:
        return torchvision.ops.nms(b, s, thr).numpy()
    return torchvision.ops.batched_nms(b, s, torch.from_numpy(labels), thr).numpy()


def _check(keep, num, ref, max_output):
    keep, num = np.asarray(keep), int(num)
    expect = ref[:max_output]
    assert num == len(expect)
    np.testing.assert_array_equal(keep[:num], expect)
    np.testing.assert_array_equal(keep[num:], -1)


@pytest.mark.parametrize(
    "kind,n,classes,thr,max_output",
    [
        ("uniform", 400, 3, 0.5, 400),  # light overlap; <=1000 boxes: coordinate-trick path
        ("clustered", 900, 5, 0.5, 900),  # heavy overlap, trick path
        ("clustered", 1500, 1, 0.5, 1500),  # heavy overlap, single class, > 1 tile
        ("clustered", 2000, 80, 0.4, 2000),  # many classes; torchvision's per-class path
        ("uniform", 2000, 80, 0.7, 100),  # truncated to max_output
    ],
)
def test_matches_torchvision_batched_nms(kind, n, classes, thr, max_output):
    rng = np.random.default_rng(n + classes)
    boxes = (_clustered_boxes if kind == "clustered" else _uniform_boxes)(rng, n)
    scores, labels = _scores(rng, n), rng.integers(0, classes, n).astype(np.int32)
    ref = _reference(boxes, scores, labels, thr)
    assert 0.02 * n < len(ref) < n  # suppression actually happened
    keep, num = nms(boxes, scores, labels, np.ones(n, bool), thr, max_output)
    _check(keep, num, ref, max_output)


@pytest.mark.parametrize("tile_size", [1, 7, 64, 512])
def test_tile_size_does_not_change_result(tile_size):
    rng = np.random.default_rng(1)
    boxes, scores = _clustered_boxes(rng, 300, clusters=10), _scores(rng, 300)
    labels = rng.integers(0, 2, 300).astype(np.int32)
    keep, num = nms(boxes, scores, labels, np.ones(300, bool), 0.5, 300, tile_size=tile_size)
    _check(keep, num, _reference(boxes, scores, labels, 0.5), 300)


def test_class_agnostic_equals_torchvision_nms():
    rng = np.random.default_rng(2)
    boxes, scores = _clustered_boxes(rng, 1200), _scores(rng, 1200)
    labels = rng.integers(0, 10, 1200).astype(np.int32)
    keep, num = nms(boxes, scores, labels, np.ones(1200, bool), 0.5, 1200, class_agnostic=True)
    ref = _reference(boxes, scores, labels, 0.5, agnostic=True)
    assert len(ref) < len(_reference(boxes, scores, labels, 0.5))
    _check(keep, num, ref, 1200)


def test_different_labels_never_suppress():
    boxes = np.tile(np.array([[10, 10, 50, 50]], np.float32), (6, 1))
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], np.float32)
    labels = np.array([0, 1, 2, 0, 1, 2], np.int32)
    keep, num = nms(boxes, scores, labels, np.ones(6, bool), 0.5, 6)
    assert int(num) == 3
    np.testing.assert_array_equal(np.asarray(keep), [0, 1, 2, -1, -1, -1])


def test_valid_mask_ignores_entries():
    rng = np.random.default_rng(3)
    n = 1500
    boxes, scores = _clustered_boxes(rng, n), _scores(rng, n)
    labels = rng.integers(0, 4, n).astype(np.int32)
    valid = rng.uniform(size=n) < 0.6
    # Invalid entries get the highest scores: they must neither be kept nor suppress anything.
    scores = np.where(valid, scores, scores + 2).astype(np.float32)
    idx = np.flatnonzero(valid)
    ref = idx[_reference(boxes[idx], scores[idx], labels[idx], 0.5)]
    keep, num = nms(boxes, scores, labels, valid, 0.5, n)
    _check(keep, num, ref, n)


def test_no_valid_boxes():
    boxes = np.zeros((10, 4), np.float32)
    keep, num = nms(boxes, np.ones(10, np.float32), np.zeros(10, np.int32), np.zeros(10, bool), 0.5, 5)
    assert int(num) == 0
    np.testing.assert_array_equal(np.asarray(keep), -1)


def test_strict_threshold():
    # IoU exactly 0.5 (inter 50, union 100) does not suppress; just above does.
    boxes = np.array([[0, 0, 10, 7.5], [0, 2.5, 10, 10], [20, 0, 30, 10], [20, 0, 30, 10.1]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
    keep, num = nms(boxes, scores, np.zeros(4, np.int32), np.ones(4, bool), 0.5, 4)
    assert int(num) == len(_reference(boxes, scores, np.zeros(4, np.int64), 0.5)) == 3
    np.testing.assert_array_equal(np.asarray(keep)[:3], [0, 1, 2])


def test_threshold_compared_like_a_double():
    # torchvision compares float32 IoUs against a float64 threshold.
    for t in [0.45, 0.5, 0.3, 0.7, 1 / 3]:
        t32 = _f32_threshold(t)
        x = np.float32(t)
        for xi in [np.nextafter(x, np.float32(0)), x, np.nextafter(x, np.float32(1))]:
            assert (xi > t32) == (float(xi) > t), (t, xi)


def test_coordinate_trick_rounding_like_torchvision():
    # <= 1000 boxes: torchvision shifts each class by label * (max + 1) before NMS; at x ~ 8e4
    # float32 spacing is 1/128, which moves this pair's IoU from just above 0.5 to just below.
    boxes = np.array([[0, 0, 10, 10], [3.3325, 0, 13.3325, 10], [990, 990, 1000, 1000]], np.float32)
    scores = np.array([0.9, 0.8, 0.1], np.float32)
    labels = np.array([79, 79, 0], np.int32)
    ref = _reference(boxes, scores, labels, 0.5)
    np.testing.assert_array_equal(ref, [0, 1, 2])
    keep, num = nms(boxes, scores, labels, np.ones(3, bool), 0.5, 3)
    _check(keep, num, ref, 3)
    # Without the shift the exact geometry suppresses box 1 (what torchvision.ops.nms does).
    keep, num = nms(boxes, scores, labels, np.ones(3, bool), 0.5, 3, coordinate_trick_max_boxes=0)
    _check(keep, num, torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.5).numpy(), 3)
    assert int(num) == 2


def test_vmap_over_batch():
    rng = np.random.default_rng(4)
    b = np.stack([_clustered_boxes(rng, 500) for _ in range(3)])
    s = np.stack([_scores(rng, 500) for _ in range(3)])
    lab = rng.integers(0, 3, (3, 500)).astype(np.int32)
    valid = np.ones((3, 500), bool)
    valid[1, 250:] = False
    batched = jax.jit(jax.vmap(lambda *a: batched_nms_padded(*a, 0.5, 200)))
    keep, num = batched(b, s, lab, valid)
    for i in range(3):
        idx = np.flatnonzero(valid[i])
        ref = idx[_reference(b[i][idx], s[i][idx], lab[i][idx], 0.5)]
        _check(keep[i], num[i], ref, 200)


@pytest.mark.slow  # N=5000 vs torchvision, a few seconds on a loaded CPU
def test_n5000_matches_torchvision():
    rng = np.random.default_rng(5)
    n = 5000
    boxes = np.concatenate([_clustered_boxes(rng, n // 2, clusters=100), _uniform_boxes(rng, n // 2)])
    scores, labels = _scores(rng, n), rng.integers(0, 80, n).astype(np.int32)
    ref = _reference(boxes, scores, labels, 0.5)
    for max_output in (300, n):
        keep, num = nms(boxes, scores, labels, np.ones(n, bool), 0.5, max_output)
        _check(keep, num, ref, max_output)
