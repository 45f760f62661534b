"""COCO-format annotations (instances JSON + image folder) as an example source.

- ``bbox`` [x, y, w, h] becomes xyxy [x, y, x + w, y + h] in pixels.
- Crowd annotations (``iscrowd=1``) are excluded, as torchvision's detection reference does
  (its ``ConvertCocoPolysToMask`` keeps ``iscrowd == 0`` only for training).
- Category ids are sorted and mapped to contiguous labels 0..K-1; ``class_names[label]`` is the
  category name and ``label_to_category_id[label]`` the original id (evaluation writes results
  with it).
- Images without annotations are kept (they train as all-background images).
- Validation (see ``records``): degenerate boxes (w <= 0 or h <= 0), boxes beyond the image
  (``width`` / ``height`` of its image entry) by more than 1 px, unknown category or image ids,
  and missing image files are bad records. Note real COCO train2017 contains a few
  degenerate boxes: load it with ``on_bad_record="drop"``.
"""

from __future__ import annotations

import collections
import json
import os

from retinanet_jax.data import decode
from retinanet_jax.data.records import (
    BadRecords,
    DataError,
    FileDetectionSource,
    ImageRecord,
    checked_boxes,
)


class CocoJsonSource(FileDetectionSource):
    """Examples from a COCO instances JSON; ``image_id`` is the COCO image id.

    Args:
      annotation_file: path of the instances JSON.
      image_dir: folder holding the images named by ``file_name``.
      on_bad_record: "error" (raise ``DataError`` naming the JSON and annotation id) or "drop".
      check_files: check at construction that every image file exists (one ``stat`` each).
    """

    def __init__(
        self, annotation_file: str, image_dir: str, on_bad_record: str = "error", check_files: bool = True
    ):
        bad = BadRecords(on_bad_record, annotation_file)
        try:
            with open(annotation_file) as f:
                data = json.load(f)
        except FileNotFoundError as e:
            raise DataError(f"{annotation_file}: annotation file not found") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{annotation_file}: not valid JSON ({e})") from e
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise DataError(f"{annotation_file}: missing or non-list key {key!r}")

        categories = sorted(data["categories"], key=lambda c: c["id"])
        self.label_to_category_id: list[int] = [int(c["id"]) for c in categories]
        self.category_id_to_label: dict[int, int] = {
            cid: label for label, cid in enumerate(self.label_to_category_id)
        }
        if len(self.category_id_to_label) != len(categories):
            raise DataError(f"{annotation_file}: duplicate category ids in 'categories'")
        class_names = [str(c.get("name", c["id"])) for c in categories]

        images = {}
        for entry in data["images"]:
            try:
                images[int(entry["id"])] = entry
            except (KeyError, TypeError, ValueError) as e:
                raise DataError(f"{annotation_file}: image entry without a valid 'id': {entry!r}") from e

        per_image = collections.defaultdict(list)
        for ann in data["annotations"]:
            where = f"{annotation_file}: annotation id {ann.get('id')}"
            if ann.get("iscrowd", 0):
                continue
            image_id = ann.get("image_id")
            if image_id not in images:
                bad.report(where, f"unknown image_id: {image_id!r}")
                continue
            label = self.category_id_to_label.get(ann.get("category_id"))
            if label is None:
                bad.report(where, f"unknown category_id: {ann.get('category_id')!r}")
                continue
            bbox = ann.get("bbox")
            try:
                x, y, w, h = (float(v) for v in bbox)
            except (TypeError, ValueError):
                bad.report(where, f"malformed bbox (need [x, y, w, h]): {bbox!r}")
                continue
            per_image[image_id].append((ann.get("id"), [x, y, x + w, y + h], label))

        records = []
        for image_id, entry in images.items():
            path = os.path.join(image_dir, str(entry.get("file_name", "")))
            where_image = f"{annotation_file}: image id {image_id}"
            if check_files and not os.path.isfile(path):
                bad.report(where_image, f"image file not found: {path}")
                continue
            hw: tuple[int, int] | None = None
            if entry.get("height") and entry.get("width"):
                hw = (int(entry["height"]), int(entry["width"]))
            elif check_files:
                try:  # no size in the JSON: the header has it (boxes need it to be checked)
                    hw = decode.read_image_size(path)
                except DataError as e:
                    bad.report(where_image, str(e), kind="unreadable image")
                    continue
            anns = per_image.get(image_id, [])
            boxes, labels, _ = checked_boxes(
                [a[1] for a in anns],
                [a[2] for a in anns],
                hw,
                bad,
                lambda n: f"{annotation_file}: annotation id {anns[n][0]} (image id {image_id})",
            )
            records.append(
                ImageRecord(
                    path=path,
                    image_id=image_id,
                    boxes=boxes,
                    labels=labels,
                    hw=hw,
                    where=where_image,
                )
            )
        bad.log_summary()
        super().__init__(records, class_names, dict(bad.counts))
