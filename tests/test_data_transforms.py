"""Host transforms (flip, padding, box padding) and the size rules they use from
imageprep.geometry: torchvision's resize rule, canvas buckets."""

import numpy as np
import pytest
import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from retinanet_jax.data import transforms
from retinanet_jax.data.errors import DataError
from retinanet_jax.imageprep import geometry


@pytest.mark.parametrize(
    "hw, min_size, max_size",
    [
        ((480, 640), 800, 1333),  # COCO landscape: upscale
        ((640, 427), 800, 1333),  # portrait
        ((333, 500), 800, 1333),
        ((100, 1000), 800, 1333),  # max_size binds
        ((1500, 1500), 800, 1333),  # downscale
        ((375, 500), 608, 1333),  # a multi-scale min_size
        ((256, 256), 512, 853),
        ((1, 7), 800, 1333),
    ],
)
def test_resize_matches_torchvision(hw, min_size, max_size):
    tv = GeneralizedRCNNTransform(min_size, max_size, [0.0] * 3, [1.0] * 3).eval()
    rng = np.random.default_rng(0)
    h, w = hw
    x1y1 = rng.uniform(0, 0.5, (5, 2)) * [w, h]
    boxes = np.concatenate([x1y1, x1y1 + rng.uniform(0.1, 0.5, (5, 2)) * [w, h]], 1)
    boxes = boxes.astype(np.float32)
    images, targets = tv(
        [torch.zeros(3, h, w)],
        [{"boxes": torch.from_numpy(boxes), "labels": torch.zeros(5, dtype=torch.int64)}],
    )
    expected_hw = tuple(images.image_sizes[0])
    assert geometry.resized_size(hw, min_size, max_size) == expected_hw
    ours = transforms.resize_boxes(boxes, hw, expected_hw)
    np.testing.assert_array_equal(ours, targets[0]["boxes"].numpy())  # same float32 ops
    resized = transforms.resize_image(np.zeros((h, w, 3), np.uint8), expected_hw)
    assert resized.shape == (*expected_hw, 3)


def test_hflip_is_an_involution_and_mirrors_boxes():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    boxes = np.array([[0, 1, 3, 5], [2.5, 0, 9, 6]], np.float32)
    flipped_image, flipped_boxes = transforms.hflip(image, boxes)
    np.testing.assert_allclose(flipped_boxes, [[6, 1, 9, 5], [0, 0, 6.5, 6]])
    np.testing.assert_array_equal(flipped_image[:, 0], image[:, -1])
    again_image, again_boxes = transforms.hflip(flipped_image, flipped_boxes)
    np.testing.assert_array_equal(again_image, image)
    np.testing.assert_allclose(again_boxes, boxes)


def test_buckets_and_padding():
    buckets = geometry.make_buckets(800, 1333)
    assert buckets == [(800, 800), (800, 1344), (1344, 800)]
    assert geometry.choose_bucket((800, 1066), buckets) == (800, 1344)
    assert geometry.choose_bucket((1066, 800), buckets) == (1344, 800)
    assert geometry.choose_bucket((800, 800), buckets) == (800, 800)
    with pytest.raises(ValueError, match=r"no canvas bucket fits .*\(1400, 10\)"):
        geometry.choose_bucket((1400, 10), buckets)
    # Every resized image, any orientation, fits a default bucket.
    for hw in [(480, 640), (640, 480), (1, 1000), (1000, 1), (333, 333)]:
        geometry.choose_bucket(geometry.resized_size(hw, 800, 1333), buckets)

    image = np.full((3, 5, 3), 200, np.uint8)
    canvas = transforms.pad_image(image, (4, 8))
    assert canvas.shape == (4, 8, 3)
    np.testing.assert_array_equal(canvas[:3, :5], image)
    assert canvas[3:].sum() == 0 and canvas[:, 5:].sum() == 0
    with pytest.raises(ValueError, match="does not fit canvas"):
        transforms.pad_image(image, (2, 8))


def test_pad_boxes():
    boxes = np.arange(12, dtype=np.float32).reshape(3, 4)
    labels = np.array([4, 0, 2], np.int32)
    pb, pl, dropped = transforms.pad_boxes(boxes, labels, 5)
    np.testing.assert_array_equal(pb[:3], boxes)
    np.testing.assert_array_equal(pb[3:], 0)
    np.testing.assert_array_equal(pl, [4, 0, 2, -1, -1])
    assert dropped == 0 and pb.dtype == np.float32 and pl.dtype == np.int32
    pb, pl, dropped = transforms.pad_boxes(np.zeros((0, 4), np.float32), np.zeros(0, np.int32), 2)
    np.testing.assert_array_equal(pl, [-1, -1])
    with pytest.raises(DataError, match="image_id 3: 3 boxes exceed max_boxes=2"):
        transforms.pad_boxes(boxes, labels, 2, where="image_id 3")
    pb, pl, dropped = transforms.pad_boxes(boxes, labels, 2, overflow="truncate")
    np.testing.assert_array_equal(pl, [4, 0])
    np.testing.assert_array_equal(pb, boxes[:2])
    assert dropped == 1


def test_train_transform_resizes_flips_and_pads():
    image = np.zeros((30, 40, 3), np.uint8)
    image[:, :20] = 255  # left half white
    example = {
        "image": image,
        "boxes": np.array([[0, 0, 20, 30]], np.float32),
        "labels": np.array([1], np.int32),
        "image_id": 5,
    }
    seen = set()
    for seed in range(12):
        out = transforms.train_transform(
            example,
            np.random.default_rng(seed),
            min_sizes=(45, 60),
            max_size=100,
            canvas_hw=(64, 96),
            max_boxes=3,
        )
        h, w = out["image_size"]
        assert (h, w) in {(45, 60), (60, 80)}
        assert out["image"].shape == (64, 96, 3)
        assert out["image"][h:].sum() == 0 and out["image"][:, w:].sum() == 0
        np.testing.assert_array_equal(out["labels"], [1, -1, -1])
        flipped = out["boxes"][0, 0] > 0
        # The box follows the white half: left unless flipped.
        expected = [w / 2, 0, w, h] if flipped else [0, 0, w / 2, h]
        np.testing.assert_allclose(out["boxes"][0], expected)
        assert out["image"][h // 2, w // 4].mean() == (0 if flipped else 255)
        seen.add(((h, w), bool(flipped)))
    assert len(seen) == 4  # both scales and both flips occur
