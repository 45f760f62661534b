"""``retinanet-jax`` driven as a user would: subprocesses on files the tests write.

Models are small (ResNet-18, 32-channel FPN, 3 classes, 64 px images) except for the
torchvision round trip, which uses torchvision's own ResNet-50 builders with random weights.
Every image fits one 64x64 canvas unscaled (min_size = max_size = 64), so each process
compiles the detector once.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import tomllib
from detection_utils import lively_variables
from PIL import Image

import retinanet_jax as rj
from retinanet_jax.data.categories import COCO_V1_CATEGORIES
from retinanet_jax.interop import model_dir as model_io
from retinanet_jax.models.spec import model_spec

REPO = Path(__file__).resolve().parents[1]
NAMES = ["cat", "dog", "bird"]
SIZE = 64  # min_size = max_size: every test image (long side 64) is used unscaled
OPTS = ["--min-size", str(SIZE), "--max-size", str(SIZE), "--detections-per-img", "100"]


def _env(with_repo: bool = True) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
    env["JAX_PLATFORMS"] = "cpu"  # one CPU device: no 8-device XLA_FLAGS from conftest
    if with_repo:
        env["PYTHONPATH"] = str(REPO)
    return env


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "retinanet_jax.cli.main", *map(str, args)],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny():
    """(model, variables, Predictor with the CLI options used below)."""
    model = rj.RetinaNet(num_classes=len(NAMES), backbone="resnet18", fpn_channels=32, variant="v1")
    variables = lively_variables(model)
    predictor = rj.Predictor(
        model,
        variables,
        min_size=SIZE,
        max_size=SIZE,
        batch_size=1,
        buckets=[(SIZE, SIZE)],
        detections_per_img=100,
    )
    return model, variables, predictor


@pytest.fixture(scope="module")
def model_dir(tiny, tmp_path_factory):
    model, variables, _ = tiny
    path = tmp_path_factory.mktemp("models") / "tiny"
    model_io.save_model(str(path), model_io.LoadedModel(model, variables, NAMES, [1, 2, 3], "test"))
    return path


def _image(h: int, w: int, seed: int) -> np.ndarray:
    # Smooth colour gradients plus noise: compress well and look like something.
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w)], -1)
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------ help, entry point


def test_help_of_every_command_explains_arguments_with_an_example(tmp_path):
    commands = {
        "convert": ["--num-classes", "--no-verify", "SRC", "DST"],
        "predict": ["--draw", "--display-thresh", "--score-thresh", "--output", "INPUT"],
        "evaluate": ["--data", "--config", "--out-dir", "--class-map", "--step"],
        "export": ["--canvas", "--input-dtype", "--platforms", "--batch-size"],
    }
    procs = {
        c: subprocess.Popen(
            [sys.executable, "-m", "retinanet_jax.cli.main", c, "--help"],
            cwd=tmp_path,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for c in commands
    }  # in parallel: each imports jax
    out = {c: p.communicate(timeout=120) + (p.returncode,) for c, p in procs.items()}
    for command, flags in commands.items():
        stdout, stderr, code = out[command]
        assert code == 0, stderr
        assert "examples:" in stdout and f"retinanet-jax {command} " in stdout.split("examples:")[1]
        for flag in flags:
            assert flag in stdout, (command, flag)


def test_console_script_entry_point(capsys, monkeypatch):
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, func = scripts["retinanet-jax"].partition(":")
    assert (module, func) == ("retinanet_jax.cli.main", "console_main")
    from retinanet_jax.backends.cpu import hostmem
    from retinanet_jax.cli import main as cli

    # console_main re-executes itself for huge-page malloc (hostmem.py): opted out here, or it
    # would replace the pytest process.
    monkeypatch.setenv(hostmem.OPT_OUT, "0")
    monkeypatch.setattr("sys.argv", ["retinanet-jax", "--help"])
    with pytest.raises(SystemExit) as e:
        getattr(cli, func)()
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(c in out for c in ("convert", "predict", "evaluate", "export"))


# ------------------------------------------------------------------------------ convert


def test_convert_torchvision_both_ways_reloads_strictly(tmp_path):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    build = torchvision.models.detection.retinanet_resnet50_fpn_v2
    torch.manual_seed(0)
    tv = build(weights=None, weights_backbone=None, num_classes=4)
    sd = {k: v.clone() for k, v in tv.state_dict().items()}
    torch.save(sd, tmp_path / "tv.pth")

    _ok(run_cli("convert", "tv.pth", "jax_model", cwd=tmp_path))
    meta = json.loads((tmp_path / "jax_model" / "model.json").read_text())
    assert meta["model"]["variant"] == "v2" and meta["model"]["backbone"] == "resnet50"  # read from keys
    assert meta["model"]["num_classes"] == 4 and meta["model"]["frozen_bn"] is False
    assert meta["category_ids"] == [0, 1, 2, 3]  # torchvision labels are category ids

    proc = _ok(run_cli("convert", "jax_model", "back.pth", cwd=tmp_path))
    assert "strict=True" in proc.stderr and "verified" in proc.stderr
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    tv.load_state_dict(back, strict=True)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k  # bit for bit

    exists = run_cli("convert", "tv.pth", "jax_model", cwd=tmp_path)
    assert exists.returncode == 2 and "jax_model: exists" in exists.stderr


def test_bad_checkpoints_get_errors_naming_the_file(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.json").write_text("{not json")
    for name, what in (("empty", "not a checkpoint"), ("broken", "not valid JSON")):
        proc = run_cli("predict", name, "x.png", cwd=tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert name in proc.stderr and what in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------ predict


def _write_inputs(folder: Path) -> dict[str, np.ndarray]:
    """Valid images (RGB JPEG / PNG, grayscale PNG, RGBA PNG) plus broken files; returns
    {file name: decoded RGB array} of the valid ones."""
    folder.mkdir()
    Image.fromarray(_image(SIZE, SIZE, 1)).save(folder / "a_rgb.jpg", quality=95)
    Image.fromarray(_image(48, SIZE, 2)).save(folder / "b_rgb.png")
    Image.fromarray(_image(SIZE, 40, 3)).convert("L").save(folder / "c_gray.png")
    rgba = np.dstack([_image(SIZE, SIZE, 4), np.full((SIZE, SIZE), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "d_rgba.png")
    jpeg = io.BytesIO()
    Image.fromarray(_image(SIZE, SIZE, 5)).save(jpeg, format="JPEG")
    (folder / "e_truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (folder / "f_text.jpg").write_text("this is not a JPEG\n")
    (folder / "notes.txt").write_text("not an image extension: ignored\n")
    good = ["a_rgb.jpg", "b_rgb.png", "c_gray.png", "d_rgba.png"]
    return {n: np.asarray(Image.open(folder / n).convert("RGB")) for n in good}


def test_predict_folder_with_bad_files_json_and_drawings(tiny, model_dir, tmp_path):
    _, _, predictor = tiny
    images = _write_inputs(tmp_path / "in")
    proc = run_cli(
        "predict",
        model_dir,
        "in",
        "-o",
        "out/dets.json",
        "--draw",
        "out/draw",
        "--batch-size",
        "1",
        *OPTS,
        cwd=tmp_path,
    )
    # Every bad file named, the rest processed, non-zero status at the end.
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for bad in ("e_truncated.jpg", "f_text.jpg"):
        assert f"in/{bad}" in proc.stderr
    assert "notes.txt" not in proc.stderr
    assert "6/6 images (2 failed" in proc.stderr  # plain progress lines off a terminal

    results = json.loads((tmp_path / "out" / "dets.json").read_text())
    by_file: dict[str, list] = {}
    for r in results:
        by_file.setdefault(os.path.basename(r["file_name"]), []).append(r)
    assert sorted(by_file) == sorted(images)
    expected = predictor(list(images.values()))
    for (name, image), want in zip(images.items(), expected):
        got = by_file[name]
        assert len({r["image_id"] for r in got}) == 1 and len(got) == len(want["scores"]) > 0
        np.testing.assert_allclose([r["score"] for r in got], want["scores"], atol=1e-5)
        assert [r["category_id"] for r in got] == (want["labels"] + 1).tolist()
        assert [r["category_name"] for r in got] == [NAMES[i] for i in want["labels"]]
        xywh = np.asarray([r["bbox"] for r in got])
        np.testing.assert_allclose(xywh[:, :2] + xywh[:, 2:], want["boxes"][:, 2:], atol=2e-3)
        np.testing.assert_allclose(xywh[:, :2], want["boxes"][:, :2], atol=1e-3)

        with Image.open(tmp_path / "out" / "draw" / (Path(name).stem + ".png")) as drawn:
            assert drawn.format == "PNG" and drawn.size == (image.shape[1], image.shape[0])
            diff = np.any(np.asarray(drawn.convert("RGB")) != image, axis=-1)
        shown = want["boxes"][want["scores"] > 0.5].round().astype(int)
        shown = shown[(shown[:, 2] - shown[:, 0] >= 4) & (shown[:, 3] - shown[:, 1] >= 4)]  # not clipped flat
        assert len(shown) > 0
        for x1, y1, x2, y2 in shown:  # the outline: pixels changed next to each edge's midpoint
            xm, ym = (x1 + x2) // 2, (y1 + y2) // 2
            for y, x in ((y1, xm), (y2 - 1, xm), (ym, x1), (ym, x2 - 1)):
                assert diff[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2].any(), (name, x1, y1, x2, y2)


def test_predict_16_bit_grayscale_file_equals_rj_predict_on_the_pil_image(tiny, model_dir, tmp_path):
    """A 16-bit grayscale PNG (PIL "I;16", values up to 65535) and an integer TIFF (PIL "I",
    every value <= 255): the CLI, which reads files through data.decode, and ``rj.predict`` on
    ``PIL.Image.open(path)`` see the same pixels, round(v / 257) whatever the values, so they
    give the same detections."""
    model, variables, _ = tiny
    folder = tmp_path / "in"
    folder.mkdir()
    gray = _image(SIZE, SIZE, 30)[..., 0]
    deep = gray.astype(np.uint16) * np.uint16(257)
    deep[0, 0] = 65535
    Image.fromarray(deep).save(folder / "a_16bit.png")
    Image.fromarray(gray.astype(np.int32), "I").save(folder / "b_int.tif")
    expected = {"a_16bit.png": np.rint(deep / 257.0), "b_int.tif": np.rint(gray / 257.0)}
    _ok(run_cli("predict", model_dir, "in", "-o", "dets.json", "--batch-size", "1", *OPTS, cwd=tmp_path))
    results = json.loads((tmp_path / "dets.json").read_text())
    opts = dict(min_size=SIZE, max_size=SIZE, detections_per_img=100)
    for name, mode in (("a_16bit.png", "I;16"), ("b_int.tif", "I")):
        with Image.open(folder / name) as im:
            assert im.mode == mode
            want = rj.predict(model, variables, [im], **opts)[0]
        # The same pixels as an explicit uint8 array of round(v / 257) (the rule itself).
        rgb = np.repeat(expected[name].astype(np.uint8)[..., None], 3, -1)
        ref = rj.predict(model, variables, [rgb], **opts)[0]
        for key in ("boxes", "scores", "labels"):
            np.testing.assert_array_equal(want[key], ref[key], err_msg=f"{name} {key}")
        got = [r for r in results if os.path.basename(r["file_name"]) == name]
        assert len(got) == len(want["scores"]) > 0, name
        np.testing.assert_allclose([r["score"] for r in got], want["scores"], atol=1e-5, err_msg=name)
        assert [r["category_id"] for r in got] == (want["labels"] + 1).tolist()
        xywh = np.asarray([r["bbox"] for r in got])
        np.testing.assert_allclose(xywh[:, :2], want["boxes"][:, :2], atol=1e-3, err_msg=name)
        np.testing.assert_allclose(xywh[:, :2] + xywh[:, 2:], want["boxes"][:, 2:], atol=2e-3, err_msg=name)


# ------------------------------------------------------------------------------ evaluate


@pytest.fixture(scope="module")
def train_workdir(tiny, tmp_path_factory) -> Path:
    """A train.py-style workdir: step 1 (dead class head, but the best eval/AP) and step 2."""
    import optax

    from retinanet_jax.training.checkpoint import Checkpointer
    from retinanet_jax.training.step import create_train_state

    model, variables, _ = tiny
    path = tmp_path_factory.mktemp("run")
    dead = lively_variables(model, cls_bias=(-30.0, -30.0, -30.0))
    config = {"eval": {"min_size": SIZE, "max_size": SIZE}, "model": {"backbone": "resnet18"}}
    with Checkpointer(path / "checkpoints", async_save=False) as ckpt:
        for step, v, ap in ((1, dead, 0.9), (2, variables, 0.1)):
            state = create_train_state(model, v, optax.sgd(0.1), trainable_backbone_layers=3)
            ckpt.save(
                step,
                state,
                config=config,
                class_names=NAMES,
                metrics={"eval/AP": ap},
                extra={"model": model_spec(model)},
            )
    return path


def _coco_dataset(tiny, folder: Path) -> tuple[Path, dict]:
    """Three images whose ground truth is the model's own detections of cat and dog, plus one
    bird the model cannot detect: per-class AP is then exactly cat 1, dog 1, bird 0."""
    _, _, predictor = tiny
    folder.mkdir()
    images = [_image(SIZE, SIZE, 10 + i) for i in range(3)]
    dets = predictor(images)
    coco = {
        "images": [],
        "annotations": [],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "bird"}],
    }
    for i, (image, det) in enumerate(zip(images, dets)):
        Image.fromarray(image).save(folder / f"{i}.png")
        coco["images"].append({"id": 100 + i, "file_name": f"{i}.png", "height": SIZE, "width": SIZE})
        boxes = [b.tolist() for b in det["boxes"]] + ([[5.0, 5.0, 40.0, 30.0]] if i == 0 else [])
        labels = det["labels"].tolist() + ([2] if i == 0 else [])
        for (x1, y1, x2, y2), label in zip(boxes, labels):
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": 100 + i,
                    "category_id": label + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    assert {a["category_id"] for a in coco["annotations"]} == {1, 2, 3}
    (folder / "gt.json").write_text(json.dumps(coco))
    return folder / "gt.json", coco


def test_evaluate_training_workdir_matches_pycocotools(tiny, train_workdir, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_path, _ = _coco_dataset(tiny, tmp_path / "data")
    proc = _ok(
        run_cli(
            "evaluate",
            train_workdir,
            "--step",
            "2",
            "--data",
            "coco_json",
            f"annotation_file={gt_path}",
            f"image_dir={gt_path.parent}",
            "--out-dir",
            "ev",
            "--detections-per-img",
            "100",
            cwd=tmp_path,
        )
    )
    assert "checkpoints/2" in proc.stderr
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    per_class = {n: v["AP"] for n, v in metrics["per_class"].items()}
    # Known answers: every detection is a true positive for cat and dog, the bird is missed.
    assert per_class == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0), "bird": pytest.approx(0.0)}
    assert metrics["AP"] == pytest.approx(2 / 3) and metrics["AP50"] == pytest.approx(2 / 3)
    assert metrics["num_images"] == 3 and metrics["step"] == 2

    # pycocotools on the annotation file and the detections the command wrote agrees.
    coco_gt = COCO(str(gt_path))
    results = json.loads((tmp_path / "ev" / "detections.json").read_text())
    coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), iouType="bbox")
    coco_eval.evaluate(), coco_eval.accumulate(), coco_eval.summarize()
    for i, key in enumerate(("AP", "AP50", "AP75", "APs", "APm", "APl")):
        assert metrics[key] == pytest.approx(coco_eval.stats[i], abs=1e-9), key
    for k, name in enumerate(NAMES):
        p = coco_eval.eval["precision"][:, :, k, 0, -1]
        assert per_class[name] == pytest.approx(p[p > -1].mean(), abs=1e-9)
    assert all(s in proc.stdout for s in ("AP50", "AR100", "cat", "dog", "bird"))  # the printed table
    for png in ["pr_all.png"] + [f"pr_{k:03d}_{n}.png" for k, n in enumerate(NAMES)]:
        with Image.open(tmp_path / "ev" / png) as im:
            assert im.format == "PNG" and im.size == (640, 480)


def test_label_mapping_pairs_classes_by_name_or_position():
    from retinanet_jax.cli.evaluate import label_mapping

    # torchvision's 91 COCO outputs against a dataset of 3 COCO classes: by name, rest dropped.
    coco = list(COCO_V1_CATEGORIES)
    mapping = label_mapping(coco, 91, ["dog", "person", "toothbrush"])
    assert mapping[18] == 0 and mapping[1] == 1 and mapping[90] == 2
    assert (np.delete(mapping, [18, 1, 90]) == -1).all()
    with pytest.raises(ValueError, match="'unicorn'.*--class-map index"):
        label_mapping(coco, 91, ["dog", "unicorn"])
    assert label_mapping(None, 3, ["a", "b"]).tolist() == [0, 1, -1]  # no names: by position
    assert label_mapping(["x", "y"], 2, ["a", "b"], "index").tolist() == [0, 1]


def test_training_workdir_loads_best_step_by_default(tiny, train_workdir, tmp_path):
    import flax

    _ok(run_cli("convert", train_workdir, "best", cwd=tmp_path))
    meta = json.loads((tmp_path / "best" / "model.json").read_text())
    assert meta["step"] == 1 and meta["class_names"] == NAMES  # best eval/AP, not the latest
    assert meta["preprocess"] == {"min_size": SIZE, "max_size": SIZE}
    restored = flax.serialization.msgpack_restore((tmp_path / "best" / "variables.msgpack").read_bytes())
    want = lively_variables(tiny[0], cls_bias=(-30.0, -30.0, -30.0))
    flat_got = flax.traverse_util.flatten_dict(restored)
    flat_want = flax.traverse_util.flatten_dict(jax.device_get(want))
    assert flat_got.keys() == flat_want.keys()
    for k, v in flat_want.items():
        np.testing.assert_array_equal(flat_got[k], v, err_msg=str(k))


# ------------------------------------------------------------------------------ export

_CHILD = """
import json, sys
import numpy as np
from jax import export
exp = export.deserialize(bytearray(open("det.jaxexport", "rb").read()))
meta = json.load(open("det.jaxexport.json"))
x = np.load("inputs.npz")
out = exp.call(x["images"], x["image_sizes"])
np.savez("outputs.npz", **dict(zip(["boxes", "scores", "labels", "num_valid"], map(np.asarray, out))))
print(json.dumps({"platforms": list(exp.platforms), "meta_platforms": meta["platforms"],
                  "imported_retinanet_jax": any(m.startswith("retinanet_jax") for m in sys.modules)}))
"""


def test_export_reloads_without_the_library_and_matches_predict(tiny, model_dir, tmp_path):
    _, _, predictor = tiny
    _ok(
        run_cli(
            "export",
            model_dir,
            "det.jaxexport",
            "--batch-size",
            "2",
            "--canvas",
            SIZE,
            SIZE,
            *OPTS,
            cwd=tmp_path,
        )
    )
    images = [_image(SIZE, SIZE, 20), _image(48, SIZE, 21)]  # the second one leaves padding
    canvas = np.zeros((2, SIZE, SIZE, 3), np.uint8)
    for i, im in enumerate(images):
        canvas[i, : im.shape[0], : im.shape[1]] = im
    canvas[1, 48:] = 255  # whatever lies outside image_sizes must not matter
    sizes = np.asarray([im.shape[:2] for im in images], np.int32)
    np.savez(tmp_path / "inputs.npz", images=canvas, image_sizes=sizes)
    (tmp_path / "child.py").write_text(_CHILD)
    child = _ok(
        subprocess.run(
            [sys.executable, "child.py"],
            cwd=tmp_path,
            env=_env(with_repo=False),
            capture_output=True,
            text=True,
            timeout=600,
        )
    )
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report == {
        "platforms": ["cpu", "cuda", "tpu"],
        "meta_platforms": ["cpu", "cuda", "tpu"],
        "imported_retinanet_jax": False,
    }

    got = np.load(tmp_path / "outputs.npz")
    for i, want in enumerate(predictor(images)):
        n = int(got["num_valid"][i])
        assert n == len(want["scores"]) > 0
        np.testing.assert_array_equal(got["labels"][i, :n], want["labels"])
        np.testing.assert_allclose(got["scores"][i, :n], want["scores"], atol=1e-5)
        np.testing.assert_allclose(got["boxes"][i, :n], want["boxes"], atol=1e-3)
