"""Sliced prediction (inference/tiling.py): grid, merge across tiles on the device, memory bound,
and the real detector through the tile path; plus the downscaled overlays of the CLI.

The merge tests use a detector whose output we control: ``predictor.detect`` is replaced by a
function that finds pure-colour squares in the (normalized) tile pixels and boxes their visible
part, clipped at the tile edge as a real detector boxes a cut object, with cut boxes scoring
*higher* than whole ones (so that a plain NMS would keep the wrong one). Everything after it,
the offsets, cut flags, the candidate buffer and the merge, is the real device path.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from detection_utils import lively_variables
from PIL import Image
from scipy import ndimage

import retinanet_jax as rj
from retinanet_jax.inference import tiling
from retinanet_jax.inference.predict import Predictor

COLOURS = np.asarray([(255, 0, 0), (0, 255, 0), (0, 0, 255)], np.uint8)  # label = index
MEAN, STD = np.asarray((0.485, 0.456, 0.406)), np.asarray((0.229, 0.224, 0.225))


# ------------------------------------------------------------------------------ the fake detector


def find_squares(pixels: np.ndarray) -> list[tuple[tuple[int, int, int, int], int]]:
    """((x1, y1, x2, y2), label) of every pure-colour blob in uint8 ``pixels`` [h, w, 3]."""
    out = []
    for label, colour in enumerate(COLOURS):
        comps, _ = ndimage.label(np.all(pixels == colour, axis=-1))
        for sl in ndimage.find_objects(comps):
            out.append(((sl[1].start, sl[0].start, sl[1].stop, sl[0].stop), label))
    return out


def fake_detect(batch, image_sizes, original_sizes, d: int = 32):
    """Stands in for ``Predictor.detect``: same inputs, same outputs (device arrays)."""
    x = np.asarray(jax.device_get(batch))
    pixels = np.rint((x * STD + MEAN) * 255).clip(0, 255).astype(np.uint8)
    b = len(x)
    boxes, scores = np.zeros((b, d, 4), np.float32), np.zeros((b, d), np.float32)
    labels, num = np.full((b, d), -1, np.int32), np.zeros((b,), np.int32)
    for i in range(b):
        h, w = (int(v) for v in image_sizes[i])
        ratio = np.asarray(original_sizes[i], np.float32) / np.asarray(image_sizes[i], np.float32)
        found = find_squares(pixels[i, :h, :w])
        for j, ((x1, y1, x2, y2), label) in enumerate(found[:d]):
            cut = x1 == 0 or y1 == 0 or x2 == w or y2 == h
            boxes[i, j] = np.asarray([x1, y1, x2, y2], np.float32) * ratio[[1, 0, 1, 0]]
            scores[i, j], labels[i, j] = (0.9 if cut else 0.8) - 1e-4 * j, label
        num[i] = min(len(found), d)
        order = np.argsort(-scores[i, : num[i]], kind="stable")
        boxes[i, : num[i]], scores[i, : num[i]], labels[i, : num[i]] = (
            boxes[i, order],
            scores[i, order],
            labels[i, order],
        )
    return jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(labels), jnp.asarray(num)


def fake_predictor(**kw) -> Predictor:
    p = Predictor(rj.RetinaNet(num_classes=3, backbone="resnet18"), {}, **kw)
    p.detect = fake_detect
    return p


def iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def scene(h: int, w: int, tile: int, overlap: float, seed: int = 0):
    """Noise background (values 30..220: never a pure colour) with squares pasted: in tile
    interiors, across vertical and horizontal tile borders, over 4-tile corners, and some wider
    than the overlap (cut in every tile that sees them). Returns (image, [(box, label)])."""
    rng = np.random.default_rng(seed)
    image = rng.integers(30, 221, (h, w, 3), dtype=np.uint8)
    grid = tiling.tile_grid((h, w), (tile, tile), overlap)
    xs, ys = sorted({int(v) for v in grid[:, 1]}), sorted({int(v) for v in grid[:, 0]})
    ov = tile - (xs[1] - xs[0])
    objects, taken = [], np.zeros((h, w), bool)

    def paste(x, y, size):
        x, y = int(np.clip(x, 0, w - size)), int(np.clip(y, 0, h - size))
        if taken[max(0, y - 8) : y + size + 8, max(0, x - 8) : x + size + 8].any():
            return
        label = len(objects) % 3
        image[y : y + size, x : x + size] = COLOURS[label]
        taken[y : y + size, x : x + size] = True
        objects.append(((x, y, x + size, y + size), label))

    for i, x0 in enumerate(xs[1:], 1):
        for j, y0 in enumerate(ys[1:], 1):
            s = int(rng.integers(24, 60))
            kind = (i + j) % 4
            if kind == 0:  # across the left border of tile (j, i)
                paste(x0 - s // 2, y0 + tile // 2, s)
            elif kind == 1:  # across the top border
                paste(x0 + tile // 2, y0 - s // 2, s)
            elif kind == 2:  # over the corner where 4 tiles meet
                paste(x0 + ov // 2 - s // 2, y0 + ov // 2 - s // 2, s)
            else:  # wider than the overlap, across the border: cut in both tiles
                big = ov + 60
                paste(x0 + ov // 2 - big // 2, y0 + tile // 3, big)
            paste(x0 + tile // 2 + 20, y0 + tile // 2 + 20, int(rng.integers(16, 40)))  # inside
    return image, objects


def crop_reference(image, box, tile):
    """The fake detector's box for the object at ``box`` on a tile-sized crop centred on it."""
    h, w = image.shape[:2]
    cx, cy = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
    x0, y0 = int(np.clip(cx - tile // 2, 0, w - tile)), int(np.clip(cy - tile // 2, 0, h - tile))
    for (x1, y1, x2, y2), label in find_squares(image[y0 : y0 + tile, x0 : x0 + tile]):
        if x1 + x0 <= cx < x2 + x0 and y1 + y0 <= cy < y2 + y0:
            return (x1 + x0, y1 + y0, x2 + x0, y2 + y0), label
    raise AssertionError(f"crop misses {box}")


# ------------------------------------------------------------------------------ grid


@pytest.mark.parametrize(
    "hw,tile,overlap",
    [
        ((4000, 6000), (512, 512), 0.25),
        ((100, 1000), (256, 300), 0.2),
        ((200, 200), (256, 256), 0.5),
        ((513, 512), (512, 512), 0.0),
    ],
)
def test_tile_grid_covers_the_image_with_the_overlap(hw, tile, overlap):
    grid = tiling.tile_grid(hw, tile, overlap)
    covered = np.zeros(hw, np.int32)
    for y, x, h, w in grid:
        assert 0 <= y and y + h <= hw[0] and 0 <= x and x + w <= hw[1]
        assert (h, w) == (min(tile[0], hw[0]), min(tile[1], hw[1]))
        covered[y : y + h, x : x + w] += 1
    assert covered.min() >= 1
    for axis, col in ((0, 0), (1, 1)):
        starts = sorted({int(v) for v in grid[:, col]})
        size = min(tile[axis], hw[axis])
        steps = np.diff(starts)
        assert np.all(steps <= size - round(size * overlap)), starts


# ------------------------------------------------------------------------------ merge


def test_every_object_found_once_with_the_box_of_a_centred_crop():
    """6000 x 4000 image, 512 px tiles, 25 % overlap (176 tiles): each pasted square is found
    exactly once, with its label and the box the detector gives on a crop centred on it."""
    tile, overlap = 512, 0.25
    image, objects = scene(4000, 6000, tile, overlap)
    predictor = fake_predictor(
        batch_size=8, tile_size=tile, tile_overlap=overlap, tile_options={"max_detections": 2048}
    )
    det = predictor([image])[0]
    assert len(objects) > 200
    # Objects that no tile holds whole (wider than the overlap) are part of the scene.
    grid = tiling.tile_grid(image.shape[:2], (tile, tile), overlap)

    def whole(b):
        return any(x <= b[0] and b[2] <= x + w and y <= b[1] and b[3] <= y + h for y, x, h, w in grid)

    assert sum(not whole(b) for b, _ in objects) > 10
    used = np.zeros(len(det["boxes"]), bool)
    for box, label in objects:
        ref, ref_label = crop_reference(image, box, tile)
        assert ref == box and ref_label == label
        ious = np.asarray(
            [iou(ref, d) if lab == label else 0.0 for d, lab in zip(det["boxes"], det["labels"])]
        )
        hits = np.flatnonzero(ious > 0.1)
        assert len(hits) == 1, (box, label, det["boxes"][hits], det["labels"][hits])
        assert ious[hits[0]] >= 0.9, (box, det["boxes"][hits[0]])
        used[hits[0]] = True
    assert used.all(), det["boxes"][~used]  # no detection of nothing, nothing twice
    assert len(det["boxes"]) == len(objects)


def test_plain_nms_would_keep_cut_parts():
    """The cut-box rule matters: with merging disabled (threshold above 1) parts survive."""
    tile, overlap = 256, 0.25
    image, objects = scene(900, 1200, tile, overlap, seed=1)
    det = fake_predictor(
        batch_size=8, tile_size=tile, tile_overlap=overlap, tile_options={"merge_thresh": 1.1}
    )([image])[0]
    assert len(det["boxes"]) > len(objects)
    det = fake_predictor(batch_size=8, tile_size=tile, tile_overlap=overlap)([image])[0]
    assert len(det["boxes"]) == len(objects)


def test_device_inputs_do_not_depend_on_the_image_size(monkeypatch):
    """Peak device memory is bounded: every array the tiled path sends to the device (tiles,
    detector batches, the candidate buffer and merge inputs) has the same shape for a 1.2 MP
    and a 12 MP image, and none is larger than one batch of tiles."""
    seen: dict[str, set] = {}

    def record(name, fn):
        def wrapped(*args, **kw):
            shapes = {
                tuple(np.shape(a)) for a in jax.tree_util.tree_leaves((args, kw)) if hasattr(a, "shape")
            }
            seen.setdefault(name, set()).update(shapes)
            return fn(*args, **kw)

        return wrapped

    monkeypatch.setattr(tiling, "resize_normalize_pad", record("tile", tiling.resize_normalize_pad))
    monkeypatch.setattr(tiling, "accumulate", record("accumulate", tiling.accumulate))
    monkeypatch.setattr(tiling, "merge_tile_detections", record("merge", tiling.merge_tile_detections))
    stats = jax.devices()[0].memory_stats()
    per_size, peaks = [], []
    for h, w in ((1000, 1200), (3000, 4000)):
        seen.clear()
        image, _ = scene(h, w, 256, 0.2, seed=2)
        predictor = fake_predictor(
            batch_size=4, tile_size=256, tile_overlap=0.2, tile_options={"max_detections": 1024}
        )
        predictor.detect = record("detect", fake_detect)
        predictor([image])
        per_size.append({k: frozenset(v) for k, v in seen.items()})
        if stats is not None:  # GPU / TPU: the allocator's own peak
            peaks.append(jax.devices()[0].memory_stats().get("peak_bytes_in_use"))
    # The last batch of an image is padded to a power of two (<= batch_size) tiles, so batch
    # dims vary within that set; the largest array of each kind is the same at both sizes.
    largest = [{k: max(int(np.prod(s)) for s in v) for k, v in d.items()} for d in per_size]
    assert largest[0] == largest[1]
    assert max(largest[1].values()) <= 4 * 256 * 256 * 3  # one batch of tiles
    assert per_size[1]["detect"] <= {(b, 256, 256, 3) for b in (1, 2, 4)} | {(b, 2) for b in (1, 2, 4)}
    if peaks and None not in peaks:
        assert peaks[1] <= peaks[0] * 1.05 + (1 << 20)


# ------------------------------------------------------------------------------ real detector


@pytest.fixture(scope="module")
def tiny():
    model = rj.RetinaNet(num_classes=3, backbone="resnet18", fpn_channels=32, variant="v1")
    return model, lively_variables(model)


def _sorted(det):
    order = np.lexsort((det["boxes"][:, 1], det["boxes"][:, 0], -det["scores"]))
    return {k: v[order] for k, v in det.items()}


def test_single_tile_equals_predict_at_native_size(tiny):
    """An image no larger than the tile is one tile: the same detections as ``predict`` on it
    at its own size (no resize) on the same canvas."""
    model, variables = tiny
    image = np.random.default_rng(3).integers(0, 256, (100, 120, 3), dtype=np.uint8)
    opts = dict(detections_per_img=40, batch_size=1)
    tiled = rj.predict(model, variables, [image], tile_size=128, **opts)[0]
    plain = rj.predict(model, variables, [image], min_size=100, max_size=120, buckets=[(128, 128)], **opts)[0]
    assert len(plain["boxes"]) > 5
    a, b = _sorted(tiled), _sorted(plain)
    np.testing.assert_array_equal(a["labels"], b["labels"])
    np.testing.assert_allclose(a["boxes"], b["boxes"], atol=1e-4)
    np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-6)


def test_repeated_tile_gives_shifted_detections_before_the_merge(tiny):
    """A 2 x 2 image of one repeated 128 px tile: the per-tile candidates are the first tile's,
    shifted by each tile's offset, and the first tile's equal a one-tile prediction."""
    model, variables = tiny
    patch = np.random.default_rng(4).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    image = np.tile(patch, (2, 2, 1))
    predictor = Predictor(
        model,
        variables,
        detections_per_img=40,
        batch_size=4,
        tile_size=128,
        tile_overlap=0.0,
        tile_options={"max_detections": 512},
    )
    buf = jax.device_get(tiling.tile_detections(predictor, image, predictor.tiling))
    grid = tiling.tile_grid(image.shape[:2], (128, 128), 0.0)
    assert [tuple(g[:2]) for g in grid] == [(0, 0), (0, 128), (128, 0), (128, 128)]
    per_tile = []
    for t, (y, x, _, _) in enumerate(grid):
        rows = buf["valid"] & (buf["tile"] == t)
        np.testing.assert_array_equal(buf["window"][rows], np.tile([x, y, x + 128, y + 128], (rows.sum(), 1)))
        per_tile.append(
            _sorted(
                {
                    "boxes": buf["boxes"][rows] - np.float32([x, y, x, y]),
                    "scores": buf["scores"][rows],
                    "labels": buf["labels"][rows],
                }
            )
        )
    assert len(per_tile[0]["boxes"]) > 5
    for det in per_tile[1:]:
        np.testing.assert_array_equal(det["labels"], per_tile[0]["labels"])
        np.testing.assert_allclose(det["boxes"], per_tile[0]["boxes"], atol=1e-4)
        np.testing.assert_allclose(det["scores"], per_tile[0]["scores"], atol=1e-6)
    single = _sorted(predictor([patch])[0])
    np.testing.assert_array_equal(single["labels"], per_tile[0]["labels"])
    np.testing.assert_allclose(single["boxes"], per_tile[0]["boxes"], atol=1e-3)


# ------------------------------------------------------------------------------ CLI


def test_cli_tiled_predict_and_downscaled_overlay(tiny, tmp_path):
    from retinanet_jax.cli import main as cli
    from retinanet_jax.interop import model_dir as model_io

    model, variables = tiny
    model_io.save_model(
        str(tmp_path / "m"), model_io.LoadedModel(model, variables, ["a", "b", "c"], [1, 2, 3], "test")
    )
    image = np.random.default_rng(5).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "big.png")
    code = cli.main(
        [
            "predict",
            str(tmp_path / "m"),
            str(tmp_path / "big.png"),
            "-o",
            str(tmp_path / "d.json"),
            "--tile",
            "128",
            "128",
            "--overlap",
            "0.25",
            "--batch-size",
            "4",
            "--detections-per-img",
            "40",
            "--draw",
            str(tmp_path / "draw"),
            "--draw-max-size",
            "150",
            "--display-thresh",
            "0.7",
        ]
    )
    assert code == 0
    got = json.loads((tmp_path / "d.json").read_text())
    want = rj.predict(
        model,
        variables,
        [image],
        tile_size=(128, 128),
        tile_overlap=0.25,
        batch_size=4,
        detections_per_img=40,
    )[0]
    assert len(got) == len(want["boxes"]) > 0
    np.testing.assert_allclose(sorted(g["score"] for g in got), np.sort(want["scores"]), atol=1e-5)
    overlay = Image.open(tmp_path / "draw" / "big.png")
    assert overlay.size == (150, 100)


def test_downscaled_overlay_keeps_tiny_boxes_visible():
    from retinanet_jax.cli.draw import PALETTE, draw_detections

    image = np.full((6000, 8000, 3), 128, np.uint8)
    boxes = np.asarray([[4000, 3000, 4012, 3012]], np.float32)  # 12 px: 3 px after the downscale
    out = np.asarray(draw_detections(image, boxes, np.asarray([0.9]), np.asarray([1]), str, max_size=2048))
    assert out.shape == (1536, 2048, 3)
    colour = np.all(out == PALETTE[1], axis=-1)
    ys, xs = np.nonzero(colour[1536 // 2 - 60 : 1536 // 2 + 60, 1024 - 60 : 1024 + 60])
    assert len(ys) > 0 and xs.max() - xs.min() >= 2 * max(1, round(2048 / 250))
