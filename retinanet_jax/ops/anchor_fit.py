"""How well the anchors fit the ground truth, and a search for anchors that fit better.

numpy only. The question answered: for each ground-truth box (xyxy, in the pixels the model
sees, i.e. after the training resize), what is the best IoU any anchor reaches with it, as
torchvision's ``Matcher`` would compute it (``box_iou(gt, anchors)`` over every anchor of the
canvas)? A box whose best IoU is below ``fg_iou`` (0.5) gets no regular positive anchor: it is
matched only by the low-quality rule (its best anchor(s), a poor regression start) and is
often missed at test time. :func:`coverage` is the share of boxes at or above a threshold.

Computing it without the full anchor set (tens of thousands per image) rests on this fact:
every anchor of a level is one of the level's base shapes (:func:`ops.anchors.base_anchors`,
symmetric about 0) shifted to a grid point ``(ix * stride_w, iy * stride_h)``. For a fixed
shape, the intersection with the box is ``overlap_x(|dx|) * overlap_y(|dy|)`` where ``dx, dy``
is the centre offset and each overlap is non-increasing in its offset; the union is
``area_box + area_anchor - intersection``, so the IoU increases with the intersection. The
best anchor of that shape is therefore the one at the grid point nearest to the box centre,
axis by axis (clamped to the grid). So the nearest grid point of each level, times the 9 base
shapes, gives exactly the best IoU over all anchors: 45 IoUs per box instead of ~10^5.

What is approximated: IoUs are computed in float64 (torchvision: float32), which can only
matter for a box whose IoU is within ~1e-7 of a threshold; the grid is that of the canvas
passed in (``canvas_hw``: the training canvas bucket of the image; without it an unbounded
grid with strides 8, 16, 32, 64, 128), and boxes are taken unflipped (a horizontal flip moves
a box relative to the grid by a fraction of a stride; coverage is a statistic over many
boxes, so this changes it little). ``tests/test_preflight_and_anchors.py`` compares against
brute force over :func:`ops.anchors.anchors_for_image`.

The search keeps torchvision's anchor structure (5 levels; per level 3 scales
``b * 2^l * 2^(0, 1/3, 2/3)`` truncated by ``int()`` as ``_default_anchorgen`` does, the P3 base
``b`` doubling per level; the same 3 aspect ratios at every level) and picks ``b`` and the 3
ratios that maximise coverage at 0.5 (ties: coverage at 0.4, then the mean best IoU).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np

from retinanet_jax.ops.anchors import (
    DEFAULT_ASPECT_RATIOS,
    DEFAULT_SIZES,
    NUM_LEVELS,
    base_anchors,
    feature_shapes,
)

# COCO's object size ranges (on sqrt(area), here in the pixels the model sees).
SIZE_RANGES: tuple[tuple[str, float, float], ...] = (
    ("small", 0.0, 32.0),
    ("medium", 32.0, 96.0),
    ("large", 96.0, float("inf")),
)
THRESHOLDS = (0.5, 0.4)  # torchvision RetinaNet fg_iou_thresh / bg_iou_thresh
SEARCH_BASES = tuple(range(8, 65))  # P3 base size candidates (px); torchvision's is 32
# h / w aspect-ratio candidates (rounded: these exact values go into the printed config).
SEARCH_RATIOS = (0.25, 0.3333, 0.5, 0.6667, 1.0, 1.5, 2.0, 3.0, 4.0)
IDEAL_STRIDES = tuple(2 ** (3 + level) for level in range(NUM_LEVELS))


def _nested(x: Sequence) -> tuple:
    return tuple(tuple(v) for v in x)


def structured_anchors(
    base: int, ratios: Sequence[float], num_levels: int = NUM_LEVELS
) -> tuple[tuple, tuple]:
    """(sizes, aspect_ratios) in torchvision's structure for P3 base size ``base`` (px):
    ``base=32, ratios=(0.5, 1, 2)`` is torchvision's default anchor generator."""
    sizes = tuple(
        (x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3)))
        for x in (int(base) * 2**level for level in range(num_levels))
    )
    return sizes, (tuple(float(r) for r in ratios),) * num_levels


def _canvases(n: int, canvas_hw) -> np.ndarray:
    if canvas_hw is None:
        return np.zeros((n, 2), np.int64)  # 0 = unbounded ideal grid
    c = np.asarray(canvas_hw, np.int64)
    return np.broadcast_to(c.reshape(-1, 2) if c.ndim == 2 else c.reshape(1, 2), (n, 2))


def nearest_centres(boxes: np.ndarray, canvas_hw=None, num_levels: int = NUM_LEVELS) -> np.ndarray:
    """Anchor centre nearest to each box centre, per level: float64 [L, N, 2] (x, y).

    ``canvas_hw``: None (unbounded grid, strides 8 * 2^l), one (H, W) for every box, or int
    [N, 2] per box: the padded canvas the anchors are made for, whose grid is exactly
    :func:`ops.anchors.anchors_for_image`'s (stride = canvas // feature size, centres at
    ``0 .. (size - 1) * stride``).
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    n = len(boxes)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    out = np.zeros((num_levels, n, 2), np.float64)
    canv = _canvases(n, canvas_hw)
    for hw in {tuple(int(v) for v in c) for c in canv}:
        sel = np.all(canv == hw, axis=1)
        if hw == (0, 0):
            grids = [(np.inf, np.inf)] * num_levels
            strides = [(s, s) for s in IDEAL_STRIDES[:num_levels]]
        else:
            grids = feature_shapes(hw)[:num_levels]
            strides = [(hw[0] // gh, hw[1] // gw) for gh, gw in grids]
        for level, ((gh, gw), (sh, sw)) in enumerate(zip(grids, strides)):
            ix = np.clip(np.rint(cx[sel] / sw), 0, gw - 1)
            iy = np.clip(np.rint(cy[sel] / sh), 0, gh - 1)
            out[level, sel, 0], out[level, sel, 1] = ix * sw, iy * sh
    return out


def _iou_at(boxes: np.ndarray, centres: np.ndarray, shapes: np.ndarray) -> np.ndarray:
    """IoU [N, S] of boxes [N,4] with base ``shapes`` [S,4] (zero-centred) at ``centres`` [N,2]."""
    a = shapes[None, :, :] + np.concatenate([centres, centres], axis=1)[:, None, :]  # [N, S, 4]
    b = boxes[:, None, :]
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def best_anchor_iou(
    boxes: np.ndarray,
    sizes: Sequence[Sequence[int]] = DEFAULT_SIZES,
    aspect_ratios: Sequence[Sequence[float]] = DEFAULT_ASPECT_RATIOS,
    canvas_hw=None,
    *,
    centres: np.ndarray | None = None,
) -> np.ndarray:
    """For each box [N,4] xyxy (model pixels), the best IoU over all anchors: float64 [N].

    See the module doc for why the nearest grid point per level is exact. ``centres``: a
    precomputed :func:`nearest_centres` (``canvas_hw`` is then unused).
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    sizes, aspect_ratios = _nested(sizes), _nested(aspect_ratios)
    if len(sizes) != len(aspect_ratios):
        raise ValueError(
            f"need one sizes and aspect_ratios entry per level, got {len(sizes)} and {len(aspect_ratios)}"
        )
    if centres is None:
        centres = nearest_centres(boxes, canvas_hw, len(sizes))
    best = np.zeros(len(boxes), np.float64)
    for level, (scales, ratios) in enumerate(zip(sizes, aspect_ratios)):
        shapes = base_anchors(scales, ratios).astype(np.float64)
        if len(boxes):
            best = np.maximum(best, _iou_at(boxes, centres[level], shapes).max(axis=1))
    return best


@dataclasses.dataclass(frozen=True)
class Coverage:
    """Shares of boxes whose best anchor IoU reaches each threshold, overall and per size.

    ``share[name][t]``: name in ("all", "small", "medium", "large"); NaN where a range has no
    box. ``count[name]``: boxes in it.
    """

    thresholds: tuple[float, ...]
    count: dict
    share: dict
    mean_iou: float

    def at(self, threshold: float, name: str = "all") -> float:
        return self.share[name][float(threshold)]


def coverage(boxes: np.ndarray, best_iou: np.ndarray, thresholds: Sequence[float] = THRESHOLDS) -> Coverage:
    """:class:`Coverage` of boxes [N,4] (model pixels) given their :func:`best_anchor_iou`."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    best_iou = np.asarray(best_iou, np.float64)
    side = np.sqrt(np.clip((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 0, None))
    groups = {"all": np.ones(len(boxes), bool)}
    groups.update({name: (side >= lo) & (side < hi) for name, lo, hi in SIZE_RANGES})
    count, share = {}, {}
    for name, sel in groups.items():
        count[name] = int(sel.sum())
        share[name] = {
            float(t): float(np.mean(best_iou[sel] >= t)) if sel.any() else float("nan") for t in thresholds
        }
    mean = float(best_iou.mean()) if len(best_iou) else float("nan")
    return Coverage(tuple(float(t) for t in thresholds), count, share, mean)


def anchor_coverage(
    boxes: np.ndarray,
    sizes=DEFAULT_SIZES,
    aspect_ratios=DEFAULT_ASPECT_RATIOS,
    canvas_hw=None,
    thresholds: Sequence[float] = THRESHOLDS,
) -> Coverage:
    """:func:`coverage` of :func:`best_anchor_iou` in one call."""
    return coverage(boxes, best_anchor_iou(boxes, sizes, aspect_ratios, canvas_hw), thresholds)


def format_coverage(cov: Coverage) -> str:
    """A small text table: rows all / small / medium / large, columns boxes and IoU >= t."""
    head = f"  {'boxes (sqrt(area), px)':<24}{'count':>8}" + "".join(
        f"{'IoU>=' + format(t, 'g'):>10}" for t in cov.thresholds
    )
    labels = {
        "all": "all",
        **{
            n: f"{n} ({lo:g}-{hi:g})" if hi != float("inf") else f"{n} (>{lo:g})" for n, lo, hi in SIZE_RANGES
        },
    }
    labels["small"] = f"small (<{SIZE_RANGES[0][2]:g})"
    rows = [head]
    for name, label in labels.items():
        cells = "".join(
            f"{cov.share[name][t]:>10.3f}" if cov.count[name] else f"{'-':>10}" for t in cov.thresholds
        )
        rows.append(f"  {label:<24}{cov.count[name]:>8d}{cells}")
    return "\n".join(rows)


@dataclasses.dataclass(frozen=True)
class SearchResult:
    base: int
    ratios: tuple[float, ...]
    sizes: tuple
    aspect_ratios: tuple
    coverage: Coverage


def search_anchors(
    boxes: np.ndarray,
    canvas_hw=None,
    *,
    bases: Sequence[int] = SEARCH_BASES,
    ratio_candidates: Sequence[float] = SEARCH_RATIOS,
    thresholds: Sequence[float] = THRESHOLDS,
    max_boxes: int = 20000,
    seed: int = 0,
) -> SearchResult:
    """The P3 base size and 3 aspect ratios (torchvision structure, see module doc) that
    maximise coverage at ``thresholds[0]``; ties go to ``thresholds[1]``, then the mean IoU.

    Each (base, ratio) pair's best IoU over levels and scales is computed once, so the
    3-of-K ratio combinations cost only a max. At most ``max_boxes`` boxes (a seeded sample)
    take part; the returned coverage is over all boxes.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if not len(boxes):
        raise ValueError("no ground-truth boxes to fit anchors to")
    canv = _canvases(len(boxes), canvas_hw)
    sample = np.arange(len(boxes))
    if len(boxes) > max_boxes:
        sample = np.sort(np.random.default_rng(seed).choice(len(boxes), max_boxes, replace=False))
    b, cv = boxes[sample], canv[sample]
    centres = nearest_centres(b, cv)
    ratios = tuple(float(r) for r in ratio_candidates)
    t_main, t_tie = float(thresholds[0]), float(thresholds[-1])
    best_key, best = None, None
    for base in bases:
        per_ratio = np.stack(
            [best_anchor_iou(b, *structured_anchors(base, (r,)), centres=centres) for r in ratios]
        )  # [R, N]
        for combo in itertools.combinations(range(len(ratios)), 3):
            iou = per_ratio[list(combo)].max(axis=0)
            key = (np.mean(iou >= t_main), np.mean(iou >= t_tie), iou.mean())
            if best_key is None or key > best_key:
                best_key, best = key, (int(base), tuple(ratios[i] for i in combo))
    sizes, aspect = structured_anchors(*best)
    cov = anchor_coverage(boxes, sizes, aspect, canv, thresholds)
    return SearchResult(best[0], best[1], sizes, aspect, cov)


def config_overrides(
    sizes: Sequence[Sequence[int]], aspect_ratios: Sequence[Sequence[float]]
) -> dict[str, tuple]:
    """``{"model.anchor_sizes": ..., "model.aspect_ratios": ...}`` (configs/base.py keys) as
    plain nested tuples, for a config file or ``train.py --config.model.anchor_sizes=...``."""
    return {
        "model.anchor_sizes": tuple(tuple(int(s) for s in level) for level in sizes),
        "model.aspect_ratios": tuple(tuple(float(r) for r in level) for level in aspect_ratios),
    }
