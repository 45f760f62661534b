"""Inference preprocessing equal to torchvision's ``GeneralizedRCNNTransform`` (eval mode).

torchvision, per image: ``to_tensor`` (uint8 / 255) -> normalize with mean/std -> bilinear
resize (``align_corners=False``, no antialias) by ``min(min_size / short, max_size / long)``
-> zero pad the batch at the bottom/right to the batch max rounded up to ``size_divisible``.
Here the host only validates and converts images to uint8 RGB; normalize, resize and pad run
in one small jitted function per (input size, output size, canvas) so they run on the
accelerator and compile once per shape. Images are NHWC: ``[H, W, 3]``.
"""

from __future__ import annotations

import collections
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Counts traces (= compilations) per jitted function name; tests read it.
TRACE_COUNTS: collections.Counter = collections.Counter()


# --------------------------------------------------------------------------- input checks


def _pil_to_uint8_rgb(img: Any, index: int) -> np.ndarray:
    """PIL image of any mode -> uint8 [H, W, 3]."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N") or (mode == "I" and np.asarray(img).max(initial=0) > 255):
        # 16-bit grayscale: PIL's convert("RGB") would clip at 255, so scale the full range
        # 0..65535 to 0..255 (x / 257 maps 65535 -> 255 exactly), rounding to nearest.
        arr = np.asarray(img).astype(np.float64)
        gray = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode == "F":
        raise ValueError(
            f"image {index}: PIL mode 'F' (32-bit float) has no defined value range; "
            "convert it to 8-bit ('L' or 'RGB') first")
    # "1", "L", "LA", "P", "PA", "RGBA", "CMYK", "YCbCr", "I" (<=255), ...: PIL's own conversion
    # (alpha is dropped, not composited, like torchvision.io's ImageReadMode.RGB).
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def to_uint8_rgb(image: Any, index: int = 0) -> np.ndarray:
    """Validate one input image and return it as a C-contiguous uint8 ``[H, W, 3]`` array.

    Accepts a PIL image (any mode: grayscale, palette, RGBA, 16-bit are converted to RGB) or a
    uint8 numpy array ``[H, W, 3]`` (``[H, W]`` / ``[H, W, 1]`` grayscale are replicated).
    Raises ``TypeError`` / ``ValueError`` naming ``index`` for anything else or for zero size.
    """
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"image {index} has zero size ({image.height}x{image.width})")
        arr = _pil_to_uint8_rgb(image, index)
    elif isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            raise TypeError(
                f"image {index}: expected a uint8 array with values 0..255, got dtype {arr.dtype} "
                "(convert with np.clip(x * 255, 0, 255).astype(np.uint8) for floats in [0, 1])")
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim != 3:
            raise ValueError(f"image {index}: expected shape [H, W, 3], got {arr.shape}")
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        if arr.shape[-1] != 3:
            hint = " (looks like [C, H, W]; use arr.transpose(1, 2, 0))" if arr.shape[0] in (1, 3) else ""
            raise ValueError(
                f"image {index}: expected 3 channels last, shape [H, W, 3], got {arr.shape}{hint}")
    else:
        raise TypeError(
            f"image {index}: unsupported type {type(image).__name__}; expected a PIL image or a "
            "uint8 numpy array [H, W, 3]")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"image {index} has zero size ({arr.shape[0]}x{arr.shape[1]})")
    return np.ascontiguousarray(arr)


# --------------------------------------------------------------------------- size arithmetic


def resized_size(hw: tuple[int, int], min_size: int, max_size: int) -> tuple[int, int]:
    """Output ``(h, w)`` of torchvision's ``_resize_image_and_masks`` for an ``(h, w)`` input.

    The scale is a Python (double) ``min(min_size / short, max_size / long)``; ``interpolate``
    with ``recompute_scale_factor=True`` then truncates ``size * scale`` in double precision.
    """
    h, w = int(hw[0]), int(hw[1])
    scale = min(min_size / min(h, w), max_size / max(h, w))
    return int(h * scale), int(w * scale)


def padded_size(hw: tuple[int, int], size_divisible: int = 32) -> tuple[int, int]:
    """Round ``(h, w)`` up to multiples of ``size_divisible`` like ``batch_images``."""
    stride = float(size_divisible)
    return tuple(int(math.ceil(float(s) / stride) * stride) for s in hw)


def batch_canvas(sizes: Sequence[tuple[int, int]], size_divisible: int = 32,
                 buckets: Sequence[tuple[int, int]] | None = None) -> tuple[int, int]:
    """Canvas ``(H, W)`` for a batch of resized sizes.

    Without ``buckets``: torchvision's ``batch_images`` (max over the batch, rounded up to
    ``size_divisible``). With ``buckets``: the smallest-area bucket that holds that canvas, so
    that shapes recur; ``ValueError`` if none does.
    """
    need = padded_size((max(s[0] for s in sizes), max(s[1] for s in sizes)), size_divisible)
    if buckets is None:
        return need
    fitting = [tuple(b) for b in buckets if b[0] >= need[0] and b[1] >= need[1]]
    if not fitting:
        raise ValueError(f"no bucket holds a batch canvas of {need}; buckets: {list(buckets)}")
    return min(fitting, key=lambda b: (b[0] * b[1], b))


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


# --------------------------------------------------------------------------- device work


@functools.partial(jax.jit, static_argnames=("canvas",))
def _normalize_resize_pad(image_u8, rows, cols, mean, std, *, canvas):
    """uint8 [h, w, 3] -> float32 [canvas_h, canvas_w, 3], normalized, resized, zero padded."""
    TRACE_COUNTS["resize"] += 1
    # Same op order as torchvision: to_tensor's x / 255, then (x - mean) / std, then resize.
    x = (image_u8.astype(jnp.float32) / 255.0 - mean) / std
    r0, r1, rw0, rw1 = rows
    c0, c1, cw0, cw1 = cols
    # Separable 2-tap interpolation (gathers, no matmul: exact on every backend and O(pixels)).
    x = rw0[:, None, None] * jnp.take(x, r0, axis=0) + rw1[:, None, None] * jnp.take(x, r1, axis=0)
    x = cw0[None, :, None] * jnp.take(x, c0, axis=1) + cw1[None, :, None] * jnp.take(x, c1, axis=1)
    pad_h, pad_w = canvas[0] - x.shape[0], canvas[1] - x.shape[1]
    # Padding after normalization is 0, as torchvision's new_full(batch_shape, 0).
    return jnp.pad(x, ((0, pad_h), (0, pad_w), (0, 0)))


@functools.lru_cache(maxsize=256)
def _axis_weights(n_in: int, n_out: int):
    return tuple(jnp.asarray(a) for a in linear_weights(n_in, n_out))


def resize_normalize_pad(image: np.ndarray, out_hw: tuple[int, int], canvas: tuple[int, int],
                         image_mean: Sequence[float] = IMAGENET_MEAN,
                         image_std: Sequence[float] = IMAGENET_STD) -> jax.Array:
    """uint8 ``[h, w, 3]`` -> float32 ``[canvas_h, canvas_w, 3]`` on device.

    Normalizes, resizes to ``out_hw`` (torch bilinear, ``align_corners=False``, no antialias)
    and zero pads at the bottom/right. Compiles once per (input, output, canvas) shape.
    """
    if out_hw[0] > canvas[0] or out_hw[1] > canvas[1]:
        raise ValueError(f"resized size {out_hw} does not fit canvas {canvas}")
    mean = jnp.asarray(np.asarray(image_mean, np.float32))
    std = jnp.asarray(np.asarray(image_std, np.float32))
    rows = _axis_weights(image.shape[0], int(out_hw[0]))
    cols = _axis_weights(image.shape[1], int(out_hw[1]))
    return _normalize_resize_pad(image, rows, cols, mean, std, canvas=tuple(int(c) for c in canvas))


def preprocess_batch(images: Sequence[np.ndarray], *, min_size: int = 800, max_size: int = 1333,
                     size_divisible: int = 32, image_mean: Sequence[float] = IMAGENET_MEAN,
                     image_std: Sequence[float] = IMAGENET_STD,
                     buckets: Sequence[tuple[int, int]] | None = None,
                     ) -> tuple[jax.Array, np.ndarray]:
    """Mirror ``GeneralizedRCNNTransform(images)`` in eval mode for uint8 ``[H, W, 3]`` images.

    Returns ``(batch float32 [B, H, W, 3] NHWC, image_sizes int32 [B, 2])`` where ``image_sizes``
    are the resized ``(h, w)`` before padding (torchvision's ``ImageList.image_sizes``).
    """
    arrays = [to_uint8_rgb(im, i) for i, im in enumerate(images)]
    if not arrays:
        raise ValueError("no images given")
    sizes = [resized_size(a.shape[:2], min_size, max_size) for a in arrays]
    canvas = batch_canvas(sizes, size_divisible, buckets)
    batch = jnp.stack([resize_normalize_pad(a, s, canvas, image_mean, image_std)
                       for a, s in zip(arrays, sizes)])
    return batch, np.asarray(sizes, np.int32)
