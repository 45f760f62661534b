"""``predict``: images in, detections in original pixels out, like torchvision's ``model(images)``.

Pipeline (torchvision ``RetinaNet.forward`` in eval mode): image preparation equal to
``GeneralizedRCNNTransform`` (``retinanet_jax.imageprep``) -> the jitted detector (forward +
fixed-shape postprocess, ``inference.detector``) per padded batch shape -> ``transform.postprocess``'s
``resize_boxes`` back to original pixels. Batches are consecutive chunks of ``batch_size`` images
in input order, padded like torchvision's ``batch_images`` (so a chunk gives what torchvision
gives for that chunk), or to one of fixed ``buckets`` canvases so that shapes, and hence
compilations, recur.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from retinanet_jax import backends
from retinanet_jax.imageprep.convert import to_uint8_rgb
from retinanet_jax.imageprep.geometry import batch_canvas, resized_size
from retinanet_jax.imageprep.normalize import IMAGENET_MEAN, IMAGENET_STD, TRACE_COUNTS, resize_normalize_pad
from retinanet_jax.inference.detector import DetectorOptions, detect
from retinanet_jax.inference.tiling import TileOptions, predict_tiled
from retinanet_jax.ops import anchors as anchors_lib

Detections = dict[str, np.ndarray]


@functools.partial(jax.jit, static_argnames=("model", "options", "target"))
def _detect(variables, images, image_sizes, anchors, ratios, *, model, options, target):
    """The detector + rescale of one padded batch; compiled once per shape, config and target
    platform (``backends.current()`` at the call: jit's cache does not see the context)."""
    TRACE_COUNTS["detect"] += 1
    with backends.target(target):
        boxes, scores, labels, num_valid = detect(model, variables, images, image_sizes, anchors, options)
    # torchvision resize_boxes: x * (orig_w / resized_w), y * (orig_h / resized_h) in float32.
    rh, rw = ratios[:, 0], ratios[:, 1]
    scale = jnp.stack([rw, rh, rw, rh], axis=-1)[:, None, :]
    return boxes.astype(jnp.float32) * scale, scores, labels, num_valid


@functools.lru_cache(maxsize=32)
def _device_anchors(canvas: tuple[int, int], sizes: tuple, ratios: tuple) -> jax.Array:
    return jnp.asarray(anchors_lib.anchors_for_image(canvas, sizes, ratios))


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


class Predictor:
    """Reusable ``predict`` with fixed options; ``predictor(images) -> list of detections``.

    Jitted functions are cached by (model config, options, shapes), so repeated calls, and other
    ``Predictor`` objects for the same model config, don't recompile. ``dtype`` (e.g.
    ``jnp.bfloat16``) overrides the model's compute dtype; parameters stay as given.
    ``tile_size`` switches to sliced prediction (``inference.tiling``; see ``predict``).
    """

    def __init__(
        self,
        model: Any,
        variables: Any,
        *,
        min_size: int = 800,
        max_size: int = 1333,
        size_divisible: int = 32,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        score_thresh: float = 0.05,
        topk_candidates: int = 1000,
        nms_thresh: float = 0.5,
        detections_per_img: int = 300,
        class_agnostic: bool = False,
        batch_size: int = 8,
        buckets: Sequence[tuple[int, int]] | None = None,
        dtype: Any = None,
        tile_size: int | tuple[int, int] | None = None,
        tile_overlap: float = 0.2,
        tile_scale: float = 1.0,
        full_image_pass: bool = False,
        tile_options: dict[str, Any] | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if buckets is not None:
            buckets = tuple((int(h), int(w)) for h, w in buckets)
            bad = [b for b in buckets if b[0] % size_divisible or b[1] % size_divisible]
            if bad:
                raise ValueError(f"buckets must be multiples of size_divisible={size_divisible}: {bad}")
        self.model = model if dtype is None else model.clone(dtype=dtype)
        self.variables = jax.device_put(variables)
        self.min_size, self.max_size, self.size_divisible = min_size, max_size, size_divisible
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.batch_size, self.buckets = batch_size, buckets
        self.options = DetectorOptions.of(
            score_thresh=score_thresh,
            topk_candidates=topk_candidates,
            nms_thresh=nms_thresh,
            detections_per_img=detections_per_img,
            class_agnostic=class_agnostic,
        )
        self.tiling = (
            None
            if tile_size is None
            else TileOptions.of(
                tile_size,
                overlap=tile_overlap,
                scale=tile_scale,
                full_image_pass=full_image_pass,
                **(tile_options or {}),
            )
        )

    # ---- stages (public so that benchmarks can time them separately)

    def preprocess(self, images: Sequence[Any], offset: int = 0):
        """uint8 images -> ``(batch f32 [B,H,W,3] on device, image_sizes int32 [B,2],
        original_sizes int32 [B,2])``; ``B`` padded to a power of two (<= batch_size) when
        ``buckets`` are set. ``offset`` only numbers images in error messages."""
        arrays = [to_uint8_rgb(im, offset + i) for i, im in enumerate(images)]
        originals = [a.shape[:2] for a in arrays]
        sizes = [resized_size(hw, self.min_size, self.max_size) for hw in originals]
        canvas = batch_canvas(sizes, self.size_divisible, self.buckets)
        padded = [
            resize_normalize_pad(a, s, canvas, self.image_mean, self.image_std) for a, s in zip(arrays, sizes)
        ]
        if self.buckets is not None:
            # Fill the batch with blank canvases up to a power of two: at most
            # log2(batch_size) + 1 batch shapes per bucket, at most 2x wasted work.
            extra = min(_next_pow2(len(padded)), self.batch_size) - len(padded)
            padded += [jnp.zeros_like(padded[0])] * extra
            sizes += [canvas] * extra
            originals += [canvas] * extra
        return jnp.stack(padded), np.asarray(sizes, np.int32), np.asarray(originals, np.int32)

    def detect(self, batch: jax.Array, image_sizes: np.ndarray, original_sizes: np.ndarray):
        """Jitted forward + postprocess + rescale; returns device arrays
        ``(boxes [B,D,4] xyxy original pixels, scores [B,D], labels [B,D], num_valid [B])``."""
        canvas = (int(batch.shape[1]), int(batch.shape[2]))
        # float32 / float32 as torchvision's resize_boxes (new / old size tensors).
        ratios = original_sizes.astype(np.float32) / image_sizes.astype(np.float32)
        anchors = _device_anchors(canvas, *anchors_lib.model_anchor_config(self.model))
        return _detect(
            self.variables,
            batch,
            jnp.asarray(image_sizes),
            anchors,
            jnp.asarray(ratios),
            model=self.model,
            options=self.options,
            target=backends.current(),
        )

    @staticmethod
    def to_numpy(outputs, count: int) -> list[Detections]:
        """Device outputs of ``detect`` -> the first ``count`` images' detection dicts."""
        boxes, scores, labels, num_valid = jax.device_get(outputs)
        dets = []
        for i in range(count):
            n = int(num_valid[i])
            dets.append(
                {
                    "boxes": np.asarray(boxes[i, :n], np.float32),
                    "scores": np.asarray(scores[i, :n], np.float32),
                    "labels": np.asarray(labels[i, :n], np.int64),
                }
            )
        return dets

    def __call__(self, images: Sequence[Any]) -> list[Detections]:
        """Detections for each image, in input order (see ``predict``)."""
        if isinstance(images, np.ndarray) and images.ndim == 3:
            raise TypeError(
                "predict takes a list of images (or a [B, H, W, 3] array); wrap a single image in a list"
            )
        images = list(images)
        if self.tiling is not None:
            return [predict_tiled(self, im, self.tiling, i) for i, im in enumerate(images)]
        pending = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            # Dispatch is asynchronous: the next chunk's host work overlaps this chunk's compute.
            pending.append((self.detect(*self.preprocess(chunk, offset=start)), len(chunk)))
        return [d for out, count in pending for d in self.to_numpy(out, count)]


def predict(
    model: Any,
    variables: Any,
    images: Sequence[Any],
    *,
    min_size: int = 800,
    max_size: int = 1333,
    size_divisible: int = 32,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
    score_thresh: float = 0.05,
    topk_candidates: int = 1000,
    nms_thresh: float = 0.5,
    detections_per_img: int = 300,
    class_agnostic: bool = False,
    batch_size: int = 8,
    buckets: Sequence[tuple[int, int]] | None = None,
    dtype: Any = None,
    tile_size: int | tuple[int, int] | None = None,
    tile_overlap: float = 0.2,
    tile_scale: float = 1.0,
    full_image_pass: bool = False,
    tile_options: dict[str, Any] | None = None,
) -> list[Detections]:
    """Detect objects; mirrors torchvision ``RetinaNet.forward`` in eval mode.

    ``images``: list of PIL images or uint8 ``[H, W, 3]`` arrays of any sizes. Returns one dict per
    image: ``boxes`` float32 ``[N, 4]`` xyxy in the original image's pixels, ``scores`` float32
    ``[N]``, ``labels`` int64 ``[N]``, sorted by descending score, ``N <= detections_per_img``.
    Each chunk of ``batch_size`` images is padded to a common canvas (torchvision's batching, or
    the smallest fitting of ``buckets`` ``[(H, W), ...]``). Compiled functions are cached.

    Sliced prediction for large images (``inference.tiling``): ``tile_size=(h, w)`` cuts each
    image into tiles overlapping by ``tile_overlap`` (fraction of the tile), fed at native
    resolution times ``tile_scale`` (``min_size`` / ``max_size`` then only size the
    ``full_image_pass``), ``batch_size`` tiles per step; detections are merged across tiles on
    the device (one object, one box) and capped at ``tile_options["max_detections"]`` (4096).
    """
    return Predictor(
        model,
        variables,
        min_size=min_size,
        max_size=max_size,
        size_divisible=size_divisible,
        image_mean=image_mean,
        image_std=image_std,
        score_thresh=score_thresh,
        topk_candidates=topk_candidates,
        nms_thresh=nms_thresh,
        detections_per_img=detections_per_img,
        class_agnostic=class_agnostic,
        batch_size=batch_size,
        buckets=buckets,
        dtype=dtype,
        tile_size=tile_size,
        tile_overlap=tile_overlap,
        tile_scale=tile_scale,
        full_image_pass=full_image_pass,
        tile_options=tile_options,
    )(images)
