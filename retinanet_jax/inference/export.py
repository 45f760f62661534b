"""The jitted detector for one fixed input shape, serialised with ``jax.export``.

The exported function (weights baked in as constants, so the file is self-contained)::

    detect(images:      uint8 [B, H, W, 3] RGB pixels    (input_dtype="uint8")
                     or float32 [B, H, W, 3] normalized  (input_dtype="float32"),
           image_sizes: int32 [B, 2]  (h, w) of each image, placed at the top-left of the canvas)
      -> (boxes     float32 [B, D, 4]  xyxy in the canvas' pixels, clipped to the image,
          scores    float32 [B, D]     descending, 0 past num_valid,
          labels    int32   [B, D],
          num_valid int32   [B])

uint8 input is normalized inside (``x / 255``, ImageNet mean/std, as torchvision) and the canvas
outside ``image_sizes`` is zeroed after normalization, as torchvision's batching pads; float32
input is used as given (e.g. torchvision's ``GeneralizedRCNNTransform`` output) with the padding
zeroed the same way. The function does not resize: to get ``rj.predict``'s detections, resize
as torchvision does (short side ``min_size``, long side at most ``max_size``, recorded in the
sidecar JSON) and scale boxes back by original / resized size.

Files: ``PATH`` (``Exported.serialize()`` bytes) and ``PATH.json`` (inputs, outputs, class names,
category ids, options). Reload without retinanet_jax::

    exp = jax.export.deserialize(open(PATH, "rb").read())
    boxes, scores, labels, num_valid = exp.call(images, image_sizes)

By default the module is lowered for ("cpu", "cuda", "tpu"): one file runs on any of them. The
module is traced once for all its platforms, with the kernels and precision choices of the
first non-CPU one (``backends.platform_for``): plain ``lax`` convolutions and, in bf16, bf16
activations. Its CPU program therefore runs lax convs too, not the CPU forms of
``backends/cpu`` (Winograd, GEMM forms, f32 inference streams) that ``rj.predict`` uses on CPU;
export with ``platforms=("cpu",)`` for a CPU-only file with those.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from retinanet_jax import backends
from retinanet_jax.imageprep.normalize import IMAGENET_MEAN, IMAGENET_STD, inside_mask, normalize_images
from retinanet_jax.inference.detector import DetectorOptions, detect
from retinanet_jax.ops import anchors as anchors_lib

FORMAT = "retinanet_jax.exported"
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
INPUT_DTYPES = ("uint8", "float32")


def detector_fn(
    model: Any, variables: Any, canvas: tuple[int, int], *, input_dtype: str = "uint8", **options: Any
):
    """``detect(images [B,H,W,3], image_sizes int32 [B,2]) -> (boxes, scores, labels, num_valid)``
    for ``canvas`` = (H, W), closing over ``variables`` (see the module doc). ``options``:
    :class:`~retinanet_jax.inference.detector.DetectorOptions` fields (torchvision's defaults)."""
    if input_dtype not in INPUT_DTYPES:
        raise ValueError(f"input_dtype must be one of {INPUT_DTYPES}, got {input_dtype!r}")
    opts = DetectorOptions.of(**options)
    anchors = np.asarray(anchors_lib.anchors_for_model(model, canvas))

    def detect_fn(images: jax.Array, image_sizes: jax.Array):
        image_sizes = image_sizes.astype(jnp.int32)
        if input_dtype == "uint8":
            x = normalize_images(images, image_sizes)  # torchvision's op order, zero padding
        else:
            x = jnp.where(inside_mask(image_sizes, canvas), images.astype(jnp.float32), 0.0)
        return detect(model, variables, x, image_sizes, jnp.asarray(anchors), opts)

    return detect_fn


def export_detector(
    model: Any,
    variables: Any,
    *,
    batch_size: int,
    canvas: tuple[int, int],
    input_dtype: str = "uint8",
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
    **options: Any,
) -> jax.export.Exported:
    """``jax.export`` of :func:`detector_fn` for inputs ``[batch_size, *canvas, 3]``.

    ``canvas`` (H, W) must be multiples of 32 (torchvision pads to that). ``options``:
    score_thresh, topk_candidates, nms_thresh, detections_per_img, class_agnostic.
    Traced with the forms of ``backends.platform_for(platforms)`` (see the module doc).
    """
    h, w = int(canvas[0]), int(canvas[1])
    if h % 32 or w % 32 or h <= 0 or w <= 0 or batch_size < 1:
        raise ValueError(
            f"canvas must be positive multiples of 32 and batch >= 1, got {canvas}, {batch_size}"
        )
    fn = detector_fn(model, jax.device_get(variables), (h, w), input_dtype=input_dtype, **options)
    args = (
        jax.ShapeDtypeStruct((batch_size, h, w, 3), jnp.dtype(input_dtype)),
        jax.ShapeDtypeStruct((batch_size, 2), jnp.int32),
    )
    with backends.target(platforms):  # a fresh jit: nothing cached from another target
        return jax.export.export(jax.jit(fn), platforms=tuple(platforms))(*args)


def save_exported(path: str, exported: jax.export.Exported, meta: dict[str, Any]) -> None:
    """Write ``path`` (serialized module) and ``path + ".json"`` (``meta`` plus the signature)."""
    b, h, w, _ = exported.in_avals[0].shape
    info = {
        "format": FORMAT,
        "version": 1,
        "jax_version": jax.__version__,
        "platforms": list(exported.platforms),
        "inputs": [
            {"name": "images", "shape": [b, h, w, 3], "dtype": str(exported.in_avals[0].dtype)},
            {"name": "image_sizes", "shape": [b, 2], "dtype": "int32", "meaning": "(h, w)"},
        ],
        "outputs": [
            {"name": n, "shape": list(a.shape), "dtype": str(a.dtype)}
            for n, a in zip(("boxes", "scores", "labels", "num_valid"), exported.out_avals)
        ],
        "boxes": "xyxy in canvas pixels",
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
        **meta,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(exported.serialize())
    with open(path + ".json", "w") as f:
        json.dump(info, f, indent=1)
