"""The whole detector exported to ONNX (normalization, forward, top-k, decoding, NMS in one graph)
gives ``rj.predict``'s detections in onnxruntime, for converted torchvision v1 and v2 weights.

Needs the ``onnx`` extra (jax2onnx, onnx, onnxruntime), which the main test command does not
install: .ci/run installs it and runs this file on its own; elsewhere the tests skip.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

_EXTRA = "the onnx extra is not installed (pip install -e '.[onnx]': jax2onnx, onnx, onnxruntime)"
pytest.importorskip("jax2onnx", reason=_EXTRA)
onnx = pytest.importorskip("onnx", reason=_EXTRA)
ort = pytest.importorskip("onnxruntime", reason=_EXTRA)
torch = pytest.importorskip("torch", reason="torch/torchvision build the reference weights")

from test_detection_parity import count_matches  # noqa: E402
from tv_utils import make_jax_from_tv  # noqa: E402

import retinanet_jax as rj  # noqa: E402
from retinanet_jax.cli.main import main  # noqa: E402
from retinanet_jax.inference.onnx_export import export_onnx  # noqa: E402

CANVAS = 256
SIZES = [(256, 256), (192, 256)]  # the second leaves 64 padding rows
DETECTIONS = 1000  # more than the default 300: more of the NMS is compared


def _inputs():
    """Noise images used unscaled (min_size = max_size = 256), on one canvas whose padding is
    filled with 255 (what lies outside image_sizes must not matter)."""
    rng = np.random.default_rng(7)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]
    canvas = np.full((len(images), CANVAS, CANVAS, 3), 255, np.uint8)
    for i, im in enumerate(images):
        canvas[i, : im.shape[0], : im.shape[1]] = im
    return images, canvas, np.asarray(SIZES, np.int32)


def _run_onnxruntime(model_bytes_or_path, canvas, sizes):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3  # no notices about unused loop-body constants
    sess = ort.InferenceSession(model_bytes_or_path, opts, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["images", "image_sizes"]
    assert [o.name for o in sess.get_outputs()] == ["boxes", "scores", "labels", "num_valid"]
    return sess.run(None, {"images": canvas, "image_sizes": sizes})


def _check_same_detections(outputs, want, what):
    boxes, scores, labels, num_valid = outputs
    assert boxes.dtype == scores.dtype == np.float32 and labels.dtype == num_valid.dtype == np.int32
    assert boxes.shape == (len(SIZES), DETECTIONS, 4) and num_valid.shape == (len(SIZES),)
    total = matched = 0
    for i, w in enumerate(want):
        n = int(num_valid[i])
        got = {"boxes": boxes[i, :n], "scores": scores[i, :n], "labels": labels[i, :n]}
        total += len(w["scores"])
        matched += count_matches(w, got)
        assert abs(n - len(w["scores"])) <= max(2, 0.01 * len(w["scores"])), (what, i, n, len(w["scores"]))
        assert np.all(np.diff(scores[i, :n]) <= 0), "scores sorted descending"
        assert np.all(scores[i, n:] == 0) and np.all(labels[i, n:] == -1)
        h, w_ = SIZES[i]
        assert boxes[i, :n, 2].max() <= w_ + 1e-3 and boxes[i, :n, 3].max() <= h + 1e-3  # clipped
    assert total > 1000, f"{what}: too few detections ({total}) for a meaningful comparison"
    print(f"{what}: onnxruntime matched {matched} of {total} rj.predict detections")
    assert matched >= 0.99 * total, f"{what}: matched {matched} of {total}"
    return matched, total


def _graph_ops(proto):
    ops = set()

    def walk(g):
        for n in g.node:
            assert n.domain in ("", "ai.onnx"), f"non-standard operator {n.domain}::{n.op_type}"
            ops.add(n.op_type)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)

    walk(proto.graph)
    return ops


@pytest.mark.slow
def test_v1_onnxruntime_matches_predict():
    _, model, variables = make_jax_from_tv("v1")
    images, canvas, sizes = _inputs()
    proto = export_onnx(
        model, variables, batch_size=len(SIZES), canvas=(CANVAS, CANVAS), detections_per_img=DETECTIONS
    )
    ops = _graph_ops(proto)
    # The whole detector: convolutions, the per-level top-k, NMS as a loop; no ONNX NMS operator.
    assert {"Conv", "MaxPool", "TopK", "Loop", "Sigmoid", "Exp"} <= ops and "NonMaxSuppression" not in ops
    got = _run_onnxruntime(proto.SerializeToString(), canvas, sizes)
    want = rj.predict(
        model,
        variables,
        images,
        min_size=CANVAS,
        max_size=CANVAS,
        batch_size=len(SIZES),
        detections_per_img=DETECTIONS,
    )
    _check_same_detections(got, want, "v1")


@pytest.mark.slow
def test_v2_cli_export_onnx_matches_predict(tmp_path):
    tv, model, variables = make_jax_from_tv("v2")
    torch.save(tv.state_dict(), tmp_path / "tv_v2.pth")
    out = tmp_path / "det.onnx"
    code = main(
        [
            "export",
            str(tmp_path / "tv_v2.pth"),
            str(out),
            "--format",
            "onnx",
            "--batch-size",
            str(len(SIZES)),
            "--canvas",
            str(CANVAS),
            str(CANVAS),
            "--min-size",
            str(CANVAS),
            "--max-size",
            str(CANVAS),
            "--detections-per-img",
            str(DETECTIONS),
        ]
    )
    assert code == 0
    assert out.stat().st_size < 200e6  # weights once (the heads are shared by the 5 levels)
    meta = json.loads(out.with_name("det.onnx.json").read_text())
    assert meta["format"] == "retinanet_jax.onnx" and meta["model"]["variant"] == "v2"
    assert meta["inputs"] == [
        {"name": "images", "shape": [2, CANVAS, CANVAS, 3], "dtype": "uint8"},
        {"name": "image_sizes", "shape": [2, 2], "dtype": "int32", "meaning": "(h, w)"},
    ]
    assert [o["name"] for o in meta["outputs"]] == ["boxes", "scores", "labels", "num_valid"]
    assert len(meta["class_names"]) == 91 and meta["resize"] == {"min_size": CANVAS, "max_size": CANVAS}
    images, canvas, sizes = _inputs()
    got = _run_onnxruntime(str(out), canvas, sizes)
    want = rj.predict(
        model,
        variables,
        images,
        min_size=CANVAS,
        max_size=CANVAS,
        batch_size=len(SIZES),
        detections_per_img=DETECTIONS,
    )
    _check_same_detections(got, want, "v2")
