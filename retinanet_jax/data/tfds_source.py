"""tensorflow_datasets detection datasets (coco/2017, voc/2007, ...) as a random-access source.

Any tfds dataset whose features have ``image`` and ``objects`` with ``bbox`` (tfds
``BBoxFeature``: normalized [ymin, xmin, ymax, xmax]) and ``label`` (``ClassLabel``) works.
Access goes through ``builder.as_data_source(split)`` (random access, so the pipeline can
shuffle and shard deterministically); the dataset must have been prepared in the
``array_record`` file format (``tfds build --file_format=array_record``).

- Boxes become xyxy pixels: ``x = xmin * width`` etc. (float32).
- ``objects/is_crowd`` (COCO) objects are dropped unless ``keep_crowd``; ``objects/is_difficult``
  (VOC) ones unless ``keep_difficult``; examples of datasets with ``is_difficult`` carry
  ``"difficult": bool [N]``.
- Labels are tfds's ``ClassLabel`` indices (already contiguous), ``class_names`` its names.
  For coco/2017 and coco/2014, whose 80 names tfds orders by COCO category id,
  ``label_to_category_id`` gives the COCO ids; otherwise it is the identity.
- ``image_id`` is ``image/id`` when the dataset has it (COCO), else the index.
- tfds VOC boxes are the raw 1-based VOC numbers divided by the image size (no -1 shift);
  see ``voc_xml`` for the convention difference.
- Image sizes are unknown without decoding (``image_size`` returns None), so the pipeline
  puts these images on a (max_size, max_size) canvas.
Bad boxes are checked when an example is read: ``on_bad_record="error"`` raises naming the
dataset, split and index; ``"drop"`` drops the box (and logs it).

tensorflow_datasets is imported only when a source is created.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from retinanet_jax.data.errors import DataError
from retinanet_jax.data.records import BadRecords, box_faults
from retinanet_jax.imageprep import convert

log = logging.getLogger(__name__)

# COCO's 80 category ids in increasing order (ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 unused).
COCO_CATEGORY_IDS = tuple(i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            "TfdsSource needs tensorflow_datasets (pip install tensorflow-datasets tensorflow "
            "array_record); or use CocoJsonSource / VocXmlSource on the extracted files"
        ) from e
    return tfds


class TfdsSource:
    """Examples from a prepared tfds detection dataset.

    Args:
      name: tfds name with config, e.g. "coco/2017", "voc/2007".
      split: e.g. "train", "validation", "train[:10%]".
      data_dir: tfds data directory (default: tfds's).
      keep_crowd, keep_difficult: keep crowd / difficult objects (see module doc).
      on_bad_record: "error" or "drop" (see module doc).
    """

    def __init__(
        self,
        name: str = "coco/2017",
        split: str = "train",
        data_dir: str | None = None,
        keep_crowd: bool = False,
        keep_difficult: bool = False,
        on_bad_record: str = "error",
    ):
        tfds = _import_tfds()
        builder = tfds.builder(name, data_dir=data_dir)
        features = builder.info.features
        try:
            objects = features["objects"]
            label_feature = objects["label"]
            objects["bbox"]
            features["image"]
        except (KeyError, TypeError) as e:
            raise ValueError(
                f"tfds dataset {name!r} has no image + objects/bbox + objects/label "
                f"features (has {list(features.keys())})"
            ) from e
        self.name, self.split = name, split
        self.keep_crowd, self.keep_difficult = keep_crowd, keep_difficult
        self.class_names: list[str] = list(label_feature.names)
        if name.split(":")[0] in ("coco/2017", "coco/2014") and len(self.class_names) == 80:
            self.label_to_category_id = list(COCO_CATEGORY_IDS)
        else:
            self.label_to_category_id = list(range(len(self.class_names)))
        self._has_difficult = "is_difficult" in objects.keys()
        self._bad = BadRecords(on_bad_record, f"tfds {name}[{split}]")
        self._data = builder.as_data_source(split=split)

    def __len__(self) -> int:
        return len(self._data)

    def image_size(self, i: int) -> None:
        """Unknown without decoding."""
        return None

    def __getitem__(self, i: int) -> dict[str, Any]:
        ex = self._data[int(i)]
        where = f"tfds {self.name}[{self.split}] index {i}"
        try:  # grayscale replicated, alpha dropped: the rules of data.decode and predict
            image = convert.array_to_rgb(np.asarray(ex["image"]), f"{where}: image")
        except (TypeError, ValueError) as e:
            raise DataError(str(e)) from None
        h, w = image.shape[:2]
        objects = ex["objects"]
        # Per-object fields are parallel sequences; a record where they disagree is corrupt
        # (tfds's random mock_data produces such records), not a droppable bad box.
        lengths = {
            k: len(np.asarray(v).reshape(-1, 4) if k == "bbox" else np.asarray(v).reshape(-1))
            for k, v in objects.items()
            if k in ("bbox", "label", "is_crowd", "is_difficult")
        }
        if len(set(lengths.values())) > 1:
            raise DataError(f"{where}: objects fields have different lengths {lengths}")
        norm = np.asarray(objects["bbox"], np.float32).reshape(-1, 4)
        boxes = norm[:, [1, 0, 3, 2]] * np.array([w, h, w, h], np.float32)
        labels = np.asarray(objects["label"], np.int32).reshape(-1)
        keep = np.ones(len(labels), bool)
        if "is_crowd" in objects and not self.keep_crowd:
            keep &= ~np.asarray(objects["is_crowd"], bool).reshape(-1)
        difficult = np.zeros(len(labels), bool)
        if "is_difficult" in objects:
            difficult = np.asarray(objects["is_difficult"], bool).reshape(-1)
            if not self.keep_difficult:
                keep &= ~difficult
        boxes, faults = box_faults(boxes, (h, w))
        for n, reason in faults.items():
            if keep[n]:
                self._bad.report(f"{where}: object {n}", reason)
                log.warning("%s: object %d dropped: %s", where, n, reason)
                keep[n] = False
        if np.any((labels[keep] < 0) | (labels[keep] >= len(self.class_names))):
            raise DataError(f"{where}: label outside 0..{len(self.class_names) - 1}")
        example = {
            "image": image,
            "boxes": boxes[keep],
            "labels": labels[keep],
            "image_id": int(ex["image/id"]) if "image/id" in ex else int(i),
        }
        if self._has_difficult:
            example["difficult"] = difficult[keep]
        return example
