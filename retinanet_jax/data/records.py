"""Annotation validation and the common file-backed detection source.

Every source yields examples ``{"image": uint8 [H,W,3], "boxes": float32 [N,4] xyxy pixels,
"labels": int32 [N] in 0..K-1, "image_id": int}`` and exposes ``class_names``, ``__len__``,
``__getitem__`` and ``image_size(i) -> (h, w) | None`` (original size without decoding; the
pipeline groups images into canvas buckets with it).

Bad annotation records (degenerate or out-of-image boxes, unknown classes, missing files) raise
:class:`DataError` naming the file and the record, or, with ``on_bad_record="drop"``, are dropped
and counted in ``source.dropped`` (reason -> count) and logged once.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from retinanet_jax.data import decode
from retinanet_jax.data.errors import DataError

log = logging.getLogger(__name__)

ON_BAD_RECORD = ("error", "drop")

# Boxes may overshoot the image by up to this many pixels (annotation tools round outwards);
# they are clipped. Anything further out is a bad record.
OUT_OF_IMAGE_TOLERANCE = 1.0


class BadRecords:
    """Raises on a bad record (``policy="error"``) or counts it (``policy="drop"``)."""

    def __init__(self, policy: str, source: str):
        if policy not in ON_BAD_RECORD:
            raise ValueError(f"on_bad_record must be one of {ON_BAD_RECORD}, got {policy!r}")
        self.policy = policy
        self.source = source
        self.counts: collections.Counter = collections.Counter()

    def report(self, where: str, reason: str, kind: str | None = None) -> None:
        """Handles one bad record; ``where`` names the file and record, ``reason`` the fault,
        ``kind`` the counter key (default: ``reason`` up to its first ':' or ' (')."""
        if self.policy == "error":
            raise DataError(f"{where}: {reason} (pass on_bad_record='drop' to skip such records)")
        self.counts[kind or reason.split(":")[0].split(" (")[0]] += 1

    def log_summary(self) -> None:
        if self.counts:
            log.warning("%s: dropped bad records: %s", self.source, dict(self.counts))


def box_faults(
    boxes: np.ndarray,
    image_hw: tuple[int, int] | None,
    tolerance: float = OUT_OF_IMAGE_TOLERANCE,
) -> tuple[np.ndarray, dict[int, str]]:
    """Checks boxes float [N,4] xyxy pixels against an image of size (h, w).

    Returns the boxes clipped to the image (overshoots up to ``tolerance`` px are legal) and
    ``{box index: reason}`` for the invalid ones. With ``image_hw=None`` only degeneracy and
    finiteness are checked. Vectorized: COCO has ~10^6 boxes.
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    clipped = boxes.copy()
    finite = np.isfinite(boxes).all(axis=1)
    with np.errstate(invalid="ignore"):
        degenerate = finite & ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))
        outside = np.zeros(len(boxes), bool)
        collapsed = np.zeros(len(boxes), bool)
        if image_hw is not None:
            h, w = image_hw
            clipped[:, 0::2] = np.clip(boxes[:, 0::2], 0, w)
            clipped[:, 1::2] = np.clip(boxes[:, 1::2], 0, h)
            outside = (
                finite
                & ~degenerate
                & (
                    (boxes[:, 0] < -tolerance)
                    | (boxes[:, 1] < -tolerance)
                    | (boxes[:, 2] > w + tolerance)
                    | (boxes[:, 3] > h + tolerance)
                )
            )
            # A box lying entirely in the tolerated margin collapses when clipped.
            collapsed = (
                finite
                & ~degenerate
                & ~outside
                & ((clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1]))
            )
    faults: dict[int, str] = {}
    for n in np.flatnonzero(~finite):
        faults[int(n)] = f"non-finite box: {boxes[n].tolist()}"
    for n in np.flatnonzero(degenerate):
        faults[int(n)] = f"degenerate box (need x2 > x1 and y2 > y1): xyxy={boxes[n].tolist()}"
    for n in np.flatnonzero(outside):
        faults[int(n)] = (
            f"out-of-image box: xyxy={boxes[n].tolist()} for image (h, w)={tuple(int(v) for v in image_hw)}"
        )
    for n in np.flatnonzero(collapsed):
        faults[int(n)] = f"degenerate box after clipping to the image: xyxy={boxes[n].tolist()}"
    return clipped, faults


@dataclasses.dataclass
class ImageRecord:
    """One annotated image file. ``boxes`` float32 [N,4] xyxy pixels (already validated),
    ``labels`` int32 [N], ``hw`` the annotated (h, w) or None, ``extra`` per-box arrays."""

    path: str
    image_id: int
    boxes: np.ndarray
    labels: np.ndarray
    hw: tuple[int, int] | None = None
    extra: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    where: str = ""  # annotation file / record naming this image, for error messages


class FileDetectionSource:
    """Random-access source over a list of :class:`ImageRecord`; images decoded on access."""

    def __init__(
        self, records: list[ImageRecord], class_names: list[str], dropped: dict[str, int] | None = None
    ):
        self.records = records
        self.class_names = list(class_names)
        self.dropped: dict[str, int] = dict(dropped or {})

    def __len__(self) -> int:
        return len(self.records)

    def image_size(self, i: int) -> tuple[int, int] | None:
        """(h, w) of image ``i`` as annotated, without decoding it."""
        return self.records[i].hw

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.records[i]
        image = decode.read_image(rec.path)
        if rec.hw is not None and tuple(image.shape[:2]) != tuple(rec.hw):
            # Boxes are in the annotated frame; a different decoded size means they do not fit.
            raise DataError(
                f"{rec.path}: decoded size (h, w)={image.shape[:2]} differs from the annotated "
                f"size {tuple(rec.hw)} in {rec.where or 'the annotations'}"
            )
        example = {
            "image": image,
            "boxes": rec.boxes.copy(),
            "labels": rec.labels.copy(),
            "image_id": int(rec.image_id),
        }
        for key, value in rec.extra.items():
            example[key] = value.copy()
        return example


def stack_boxes(boxes: list, labels: list) -> tuple[np.ndarray, np.ndarray]:
    """Lists of 4-sequences and ints -> (float32 [N,4], int32 [N]), well-shaped when empty."""
    return (np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int32).reshape(-1))


def checked_boxes(
    boxes: list, labels: list, image_hw: tuple[int, int] | None, bad: BadRecords, where: Callable[[int], str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's annotations as arrays, faulty boxes reported and dropped.

    ``where(n)`` names annotation ``n`` (file and line / object / id) in the report. Returns
    ``(boxes float32 [M,4], labels int32 [M], keep bool [N])``: the kept rows and which they were.
    """
    box_arr, label_arr = stack_boxes(boxes, labels)
    box_arr, faults = box_faults(box_arr, image_hw)
    for n, reason in faults.items():
        bad.report(where(n), reason)
    keep = np.array([n not in faults for n in range(len(label_arr))], bool)
    return box_arr[keep], label_arr[keep], keep
