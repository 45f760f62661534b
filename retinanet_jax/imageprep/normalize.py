"""Normalization as torchvision's ``GeneralizedRCNNTransform``: ``x / 255``, then ``(x - mean) / std``.

Three forms, one arithmetic:

- :func:`normalize_images`: a uint8 batch already resized and padded on a canvas (training
  batches, the exported detector's uint8 input) -> float32 on device, zero outside each
  image's ``(h, w)`` as torchvision's ``batch_images`` pads *after* normalization.
- :func:`resize_normalize_pad`: one uint8 image -> normalized, resized (torch bilinear,
  ``align_corners=False``, no antialias) and zero padded on device (``predict``); one small
  jitted function per (input size, output size, canvas).
- :func:`resize_normalize_host`: the same normalize + resize in float32 numpy on the host
  (the evaluation loop, which resizes while the device runs the previous batch).

torchvision's op order is kept everywhere: normalize, then resize, then pad. Images are NHWC.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from retinanet_jax.imageprep.geometry import linear_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Counts traces (= compilations) per jitted function name; tests read it.
TRACE_COUNTS: collections.Counter = collections.Counter()


def inside_mask(image_sizes: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """bool ``[B, H, W, 1]``: True inside each image's ``(h, w)`` (``image_sizes`` int [B, 2])
    region at the top-left of an ``hw`` canvas."""
    ys = jnp.arange(hw[0])[None, :] < image_sizes[:, 0:1]  # [B, H]
    xs = jnp.arange(hw[1])[None, :] < image_sizes[:, 1:2]  # [B, W]
    return (ys[:, :, None] & xs[:, None, :])[..., None]


def normalize_images(
    images: jax.Array,
    image_sizes: jax.Array,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
    dtype: Any = jnp.float32,
) -> jax.Array:
    """uint8 [B,H,W,3] -> ``dtype`` (float32; float64 in float64 runs) normalized, zero outside
    ``image_sizes`` [B,2] (h, w).

    Same arithmetic as torchvision (``x / 255``, then ``(x - mean) / std``, in the image's
    dtype), and the padding is zero *after* normalization as
    ``GeneralizedRCNNTransform.batch_images`` pads.
    """
    x = images.astype(dtype) / 255.0
    x = (x - jnp.asarray(image_mean, dtype)) / jnp.asarray(image_std, dtype)
    return jnp.where(inside_mask(image_sizes, images.shape[1:3]), x, 0.0)


def _normalize_resize(xp: Any, image, rows, cols, mean, std):
    """uint8 [h, w, 3] -> float32 [H, W, 3]: normalize, then separable 2-tap bilinear resize
    with :func:`linear_weights` ``rows`` / ``cols``, in ``xp`` (numpy or jax.numpy)."""
    x = (image.astype(xp.float32) / xp.float32(255.0) - mean) / std
    r0, r1, rw0, rw1 = rows
    c0, c1, cw0, cw1 = cols
    # Gathers, no matmul: exact on every backend and O(pixels).
    x = rw0[:, None, None] * xp.take(x, r0, axis=0) + rw1[:, None, None] * xp.take(x, r1, axis=0)
    return cw0[None, :, None] * xp.take(x, c0, axis=1) + cw1[None, :, None] * xp.take(x, c1, axis=1)


def resize_normalize_host(
    image: np.ndarray,
    out_hw: tuple[int, int],
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
    """uint8 ``[h, w, 3]`` -> float32 ``[out_h, out_w, 3]`` normalized and torch-bilinear
    resized, in numpy (same arithmetic as :func:`resize_normalize_pad`, without the pad)."""
    return _normalize_resize(
        np,
        image,
        linear_weights(image.shape[0], int(out_hw[0])),
        linear_weights(image.shape[1], int(out_hw[1])),
        np.asarray(image_mean, np.float32),
        np.asarray(image_std, np.float32),
    )


@functools.partial(jax.jit, static_argnames=("canvas",))
def _normalize_resize_pad(image_u8, rows, cols, mean, std, *, canvas):
    """uint8 [h, w, 3] -> float32 [canvas_h, canvas_w, 3], normalized, resized, zero padded."""
    TRACE_COUNTS["resize"] += 1
    x = _normalize_resize(jnp, image_u8, rows, cols, mean, std)
    pad_h, pad_w = canvas[0] - x.shape[0], canvas[1] - x.shape[1]
    # Padding after normalization is 0, as torchvision's new_full(batch_shape, 0).
    return jnp.pad(x, ((0, pad_h), (0, pad_w), (0, 0)))


@functools.lru_cache(maxsize=256)
def _axis_weights(n_in: int, n_out: int):
    return tuple(jnp.asarray(a) for a in linear_weights(n_in, n_out))


def resize_normalize_pad(
    image: np.ndarray,
    out_hw: tuple[int, int],
    canvas: tuple[int, int],
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
) -> jax.Array:
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
