"""``retinanet-jax evaluate``: COCO metrics with per-class AP, the results JSON and PR plots.

The dataset is any source ``train.py`` reads: ``--data SOURCE key=value ...`` (the keyword
arguments of ``retinanet_jax.data.*Source``), a config file's split, or the config stored with
a training checkpoint. Inference and COCO metrics are ``evaluation.evaluate`` (torchvision's
eval preprocessing, canvas buckets, all local devices); a second pycocotools pass over the same
results gives the precision arrays for the plots.

Model labels meet dataset labels by class name (a torchvision COCO model's 91 outputs match a
COCO dataset's 80 classes this way; the unused outputs are dropped) or, with
``class_map="index"``, by position.
"""

from __future__ import annotations

import ast
import collections
import contextlib
import io
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

# ------------------------------------------------------------------------------ dataset


def parse_value(text: str) -> Any:
    """``"8"`` -> 8, ``"(64, 64)"`` -> (64, 64), ``"true"`` -> True, anything else -> the string."""
    lowered = {"true": True, "false": False, "none": None, "null": None}
    if text.lower() in lowered:
        return lowered[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_assignments(items: Sequence[str], what: str) -> dict[str, Any]:
    """``["a=1", "b.c=x"]`` -> ``{"a": 1, "b.c": "x"}``; ValueError naming ``what`` otherwise."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{what}: expected KEY=VALUE, got {item!r}")
        out[key.strip()] = parse_value(value.strip())
    return out


def load_config(path: str, overrides: dict[str, Any]) -> Any:
    """``get_config()`` of a config file (or a stored config dict) with dotted ``overrides``.
    ``FILE.py:ARG`` calls ``get_config("ARG")``, as train.py's ``--config`` does (ml_collections)."""
    import runpy

    from ml_collections import ConfigDict

    if isinstance(path, dict):
        config = ConfigDict(path)
    else:
        file, sep, arg = path.partition(":") if not os.path.isfile(path) else (path, "", "")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file}: config file not found")
        get_config = runpy.run_path(file)["get_config"]
        config = get_config(arg) if sep else get_config()
    for key, value in overrides.items():
        node, *parents = config, *key.split(".")[:-1]
        try:
            for part in parents:
                node = node[part]
            node[key.split(".")[-1]] = value
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"--set {key}={value!r}: {e}") from e
    return config


def build_source(data: Sequence[str] | None, config: Any, split: str, model_names: list[str] | None) -> Any:
    """The evaluation split: ``--data SOURCE k=v ...`` or ``config.dataset.<split>``."""
    from retinanet_jax.data.registry import SourceArgumentError, make_source

    if data:
        name, kwargs = data[0], parse_assignments(data[1:], f"--data {data[0]}")
        what, where = "--data SOURCE", f"--data {name}"
    else:
        try:
            name, kwargs = config.dataset.source, dict(config.dataset[split])
        except (KeyError, AttributeError) as e:
            raise ValueError(f"the config has no dataset.source / dataset.{split} ({e})") from e
        what, where = "config.dataset.source", f"config.dataset.{split}"
    if name == "voc_xml" and "class_names" not in kwargs and model_names:
        kwargs["class_names"] = list(model_names)  # the XMLs of one split may lack a class
    try:
        return make_source(name, kwargs, where=where, what=what)
    except SourceArgumentError as e:  # only the keyword check: a bad input, reported as such
        raise ValueError(str(e)) from e


# ------------------------------------------------------------------------------ label mapping


def label_mapping(
    model_names: list[str] | None, num_outputs: int, data_names: list[str], mode: str = "auto"
) -> np.ndarray:
    """int [num_outputs]: model label -> dataset label, -1 = output not in the dataset."""
    mapping = np.full(num_outputs, -1, np.int64)
    by_name = mode == "name" or (mode == "auto" and model_names is not None)
    if by_name:
        if model_names is None:
            raise ValueError("the model has no class names; use --class-map index or --class-names")
        index = {n.lower(): i for i, n in enumerate(data_names)}
        for label, name in enumerate(model_names):
            mapping[label] = index.get(name.lower(), -1)
        missing = sorted(set(range(len(data_names))) - set(mapping.tolist()))
        if missing:
            raise ValueError(
                f"dataset classes {[data_names[i] for i in missing]} are not among the model's "
                f"classes {model_names}; use --class-map index to pair them by position"
            )
        return mapping
    if num_outputs < len(data_names):
        raise ValueError(f"the model has {num_outputs} outputs, the dataset {len(data_names)} classes")
    mapping[: len(data_names)] = np.arange(len(data_names))
    return mapping


class EvalView:
    """The dataset in the model's label space, recording the ground truth it hands out.

    ``class_names`` / ``label_to_category_id`` have one entry per model output; outputs that
    are not dataset classes get unused category ids (no ground truth: pycocotools skips them).
    """

    def __init__(
        self,
        source: Any,
        mapping: np.ndarray,
        model_names: list[str] | None,
        data_ids: list[int],
        progress: Any = None,
    ):
        self.source, self.progress = source, progress
        self.inverse = np.zeros(len(source.class_names), np.int64)
        for label, d in enumerate(mapping):
            if d >= 0:
                self.inverse[d] = label
        spare = max(data_ids) + 1
        self.label_to_category_id = [data_ids[d] if d >= 0 else spare + i for i, d in enumerate(mapping)]
        data_names = list(source.class_names)
        self.class_names = [
            model_names[i] if model_names else (data_names[d] if d >= 0 else f"unused {i}")
            for i, d in enumerate(mapping)
        ]
        self.ground_truth: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.source)

    def image_size(self, i: int):
        return self.source.image_size(i) if hasattr(self.source, "image_size") else None

    def __getitem__(self, i: int) -> dict:
        ex = self.source[i]
        labels = np.asarray(ex["labels"], np.int64)
        self.ground_truth[int(ex["image_id"])] = {
            "image_id": int(ex["image_id"]),
            "image_hw": tuple(ex["image"].shape[:2]),
            "boxes": np.asarray(ex["boxes"], np.float32),
            "labels": labels,
        }
        if self.progress is not None:
            self.progress.update(1)
        return {**ex, "labels": self.inverse[labels].astype(np.int32)}


# ------------------------------------------------------------------------------ report


def precision_arrays(coco_gt: Any, results: list[dict], cat_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(recall thresholds [R], precision [T, R, K]) of COCOeval (area all, maxDets 100)."""
    from pycocotools.cocoeval import COCOeval

    from retinanet_jax.evaluation.loop import results_coco

    coco_eval = COCOeval(coco_gt, results_coco(coco_gt, results), iouType="bbox")
    coco_eval.params.catIds = list(cat_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval.evaluate()
        coco_eval.accumulate()
    return np.asarray(coco_eval.params.recThrs), coco_eval.eval["precision"][:, :, :, 0, -1]


def _no_nan(value: Any) -> Any:
    """NaN -> None, recursively (JSON has no NaN; a class without ground truth has no AP)."""
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, float) and value != value:
        return None
    return value


def _mean_valid(x: np.ndarray) -> float:
    x = x[x > -1]
    return float(x.mean()) if x.size else float("nan")


def write_plots(out_dir: str, recall: np.ndarray, precision: np.ndarray, names: list[str]) -> list[str]:
    """``pr_all.png`` (mean over classes with ground truth) and ``pr_<class>.png`` per class."""
    from retinanet_jax.cli import draw

    def curves(p: np.ndarray) -> list:  # p: [T, R] for one class or the class mean
        # Only a class without ground truth has -1 entries (then all of them are -1).
        mean_t = p.mean(0) if (p > -1).all() else np.full(p.shape[1], -1.0)
        return [
            (f"IoU 0.50: AP50 = {_mean_valid(p[0]):.3f}", recall, p[0]),
            (f"mean over IoU 0.50:0.95: AP = {_mean_valid(p):.3f}", recall, mean_t),
        ]

    sub = "COCOeval interpolated precision, area all, maxDets 100"
    written = []
    has_gt = (precision > -1).all(axis=(0, 1))
    mean = precision[:, :, has_gt].mean(-1) if has_gt.any() else np.full(precision.shape[:2], -1.0)
    plots = [("pr_all.png", "all classes (mean over classes)", mean)]
    for k, name in enumerate(names):
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or f"class{k}"
        plots.append((f"pr_{k:03d}_{slug}.png", f"class {name!r}", precision[:, :, k]))
    for file_name, title, p in plots:
        path = os.path.join(out_dir, file_name)
        draw.pr_plot(curves(p), f"Precision-recall: {title}", sub).save(path, format="PNG")
        written.append(path)
    return written


def format_report(
    metrics: dict, names: list[str], ap: list[float], ap50: list[float], gt_counts: list[int], header: str
) -> str:
    """The COCO summary and a per-class table as text."""
    rows = [header, "-" * 56]
    rows += [
        f"  {k:<6}{metrics[k]:>8.4f}   {d}"
        for k, d in (
            ("AP", "IoU 0.50:0.95, area all, maxDets 100"),
            ("AP50", "IoU 0.50"),
            ("AP75", "IoU 0.75"),
            ("APs", "small (< 32^2 px)"),
            ("APm", "medium"),
            ("APl", "large (> 96^2 px)"),
            ("AR1", "recall, maxDets 1"),
            ("AR10", "maxDets 10"),
            ("AR100", "maxDets 100"),
        )
    ]
    rows += ["-" * 56, f"  {'class':<28}{'AP':>8}{'AP50':>8}{'#gt':>8}"]
    rows += [f"  {n[:27]:<28}{a:>8.4f}{b:>8.4f}{c:>8d}" for n, a, b, c in zip(names, ap, ap50, gt_counts)]
    return "\n".join(rows)


def _counted(names: list[str]) -> str:
    """'a, N/A (x10), b' in first-seen order."""
    counts = collections.Counter(names)
    return ", ".join(n if counts[n] == 1 else f"{n} (x{counts[n]})" for n in dict.fromkeys(names))


def run_evaluate(loaded: Any, source: Any, *, out_dir: str, class_map: str, **options: Any) -> int:
    """Evaluate, print the table, write detections.json / metrics.json / PR plots to ``out_dir``."""
    from retinanet_jax.cli.progress import ImageProgress
    from retinanet_jax.data.categories import default_category_ids
    from retinanet_jax.evaluation import loop as evaluation

    data_names = [str(n) for n in source.class_names]
    data_ids = list(getattr(source, "label_to_category_id", None) or default_category_ids(len(data_names)))
    mapping = label_mapping(loaded.class_names, loaded.model.num_classes, data_names, class_map)
    absent = [
        {"label": label, "name": loaded.label_name(label)}
        for label in range(loaded.model.num_classes)
        if mapping[label] < 0
    ]
    if absent:
        print(
            f"{len(absent)} of {loaded.model.num_classes} model outputs are not dataset classes "
            f"(absent: no AP): {_counted([a['name'] for a in absent])}",
            file=sys.stderr,
        )
    total = len(source) if options.get("max_images") is None else min(len(source), options["max_images"])
    progress = ImageProgress(total)
    view = EvalView(source, mapping, loaded.class_names, data_ids, progress)
    os.makedirs(out_dir, exist_ok=True)
    det_path = os.path.join(out_dir, "detections.json")
    try:
        metrics = evaluation.evaluate(loaded.model, loaded.variables, view, output_path=det_path, **options)
    finally:
        progress.close()
    known = set(data_ids)
    with open(det_path) as f:
        results = [r for r in json.load(f) if r["category_id"] in known]
    evaluation.write_json_atomic(results, det_path)  # without the outputs the dataset lacks

    gts = list(view.ground_truth.values())
    coco_gt = evaluation.coco_ground_truth(gts, data_names, data_ids)
    recall, precision = precision_arrays(coco_gt, results, data_ids)
    ap = [_mean_valid(precision[:, :, k]) for k in range(len(data_names))]
    ap50 = [_mean_valid(precision[0, :, k]) for k in range(len(data_names))]
    counts = np.bincount(
        np.concatenate([g["labels"] for g in gts] or [np.zeros(0, np.int64)]), minlength=len(data_names)
    ).tolist()
    header = f"COCO bbox metrics of {loaded.source} on {metrics['num_images']} images"
    print(format_report(metrics, data_names, ap, ap50, counts, header))
    plots = write_plots(out_dir, recall, precision, data_names)
    summary = {k: metrics[k] for k in (*evaluation.COCO_METRICS, "AR1", "AR10", "AR100", "num_images")}
    summary["per_class"] = {
        n: {"AP": a, "AP50": b, "num_gt": c} for n, a, b, c in zip(data_names, ap, ap50, counts)
    }
    summary["absent_outputs"] = absent
    summary["checkpoint"], summary["step"] = loaded.source, loaded.step
    evaluation.write_json_atomic(_no_nan(summary), os.path.join(out_dir, "metrics.json"))
    print(
        f"detections -> {det_path}; metrics -> {os.path.join(out_dir, 'metrics.json')}; "
        f"{len(plots)} precision-recall plots -> {out_dir}",
        file=sys.stderr,
    )
    return 0
