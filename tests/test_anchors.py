"""Anchors: bit-for-bit equal to torchvision's AnchorGenerator; feature sizes equal to the backbone's."""

import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import _default_anchorgen

from retinanet_jax.ops import anchors as anc


def _torchvision_anchors(image_hw, generator=None):
    gen = generator or _default_anchorgen()
    h, w = image_hw
    images = ImageList(torch.zeros(1, 3, h, w), [(h, w)])
    feats = [torch.zeros(1, 1, fh, fw) for fh, fw in anc.feature_shapes(image_hw)]
    return gen(images, feats)[0].numpy()


def test_default_sizes_are_torchvisions():
    gen = _default_anchorgen()
    assert anc.DEFAULT_SIZES == gen.sizes
    assert anc.DEFAULT_ASPECT_RATIOS == gen.aspect_ratios
    assert anc.DEFAULT_SIZES[0] == (32, 40, 50)  # int() truncation, not rounding


def test_base_anchors_bitwise():
    gen = _default_anchorgen()
    for scales, ratios, ref in zip(anc.DEFAULT_SIZES, anc.DEFAULT_ASPECT_RATIOS, gen.cell_anchors):
        got = anc.base_anchors(scales, ratios)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, ref.numpy())


def test_base_anchors_round_half_to_even():
    # size 5, ratio 1 -> +-2.5 must round to +-2 (torch.round is half-to-even), not +-3.
    np.testing.assert_array_equal(anc.base_anchors((5,), (1.0,)), [[-2, -2, 2, 2]])


@pytest.mark.parametrize("image_hw", [(800, 1216), (512, 512), (224, 320), (96, 160), (100, 150), (33, 65)])
def test_anchors_equal_torchvision_bitwise(image_hw):
    got = anc.anchors_for_image(image_hw)
    ref = _torchvision_anchors(image_hw)
    assert got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)
    assert sum(anc.num_anchors_per_level(image_hw)) == got.shape[0]


def test_custom_sizes_and_ratios_bitwise():
    sizes = ((16, 24), (32, 48), (64, 96), (128, 192), (256, 384))
    ratios = ((0.25, 1.0, 3.0),) * 5
    got = anc.anchors_for_image((160, 96), sizes, ratios)
    np.testing.assert_array_equal(got, _torchvision_anchors((160, 96), AnchorGenerator(sizes, ratios)))
    assert got.shape[0] == sum(anc.num_anchors_per_level((160, 96), anchors_per_location=6))


def test_anchors_cached_and_read_only():
    a = anc.anchors_for_image((96, 160))
    assert anc.anchors_for_image([96, 160]) is a
    with pytest.raises(ValueError):
        a[0, 0] = 1.0


def test_level_sizes_split_in_anchor_order():
    hw = (224, 320)
    a = anc.anchors_for_image(hw)
    n = anc.num_anchors_per_level(hw)
    starts = np.cumsum((0,) + n[:-1])
    for lvl, (s, (fh, fw)) in enumerate(zip(starts, anc.feature_shapes(hw))):
        # torchvision's stride is padded size // grid size: 320 // 3 = 106 on P7, not 128.
        stride = hw[1] // fw
        assert stride == (8 * 2**lvl if lvl < 4 else 106)
        # Second location (x = 1) of each level is shifted by one stride in x only.
        np.testing.assert_array_equal(a[s + 9 : s + 18] - a[s : s + 9], [[stride, 0, stride, 0]] * 9)
        assert n[lvl] == fh * fw * 9


def test_feature_shapes_arithmetic():
    assert anc.feature_shapes((800, 1216)) == [(100, 152), (50, 76), (25, 38), (13, 19), (7, 10)]
    assert anc.feature_shapes((33, 65)) == [(5, 9), (3, 5), (2, 3), (1, 2), (1, 1)]


@pytest.mark.slow  # builds two resnet50 FPN backbones (~8 s each on a shared CPU)
@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_feature_shapes_equal_torchvision_backbone(variant):
    torch.manual_seed(0)
    build = {
        "v1": torchvision.models.detection.retinanet_resnet50_fpn,
        "v2": torchvision.models.detection.retinanet_resnet50_fpn_v2,
    }[variant]
    backbone = build(weights=None, weights_backbone=None).backbone.eval()
    with torch.no_grad():
        for hw in [(64, 96), (97, 130), (161, 75)]:
            feats = backbone(torch.zeros(1, 3, *hw))
            got = [tuple(f.shape[-2:]) for f in feats.values()]
            assert got == anc.feature_shapes(hw), hw
