"""Helpers shared by tests (not a test module): detection matching, lively random variables and a
source that has only image sizes."""

import math

import jax
import jax.numpy as jnp
import numpy as np


def box_iou(a, b):
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)

    def area(x):
        return np.prod(x[:, 2:] - x[:, :2], axis=-1)

    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def count_matches(ref, got, iou_min=0.99, score_tol=1e-3, coord_tol=0.05):
    """Greedy one-to-one matching of torchvision's detections (in score order) to ours: same
    label, IoU >= iou_min, |score difference| <= score_tol. Returns the number matched.

    Boxes clipped at the image border can have zero width or height (IoU undefined): those
    match when every coordinate is within ``coord_tol`` pixels."""
    if len(ref["scores"]) == 0 or len(got["scores"]) == 0:
        return 0
    close = np.abs(ref["boxes"][:, None, :] - got["boxes"][None, :, :]).max(-1) <= coord_tol
    ok = (
        ((box_iou(ref["boxes"], got["boxes"]) >= iou_min) | close)
        & (ref["labels"][:, None] == got["labels"][None, :])
        & (np.abs(ref["scores"][:, None] - got["scores"][None, :]) <= score_tol)
    )
    used = np.zeros(len(got["scores"]), bool)
    matched = 0
    for i in range(len(ref["scores"])):
        cand = np.flatnonzero(ok[i] & ~used)
        if len(cand):
            used[cand[0]] = True
            matched += 1
    return matched


def lively_variables(model, cls_bias=(1.0, 0.0, -30.0), size: int = 64, seed: int = 0):
    """Random variables without compiling ``init``: fan-in scaled conv kernels keep features
    O(1); class logits = ``cls_bias`` (per class, tiled over anchors) + small noise, so a class
    with bias +1 scores ~0.5-0.85 and one with -30 never detects."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name, module = path[-1].key, path[-2].key
        if name == "kernel":
            std = 0.01 if module in ("cls_logits", "bbox_reg") else math.sqrt(1.0 / np.prod(s.shape[:-1]))
            return (rng.standard_normal(s.shape) * std).astype(np.float32)
        if name == "bias" and module == "cls_logits":
            return np.tile(np.asarray(cls_bias, np.float32), s.shape[0] // len(cls_bias))
        return np.ones(s.shape, s.dtype) if name in ("scale", "var") else np.zeros(s.shape, s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


class SizedSource:
    """Sizes only, plus constant images for the pipeline (pixel value = index)."""

    class_names = ["a"]

    def __init__(self, sizes):
        self.sizes = sizes

    def __len__(self):
        return len(self.sizes)

    def image_size(self, i):
        return self.sizes[i]

    def __getitem__(self, i):
        h, w = self.sizes[i]
        return {
            "image": np.full((h, w, 3), i % 256, np.uint8),
            "boxes": np.array([[1, 1, 10, 10]], np.float32),
            "labels": np.array([0], np.int32),
            "image_id": i,
        }
