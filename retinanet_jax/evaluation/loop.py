"""COCO box metrics through pycocotools, and the jitted evaluation loop over a validation split.

Ground truth comes from the dataset's own examples (boxes xyxy in original pixels, contiguous
labels 0..K-1) as an in-memory COCO object: every image is registered, with or without
objects, boxes have ``iscrowd=0`` and ``area = w * h`` (there are no masks). Detections are
mapped label -> category id and written as a COCO results file (``bbox`` = xywh), which is
also what pycocotools evaluates, so the numbers can be reproduced from the file alone.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from retinanet_jax import storage
from retinanet_jax.data.canvas_stats import image_sizes
from retinanet_jax.data.categories import default_category_ids
from retinanet_jax.imageprep import canvases as canvases_lib
from retinanet_jax.imageprep import geometry
from retinanet_jax.imageprep.normalize import resize_normalize_host
from retinanet_jax.inference.detector import DetectorOptions, detect_jit
from retinanet_jax.ops import anchors as anchors_lib
from retinanet_jax.parallel import mesh as parallel

log = logging.getLogger(__name__)

# Names of COCOeval.stats[0:6], in order.
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
DETECTIONS_FILE = "detections.json"


def _check_category_ids(class_names: Sequence[str], category_ids: Sequence[int] | None) -> list[int]:
    ids = default_category_ids(len(class_names)) if category_ids is None else [int(c) for c in category_ids]
    if len(ids) != len(class_names):
        raise ValueError(f"category_ids has {len(ids)} entries but there are {len(class_names)} classes")
    if len(set(ids)) != len(ids):
        raise ValueError(f"category_ids must be distinct, got {ids}")
    return ids


def coco_ground_truth(
    examples: Iterable[Mapping[str, Any]],
    class_names: Sequence[str],
    category_ids: Sequence[int] | None = None,
) -> COCO:
    """In-memory pycocotools ``COCO`` from examples.

    Each example: ``image_id`` int, ``boxes`` [N, 4] xyxy original pixels, ``labels`` [N] in
    0..K-1, and its size as ``image_hw`` (h, w) or an ``image`` [H, W, 3] array. Images without
    objects are included (they count for false positives).
    """
    ids = _check_category_ids(class_names, category_ids)
    images, annotations, seen = [], [], set()
    for ex in examples:
        image_id = int(ex["image_id"])
        if image_id in seen:
            raise ValueError(f"duplicate image_id {image_id} in the evaluation set")
        seen.add(image_id)
        h, w = ex["image_hw"] if "image_hw" in ex else np.shape(ex["image"])[:2]
        images.append({"id": image_id, "height": int(h), "width": int(w)})
        boxes = np.asarray(ex["boxes"], np.float64).reshape(-1, 4)
        labels = np.asarray(ex["labels"]).reshape(-1)
        for box, label in zip(boxes, labels):
            if not 0 <= label < len(ids):
                raise ValueError(f"image {image_id}: label {int(label)} outside 0..{len(ids) - 1}")
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": ids[int(label)],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    coco = COCO()
    coco.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": str(n)} for c, n in zip(ids, class_names)],
    }
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
        coco.createIndex()
    return coco


def detections_to_coco(detections: Iterable[Mapping[str, Any]], category_ids: Sequence[int]) -> list[dict]:
    """Per-image detections -> COCO results list (``bbox`` xywh, ``category_id``, ``score``).

    Each detection dict: ``image_id``, ``boxes`` [N, 4] xyxy original pixels, ``scores`` [N],
    ``labels`` [N] (0..K-1).
    """
    ids = np.asarray(category_ids)
    results = []
    for det in detections:
        boxes = np.asarray(det["boxes"], np.float64).reshape(-1, 4)
        scores = np.asarray(det["scores"], np.float64).reshape(-1)
        labels = np.asarray(det["labels"]).reshape(-1)
        if len(boxes) and not (0 <= labels.min() and labels.max() < len(ids)):
            raise ValueError(
                f"image {det['image_id']}: labels {sorted(set(labels.tolist()))} outside 0..{len(ids) - 1}"
            )
        for box, score, label in zip(boxes, scores, labels):
            x1, y1, x2, y2 = box.tolist()
            results.append(
                {
                    "image_id": int(det["image_id"]),
                    "category_id": int(ids[label]),
                    "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
                    "score": round(float(score), 5),
                }
            )
    return results


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    """Write JSON to ``path`` whole: a crash never leaves half a file (local disk: temporary
    file + rename; object store: one upload; ``retinanet_jax.storage``)."""
    storage.write_text(path, json.dumps(obj))


def results_coco(coco_gt: COCO, results: list[dict]) -> COCO:
    """COCO results list -> pycocotools ``COCO`` of detections for ``coco_gt``'s images."""
    # pycocotools' loadRes fails on an empty list; an empty results COCO evaluates to AP 0.
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            return coco_gt.loadRes(results)
    coco_dt = COCO()
    coco_dt.dataset = {
        "images": coco_gt.dataset["images"],
        "annotations": [],
        "categories": coco_gt.dataset["categories"],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt.createIndex()
    return coco_dt


def per_class_ap(coco_eval: COCOeval) -> list[float]:
    """AP@[.5:.95] per category (area all, 100 dets), in ``params.catIds`` order; NaN for a
    category without ground truth."""
    precision = coco_eval.eval["precision"]  # [T iou, R recall, K cat, A area, M maxdets]
    out = []
    for k in range(precision.shape[2]):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        out.append(float(p.mean()) if p.size else math.nan)
    return out


def coco_metrics(coco_gt: COCO, results: list[dict]) -> dict[str, Any]:
    """Run COCOeval (bbox) on a results list.

    Returns ``{"AP", "AP50", "AP75", "APs", "APm", "APl": float, "AR1", "AR10", "AR100": float,
    "per_class_AP": [float] (one per category, in the order of ``coco_gt``'s categories: label
    order for :func:`coco_ground_truth`; NaN without ground truth), "class_names": [str] (for
    display; names may repeat, as torchvision's
    COCO "N/A")}``. pycocotools reports -1 for an area range without ground truth; that is kept.
    """
    coco_dt = results_coco(coco_gt, results)
    coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    log.info("COCO bbox evaluation:\n%s", text.getvalue())
    stats = [float(s) for s in coco_eval.stats]
    metrics: dict[str, Any] = dict(zip(COCO_METRICS, stats[:6]))
    metrics.update({"AR1": stats[6], "AR10": stats[7], "AR100": stats[8]})
    # pycocotools orders categories by id; report them in coco_gt's order (label order for
    # coco_ground_truth), keyed by position since names may repeat.
    ap_by_id = dict(zip(coco_eval.params.catIds, per_class_ap(coco_eval)))
    categories = coco_gt.dataset["categories"]
    metrics["per_class_AP"] = [ap_by_id[c["id"]] for c in categories]
    metrics["class_names"] = [str(c["name"]) for c in categories]
    return metrics


def evaluate_detections(
    detections: Iterable[Mapping[str, Any]],
    coco_gt: COCO,
    category_ids: Sequence[int],
    *,
    output_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Detections -> COCO results (written to ``output_path`` if given) -> :func:`coco_metrics`."""
    results = detections_to_coco(detections, category_ids)
    if output_path is not None:
        write_json_atomic(results, output_path)
    return coco_metrics(coco_gt, results)


# ----------------------------------------------------------------------------- the eval loop
# Validation images are resized exactly as torchvision's GeneralizedRCNNTransform does in eval
# mode (normalize, then torch bilinear without antialias, on the host in float32) and padded
# to one of a few canvas buckets, so the jitted forward + postprocess compiles once per bucket.


def eval_plan(
    source: Any,
    global_batch_size: int,
    *,
    min_size: int,
    max_size: int,
    buckets: Sequence[tuple[int, int]] | None = None,
    max_images: int | None = None,
    canvases: str = "fit",
    max_canvases: int = canvases_lib.DEFAULT_MAX_CANVASES,
) -> list[tuple[tuple[int, int], np.ndarray]]:
    """Global eval batches: ``[(canvas (H, W), indices int64 [global_batch_size])]``, -1 = pad.

    Every example appears once; each batch holds one canvas bucket (chosen from the original
    size, ``source.image_size(i)``; unknown sizes go to the largest canvas). The canvases:
    ``buckets`` if given, else ``canvases`` "fit" (at most ``max_canvases`` fitted to these
    images' sizes) or "fixed" (``geometry.make_buckets``), by
    ``imageprep.canvases.select_canvases``, the rule training uses.
    """
    sizes = image_sizes(source, max_images)
    buckets = canvases_lib.select_canvases(
        sizes, min_size, max_size, mode=canvases, max_canvases=max_canvases, buckets=buckets
    )
    per_image = [geometry.image_bucket(s, buckets, min_size, max_size) for s in sizes]
    plan = []
    for canvas in sorted(set(per_image), key=lambda hw: (hw[0] * hw[1], hw)):
        idx = np.asarray([i for i, c in enumerate(per_image) if c == canvas], np.int64)
        pad = -len(idx) % global_batch_size
        idx = np.concatenate([idx, np.full(pad, -1, np.int64)])
        plan += [(canvas, row) for row in idx.reshape(-1, global_batch_size)]
    return plan


def _load_rows(
    source: Any, canvas: tuple[int, int], indices: np.ndarray, min_size: int, max_size: int
) -> tuple[dict[str, np.ndarray], list[dict]]:
    """This host's rows -> (device batch, per-row ground truth dict or None for padding)."""
    images = np.zeros((len(indices), canvas[0], canvas[1], 3), np.float32)
    sizes = np.tile(np.asarray(canvas, np.int32), (len(indices), 1))
    gts: list[dict | None] = []
    for r, index in enumerate(indices):
        if index < 0:
            gts.append(None)
            continue
        ex = source[int(index)]
        hw = tuple(int(v) for v in ex["image"].shape[:2])
        new_hw = geometry.resized_size(hw, min_size, max_size)
        if new_hw[0] > canvas[0] or new_hw[1] > canvas[1]:
            raise ValueError(
                f"image_id {ex['image_id']}: decoded size {hw} does not fit its canvas "
                f"{canvas} (source.image_size({int(index)}) was wrong?)"
            )
        images[r, : new_hw[0], : new_hw[1]] = resize_normalize_host(ex["image"], new_hw)
        sizes[r] = new_hw
        gts.append(
            {
                "image_id": int(ex["image_id"]),
                "image_hw": hw,
                "boxes": np.asarray(ex["boxes"], np.float32).reshape(-1, 4),
                "labels": np.asarray(ex["labels"]).reshape(-1),
            }
        )
    return {"images": images, "image_sizes": sizes}, gts


def _gather_to_all(obj: Any) -> list[Any]:
    """Every process's ``obj`` (JSON-able), in process order, on every process."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.asarray([len(data)], np.int64))
    padded = np.zeros(int(np.max(lengths)), np.uint8)
    padded[: len(data)] = data
    everything = multihost_utils.process_allgather(padded[None], tiled=True)
    return [json.loads(bytes(row[: int(n)]).decode()) for row, n in zip(everything, np.ravel(lengths))]


def evaluate(
    model: Any,
    variables: Any,
    source: Any,
    *,
    mesh: Mesh | None = None,
    batch_size: int = 8,
    min_size: int = 800,
    max_size: int = 1333,
    buckets: Sequence[tuple[int, int]] | None = None,
    max_images: int | None = None,
    canvases: str = "fit",
    max_canvases: int = canvases_lib.DEFAULT_MAX_CANVASES,
    score_thresh: float = 0.05,
    topk_candidates: int = 1000,
    nms_thresh: float = 0.5,
    detections_per_img: int = 300,
    class_agnostic: bool = False,
    category_ids: Sequence[int] | None = None,
    output_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """COCO metrics of ``model`` on ``source`` (a dataset split; see ``retinanet_jax.data``).

    Runs the jitted forward + postprocess over global batches of ``batch_size`` images (split
    over the mesh's ``data`` axis; each process loads its own rows), maps boxes back to the
    original pixels, gathers every process's detections and ground truth, and lets process 0
    run pycocotools and write ``output_path`` (COCO results JSON). Labels map to
    ``category_ids`` (default ``source.label_to_category_id`` if present, else label + 1). Returns
    :func:`coco_metrics`'s dict on every process plus ``"num_images"``.
    """
    mesh = mesh or parallel.make_mesh()
    class_names = list(source.class_names)
    if category_ids is None:
        category_ids = getattr(source, "label_to_category_id", None)
    category_ids = _check_category_ids(class_names, category_ids)
    local = parallel.local_batch_size(batch_size, mesh)
    options = DetectorOptions.of(
        score_thresh=score_thresh,
        topk_candidates=topk_candidates,
        nms_thresh=nms_thresh,
        detections_per_img=detections_per_img,
        class_agnostic=class_agnostic,
    )
    variables = _on_mesh(variables, mesh)
    p = jax.process_index()
    plan = eval_plan(
        source,
        batch_size,
        min_size=min_size,
        max_size=max_size,
        buckets=buckets,
        max_images=max_images,
        canvases=canvases,
        max_canvases=max_canvases,
    )
    results, gts = [], []
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        # Decoding/resizing the next batch on the host overlaps the device work on this one.
        loads = [
            pool.submit(_load_rows, source, canvas, row[p * local : (p + 1) * local], min_size, max_size)
            for canvas, row in plan[:2]
        ]
        for b, (canvas, _) in enumerate(plan):
            host_batch, batch_gts = loads[b].result()
            loads[b] = None
            if b + 2 < len(plan):
                canvas2, row2 = plan[b + 2]
                loads.append(
                    pool.submit(
                        _load_rows, source, canvas2, row2[p * local : (p + 1) * local], min_size, max_size
                    )
                )
            batch = parallel.shard_batch(host_batch, mesh)
            anchors = jnp.asarray(anchors_lib.anchors_for_model(model, canvas))
            out = detect_jit(
                variables, batch["images"], batch["image_sizes"], anchors, model=model, options=options
            )
            boxes, scores, labels, num_valid = (_local_rows(x, mesh) for x in out)
            for r, gt in enumerate(batch_gts):
                if gt is None:
                    continue
                n = int(num_valid[r])
                # torchvision resize_boxes: ratios original / resized in float32.
                ratio = np.asarray(gt["image_hw"], np.float32) / host_batch["image_sizes"][r].astype(
                    np.float32
                )
                scale = np.asarray([ratio[1], ratio[0], ratio[1], ratio[0]], np.float32)
                det = {
                    "image_id": gt["image_id"],
                    "boxes": boxes[r, :n] * scale,
                    "scores": scores[r, :n],
                    "labels": labels[r, :n],
                }
                results += detections_to_coco([det], category_ids)
                gts.append(
                    {
                        "image_id": gt["image_id"],
                        "image_hw": list(gt["image_hw"]),
                        "boxes": gt["boxes"].tolist(),
                        "labels": gt["labels"].tolist(),
                    }
                )
    all_results = [r for part in _gather_to_all(results) for r in part]
    all_gts = [g for part in _gather_to_all(gts) for g in part]
    values = np.zeros(len(COCO_METRICS) + 3 + len(class_names), np.float64)
    metrics: dict[str, Any] = {}
    if p == 0:
        coco_gt = coco_ground_truth(all_gts, class_names, category_ids)
        if output_path is not None:
            write_json_atomic(all_results, output_path)
        metrics = coco_metrics(coco_gt, all_results)
        values[:] = (
            [metrics[k] for k in COCO_METRICS]
            + [metrics[k] for k in ("AR1", "AR10", "AR100")]
            + list(metrics["per_class_AP"])
        )
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        # Without jax_enable_x64 a float64 array would travel as float32: send its bits as
        # uint32 pairs, so every process returns process 0's values exactly.
        bits = multihost_utils.broadcast_one_to_all(values.view(np.uint32))
        values = np.asarray(bits).astype(np.uint32).view(np.float64)
        names = list(COCO_METRICS) + ["AR1", "AR10", "AR100"]
        metrics = {k: float(v) for k, v in zip(names, values)}
        # coco_ground_truth numbers categories in label order, so values line up with labels.
        metrics["per_class_AP"] = [float(v) for v in values[len(names) :]]
        metrics["class_names"] = [str(c) for c in class_names]
    metrics["num_images"] = len(all_gts)
    return metrics


def _on_mesh(variables: Any, mesh: Mesh) -> Any:
    """Keep arrays already placed on ``mesh`` (e.g. the train state's); replicate the rest."""
    devices = set(mesh.devices.flat)

    def place(x):
        if isinstance(x, jax.Array) and set(x.sharding.device_set) == devices:
            return x
        return jax.device_put(x, parallel.replicated(mesh))

    return jax.tree.map(place, variables)


def _local_rows(x: jax.Array, mesh: Mesh) -> np.ndarray:
    """This process's rows of a ``data``-sharded global array, as numpy."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(
        multihost_utils.global_array_to_host_local_array(
            x, mesh, jax.sharding.PartitionSpec(parallel.DATA_AXIS)
        )
    )
