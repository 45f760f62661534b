"""retinanet_jax.imageprep / predict: torchvision's resize arithmetic, input handling, batching,
compile caching. Parity of whole detections with torchvision is in test_detection_parity.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from retinanet_jax.imageprep.convert import to_uint8_rgb
from retinanet_jax.imageprep.geometry import batch_canvas, linear_weights, padded_size, resized_size
from retinanet_jax.imageprep.normalize import IMAGENET_MEAN, IMAGENET_STD, TRACE_COUNTS, resize_normalize_pad
from retinanet_jax.inference.predict import Predictor, predict
from retinanet_jax.models.retinanet import RetinaNet

RNG = np.random.default_rng(0)


def rand_image(h, w):
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------ resize arithmetic vs torch


@pytest.mark.parametrize(
    "hw,min_size,max_size",
    [
        ((300, 450), 320, 512),
        ((333, 250), 320, 512),
        ((256, 256), 320, 512),
        ((480, 640), 800, 1333),
        ((1080, 1920), 800, 1333),
        ((799, 1201), 800, 1333),
        ((37, 91), 120, 300),
        ((1000, 700), 200, 250),
        ((800, 1216), 800, 1333),
    ],
)
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
    ref = (
        torch.nn.functional.interpolate(
            ((x - mean) / std)[None], size=(90, 70), mode="bilinear", align_corners=False
        )[0]
        .permute(1, 2, 0)
        .numpy()
    )
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


def test_integer_modes_scale_by_257_whatever_the_values(tmp_path):
    """PIL "I" (32-bit integer, e.g. integer TIFFs) and "I;16" are 16-bit gray: always
    round(v / 257), also when every value is <= 255 -- and a file read by data.decode (the
    CLI, training, evaluation) gives the same pixels as the PIL image given to predict."""
    from retinanet_jax.data.decode import read_image

    small = np.array([[0, 100, 128, 255]], np.int32)
    for mode, values in (("I", small), ("I", small * 257), ("I;16", small.astype(np.uint16))):
        im = Image.fromarray(values, mode) if mode == "I" else Image.fromarray(values)
        assert im.mode == mode
        out = to_uint8_rgb(im)
        np.testing.assert_array_equal(out[..., 0], np.rint(values / 257.0).astype(np.uint8))
        im.save(tmp_path / "gray.tif")
        with Image.open(tmp_path / "gray.tif") as reread:
            assert reread.mode == mode
            np.testing.assert_array_equal(to_uint8_rgb(reread), out)
        np.testing.assert_array_equal(read_image(str(tmp_path / "gray.tif")), out)
    # 4-channel arrays are RGBA, alpha dropped as for a PIL "RGBA" image.
    rgba = rand_image(4, 5).repeat(2, axis=-1)[..., :4]
    np.testing.assert_array_equal(to_uint8_rgb(rgba), to_uint8_rgb(Image.fromarray(rgba, "RGBA")))


def test_numpy_grayscale_is_replicated():
    gray = rand_image(5, 6)[..., 0]
    for arr in (gray, gray[..., None]):
        np.testing.assert_array_equal(to_uint8_rgb(arr), np.repeat(gray[..., None], 3, -1))


@pytest.mark.parametrize(
    "bad,exc,match",
    [
        ("image.jpg", TypeError, "image 2: unsupported type str"),
        (np.zeros((4, 5, 3), np.float32), TypeError, "image 2: .*uint8.*float32"),
        (np.zeros((3, 40, 50), np.uint8), ValueError, r"image 2: .*\[C, H, W\]"),
        (np.zeros((4, 5, 2), np.uint8), ValueError, "image 2: expected 3 channels"),
        (np.zeros((2, 4, 5, 3), np.uint8), ValueError, r"image 2: expected shape \[H, W, 3\]"),
        (np.zeros((0, 5, 3), np.uint8), ValueError, "image 2 has zero size"),
        (Image.new("RGB", (0, 10)), ValueError, "image 2 has zero size"),
        (Image.new("F", (4, 4)), ValueError, "image 2: PIL mode 'F'"),
    ],
)
def test_bad_inputs_raise_clear_errors(bad, exc, match):
    images = [rand_image(40, 50), rand_image(30, 30), bad]
    with pytest.raises(exc, match=match):
        [to_uint8_rgb(im, i) for i, im in enumerate(images)]


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


@pytest.fixture(scope="module")
def tv_resnet18_retinanet():
    """torchvision's RetinaNet class on a ResNet-18 FPN (as retinanet_resnet50_fpn builds its
    ResNet-50 one: LastLevelP6P7(256, 256), BatchNorm2d) with tests/tv_utils.py's lively random
    weights (~10% of class scores above 0.05), and the same weights ported to ours."""
    import torchvision
    from torchvision.models.detection import retinanet as tv_retinanet
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    from tv_utils import _make_lively, tv_state_dict_numpy

    from retinanet_jax.interop.torchvision import from_torchvision

    torch.manual_seed(0)
    backbone = _resnet_fpn_extractor(
        torchvision.models.resnet18(), 5, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256)
    )
    tv = tv_retinanet.RetinaNet(backbone, num_classes=91).eval()
    _make_lively(tv, seed=0)
    for p in tv.parameters():
        p.requires_grad_(False)
    model, variables = from_torchvision(tv_state_dict_numpy(tv), "v1", backbone="resnet18")
    return tv, model, variables


# Landscape, portrait and square, none a multiple of 32, resized by different factors in one
# batch (min_size 128, max_size 192): 100x150 -> 128x192, 130x90 -> 184x128, 96x96 -> 128x128;
# canvas 192x192.
TV_SIZES = [(100, 150), (130, 90), (96, 96)]
TV_OPTS = dict(min_size=128, max_size=192, detections_per_img=1000)


@pytest.mark.parametrize("anchor_sizes", [None, SMALL_ANCHORS])
def test_predict_equals_torchvision_pipeline(tv_resnet18_retinanet, anchor_sizes):
    """predict's detections in original pixels equal torchvision's own pipeline on the same
    weights: GeneralizedRCNNTransform (resize, normalize, pad) -> backbone + head ->
    postprocess_detections -> transform.postprocess (boxes back to original pixels), i.e.
    ``tv(images)`` in eval mode; with the model's own anchors (torchvision's defaults, or
    other sizes given to both sides)."""
    from detection_utils import count_matches
    from torchvision.models.detection import retinanet as tv_retinanet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.transform import GeneralizedRCNNTransform
    from torchvision.transforms.functional import to_tensor

    tv, model, variables = tv_resnet18_retinanet
    tv.transform = GeneralizedRCNNTransform(
        TV_OPTS["min_size"], TV_OPTS["max_size"], list(IMAGENET_MEAN), list(IMAGENET_STD)
    ).eval()
    tv.detections_per_img = TV_OPTS["detections_per_img"]
    tv.anchor_generator = tv_retinanet._default_anchorgen()
    if anchor_sizes is not None:
        model = model.clone(anchor_sizes=anchor_sizes)
        tv.anchor_generator = AnchorGenerator(anchor_sizes, ((0.5, 1.0, 2.0),) * len(anchor_sizes))
    images = [rand_image(h, w) for h, w in TV_SIZES]
    with torch.no_grad():
        ref = [
            {k: v.numpy() for k, v in d.items()}
            for d in tv([to_tensor(Image.fromarray(im)) for im in images])
        ]
    got = predict(model, variables, images, batch_size=len(images), **TV_OPTS)

    total = sum(len(r["scores"]) for r in ref)
    assert total > 1000, f"too few torchvision detections ({total}) for a meaningful comparison"
    for img, r, g in zip(images, ref, got):
        assert g["boxes"].dtype == np.float32 and g["scores"].dtype == np.float32
        assert g["labels"].dtype == np.int64 and np.all(np.diff(g["scores"]) <= 0)
        # float32 through a ResNet moves a score by ~1e-6 and a box corner by ~1e-4 pixels; as
        # in test_detection_parity, IoU >= 0.99 and scores within 1e-3, same label, one to one.
        # Only detections at a boundary (the 0.05 threshold, a top-k or NMS tie, the 1000 cap)
        # may differ: 2% of them.
        matched = count_matches(r, g)
        assert matched >= 0.98 * len(r["scores"]), f"{img.shape}: matched {matched} of {len(r['scores'])}"
        assert abs(len(g["scores"]) - len(r["scores"])) <= max(2, 0.02 * len(r["scores"]))
        # Boxes in original pixels: clipped to the resized image, then rescaled.
        assert g["boxes"][:, 2].max() <= img.shape[1] + 1e-3
        assert g["boxes"][:, 3].max() <= img.shape[0] + 1e-3
        assert g["boxes"][:, 2].max() > 0.9 * img.shape[1] and g["boxes"][:, 3].max() > 0.9 * img.shape[0]


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
        predict(
            model,
            variables,
            pair() + [rand_image(50, 50), np.zeros((0, 4, 3), np.uint8)],
            batch_size=2,
            **OPTS,
        )
