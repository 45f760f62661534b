"""Synthetic shapes dataset: determinism, splits, tight boxes, occlusion rule, speed."""

import time

import numpy as np
import pytest

from retinanet_jax.data.shapes import CLASS_NAMES, ShapesSource


def test_deterministic_and_well_formed():
    a, b = ShapesSource(num_images=30), ShapesSource(num_images=30)
    for i in (0, 7, 29):
        ea, eb = a[i], b[i]
        np.testing.assert_array_equal(ea["image"], eb["image"])
        np.testing.assert_array_equal(ea["boxes"], eb["boxes"])
        np.testing.assert_array_equal(ea["labels"], eb["labels"])
        assert ea["image"].shape == (256, 256, 3) and ea["image"].dtype == np.uint8
        assert ea["boxes"].dtype == np.float32 and ea["labels"].dtype == np.int32
        assert ea["image_id"] == i
    # Random access order does not matter.
    np.testing.assert_array_equal(ShapesSource(num_images=30)[7]["image"], a[7]["image"])
    assert not np.array_equal(a[0]["image"], ShapesSource(num_images=30, seed=1)[0]["image"])
    with pytest.raises(IndexError):
        a[30]


def test_splits_are_disjoint():
    train = ShapesSource("train", num_images=50)
    val = ShapesSource("validation", num_images=50)
    train_images = {train[i]["image"].tobytes() for i in range(50)}
    assert not train_images & {val[i]["image"].tobytes() for i in range(50)}


def test_boxes_are_tight_bounds_of_visible_shapes():
    src = ShapesSource(num_images=60, image_size=(96, 128), max_objects=8)
    counts, labels = [], []
    for i in range(60):
        ex, ids = src.generate(i)
        counts.append(len(ex["boxes"]))
        labels.extend(ex["labels"].tolist())
        assert ids.shape == (96, 128)
        assert set(np.unique(ids)) <= set(range(len(ex["boxes"]) + 1))
        for k, box in enumerate(ex["boxes"]):
            ys, xs = np.nonzero(ids == k + 1)
            np.testing.assert_array_equal(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            assert 0 <= box[0] < box[2] <= 128 and 0 <= box[1] < box[3] <= 96
    assert 0 in counts and max(counts) >= 4  # empty images and crowded ones both occur
    assert set(labels) == set(range(len(CLASS_NAMES)))


def test_mostly_hidden_shapes_are_removed():
    # Large shapes, many per image: heavy overlap, so the occlusion rule has work to do.
    kw = dict(num_images=150, image_size=64, max_objects=12, object_size=(0.5, 0.9), empty_fraction=0.0)
    strict, lenient = ShapesSource(min_visible=0.8, **kw), ShapesSource(min_visible=0.0, **kw)
    removed = 0
    for i in range(150):
        ex, ids = strict.generate(i)
        visible = np.bincount(ids.ravel(), minlength=len(ex["boxes"]) + 1)[1:]
        assert np.all(visible > 0)  # every labelled shape can be seen
        # Same random draws: the strict image keeps a subset of the lenient image's shapes.
        all_labels = list(lenient[i]["labels"])
        for label in ex["labels"]:
            all_labels.remove(label)
        removed += len(all_labels)
    assert removed > 0


def test_generation_is_fast():
    src = ShapesSource(num_images=200)
    src[0]
    # CPU time of this process, so other processes on a shared machine do not count.
    start = time.process_time()
    for i in range(100):
        src[i]
    per_image = (time.process_time() - start) / 100
    assert per_image < 5e-3, f"{per_image * 1e3:.2f} ms per 256x256 image"
