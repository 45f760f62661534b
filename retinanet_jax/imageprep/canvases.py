"""Canvases fitted to a dataset's image sizes, and how much of each canvas is image.

Every training (and evaluation) batch is padded to one canvas, and the step compiles once per
canvas, so the canvases are a small set chosen before the run. :func:`geometry.make_buckets`'s
fixed set ((S, S), (S, L), (L, S)) holds any image but pads a 4:3 COCO image resized to
800 x 1066 onto 800 x 1344 (21% padding), and an image of unknown size goes on (L, L) (53%).

:func:`fit_canvases` chooses them from the sizes instead, in the spirit of torchvision's
aspect-ratio grouping (``GroupedBatchSampler``): each image's resized size (``max(min_sizes)``,
``max_size``: the largest it gets), padded to 32; those sorted by aspect ratio; the sorted list
cut into at most ``max_canvases`` contiguous groups by dynamic programming, minimizing the total
canvas area (a group's canvas = (max h, max w) of its members, paid once per member), with at
least ``min_group`` images per group (the global batch in training: the sampler draws each
batch from one canvas and drops what does not fill one). At run time each image goes on the
smallest canvas that holds it (:func:`geometry.image_bucket`); where that differs from its
group, groups that fall below ``min_group`` are merged with the canvas that costs least.

The canvases are a pure function of the sizes (no randomness, ties broken by order), so every
host of a multi-host run computes the same ones. Sizes are ``(h, w)`` ints; ``None`` = unknown
(such images get :func:`geometry.unknown_size_canvas`, (L, L), which holds any image).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from retinanet_jax.imageprep import geometry

MODES = ("fit", "fixed")  # fitted to the sizes | geometry.make_buckets' three
DEFAULT_MAX_CANVASES = 8

Size = tuple[int, int]


def _key(hw: Size) -> tuple[int, Size]:
    return hw[0] * hw[1], hw


def _distinct_padded(
    sizes: Sequence[Size | None], min_size: int, max_size: int, divisor: int
) -> tuple[np.ndarray, np.ndarray]:
    """(distinct padded resized sizes int64 [m, 2] sorted by aspect ratio, counts [m])."""
    counts: dict[Size, int] = {}
    for hw, n in _size_counts(sizes).items():
        padded = geometry.padded_size(geometry.resized_size(hw, min_size, max_size), divisor)
        counts[padded] = counts.get(padded, 0) + n
    order = sorted(counts, key=lambda hw: (hw[0] / hw[1], hw))
    return np.asarray(order, np.int64).reshape(-1, 2), np.asarray([counts[hw] for hw in order], np.int64)


def _size_counts(sizes: Sequence[Size | None]) -> dict[Size, int]:
    out: dict[Size, int] = {}
    for s in sizes:
        if s is not None:
            hw = (int(s[0]), int(s[1]))
            out[hw] = out.get(hw, 0) + 1
    return out


def _split(sizes: np.ndarray, counts: np.ndarray, max_groups: int, min_group: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) groups of the rows of ``sizes`` (at most ``max_groups``, each
    with >= ``min_group`` images when the total allows) minimizing sum(count * H * W)."""
    m = len(sizes)
    prefix = np.concatenate([[0], np.cumsum(counts)])
    if prefix[-1] < min_group:
        return [(0, m)]
    # cost[i, j]: the group of rows i..j (inclusive); inf where too small or j < i.
    cost = np.full((m, m), np.inf)
    for i in range(m):
        h = np.maximum.accumulate(sizes[i:, 0])
        w = np.maximum.accumulate(sizes[i:, 1])
        n = prefix[i + 1 :] - prefix[i]
        cost[i, i:] = np.where(n >= min_group, (n * h * w).astype(np.float64), np.inf)
    groups = min(int(max_groups), m)
    best = np.full((groups + 1, m + 1), np.inf)  # best[g, j]: rows [0, j) in g groups
    best[0, 0] = 0.0
    start = np.zeros((groups + 1, m + 1), np.int64)
    for g in range(1, groups + 1):
        for j in range(1, m + 1):
            total = best[g - 1, :j] + cost[:j, j - 1]
            i = int(np.argmin(total))  # first minimum: deterministic ties
            best[g, j], start[g, j] = total[i], i
    g = int(np.argmin(best[1:, m])) + 1  # fewest groups among equal costs
    out, j = [], m
    while g > 0:
        i = int(start[g, j])
        out.append((i, j))
        j, g = i, g - 1
    return out[::-1]


def _assigned(sizes: np.ndarray, canvases: list[Size]) -> list[Size]:
    """The canvas of each row at run time: the smallest that holds it."""
    return [geometry.choose_bucket((int(h), int(w)), canvases) for h, w in sizes]


def _total_area(sizes: np.ndarray, counts: np.ndarray, canvases: list[Size]) -> int:
    return sum(int(n) * c[0] * c[1] for n, c in zip(counts, _assigned(sizes, canvases)))


def _merge_small(sizes: np.ndarray, counts: np.ndarray, canvases: list[Size], min_group: int) -> list[Size]:
    """Drops unused canvases and merges those that the smallest-fitting rule leaves with fewer
    than ``min_group`` images into the partner that adds least area (the merged canvas holds
    both groups, so every image still fits)."""
    canvases = sorted(set(canvases), key=_key)
    while True:
        per: dict[Size, int] = {}
        for n, c in zip(counts, _assigned(sizes, canvases)):
            per[c] = per.get(c, 0) + int(n)
        canvases = sorted(per, key=_key)
        small = [c for c in canvases if per[c] < min_group]
        if not small or len(canvases) == 1:
            return canvases
        worst = min(small, key=lambda c: (per[c], _key(c)))
        options = []
        for other in canvases:
            if other != worst:
                merged = (max(worst[0], other[0]), max(worst[1], other[1]))
                rest = [c for c in canvases if c not in (worst, other)] + [merged]
                options.append((_total_area(sizes, counts, rest), _key(other), rest))
        canvases = sorted(set(min(options)[2]), key=_key)


def fit_canvases(
    sizes: Sequence[Size | None],
    min_size: int,
    max_size: int,
    *,
    max_canvases: int = DEFAULT_MAX_CANVASES,
    min_group: int = 1,
    divisor: int = geometry.SIZE_DIVISIBLE,
) -> list[Size]:
    """At most ``max_canvases`` canvases (h, w), multiples of ``divisor``, that hold every known
    size resized with (``min_size``, ``max_size``) and minimize the total canvas area, each
    receiving >= ``min_group`` images under :func:`geometry.image_bucket` (unless there are
    fewer images in all: then one canvas). See the module doc. Unknown (None) sizes are
    ignored: add :func:`geometry.unknown_size_canvas` for them (:func:`select_canvases`).
    Sorted by (area, (h, w)); [] without known sizes."""
    if max_canvases < 1 or min_group < 1:
        raise ValueError(f"need max_canvases >= 1 and min_group >= 1, got {max_canvases}, {min_group}")
    padded, counts = _distinct_padded(sizes, min_size, max_size, divisor)
    if not len(padded):
        return []
    groups = _split(padded, counts, max_canvases, int(min_group))
    canvases = [(int(padded[i:j, 0].max()), int(padded[i:j, 1].max())) for i, j in groups]
    return _merge_small(padded, counts, canvases, int(min_group))


def select_canvases(
    sizes: Sequence[Size | None],
    min_size: int,
    max_size: int,
    *,
    mode: str = "fit",
    max_canvases: int = DEFAULT_MAX_CANVASES,
    min_group: int = 1,
    buckets: Sequence[Size] | None = None,
) -> list[Size]:
    """The canvases of a run, the one rule for training and evaluation: ``buckets`` as given if
    any; else ``mode`` "fit" (:func:`fit_canvases`) or "fixed" (:func:`geometry.make_buckets`);
    plus :func:`geometry.unknown_size_canvas` when some size is None. "fit" returns at most
    ``max_canvases`` in all (one of them (L, L) when some size is unknown)."""
    if buckets:
        chosen = [(int(b[0]), int(b[1])) for b in buckets]
    elif mode == "fixed":
        chosen = geometry.make_buckets(min_size, max_size)
    elif mode == "fit":
        unknown = any(s is None for s in sizes)
        room = max(1, int(max_canvases) - 1) if unknown else int(max_canvases)
        chosen = fit_canvases(sizes, min_size, max_size, max_canvases=room, min_group=min_group)
    else:
        raise ValueError(f"canvas mode must be one of {MODES}, got {mode!r}")
    return sorted(set(geometry.with_unknown_size_canvas(chosen, max_size, sizes)), key=_key)


class CanvasUsage(NamedTuple):
    """How images fill their canvases. ``share``: sum of resized image pixels / sum of the
    pixels of the canvases they go on (known sizes only; nan without any); ``counts``: images
    per canvas (unknown sizes on the (L, L) canvas included); ``unknown``: images of unknown
    size."""

    share: float
    counts: dict[Size, int]
    unknown: int

    def describe(self) -> str:
        listed = ", ".join(
            f"{h}x{w}: {n}" for (h, w), n in sorted(self.counts.items(), key=lambda kv: _key(kv[0]))
        )
        extra = f", {self.unknown} of unknown size" if self.unknown else ""
        return (
            f"{len(self.counts)} canvases (h x w: images) {listed}; image pixels / canvas pixels "
            f"{self.share:.3f}{extra}"
        )


def canvas_usage(
    sizes: Sequence[Size | None], canvases: Sequence[Size], min_size: int, max_size: int
) -> CanvasUsage:
    """Where ``sizes`` (original (h, w), None = unknown) go among ``canvases`` when resized with
    (``min_size``, ``max_size``) and the share of canvas pixels that are image pixels."""
    canvases = [(int(c[0]), int(c[1])) for c in canvases]
    image_px = canvas_px = 0
    counts: dict[Size, int] = {}
    for hw, n in _size_counts(sizes).items():
        canvas = geometry.image_bucket(hw, canvases, min_size, max_size)
        h, w = geometry.resized_size(hw, min_size, max_size)
        image_px += n * h * w
        canvas_px += n * canvas[0] * canvas[1]
        counts[canvas] = counts.get(canvas, 0) + n
    unknown = sum(s is None for s in sizes)
    if unknown:
        canvas = geometry.image_bucket(None, canvases, min_size, max_size)
        counts[canvas] = counts.get(canvas, 0) + unknown
    share = image_px / canvas_px if canvas_px else float("nan")
    return CanvasUsage(float(share), counts, int(unknown))
