"""Image sizes of a source (without decoding) and how its images fill a set of canvases.

The size arithmetic is ``imageprep.canvases`` (pure, no data); this module only reads the
sizes from a source: ``source.image_size(i)`` (annotations, image headers, or the tfds source's
cached header scan), None where a source cannot tell.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from retinanet_jax.imageprep import canvases as canvases_lib


def image_sizes(source: Any, n: int | None = None) -> list[tuple[int, int] | None]:
    """Original (h, w) of the first ``n`` examples (None: every one) without decoding; None
    where the source cannot tell."""
    n = len(source) if n is None else min(len(source), int(n))
    if not hasattr(source, "image_size"):
        return [None] * n
    sizes = (source.image_size(i) for i in range(n))
    return [None if s is None else (int(s[0]), int(s[1])) for s in sizes]


def source_canvas_usage(
    source: Any, canvases: Sequence[tuple[int, int]], min_size: int, max_size: int
) -> canvases_lib.CanvasUsage:
    """:func:`imageprep.canvases.canvas_usage` of every image of ``source`` (resized with
    ``min_size`` / ``max_size``) on ``canvases``: images per canvas and the share of canvas
    pixels that are image pixels."""
    return canvases_lib.canvas_usage(image_sizes(source), canvases, min_size, max_size)
