"""The porter's workflow from the README, as a user runs it: a torchvision COCO checkpoint
(91 outputs, "N/A" ten times among their names) converted, then evaluated on a COCO-JSON set
with the 80 real COCO categories.

The checkpoint is torchvision's ``retinanet_resnet50_fpn`` with random weights (no download
here); images are small (min_size = max_size = 128) so the ResNet-50 runs in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SIZE = 128


def _cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "retinanet_jax.cli", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def coco_v1_pth(tmp_path_factory) -> Path:
    torch = pytest.importorskip("torch")
    tvd = pytest.importorskip("torchvision.models.detection")
    torch.manual_seed(0)
    tv = tvd.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    with torch.no_grad():  # a lively class head: some detections score above 0.05
        tv.head.classification_head.cls_logits.bias.normal_(-1.0, 1.0)
    path = tmp_path_factory.mktemp("tv") / "retinanet_resnet50_fpn_coco.pth"
    torch.save(tv.state_dict(), path)
    return path


def _coco_val(folder: Path) -> Path:
    """Three images, boxes of a few of the 80 COCO categories (real ids and names)."""
    from retinanet_jax.data.categories import COCO_V1_CATEGORIES

    categories = [{"id": i, "name": n} for i, n in enumerate(COCO_V1_CATEGORIES)
                  if n not in ("__background__", "N/A")]
    assert len(categories) == 80
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), np.uint8)).save(folder / f"{i}.jpg")
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "height": SIZE, "width": SIZE})
        for cat in (1, 3, 18):  # person, car, dog
            x, y = rng.uniform(0, SIZE / 2, 2)
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": cat,
                                "bbox": [x, y, 40.0, 30.0], "area": 1200.0, "iscrowd": 0})
    path = folder / "val.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def test_convert_then_evaluate_a_torchvision_coco_model(coco_v1_pth, tmp_path):
    _cli("convert", coco_v1_pth, "models/coco_v1", cwd=tmp_path)
    val = _coco_val(tmp_path)
    proc = _cli("evaluate", "models/coco_v1", "--data", "coco_json", f"annotation_file={val}",
                f"image_dir={tmp_path}", "--min-size", SIZE, "--max-size", SIZE, "--out-dir", "ev",
                cwd=tmp_path)
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["num_images"] == 3
    assert len(metrics["per_class"]) == 80 and "N/A" not in metrics["per_class"]
    # The 11 outputs without a dataset class ("__background__" and the ten "N/A") are reported.
    absent = metrics["absent_outputs"]
    assert [a["label"] for a in absent] == [0, 12, 26, 29, 30, 45, 66, 68, 69, 71, 83]
    assert [a["name"] for a in absent].count("N/A") == 10
    assert "11 of 91 model outputs are not dataset classes" in proc.stderr and "N/A (x10)" in proc.stderr
    for name in ("person", "car", "dog"):  # classes with ground truth get a finite AP
        assert 0.0 <= metrics["per_class"][name]["AP"] <= 1.0
        assert metrics["per_class"][name]["num_gt"] == 3
