"""COCO metrics from our detections: known answers and agreement with pycocotools run directly."""

import contextlib
import io
import json
import math

import numpy as np
import pytest
from detection_utils import SizedSource
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from retinanet_jax.evaluation import loop as evaluation

CLASSES = ["circle", "square"]

# Two images with one medium object each (area 40*40 in [32^2, 96^2)) and one empty image.
GT = [
    {
        "image_id": 7,
        "image_hw": (100, 120),
        "boxes": np.array([[10, 10, 50, 50]], np.float32),
        "labels": np.array([0]),
    },
    {
        "image_id": 9,
        "image_hw": (100, 120),
        "boxes": np.array([[60, 20, 100, 60]], np.float32),
        "labels": np.array([1]),
    },
    {
        "image_id": 11,
        "image_hw": (80, 80),
        "boxes": np.zeros((0, 4), np.float32),
        "labels": np.zeros((0,), np.int32),
    },
]


def _det(image_id, boxes, scores, labels):
    return {
        "image_id": image_id,
        "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
        "scores": np.asarray(scores, np.float32),
        "labels": np.asarray(labels, np.int32),
    }


def _perfect():
    return [_det(ex["image_id"], ex["boxes"], np.full(len(ex["labels"]), 0.9), ex["labels"]) for ex in GT]


def test_perfect_detections_give_ap_one(tmp_path):
    gt = evaluation.coco_ground_truth(GT, CLASSES)
    m = evaluation.evaluate_detections(_perfect(), gt, [1, 2], output_path=tmp_path / "d.json")
    for k in ("AP", "AP50", "AP75", "APm"):
        np.testing.assert_allclose(m[k], 1.0, atol=1e-9, err_msg=k)
    # No small / large ground truth: pycocotools reports -1.
    assert m["APs"] == -1 and m["APl"] == -1
    assert dict(zip(m["class_names"], m["per_class_AP"])) == {
        "circle": pytest.approx(1.0),
        "square": pytest.approx(1.0),
    }
    assert set(evaluation.COCO_METRICS) <= set(m)


def test_one_of_two_missed_gives_known_ap():
    # Only the square is detected. Per class: circle AP 0 (recall 0), square AP 1 -> mean 0.5.
    dets = [_det(9, GT[1]["boxes"], [0.8], [1])]
    m = evaluation.evaluate_detections(dets, evaluation.coco_ground_truth(GT, CLASSES), [1, 2])
    np.testing.assert_allclose(m["AP"], 0.5, atol=1e-9)
    np.testing.assert_allclose(m["per_class_AP"][0], 0.0, atol=1e-9)

    # One class with two objects, one found: precision 1 up to recall 0.5, so 51 of COCO's
    # 101 recall points have precision 1 -> AP = 51/101.
    gt = [dict(GT[0]), dict(GT[1], labels=np.array([0]))]
    dets = [_det(7, GT[0]["boxes"], [0.8], [0])]
    m = evaluation.evaluate_detections(dets, evaluation.coco_ground_truth(gt, CLASSES), [1, 2])
    np.testing.assert_allclose(m["AP"], 51 / 101, atol=1e-9)
    assert np.isnan(m["per_class_AP"][1])  # no ground truth for that class


def test_category_id_mapping_and_results_format(tmp_path):
    path = tmp_path / "dets.json"
    gt = evaluation.coco_ground_truth(GT, CLASSES, category_ids=[3, 17])
    path.write_text("old")  # an earlier evaluation's file is replaced
    evaluation.evaluate_detections(_perfect(), gt, [3, 17], output_path=path)
    results = json.loads(path.read_text())
    assert len(results) == 2
    r = next(r for r in results if r["image_id"] == 9)
    assert r["category_id"] == 17
    np.testing.assert_allclose(r["bbox"], [60, 20, 40, 40])  # xywh
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temp file


def test_matches_pycocotools_on_the_written_json(tmp_path):
    rng = np.random.default_rng(0)
    examples, dets = [], []
    for i in range(6):
        n = int(rng.integers(0, 5))
        xy = rng.uniform(0, 150, (n, 2))
        wh = rng.uniform(8, 100, (n, 2))
        boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
        labels = rng.integers(0, 2, n)
        examples.append({"image_id": 100 + i, "image_hw": (256, 256), "boxes": boxes, "labels": labels})
        # Jittered true boxes, some with wrong labels, plus random false positives.
        jit = boxes + rng.normal(0, 4, boxes.shape)
        fp_xy = rng.uniform(0, 150, (3, 2))
        fp = np.concatenate([fp_xy, fp_xy + 30], 1)
        dets.append(
            _det(
                100 + i,
                np.concatenate([jit, fp]),
                rng.uniform(0.05, 1, n + 3),
                np.concatenate(
                    [np.where(rng.uniform(size=n) < 0.8, labels, 1 - labels), rng.integers(0, 2, 3)]
                ),
            )
        )
    gt = evaluation.coco_ground_truth(examples, CLASSES)
    det_path, gt_path = tmp_path / "dets.json", tmp_path / "gt.json"
    ours = evaluation.evaluate_detections(dets, gt, [1, 2], output_path=det_path)
    assert 0.05 < ours["AP"] < 0.95  # a non-trivial case

    # pycocotools on its own, from files: a GT json written independently of our COCO object.
    gt_json = {
        "images": [{"id": e["image_id"], "height": 256, "width": 256} for e in examples],
        "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}],
        "annotations": [],
    }
    for e in examples:
        for b, lab in zip(e["boxes"].tolist(), e["labels"].tolist()):
            gt_json["annotations"].append(
                {
                    "id": len(gt_json["annotations"]) + 1,
                    "image_id": e["image_id"],
                    "category_id": lab + 1,
                    "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                    "area": (b[2] - b[0]) * (b[3] - b[1]),
                    "iscrowd": 0,
                }
            )
    gt_path.write_text(json.dumps(gt_json))
    with contextlib.redirect_stdout(io.StringIO()):
        ref_gt = COCO(str(gt_path))
        ref = COCOeval(ref_gt, ref_gt.loadRes(str(det_path)), "bbox")
        ref.evaluate()
        ref.accumulate()
        ref.summarize()
    np.testing.assert_allclose([ours[k] for k in evaluation.COCO_METRICS], ref.stats[:6], atol=1e-6)


def test_false_positive_on_empty_image_counts():
    # The empty image is part of the ground truth: a higher-scored circle there halves the
    # circle's precision at every recall -> circle AP 0.5, square AP 1.
    dets = _perfect() + [_det(11, [[5, 5, 45, 45]], [0.95], [0])]
    m = evaluation.evaluate_detections(dets, evaluation.coco_ground_truth(GT, CLASSES), [1, 2])
    np.testing.assert_allclose(m["per_class_AP"][0], 0.5, atol=1e-9)
    np.testing.assert_allclose(m["AP"], 0.75, atol=1e-9)


def test_no_detections_gives_zero_ap():
    m = evaluation.evaluate_detections(
        [_det(7, np.zeros((0, 4)), [], [])], evaluation.coco_ground_truth(GT, CLASSES), [1, 2]
    )
    np.testing.assert_allclose(m["AP"], 0.0)


def test_bad_inputs_raise_specific_errors():
    with pytest.raises(ValueError, match="duplicate image_id 7"):
        evaluation.coco_ground_truth([GT[0], GT[0]], CLASSES)
    with pytest.raises(ValueError, match="label 5"):
        evaluation.coco_ground_truth([dict(GT[0], labels=np.array([5]))], CLASSES)
    with pytest.raises(ValueError, match="category_ids has 1 entries"):
        evaluation.coco_ground_truth(GT, CLASSES, category_ids=[1])
    with pytest.raises(ValueError, match="image 7: labels"):
        evaluation.detections_to_coco([_det(7, [[0, 0, 1, 1]], [0.5], [2])], [1, 2])


def test_eval_plan_groups_by_canvas_and_pads():
    sizes = [(100, 200), (200, 100), (100, 200), None, (150, 150), (100, 200)]
    plan = evaluation.eval_plan(SizedSource(sizes), 2, min_size=64, max_size=128)
    seen = np.concatenate([row for _, row in plan])
    assert sorted(seen[seen >= 0].tolist()) == list(range(6))  # every image exactly once
    assert all(len(row) == 2 for _, row in plan)
    canvases = {int(i): c for c, row in plan for i in row if i >= 0}
    assert canvases[0] == canvases[2] == canvases[5] == (64, 128)  # landscape
    assert canvases[1] == (128, 64) and canvases[4] == (64, 64)
    assert canvases[3] == (128, 128)  # unknown size: the canvas that fits any image
    assert (seen == -1).sum() == len(plan) * 2 - 6


# ------------------------------------------------------------- evaluate() on a known model
# Lively random weights whose class logits are a per-class bias + small noise: "cat" (bias +1,
# scores ~0.73) and "dog" (bias 0, ~0.5) detect, "never" and "absent" (bias -30) never do. The
# ground truth is the model's own cat and dog detections (rj.predict, same images and sizes)
# plus one "never" box per image and nothing of "absent", so per class AP is known exactly:
# cat 1, never 0 (recall 0), dog 1, absent NaN (no ground truth) -> AP = (1 + 0 + 1) / 3, at
# every IoU threshold (evaluate and predict differ by float rounding only, IoU ~ 1). Original
# images are 48x64, resized to 64x85 (min_size 64): the boxes must be rescaled by 48/64 and
# 64/85 to match the ground truth.
EVAL_NAMES = ["cat", "never", "dog", "absent"]
EVAL_HW = (48, 64)
EVAL_KW = dict(min_size=64, max_size=128, detections_per_img=100)
NEVER_BOX = [4.0, 4.0, 30.0, 20.0]


class _OwnDetectionsSource:
    class_names = EVAL_NAMES

    def __init__(self, images, detections):
        self.examples = []
        for i, (image, det) in enumerate(zip(images, detections)):
            keep = det["scores"] > 0.3
            self.examples.append(
                {
                    "image_id": 10 + i,
                    "image": image,
                    "boxes": np.concatenate([det["boxes"][keep], [NEVER_BOX]]).astype(np.float32),
                    "labels": np.concatenate([det["labels"][keep], [1]]).astype(np.int32),
                }
            )

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]

    def image_size(self, i):
        return EVAL_HW


def _pycocotools_on_files(gt_path, det_path):
    """COCOeval on the two files alone: (stats[:6], per-category AP@[.5:.95] in id order)."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt_path))
        ref = COCOeval(coco, coco.loadRes(str(det_path)), "bbox")
        ref.evaluate()
        ref.accumulate()
        ref.summarize()
    precision = ref.eval["precision"][:, :, :, 0, -1]  # [iou, recall, category], area all, 100 dets
    per_class = [
        float(p[p > -1].mean()) if (p > -1).any() else math.nan for p in np.moveaxis(precision, -1, 0)
    ]
    return ref.stats[:6], per_class


@pytest.mark.slow
def test_evaluate_gives_known_ap_and_pycocotools_agrees_on_its_files(tmp_path):
    import jax
    from detection_utils import lively_variables

    import retinanet_jax as rj
    from retinanet_jax.parallel import mesh as parallel

    model = rj.RetinaNet(num_classes=4, backbone="resnet18", fpn_channels=32, variant="v1")
    variables = lively_variables(model, cls_bias=(1.0, -30.0, 0.0, -30.0))
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, EVAL_HW + (3,), np.uint8) for _ in range(6)]
    dets = rj.predict(model, variables, images, batch_size=6, **EVAL_KW)  # canvas 64x96
    source = _OwnDetectionsSource(images, dets)
    gt_labels = np.concatenate([ex["labels"] for ex in source.examples])
    # A meaningful case: several cat and dog boxes, spread over the whole 48x64 image.
    assert (gt_labels == 0).sum() >= 5 and (gt_labels == 2).sum() >= 5 and (gt_labels == 3).sum() == 0
    gt_boxes = np.concatenate([ex["boxes"] for ex in source.examples])
    assert gt_boxes[:, 2].max() > 50 and gt_boxes[:, 3].max() > 40

    det_path = tmp_path / "dets.json"
    # 6 images, 4 per batch over 2 devices: a full and a padded batch; the same 64x96 canvas as
    # predict's (padding beyond it would change the features near the border).
    m = evaluation.evaluate(
        model,
        variables,
        source,
        mesh=parallel.make_mesh(devices=jax.devices()[:2]),
        batch_size=4,
        buckets=[(64, 96)],
        output_path=det_path,
        **EVAL_KW,
    )
    assert m["num_images"] == 6
    assert m["class_names"] == EVAL_NAMES
    per_class = m["per_class_AP"]
    assert per_class[:3] == [pytest.approx(1.0, abs=1e-12), 0.0, pytest.approx(1.0, abs=1e-12)], per_class
    assert math.isnan(per_class[3])
    for k in ("AP", "AP50", "AP75"):
        assert m[k] == pytest.approx(2 / 3, abs=1e-12), k

    # pycocotools on its own, from files: the ground truth written here from the source's
    # examples, the detections as evaluate() wrote them.
    gt_json = {
        "images": [
            {"id": ex["image_id"], "height": EVAL_HW[0], "width": EVAL_HW[1]} for ex in source.examples
        ],
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(EVAL_NAMES)],
        "annotations": [],
    }
    for ex in source.examples:
        for (x1, y1, x2, y2), label in zip(ex["boxes"].tolist(), ex["labels"].tolist()):
            gt_json["annotations"].append(
                {
                    "id": len(gt_json["annotations"]) + 1,
                    "image_id": ex["image_id"],
                    "category_id": label + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt_json))
    stats, ref_per_class = _pycocotools_on_files(gt_path, det_path)
    np.testing.assert_allclose(stats[:3], [2 / 3] * 3, atol=1e-12)  # AP, AP50, AP75
    np.testing.assert_allclose([m[k] for k in evaluation.COCO_METRICS], stats, atol=1e-12)
    np.testing.assert_allclose(ref_per_class, [1.0, 0.0, 1.0, math.nan], atol=1e-12)

    # The file holds predict's detections in original pixels (predict resizes on the device,
    # evaluate on the host: float rounding apart, the same).
    results = json.loads(det_path.read_text())
    for i, det in enumerate(dets):
        mine = sorted((r for r in results if r["image_id"] == 10 + i), key=lambda r: -r["score"])
        assert len(mine) == len(det["scores"])
        xyxy = np.asarray([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in mine)])
        np.testing.assert_allclose(xyxy, det["boxes"], atol=2e-3)  # json rounds to 1e-3
        np.testing.assert_allclose([r["score"] for r in mine], det["scores"], atol=1e-5)
        assert [r["category_id"] - 1 for r in mine] == det["labels"].tolist()
