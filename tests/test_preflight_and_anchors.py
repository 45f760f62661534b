"""Anchor coverage (ops.anchor_fit, data.box_stats, `retinanet-jax anchors`) and the start-of-run
checks of training.preflight, in the functions and through train_and_evaluate's hooks."""

import json
import logging
import os

import numpy as np
import pytest
from config_utils import tiny_config

from retinanet_jax.ops import anchor_fit
from retinanet_jax.ops.anchors import DEFAULT_SIZES, anchors_for_image, base_anchors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFLIGHT_LOG = "retinanet_jax.training.preflight"


def brute_force_best_iou(boxes, canvas_hw, sizes=DEFAULT_SIZES, ratios=((0.5, 1.0, 2.0),) * 5):
    """Best IoU of each box over every anchor torchvision makes for the canvas."""
    a = anchors_for_image(canvas_hw, sizes, ratios).astype(np.float64)
    b = np.asarray(boxes, np.float64)
    lt = np.maximum(b[:, None, :2], a[None, :, :2])
    rb = np.minimum(b[:, None, 2:], a[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    return (inter / (area_b[:, None] + area_a[None, :] - inter)).max(axis=1)


def random_boxes(rng, n, canvas_hw, lo=3.0, hi=None):
    h, w = canvas_hw
    wh = np.exp(rng.uniform(np.log(lo), np.log(hi or max(h, w)), (n, 2)))
    c = rng.uniform(0, 1, (n, 2)) * [w, h]
    boxes = np.concatenate([c - wh / 2, c + wh / 2], 1)
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, w)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, h)
    return boxes[(boxes[:, 2] - boxes[:, 0] > 1) & (boxes[:, 3] - boxes[:, 1] > 1)]


# ------------------------------------------------------------------------------ ops.anchor_fit


@pytest.mark.parametrize("canvas", [(160, 224), (96, 96), (288, 160)])
def test_nearest_centre_iou_equals_brute_force_over_all_anchors(canvas):
    """The module doc's claim: the nearest grid point per level gives the exact best IoU
    (canvases that are not multiples of 64 / 128 have P6 / P7 strides other than 64 / 128)."""
    rng = np.random.default_rng(sum(canvas))
    boxes = random_boxes(rng, 400, canvas)
    fast = anchor_fit.best_anchor_iou(boxes, canvas_hw=canvas)
    np.testing.assert_allclose(fast, brute_force_best_iou(boxes, canvas), rtol=0, atol=1e-12)
    # Per-box canvases give the same as one canvas for all.
    per_box = np.tile(np.asarray(canvas), (len(boxes), 1))
    np.testing.assert_array_equal(anchor_fit.best_anchor_iou(boxes, canvas_hw=per_box), fast)


def test_large_boxes_use_the_canvas_p6_p7_strides():
    """416 px: P6 has 7 cells of stride 59, P7 4 of stride 104 (not 64 / 128)."""
    canvas = (416, 416)
    boxes = random_boxes(np.random.default_rng(2), 300, canvas, lo=150)
    brute = brute_force_best_iou(boxes, canvas)
    np.testing.assert_allclose(anchor_fit.best_anchor_iou(boxes, canvas_hw=canvas), brute, atol=1e-12)
    assert np.abs(anchor_fit.best_anchor_iou(boxes) - brute).max() > 0.01  # the ideal grid differs


def test_unbounded_grid_matches_a_large_canvas_away_from_its_edge():
    rng = np.random.default_rng(1)
    boxes = random_boxes(rng, 300, (200, 200), hi=120)  # far from the 512 canvas' far edge
    np.testing.assert_allclose(
        anchor_fit.best_anchor_iou(boxes), brute_force_best_iou(boxes, (512, 512)), atol=1e-12
    )


def test_coverage_shares_by_size_range():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 40, 40], [0, 0, 100, 100], [0, 0, 50, 50]], float)
    cov = anchor_fit.coverage(boxes, np.array([0.9, 0.45, 0.3, 0.6]))
    assert cov.count == {"all": 4, "small": 1, "medium": 2, "large": 1}
    assert cov.at(0.5) == 0.5 and cov.at(0.4) == 0.75
    assert cov.at(0.5, "medium") == 0.5 and cov.at(0.4, "medium") == 1.0
    assert cov.at(0.5, "large") == 0.0 and cov.at(0.5, "small") == 1.0


def test_structured_anchors_with_base_32_are_torchvisions_default():
    sizes, ratios = anchor_fit.structured_anchors(32, (0.5, 1.0, 2.0))
    assert (
        sizes
        == DEFAULT_SIZES
        == ((32, 40, 50), (64, 80, 101), (128, 161, 203), (256, 322, 406), (512, 645, 812))
    )
    assert ratios == ((0.5, 1.0, 2.0),) * 5


def test_search_finds_better_anchors_for_tiny_boxes():
    rng = np.random.default_rng(0)
    canvas = (128, 128)
    boxes = random_boxes(rng, 600, canvas, lo=6, hi=14)
    before = anchor_fit.anchor_coverage(boxes, canvas_hw=canvas)
    assert before.at(0.5) < 0.05  # 32 px anchors vs 6..14 px boxes: IoU <= (14/32)^2 = 0.19
    found = anchor_fit.search_anchors(boxes, canvas)
    assert found.base < 16
    assert found.coverage.at(0.5) > before.at(0.5) + 0.3
    # The reported coverage is that of the printed overrides, recomputed independently.
    over = anchor_fit.config_overrides(found.sizes, found.aspect_ratios)
    best = brute_force_best_iou(boxes, canvas, over["model.anchor_sizes"], over["model.aspect_ratios"])
    assert found.coverage.at(0.5) == pytest.approx(np.mean(best >= 0.5))
    # Data already covered by the default anchors keeps (at least) that coverage.
    square = np.array([[64 - s / 2, 64 - s / 2, 64 + s / 2, 64 + s / 2] for s in (32, 64, 128)], float)
    assert anchor_fit.search_anchors(square, (256, 256)).coverage.at(0.5) == 1.0


# ------------------------------------------------------------------------------ the CLI


def _inside_anchors(canvas):
    """One anchor per (level P3..P5, ratio) lying inside the canvas, as xyxy boxes."""
    out = []
    for level, scales in enumerate(DEFAULT_SIZES[:3]):
        stride = 8 * 2**level
        for shape in base_anchors(scales, (0.5, 1.0, 2.0))[::3]:  # scale 0 of each ratio
            c = (canvas // 2 // stride) * stride
            out.append(shape + c)
    boxes = np.array(out, float)
    assert (boxes >= 0).all() and (boxes <= canvas).all()
    return boxes


def _coco_json(path, boxes, size=256):
    anns = [
        {
            "id": i + 1,
            "image_id": 1 + i % 2,
            "category_id": 1,
            "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
        }
        for i, b in enumerate(boxes)
    ]
    images = [{"id": i, "file_name": f"{i}.jpg", "height": size, "width": size} for i in (1, 2)]
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]}, f)


def _run_cli(tmp_path, boxes, *extra, image_size=256, train_size=256):
    """`retinanet-jax anchors` on two square images holding ``boxes``, resized to ``train_size``."""
    from retinanet_jax.cli.main import main

    ann = tmp_path / "train.json"
    _coco_json(ann, boxes, image_size)
    out = tmp_path / "fit.json"
    code = main(
        [
            "anchors",
            "--data",
            "coco_json",
            f"annotation_file={ann}",
            f"image_dir={tmp_path}",
            "check_files=false",
            "--min-size",
            str(train_size),
            "--max-size",
            str(train_size),
            "--json",
            str(out),
            *extra,
        ]
    )
    assert code == 0
    return json.load(open(out))


def test_anchors_command_on_boxes_equal_to_anchors_prints_full_coverage(tmp_path, capsys):
    boxes = _inside_anchors(512)
    assert brute_force_best_iou(boxes, (512, 512)).min() == 1.0
    # In 320 px images: anchors again once resized (x 1.6) to the training 512 px.
    assert brute_force_best_iou(boxes / 1.6, (320, 320)).min() < 0.5
    result = _run_cli(tmp_path, boxes / 1.6, "--no-search", image_size=320, train_size=512)
    out = capsys.readouterr().out
    assert f"{len(boxes)} ground-truth boxes in 2 images" in out and "min_size 512" in out
    assert f"  {'all':<24}{len(boxes):>8d}{1.0:>10.3f}{1.0:>10.3f}" in out
    assert result["current"]["coverage"]["share"]["all"] == {"0.5": 1.0, "0.4": 1.0}


def test_anchors_command_on_slivers_prints_the_brute_force_coverage(tmp_path, capsys):
    exact = _inside_anchors(256)
    slivers = np.array(
        [[100 + 20 * k, 20, 104 + 20 * k, 220] for k in range(3)]
        + [[20, 100 + 20 * k, 220, 104 + 20 * k] for k in range(3)],
        float,
    )
    boxes = np.concatenate([exact, slivers])
    best = brute_force_best_iou(boxes, (256, 256))
    assert best[len(exact) :].max() < 0.4  # 4 x 200 px: no anchor shape is close
    share50, share40 = np.mean(best >= 0.5), np.mean(best >= 0.4)
    assert share50 == share40 == len(exact) / len(boxes)
    result = _run_cli(tmp_path, boxes)
    out = capsys.readouterr().out
    assert f"  {'all':<24}{len(boxes):>8d}{share50:>10.3f}{share40:>10.3f}" in out
    # Slivers: sqrt(4 * 200) = 28 px, "small", as the 46 x 22 px anchors (sqrt 31.8).
    small = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])) < 32
    assert small.sum() == 8
    s50, s40 = np.mean(best[small] >= 0.5), np.mean(best[small] >= 0.4)
    assert f"  {'small (<32)':<24}{8:>8d}{s50:>10.3f}{s40:>10.3f}" in out
    assert result["current"]["coverage"]["share"]["all"]["0.5"] == pytest.approx(share50)
    # The search reaches the slivers with ratio 4 / 0.25 anchors without losing the rest.
    search = result["search"]
    assert search["coverage"]["share"]["all"]["0.5"] >= share50
    assert "c.model.anchor_sizes = " in out or "no searched anchors beat" in out


def test_anchors_command_reads_a_config_and_fails_clearly(tmp_path, capsys):
    from retinanet_jax.cli.main import main

    code = main(
        [
            "anchors",
            "--config",
            os.path.join(ROOT, "configs", "tiny.py"),
            "--set",
            "dataset.train.num_images=16",
            "--no-search",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "min_size 64, max_size 64" in out and "current anchors: sizes [(16, 20, 25)" in out
    assert main(["anchors"]) == 2
    assert "--data SOURCE" in capsys.readouterr().err


# ------------------------------------------------------------------------------ data.box_stats


def test_training_boxes_follow_the_training_resize(tmp_path):
    from retinanet_jax.data.box_stats import training_boxes
    from retinanet_jax.data.registry import make_source

    ann = tmp_path / "a.json"
    boxes = np.array([[10, 20, 50, 60], [0, 0, 256, 128]], float)
    _coco_json(ann, boxes)
    src = make_source(
        "coco_json", {"annotation_file": str(ann), "image_dir": str(tmp_path), "check_files": False}
    )
    gt = training_boxes(src, (512, 128), 1000)
    assert gt.num_images == 2 and len(gt.boxes) == 4  # each box once per min_size
    scaled = sorted(map(tuple, gt.boxes.tolist()))
    assert scaled == sorted([(20, 40, 100, 120), (0, 0, 512, 256), (5, 10, 25, 30), (0, 0, 128, 64)])
    assert {tuple(c) for c in gt.canvas_hw.tolist()} == {(512, 512)}  # canvas for max(min_sizes)


# ------------------------------------------------------------------------------ preflight checks


def _check(config, *, dataset_size=64, steps_per_epoch=8, num_steps=None, eval_every=None, ckpt_every=None):
    from retinanet_jax.training import preflight

    num_steps = num_steps or config.num_steps or config.optim.epochs * steps_per_epoch
    return preflight.check_run(
        config,
        dataset_size=dataset_size,
        steps_per_epoch=steps_per_epoch,
        num_steps=num_steps,
        eval_every=eval_every or config.eval.every_steps or steps_per_epoch,
        ckpt_every=ckpt_every or config.checkpoint.every_steps or steps_per_epoch,
    )


def test_tiny_config_passes_without_warnings(caplog):
    assert _check(tiny_config()) == []


@pytest.mark.parametrize("schedule,milestones", [("cosine", ()), ("multistep", (1,))])
def test_num_steps_past_the_schedule_is_an_error(schedule, milestones):
    cfg = tiny_config(num_steps=20, **{"optim.schedule": schedule, "optim.milestones": milestones})
    with pytest.raises(ValueError) as e:
        _check(cfg)
    msg = str(e.value)
    assert "config.num_steps=20" in msg and "config.optim.epochs=1" in msg
    assert "= 8 steps" in msg and "the last 12 steps" in msg
    from retinanet_jax.training.optim import OptimConfig, make_schedule

    final = float(make_schedule(OptimConfig.from_mapping(cfg.optim), 8, cfg.batch_size)(8))
    assert f"final lr {final:g}." in msg
    assert final < 1e-9 if schedule == "cosine" else final == pytest.approx(3e-4)
    assert ">= 3" in msg  # the epochs that would cover 20 steps of 8


def test_num_steps_past_a_constant_schedule_is_fine():
    cfg = tiny_config(
        num_steps=20, **{"optim.schedule": "constant", "eval.every_steps": 10, "checkpoint.every_steps": 10}
    )
    assert _check(cfg) == []


def test_a_schedule_over_the_run_has_no_epoch_traps():
    """optim.epochs=None: the schedule is num_steps long, so a long run is not "past the
    schedule", and a warmup longer than an epoch is not capped (no warning)."""
    cfg = tiny_config(
        num_steps=20,
        **{"optim.epochs": None, "optim.warmup_steps": 12, "eval.every_steps": 10},
        **{"checkpoint.every_steps": 10},
    )
    assert _check(cfg) == []


def test_warmup_longer_than_the_run_warns(caplog):
    cfg = tiny_config(
        num_steps=4, **{"optim.warmup_steps": 6, "eval.every_steps": 4, "checkpoint.every_steps": 4}
    )
    with caplog.at_level(logging.WARNING, logger=PREFLIGHT_LOG):
        warnings = _check(cfg)
    assert len(warnings) == 1 and "config.optim.warmup_steps=6" in warnings[0]
    assert "whole run is warmup" in warnings[0] and warnings[0] in caplog.text


def test_warmup_longer_than_an_epoch_warns_about_torchvisions_cap():
    cfg = tiny_config(
        num_steps=16,
        **{"optim.warmup_steps": 50, "optim.epochs": 2, "eval.every_steps": 8, "checkpoint.every_steps": 8},
    )
    warnings = _check(cfg)
    assert len(warnings) == 1 and "config.optim.warmup_steps=50" in warnings[0]
    assert "= 7 steps" in warnings[0]


def test_eval_interval_longer_than_the_run_warns_that_only_the_final_eval_runs():
    warnings = _check(tiny_config(**{"eval.every_steps": 100}))
    assert len(warnings) == 1
    assert "config.eval.every_steps = 100" in warnings[0] and "only the final one at step 6" in warnings[0]
    assert _check(tiny_config(**{"eval.every_steps": 100, "eval.enabled": False})) == []


def test_checkpoint_interval_longer_than_the_run_warns_that_only_the_final_one_is_written():
    warnings = _check(tiny_config(**{"checkpoint.every_steps": 7}))
    assert len(warnings) == 1 and "config.checkpoint.every_steps = 7" in warnings[0]
    assert "only the final checkpoint (step 6)" in warnings[0]
    # The default (once per epoch) longer than the run is reported under the same key.
    warnings = _check(tiny_config(**{"checkpoint.every_steps": None}), steps_per_epoch=10)
    assert any("config.checkpoint.every_steps=None (once per epoch) = 10" in w for w in warnings)


def test_batch_larger_than_the_training_set_is_an_error():
    with pytest.raises(
        ValueError,
        match=r"config.batch_size=128 is larger than the training set "
        r"\(64 examples",
    ):
        _check(tiny_config(batch_size=128))


def test_milestones_after_the_last_epoch_warn():
    cfg = tiny_config(
        **{
            "optim.schedule": "multistep",
            "optim.milestones": (1, 3),
            "optim.epochs": 2,
            "num_steps": None,
            "eval.every_steps": 16,
            "checkpoint.every_steps": 16,
        }
    )
    warnings = _check(cfg)
    assert len(warnings) == 1 and "config.optim.milestones=(1, 3)" in warnings[0]


# ------------------------------------------------------------------------------ train_and_evaluate hooks


class _Stop(Exception):
    pass


@pytest.fixture
def until_optimizer(monkeypatch):
    """train_and_evaluate up to its optimizer (after sources, model, pipeline and the preflight
    hooks), with a stand-in model: no weights are initialised, nothing compiles."""
    from types import SimpleNamespace

    from retinanet_jax.ops.anchors import model_anchor_config
    from retinanet_jax.training import loop

    def fake_model(config, num_classes, **kw):
        sizes, ratios = model_anchor_config(config.model)
        return SimpleNamespace(anchor_sizes=sizes, aspect_ratios=ratios), {}

    def stop(*a, **k):
        raise _Stop

    monkeypatch.setattr(loop, "build_model", fake_model)
    monkeypatch.setattr(loop, "make_optimizer", stop)
    return loop.train_and_evaluate


def _expected_tiny_coverage(config):
    from retinanet_jax.data.box_stats import training_boxes
    from retinanet_jax.data.registry import make_source
    from retinanet_jax.ops.anchors import model_anchor_config

    src = make_source("shapes", dict(config.dataset.train))
    gt = training_boxes(src, (64,), 64)
    assert (gt.canvas_hw == 64).all()
    best = brute_force_best_iou(gt.boxes, (64, 64), *model_anchor_config(config.model))
    return np.mean(best >= 0.5), np.mean(best >= 0.4), len(best)


def test_training_logs_anchor_coverage_and_warns_below_0_8(until_optimizer, tmp_path, caplog):
    cfg = tiny_config()
    share50, share40, n = _expected_tiny_coverage(cfg)
    assert share50 >= 0.8
    with caplog.at_level(logging.INFO, logger=PREFLIGHT_LOG), pytest.raises(_Stop):
        until_optimizer(cfg, str(tmp_path / "a"))
    assert f"anchor coverage: share of {n} boxes (64 training images" in caplog.text
    assert f"{share50:.3f} / {share40:.3f}" in caplog.text
    assert "< 0.8" not in caplog.text

    caplog.clear()
    cfg = tiny_config(**{"model.anchor_sizes": None})  # torchvision's 32..512 px on 64 px images
    share50, share40, n = _expected_tiny_coverage(cfg)
    assert share50 < 0.8
    with caplog.at_level(logging.INFO, logger=PREFLIGHT_LOG), pytest.raises(_Stop):
        until_optimizer(cfg, str(tmp_path / "b"))
    assert f"{share50:.3f} / {share40:.3f}" in caplog.text
    warn = [r for r in caplog.records if r.levelno == logging.WARNING and "anchor coverage" in r.message]
    assert len(warn) == 1 and "retinanet-jax anchors" in warn[0].message


def test_training_refuses_num_steps_past_the_schedule(until_optimizer, tmp_path):
    with pytest.raises(ValueError, match=r"config.num_steps=20 .*config.optim.epochs=1"):
        until_optimizer(tiny_config(num_steps=20), str(tmp_path))


def test_training_refuses_a_schedule_over_the_run_without_num_steps(until_optimizer, tmp_path):
    with pytest.raises(ValueError, match=r"config.optim.epochs=None .* needs config.num_steps"):
        until_optimizer(tiny_config(num_steps=None, **{"optim.epochs": None}), str(tmp_path))


def test_training_refuses_a_batch_larger_than_the_dataset(until_optimizer, tmp_path):
    cfg = tiny_config(batch_size=128)  # 64 images; divisible by the 8 test devices
    with pytest.raises(ValueError, match="config.batch_size=128 is larger than the training set"):
        until_optimizer(cfg, str(tmp_path))
