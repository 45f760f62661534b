"""torchvision state_dict <-> flax variables: round trips, legacy keys, class surgery, errors."""

import logging
import math
import re

import flax
import jax
import numpy as np
import pytest
import torch
import torchvision
from tv_utils import make_tv_model, tv_state_dict_numpy

from retinanet_jax.interop.torchvision import backbone_from_torchvision, from_torchvision, to_torchvision
from retinanet_jax.models.heads import CLS_PRIOR_BIAS

BUILDERS = {
    "v1": torchvision.models.detection.retinanet_resnet50_fpn,
    "v2": torchvision.models.detection.retinanet_resnet50_fpn_v2,
}


@pytest.fixture(scope="module", params=["v1", "v2", "v1-coco"])
def case(request):
    """(variant, numpy state_dict): v1/v2 as weights=None (BatchNorm2d), v1-coco as COCO_V1 (FrozenBN)."""
    variant, coco = request.param[:2], request.param == "v1-coco"
    return variant, coco, tv_state_dict_numpy(make_tv_model(variant, frozen_bn=coco))


def _assert_same_state_dict(got: dict, want: dict) -> None:
    assert set(got) == set(want), set(got) ^ set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, (
            k,
            got[k].dtype,
            v.dtype,
            got[k].shape,
            v.shape,
        )
        assert got[k].tobytes() == v.tobytes(), k  # bit for bit


def _flat(variables) -> dict:
    return flax.traverse_util.flatten_dict(jax.device_get(variables))


def test_round_trip_bitwise_and_strict_reload(case, tmp_path):
    variant, coco, sd = case
    assert sum(k.endswith("num_batches_tracked") for k in sd) == (0 if coco else 53)
    path = tmp_path / "w.pth"
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, path)
    model, variables = from_torchvision(str(path), variant)
    back = to_torchvision(model, variables)
    _assert_same_state_dict(back, sd)

    tv = BUILDERS[variant](weights=None, weights_backbone=None)
    tv.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    loaded = tv_state_dict_numpy(tv)
    _assert_same_state_dict({k: loaded[k] for k in sd}, sd)


def test_bn_defaults_follow_checkpoint_layout(case):
    variant, coco, sd = case
    model, variables = from_torchvision(sd, variant)
    has_counters = not coco
    assert model.frozen_bn is (not has_counters)
    assert model.bn_eps == (1e-5 if has_counters or variant == "v2" else 0.0)
    assert from_torchvision(sd, variant, bn_eps=1e-3)[0].bn_eps == 1e-3
    nbt = [v for p, v in _flat(variables).items() if p[-1] == "num_batches_tracked"]
    assert len(nbt) == (53 if has_counters else 0)
    assert all(int(v) == 1 for v in nbt)  # make_tv_model's calibration pass counted one batch


@pytest.mark.parametrize("coco", [False, True], ids=["v1", "v1-coco"])
def test_legacy_key_names_load(coco):
    # Version-1 key names exist for the v1 layout only (the COCO_V1 checkpoint uses them).
    sd = tv_state_dict_numpy(make_tv_model("v1", frozen_bn=coco))
    old = {}
    for k, v in sd.items():
        k = re.sub(r"^(head\.\w+_head\.conv)\.(\d)\.0\.", lambda m: f"{m.group(1)}.{2 * int(m.group(2))}.", k)
        k = re.sub(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d)\.0\.", r"\1.", k)
        old[k] = v
    assert "head.classification_head.conv.6.weight" in old and "backbone.fpn.inner_blocks.2.bias" in old
    # torchvision itself loads it (so the renaming above is what its hooks undo)...
    tv = BUILDERS["v1"](weights=None, weights_backbone=None)
    tv.load_state_dict({k: torch.from_numpy(v) for k, v in old.items()}, strict=True)
    # ...and so do we, to exactly the same variables as from the new names.
    model, variables = from_torchvision(old, "v1")
    want = _flat(from_torchvision(sd, "v1")[1])
    got = _flat(variables)
    assert set(got) == set(want)
    assert all(np.array_equal(got[p], want[p]) for p in want)


def test_num_classes_surgery_keeps_everything_but_cls_logits(caplog):
    sd = tv_state_dict_numpy(make_tv_model("v1"))
    report = []
    with caplog.at_level(logging.WARNING):
        model, variables = from_torchvision(sd, "v1", num_classes=5, report=report)
    skipped = ["head.classification_head.cls_logits.weight", "head.classification_head.cls_logits.bias"]
    assert report == skipped
    assert all(k in caplog.text for k in skipped)
    assert model.num_classes == 5
    cls = variables["params"]["head"]["classification_head"]["cls_logits"]
    assert cls["kernel"].shape == (3, 3, 256, 9 * 5)
    np.testing.assert_array_equal(np.asarray(cls["bias"]), np.float32(CLS_PRIOR_BIAS))
    assert float(np.std(np.asarray(cls["kernel"]))) == pytest.approx(0.01, rel=0.05)
    assert CLS_PRIOR_BIAS == pytest.approx(-math.log(99))

    back = to_torchvision(model, variables)
    assert set(back) == set(sd)
    for k, v in sd.items():
        if k not in skipped:
            assert back[k].tobytes() == v.tobytes(), k
    tv5 = BUILDERS["v1"](weights=None, weights_backbone=None, num_classes=5)
    tv5.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)

    # Same class count: nothing skipped, nothing reported.
    report = []
    from_torchvision(sd, "v1", num_classes=91, report=report)
    assert report == []


@pytest.fixture(scope="module")
def v1_sd():
    return tv_state_dict_numpy(make_tv_model("v1"))


def test_missing_key_is_an_error(v1_sd):
    sd = dict(v1_sd)
    del sd["backbone.body.layer3.2.bn2.running_var"]
    with pytest.raises(ValueError, match=r"missing keys.*backbone\.body\.layer3\.2\.bn2\.running_var"):
        from_torchvision(sd, "v1")


def test_unexpected_key_is_an_error(v1_sd):
    sd = dict(v1_sd, **{"head.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"unexpected keys.*head\.extra\.weight"):
        from_torchvision(sd, "v1")


def test_wrong_shape_names_key_and_both_shapes(v1_sd):
    sd = dict(v1_sd)
    sd["backbone.fpn.layer_blocks.1.0.weight"] = np.zeros((256, 128, 3, 3), np.float32)
    with pytest.raises(ValueError) as e:
        from_torchvision(sd, "v1")
    msg = str(e.value)
    assert (
        "backbone.fpn.layer_blocks.1.0.weight" in msg
        and "(256, 128, 3, 3)" in msg
        and "(256, 256, 3, 3)" in msg
    )


def _meta_state_dict(module: torch.nn.Module, prefix: str = "") -> dict:
    # Shapes only (random values are irrelevant to key/shape checks); meta builds are instant.
    return {prefix + k: np.zeros(v.shape, np.float32) for k, v in module.state_dict().items()}


def test_other_architectures_are_errors(v1_sd):
    with torch.device("meta"):
        frcnn = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
        r101 = torchvision.models.resnet101()
    with pytest.raises(ValueError, match="Faster/Mask R-CNN"):
        from_torchvision(_meta_state_dict(frcnn), "v1")

    # A RetinaNet whose body is a ResNet-101 into the ResNet-50 model.
    sd = {k: v for k, v in v1_sd.items() if not k.startswith("backbone.body.")}
    sd.update({k: v for k, v in _meta_state_dict(r101, "backbone.body.").items() if ".fc." not in k})
    with pytest.raises(ValueError, match=r"unexpected keys.*layer3\.6.*'resnet101'"):
        from_torchvision(sd, "v1")

    # v2 weights into the v1 model, and an ImageNet classifier into from_torchvision.
    v2 = tv_state_dict_numpy(make_tv_model("v2"))
    with pytest.raises(ValueError, match="variant='v2'"):
        from_torchvision(v2, "v1")
    with pytest.raises(ValueError, match="backbone_from_torchvision"):
        from_torchvision(_meta_state_dict(r101), "v1")


def test_malicious_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pth"
    torch.save({"backbone.body.conv1.weight": Evil()}, path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        from_torchvision(str(path), "v1")
    assert not marker.exists()
    # The payload is real: an unsafe load would have run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        from_torchvision(str(tmp_path / "nope.pth"), "v1")


def test_imagenet_backbone_loads_and_reports_fc(caplog):
    torch.manual_seed(0)
    r18 = torchvision.models.resnet18()
    sd = tv_state_dict_numpy(r18)
    report = []
    with caplog.at_level(logging.WARNING):
        model, variables = backbone_from_torchvision(sd, num_classes=3, report=report)
    assert model.backbone == "resnet18" and model.num_classes == 3 and model.frozen_bn
    assert report == ["fc.weight", "fc.bias"] and "fc.weight" in caplog.text
    back = to_torchvision(model, variables)
    for k, v in sd.items():
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked"):  # FrozenBN drops counters
            assert back["backbone.body." + k].tobytes() == v.tobytes(), k
    assert back["head.classification_head.cls_logits.weight"].shape == (27, 256, 3, 3)
    with pytest.raises(ValueError, match="resnet50"):
        backbone_from_torchvision(sd, backbone="resnet50")


def test_corrupt_file_keeps_its_own_error(tmp_path):
    # Only the weights-only unpickler's refusal says "refusing"; a damaged zip says what it is.
    path = tmp_path / "cut.pth"
    torch.save({"conv1.weight": torch.zeros(2, 3, 1, 1)}, path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match=re.escape(str(path))) as info:
        from_torchvision(str(path), "v1")
    assert "refusing" not in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)
