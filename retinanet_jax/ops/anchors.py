"""Anchors for RetinaNet, bit-for-bit equal to torchvision's ``AnchorGenerator``.

numpy only (no jax): anchors depend only on the padded image shape, so they are computed once
per canvas shape on the host and cached.

Anchor order = torchvision's: level (P3..P7), then y, then x, then the base anchors of the
level in ``generate_anchors`` order (aspect ratio major, scale minor).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

# torchvision ``retinanet._default_anchorgen``: int() truncates 32 * 2**(1/3) = 40.3 -> 40, etc.
DEFAULT_SIZES: tuple[tuple[int, ...], ...] = tuple(
    (x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in [32, 64, 128, 256, 512]
)
DEFAULT_ASPECT_RATIOS: tuple[tuple[float, ...], ...] = ((0.5, 1.0, 2.0),) * len(DEFAULT_SIZES)
NUM_LEVELS = 5


def _conv_s2(n: int) -> int:
    # Every downsampling op in the model (7x7/s2/p3 stem conv, 3x3/s2/p1 max pool, 3x3/s2/p1
    # convs, 1x1/s2/p0 downsample) gives floor((n + 2p - k) / 2) + 1 = (n - 1) // 2 + 1.
    return (n - 1) // 2 + 1


def feature_shapes(image_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """Spatial sizes (h, w) of P3..P7 for a padded input of ``image_hw`` = (H, W) pixels.

    P3 = stem conv + max pool + layer2 (three halvings); P4, P5 = layer3, layer4; P6, P7 =
    the extra stride-2 convs. The FPN top-down path resizes to the lateral sizes, so it
    changes nothing.
    """
    h, w = int(image_hw[0]), int(image_hw[1])
    for _ in range(3):
        h, w = _conv_s2(h), _conv_s2(w)
    shapes = [(h, w)]
    for _ in range(NUM_LEVELS - 1):
        h, w = _conv_s2(h), _conv_s2(w)
        shapes.append((h, w))
    return shapes


def base_anchors(scales: tuple[int, ...], aspect_ratios: tuple[float, ...]) -> np.ndarray:
    """Zero-centred anchors of one level, float32 [len(ratios) * len(scales), 4] xyxy.

    Mirrors ``AnchorGenerator.generate_anchors``: every step in float32, and the final
    rounding is round-half-to-even (torch.round == np.round).
    """
    scales_f = np.asarray(scales, dtype=np.float32)
    ratios_f = np.asarray(aspect_ratios, dtype=np.float32)
    h_ratios = np.sqrt(ratios_f)
    w_ratios = np.float32(1) / h_ratios
    ws = (w_ratios[:, None] * scales_f[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales_f[None, :]).reshape(-1)
    anchors = np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2)
    return np.round(anchors).astype(np.float32)


def _as_key(nested) -> tuple:
    return tuple(tuple(x) for x in nested)


@functools.lru_cache(maxsize=64)
def _anchors_cached(image_hw: tuple[int, int], sizes: tuple, aspect_ratios: tuple) -> np.ndarray:
    grids = feature_shapes(image_hw)
    if not (len(sizes) == len(aspect_ratios) == len(grids)):
        raise ValueError(
            f"need one sizes / aspect_ratios entry per level ({len(grids)}), got "
            f"{len(sizes)} and {len(aspect_ratios)}"
        )
    per_level = []
    for (gh, gw), scales, ratios in zip(grids, sizes, aspect_ratios):
        # torchvision: stride = padded image size // grid size, per axis, integer division.
        stride_h, stride_w = image_hw[0] // gh, image_hw[1] // gw
        shift_x = np.arange(gw, dtype=np.int64) * stride_w
        shift_y = np.arange(gh, dtype=np.int64) * stride_h
        sy, sx = np.meshgrid(shift_y, shift_x, indexing="ij")
        sx, sy = sx.reshape(-1), sy.reshape(-1)
        # Integer shifts are exact in float32 for any realistic image, so int + float32 here
        # equals torchvision's int32 + float32 promotion.
        shifts = np.stack([sx, sy, sx, sy], axis=1).astype(np.float32)
        base = base_anchors(scales, ratios)
        per_level.append((shifts[:, None, :] + base[None, :, :]).reshape(-1, 4))
    out = np.concatenate(per_level, axis=0).astype(np.float32)
    out.flags.writeable = False
    return out


def anchors_for_image(
    image_hw: tuple[int, int],
    sizes: tuple[tuple[int, ...], ...] = DEFAULT_SIZES,
    aspect_ratios: tuple[tuple[float, ...], ...] = DEFAULT_ASPECT_RATIOS,
) -> np.ndarray:
    """All anchors of a padded batch of size ``image_hw`` = (H, W): float32 [A, 4], xyxy pixels.

    Exactly torchvision ``AnchorGenerator(sizes, aspect_ratios)(ImageList, features)`` for the
    P3..P7 feature maps of that size. Cached per argument; the returned array is read-only.
    """
    key = (int(image_hw[0]), int(image_hw[1]))
    return _anchors_cached(key, _as_key(sizes), _as_key(aspect_ratios))


def model_anchor_config(model: Any) -> tuple[tuple, tuple]:
    """``(sizes, aspect_ratios)`` of a model: its ``anchor_sizes`` / ``aspect_ratios`` fields,
    torchvision's defaults where a field is None or absent."""
    sizes = getattr(model, "anchor_sizes", None) or DEFAULT_SIZES
    ratios = getattr(model, "aspect_ratios", None) or DEFAULT_ASPECT_RATIOS
    return _as_key(sizes), _as_key(ratios)


def anchors_for_model(model: Any, image_hw: tuple[int, int]) -> np.ndarray:
    """:func:`anchors_for_image` with the model's anchor sizes and ratios: float32 [A, 4] xyxy."""
    sizes, ratios = model_anchor_config(model)
    return anchors_for_image(image_hw, sizes, ratios)


def num_anchors_per_level(image_hw: tuple[int, int], anchors_per_location: int = 9) -> tuple[int, ...]:
    """Number of anchors of each level P3..P7 (h * w * anchors_per_location), in anchor order."""
    return tuple(h * w * anchors_per_location for h, w in feature_shapes(image_hw))
