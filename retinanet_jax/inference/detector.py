"""The detector function: forward + fixed-shape postprocess of one normalized, padded batch.

The one definition behind ``predict`` (which then rescales boxes to original pixels), the
evaluation loop and the exported detector (which normalizes uint8 input first)::

    detect(model, variables, images float32 [B, H, W, 3], image_sizes int32 [B, 2], anchors,
           options) -> (boxes float32 [B, D, 4] xyxy in the canvas' pixels, clipped to each
                        image's (h, w), scores [B, D], labels int32 [B, D], num_valid int32 [B])

as torchvision's ``RetinaNet.forward`` in eval mode up to (not including)
``transform.postprocess``'s ``resize_boxes``. Traceable; :func:`detect_jit` is it jitted once per
(model config, options, shapes, target platform: ``retinanet_jax.backends.target``).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from retinanet_jax import backends
from retinanet_jax.inference.postprocess import postprocess
from retinanet_jax.ops import anchors as anchors_lib


class DetectorOptions(NamedTuple):
    """Postprocess options (torchvision's defaults); hashable, so a static jit argument."""

    score_thresh: float = 0.05
    topk_candidates: int = 1000
    nms_thresh: float = 0.5
    detections_per_img: int = 300
    class_agnostic: bool = False

    @classmethod
    def of(cls, **options: Any) -> DetectorOptions:
        """Options from keywords, with each value cast to its field's type (so that equal
        options compare, and hash, equal whatever numeric types the caller used)."""
        unknown = set(options) - set(cls._fields)
        if unknown:
            raise TypeError(f"unknown detector options {sorted(unknown)}; known: {list(cls._fields)}")
        opts = cls(**options)
        return cls(
            float(opts.score_thresh),
            int(opts.topk_candidates),
            float(opts.nms_thresh),
            int(opts.detections_per_img),
            bool(opts.class_agnostic),
        )


def detect(
    model: Any,
    variables: Any,
    images: jax.Array,
    image_sizes: jax.Array,
    anchors: jax.Array | None = None,
    options: DetectorOptions = DetectorOptions(),
):
    """Forward + postprocess (see the module doc). ``anchors`` float32 [A, 4]: the model's
    anchors for the canvas ``images.shape[1:3]``; None computes them here (then they are
    constants of the traced program)."""
    canvas = (int(images.shape[1]), int(images.shape[2]))
    if anchors is None:
        anchors = jnp.asarray(anchors_lib.anchors_for_model(model, canvas))
    level_sizes = anchors_lib.num_anchors_per_level(canvas, model.num_anchors)
    out = model.apply(variables, images)
    return postprocess(
        out["cls_logits"], out["bbox_regression"], anchors, level_sizes, image_sizes, **options._asdict()
    )


@functools.partial(jax.jit, static_argnames=("model", "options", "target"))
def detect_jit(
    variables: Any,
    images: jax.Array,
    image_sizes: jax.Array,
    anchors: jax.Array,
    *,
    model: Any,
    options: DetectorOptions,
    target: str | None = None,
):
    """:func:`detect` jitted; compiled once per (model config, options, shapes, ``target``).

    ``target``: the platform whose kernels and precision choices are traced (``"cpu"``,
    ``"cuda"``, ``"tpu"``; None: ``backends.current()`` when traced, i.e. the default backend or
    an enclosing ``backends.target(...)``). Lowering for another platform than the default one
    (``.trace(...)``, ``jax.export``) should name it: jit's cache does not see the context."""
    with backends.target(target):
        return detect(model, variables, images, image_sizes, anchors, options)
