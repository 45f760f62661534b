"""retinanet_jax.imageprep.normalize / predict: torchvision's resize arithmetic, input handling, batching,
compile caching. Parity of whole detections with torchvision is in test_detection_parity.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from retinanet_jax.ops import anchors as anchors_lib
from retinanet_jax.models.retinanet import RetinaNet
from retinanet_jax.inference.postprocess import postprocess
from retinanet_jax.inference.predict import Predictor, predict
from retinanet_jax.imageprep.normalize import (TRACE_COUNTS, batch_canvas, linear_weights, padded_size,
                                      preprocess_batch, resize_normalize_pad, resized_size,
                                      to_uint8_rgb)

RNG = np.random.default_rng(0)


def rand_image(h, w):
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------ resize arithmetic vs torch


@pytest.mark.parametrize("hw,min_size,max_size", [
    ((300, 450), 320, 512), ((333, 250), 320, 512), ((256, 256), 320, 512),
    ((480, 640), 800, 1333), ((1080, 1920), 800, 1333), ((799, 1201), 800, 1333),
    ((37, 91), 120, 300), ((1000, 700), 200, 250), ((800, 1216), 800, 1333)])
def test_resize_equals_torch_interpolate(hw, min_size, max_size):
    """Shape and values of torchvision's _resize_image_and_masks on a normalized image."""
    from torchvision.models.detection.transform import _resize_image_and_masks
    x = RNG.standard_normal((3,) + hw).astype(np.float32)
    ref, _ = _resize_image_and_masks(torch.from_numpy(x), min_size, max_size)
    out_hw = resized_size(hw, min_size, max_size)
    assert out_hw == tuple(ref.shape[1:])
    r0, r1, rw0, rw1 = linear_weights(hw[0], out_hw[0])
    c0, c1, cw0, cw1 = linear_weights(hw[1], out_hw[1])
    rows = rw0[:, None] * x[:, r0] + rw1[:, None] * x[:, r1]
    ours = cw0 * rows[:, :, c0] + cw1 * rows[:, :, c1]
    # Weights equal ATen's up to float rounding (the FMA in the source index matters: without
    # it errors reach 1e-4 on 1080x1920).
    np.testing.assert_allclose(ours, ref.numpy(), atol=2e-6, rtol=0)


def test_resize_normalize_pad_device_matches_numpy_weights():
    img = rand_image(61, 47)
    out = np.asarray(resize_normalize_pad(img, (90, 70), (96, 96)))
    assert out.shape == (96, 96, 3)
    np.testing.assert_array_equal(out[90:], 0)
    np.testing.assert_array_equal(out[:, 70:], 0)
    x = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    ref = torch.nn.functional.interpolate(((x - mean) / std)[None], size=(90, 70), mode="bilinear",
                                          align_corners=False)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(out[:90, :70], ref, atol=1e-5, rtol=0)


def test_identity_resize_is_a_copy():
    i0, i1, w0, w1 = linear_weights(50, 50)
    np.testing.assert_array_equal(i0, np.arange(50))
    np.testing.assert_array_equal(w1, 0)
    assert w0.dtype == np.float32 and i0.dtype == np.int32


def test_padded_size_and_canvas_match_torchvision_batch_images():
    from torchvision.models.detection.transform import GeneralizedRCNNTransform
    t = GeneralizedRCNNTransform(100, 100, [0, 0, 0], [1, 1, 1])
    sizes = [(100, 133), (161, 100), (64, 64)]
    ref = t.batch_images([torch.zeros(3, h, w) for h, w in sizes]).shape[-2:]
    assert batch_canvas(sizes) == tuple(ref) == (192, 160)
    assert padded_size((33, 64)) == (64, 64)
    assert padded_size((33, 64), 1) == (33, 64)


def test_buckets_pick_smallest_fitting_canvas():
    buckets = [(512, 512), (256, 384), (384, 256), (256, 256)]
    assert batch_canvas([(200, 250)], buckets=buckets) == (256, 256)
    assert batch_canvas([(200, 300)], buckets=buckets) == (256, 384)
    assert batch_canvas([(200, 300), (300, 200)], buckets=buckets) == (512, 512)
    with pytest.raises(ValueError, match="no bucket"):
        batch_canvas([(600, 100)], buckets=buckets)


# ------------------------------------------------------------------ input conversion and errors


def test_pil_modes_are_converted_to_rgb():
    rgb = rand_image(20, 30)
    np.testing.assert_array_equal(to_uint8_rgb(Image.fromarray(rgb)), rgb)
    gray = rgb[..., 0]
    out = to_uint8_rgb(Image.fromarray(gray))
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, -1))
    rgba = np.concatenate([rgb, np.full((20, 30, 1), 7, np.uint8)], -1)
    np.testing.assert_array_equal(to_uint8_rgb(Image.fromarray(rgba)), rgb)
    pal = Image.fromarray(rgb).convert("P")
    np.testing.assert_array_equal(to_uint8_rgb(pal), np.asarray(pal.convert("RGB")))
    # 16-bit: full range scaled to 8 bits (PIL's own convert would clip everything above 255).
    g16 = np.array([[0, 257, 65535, 1000]], np.uint16)
    im16 = Image.fromarray(g16)
    assert im16.mode.startswith("I;16")
    out16 = to_uint8_rgb(im16)
    np.testing.assert_array_equal(out16[..., 0], [[0, 1, 255, 4]])
    assert out16.shape == (1, 4, 3) and out16.dtype == np.uint8


def test_numpy_grayscale_is_replicated():
    gray = rand_image(5, 6)[..., 0]
    for arr in (gray, gray[..., None]):
        np.testing.assert_array_equal(to_uint8_rgb(arr), np.repeat(gray[..., None], 3, -1))


@pytest.mark.parametrize("bad,exc,match", [
    ("image.jpg", TypeError, "image 2: unsupported type str"),
    (np.zeros((4, 5, 3), np.float32), TypeError, "image 2: .*uint8.*float32"),
    (np.zeros((3, 40, 50), np.uint8), ValueError, r"image 2: .*\[C, H, W\]"),
    (np.zeros((4, 5, 2), np.uint8), ValueError, "image 2: expected 3 channels"),
    (np.zeros((2, 4, 5, 3), np.uint8), ValueError, r"image 2: expected shape \[H, W, 3\]"),
    (np.zeros((0, 5, 3), np.uint8), ValueError, "image 2 has zero size"),
    (Image.new("RGB", (0, 10)), ValueError, "image 2 has zero size"),
    (Image.new("F", (4, 4)), ValueError, "image 2: PIL mode 'F'"),
])
def test_bad_inputs_raise_clear_errors(bad, exc, match):
    images = [rand_image(40, 50), rand_image(30, 30), bad]
    with pytest.raises(exc, match=match):
        preprocess_batch(images, min_size=32, max_size=64)


# ------------------------------------------------------------------ predict on a small model
# Compiling the model dominates these tests' time: they share two batch shapes, B=2 and B=4 on a
# 160x160 canvas (70x110 -> 96x150 and 130x90 -> 138x96 with min_size 96, max_size 160).


@pytest.fixture(scope="module")
def small_model():
    model = RetinaNet(num_classes=4, backbone="resnet18")
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    return model, variables


OPTS = dict(min_size=96, max_size=160, score_thresh=0.0, detections_per_img=50)


def pair():
    return [rand_image(70, 110), rand_image(130, 90)]


SMALL_ANCHORS = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in (12, 24, 48, 96, 192))


@pytest.mark.parametrize("anchor_sizes", [None, SMALL_ANCHORS])
def test_predict_equals_manual_pipeline(small_model, anchor_sizes):
    """predict = preprocess_batch -> apply -> postprocess -> boxes * (original / resized),
    with the model's own anchors (torchvision's by default)."""
    model, variables = small_model
    model = model.clone(anchor_sizes=anchor_sizes)
    images = pair()
    dets = predict(model, variables, images, **OPTS)
    batch, sizes = preprocess_batch(images, min_size=96, max_size=160)
    assert batch.shape == (2, 160, 160, 3) and sizes.tolist() == [[96, 150], [138, 96]]
    out = jax.jit(model.apply)(variables, batch)
    canvas = batch.shape[1:3]
    boxes, scores, labels, n = postprocess(
        out["cls_logits"], out["bbox_regression"], jnp.asarray(anchors_lib.anchors_for_image(canvas, anchor_sizes or anchors_lib.DEFAULT_SIZES)),
        anchors_lib.num_anchors_per_level(canvas), jnp.asarray(sizes), score_thresh=0.0,
        detections_per_img=50)
    for i, (img, d) in enumerate(zip(images, dets)):
        ratio = np.float32(img.shape[:2]) / np.float32(sizes[i])
        assert d["boxes"].dtype == np.float32 and d["scores"].dtype == np.float32
        assert d["labels"].dtype == np.int64
        assert len(d["scores"]) == int(n[i]) == 50
        assert np.all(np.diff(d["scores"]) <= 0)
        want = np.asarray(boxes[i, :50]) * np.array([ratio[1], ratio[0], ratio[1], ratio[0]], np.float32)
        np.testing.assert_allclose(d["boxes"], want, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(d["scores"], np.asarray(scores[i, :50]), rtol=0, atol=1e-6)
        np.testing.assert_array_equal(d["labels"], np.asarray(labels[i, :50]))
        # Clipped to the resized image, then rescaled: inside the original image.
        assert d["boxes"][:, 2].max() <= img.shape[1] + 1e-3
        assert d["boxes"][:, 3].max() <= img.shape[0] + 1e-3


def test_same_shapes_do_not_recompile(small_model):
    model, variables = small_model
    predict(model, variables, pair(), **OPTS)
    before = dict(TRACE_COUNTS)
    assert before["detect"] >= 1 and before["resize"] >= 2
    # Same sizes and options, new pixels, new Predictor, new (but equal) model object: no trace.
    predict(RetinaNet(num_classes=4, backbone="resnet18"), variables, pair(), **OPTS)
    Predictor(model, variables, **OPTS)(pair())
    assert dict(TRACE_COUNTS) == before
    # Another option is another compilation.
    predict(model, variables, pair(), **dict(OPTS, nms_thresh=0.6))
    assert TRACE_COUNTS["detect"] == before["detect"] + 1


def test_buckets_make_shapes_recur(small_model):
    model, variables = small_model
    predictor = Predictor(model, variables, buckets=[(160, 160), (320, 320)], batch_size=4, **OPTS)
    predictor([rand_image(60, 90), rand_image(90, 60), rand_image(70, 70)])  # batch 3 -> 4
    before = TRACE_COUNTS["detect"]
    dets = predictor([rand_image(50, 80), rand_image(81, 52), rand_image(40, 40), rand_image(33, 47)])
    assert TRACE_COUNTS["detect"] == before  # other sizes, same bucket and batch: no compile
    assert len(dets) == 4 and all(len(d["scores"]) == 50 for d in dets)


def test_blank_batch_padding_changes_nothing(small_model):
    """With buckets, 3 images are padded with a blank canvas to a batch of 4; the first two
    images' detections equal those of a plain batch of the two (same 160x160 canvas)."""
    model, variables = small_model
    images = pair() + [rand_image(64, 64)]
    ref = predict(model, variables, images[:2], **OPTS)
    got = predict(model, variables, images, buckets=[(160, 160)], batch_size=4, **OPTS)
    assert len(got) == 3
    for r, g in zip(ref, got):
        np.testing.assert_allclose(g["scores"], r["scores"], atol=1e-5)
        np.testing.assert_allclose(g["boxes"], r["boxes"], atol=1e-3)
        np.testing.assert_array_equal(g["labels"], r["labels"])


def test_predict_rejects_single_image_and_accepts_empty(small_model):
    model, variables = small_model
    with pytest.raises(TypeError, match="wrap a single image in a list"):
        predict(model, variables, rand_image(50, 50), **OPTS)
    assert predict(model, variables, [], **OPTS) == []
    with pytest.raises(ValueError, match="image 3 has zero size"):
        predict(model, variables, pair() + [rand_image(50, 50), np.zeros((0, 4, 3), np.uint8)],
                batch_size=2, **OPTS)
