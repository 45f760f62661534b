"""Size arithmetic of image preparation: resized size, padding, canvas buckets, resize weights.

All of it is torchvision's ``GeneralizedRCNNTransform`` arithmetic (eval and train mode) plus
the canvas buckets that keep jitted shapes few. Sizes are ``(h, w)`` tuples of ints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

SIZE_DIVISIBLE = 32


def resized_size(hw: tuple[int, int], min_size: float, max_size: float) -> tuple[int, int]:
    """Output ``(h, w)`` of torchvision's ``_resize_image_and_masks`` for an ``(h, w)`` input.

    The scale is a Python (double) ``min(min_size / short, max_size / long)``; ``interpolate``
    with ``recompute_scale_factor=True`` then truncates ``size * scale`` in double precision.
    """
    h, w = int(hw[0]), int(hw[1])
    scale = min(float(min_size) / min(h, w), float(max_size) / max(h, w))
    return math.floor(float(h) * scale), math.floor(float(w) * scale)


def padded_size(hw: tuple[int, int], size_divisible: int = SIZE_DIVISIBLE) -> tuple[int, int]:
    """Round ``(h, w)`` up to multiples of ``size_divisible`` like ``batch_images``."""
    stride = float(size_divisible)
    return tuple(int(math.ceil(float(s) / stride) * stride) for s in hw)


# --------------------------------------------------------------------------- canvas buckets


def make_buckets(min_size: int, max_size: int, divisor: int = SIZE_DIVISIBLE) -> list[tuple[int, int]]:
    """Canvas (h, w) buckets covering every image resized with (min_size, max_size).

    A resized image has short side <= min_size and long side <= max_size, so landscape images
    fit (S, L) and portrait ones (L, S), with S, L rounded up to ``divisor``; (S, S) keeps
    square images from being padded to the long side.
    """
    s = -(-int(min_size) // divisor) * divisor
    long = -(-int(max_size) // divisor) * divisor
    return sorted({(s, s), (s, long), (long, s)}, key=lambda hw: (hw[0] * hw[1], hw))


def choose_bucket(image_hw: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The smallest-area bucket (h, w) with h >= image h and w >= image w; between buckets of
    equal area, the smaller (h, w) tuple (so the choice does not depend on the list order)."""
    fitting = [tuple(b) for b in buckets if b[0] >= image_hw[0] and b[1] >= image_hw[1]]
    if not fitting:
        raise ValueError(
            f"no canvas bucket fits an image of (h, w)={tuple(image_hw)}; buckets={list(buckets)}"
        )
    return min(fitting, key=lambda b: (b[0] * b[1], b))


def batch_canvas(
    sizes: Sequence[tuple[int, int]],
    size_divisible: int = SIZE_DIVISIBLE,
    buckets: Sequence[tuple[int, int]] | None = None,
) -> tuple[int, int]:
    """Canvas ``(H, W)`` for a batch of resized sizes.

    Without ``buckets``: torchvision's ``batch_images`` (max over the batch, rounded up to
    ``size_divisible``). With ``buckets``: :func:`choose_bucket` for that canvas, so that shapes
    recur; ``ValueError`` if none holds it.
    """
    need = padded_size((max(s[0] for s in sizes), max(s[1] for s in sizes)), size_divisible)
    if buckets is None:
        return need
    try:
        return choose_bucket(need, buckets)
    except ValueError:
        raise ValueError(f"no bucket holds a batch canvas of {need}; buckets: {list(buckets)}") from None


def unknown_size_canvas(max_size: int, divisor: int = SIZE_DIVISIBLE) -> tuple[int, int]:
    """The canvas for an image whose size is not known before decoding: (L, L) with L =
    ``max_size`` rounded up to ``divisor``, which holds the image whatever its size."""
    side = -(-int(max_size) // divisor) * divisor
    return side, side


def with_unknown_size_canvas(
    buckets: Sequence[tuple[int, int]], max_size: int, sizes: Sequence[tuple[int, int] | None]
) -> list[tuple[int, int]]:
    """``buckets`` plus :func:`unknown_size_canvas` when some of ``sizes`` is None (unknown)."""
    out = [tuple(int(v) for v in b) for b in buckets]
    extra = unknown_size_canvas(max_size)
    if any(s is None for s in sizes) and extra not in out:
        out.append(extra)
    return out


def image_bucket(
    image_hw: tuple[int, int] | None, buckets: Sequence[tuple[int, int]], max_min_size: int, max_size: int
) -> tuple[int, int]:
    """The canvas for an image of original size ``image_hw`` under any min_size up to
    ``max_min_size`` (the resized size grows with min_size). ``None`` (size unknown): the
    smallest bucket that fits every image, (L, L) with L = max_size (see
    :func:`with_unknown_size_canvas`)."""
    if image_hw is None:
        return choose_bucket((max_size, max_size), buckets)
    return choose_bucket(resized_size(image_hw, max_min_size, max_size), buckets)


# --------------------------------------------------------------------------- resize weights


def linear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Two-tap weights of torch's ``upsample_bilinear2d`` (CPU, ``align_corners=False``) on one axis.

    Returns ``(idx0, idx1) int32 [n_out]`` and ``(w0, w1) float32 [n_out]`` such that
    ``out[i] = w0[i] * x[idx0[i]] + w1[i] * x[idx1[i]]``. Mirrors ATen's
    ``compute_source_index_and_lambda`` with the recomputed scale ``float(n_in) / n_out``.
    """
    if n_in == n_out:  # ATen copies rows when sizes match
        idx = np.arange(n_out, dtype=np.int32)
        return idx, idx, np.ones(n_out, np.float32), np.zeros(n_out, np.float32)
    scale = np.float32(n_in) / np.float32(n_out)
    dst = np.arange(n_out, dtype=np.float64)
    # ATen computes scale * (dst + 0.5) - 0.5 in float32, and the compiler contracts it into
    # one fused multiply-add (a single rounding): emulate it exactly in float64 (the product
    # of two floats is exact in double) and round once. Without this, ~1e-4 differences appear.
    src = (np.float64(scale) * (dst + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))  # source index clamped at 0 (not for cubic)
    idx0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    lam1 = np.clip(src - idx0.astype(np.float32), 0.0, 1.0).astype(np.float32)
    idx1 = idx0 + (idx0 < n_in - 1)
    lam0 = (np.float32(1.0) - lam1).astype(np.float32)
    return idx0.astype(np.int32), idx1.astype(np.int32), lam0, lam1
