"""Pascal-VOC XML annotations (one .xml per image) as an example source.

Image lookup: ``<filename>`` (or ``<xml stem>.jpg`` when absent) is searched in ``image_dir``
if given, then next to the XML, then in the sibling ``JPEGImages/`` folder
(``Annotations/../JPEGImages/``, the VOCdevkit layout).

Coordinates: VOC ``<bndbox>`` values are 1-based pixel indices, inclusive at both ends
(xmin=1, xmax=W covers the whole width). The default ``box_convention="exact"`` converts them
to pixel-edge xyxy as ``(xmin - 1, ymin - 1, xmax, ymax)`` (detectron2's ``pascal_voc.py``
does the same): a box covering the whole image becomes [0, 0, W, H]. ``"raw"`` keeps the
numbers as written, which is what tensorflow_datasets' ``voc`` stores (it divides the raw
values by width / height without subtracting 1), for boxes consistent with ``voc/2007``.

Difficult objects (``<difficult>1``) are excluded by default, as VOC training does; with
``keep_difficult=True`` they stay. Every example has ``"difficult": bool [N]`` aligned with
its boxes, so an evaluation source (keep_difficult=True) can ignore them as VOC's metric does.

Classes: ``class_names`` (e.g. ``VOC_CLASSES``) fixes the label order and makes other names bad
records; by default the sorted set of names found in the XML files.
"""

from __future__ import annotations

import glob
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence

import numpy as np

from retinanet_jax.data import decode
from retinanet_jax.data.records import (
    BadRecords,
    DataError,
    FileDetectionSource,
    ImageRecord,
    checked_boxes,
)

VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
BOX_CONVENTIONS = ("exact", "raw")


def _text(node: ET.Element | None, tag: str) -> str | None:
    child = None if node is None else node.find(tag)
    return None if child is None or child.text is None else child.text.strip()


def _parse(xml_path: str) -> ET.Element:
    try:
        return ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as e:
        raise DataError(f"{xml_path}: cannot parse XML ({e})") from e


class VocXmlSource(FileDetectionSource):
    """Examples from a folder of VOC XML files; ``image_id`` is the index in ``self.ids``.

    Args:
      annotation_dir: folder of .xml files (VOCdevkit/VOC2007/Annotations).
      class_names: label order; default sorted names found in the files.
      keep_difficult: keep difficult objects (flagged in ``"difficult"``).
      image_set: optional text file of ids (xml stems), one per line (ImageSets/Main/*.txt;
        only the first token of a line counts); default every .xml, sorted.
      image_dir: optional folder searched first for images.
      box_convention: "exact" (x1-1, y1-1, x2, y2) or "raw" (as written; tfds voc).
      on_bad_record: "error" (raise ``DataError`` naming the XML file and object) or "drop".
    """

    def __init__(
        self,
        annotation_dir: str,
        class_names: Sequence[str] | None = None,
        keep_difficult: bool = False,
        image_set: str | None = None,
        image_dir: str | None = None,
        box_convention: str = "exact",
        on_bad_record: str = "error",
    ):
        if box_convention not in BOX_CONVENTIONS:
            raise ValueError(f"box_convention must be one of {BOX_CONVENTIONS}, got {box_convention!r}")
        bad = BadRecords(on_bad_record, annotation_dir)
        if image_set is not None:
            with open(image_set) as f:
                stems = [line.split()[0] for line in f if line.strip()]
            xml_paths = [os.path.join(annotation_dir, s + ".xml") for s in stems]
        else:
            xml_paths = sorted(glob.glob(os.path.join(annotation_dir, "*.xml")))
        if not xml_paths:
            raise DataError(f"{annotation_dir}: no .xml annotation files found")

        parsed = []  # (xml_path, root) of the readable files
        for xml_path in xml_paths:
            if not os.path.isfile(xml_path):
                bad.report(xml_path, "annotation file not found (listed in the image set)")
                continue
            try:
                parsed.append((xml_path, _parse(xml_path)))
            except DataError as e:
                bad.report(xml_path, str(e).split(": ", 1)[1], kind="unparsable XML")

        if class_names is None:
            names = {_text(obj, "name") for _, root in parsed for obj in root.iter("object")}
            class_names = sorted(n for n in names if n)
        label_of = {name: label for label, name in enumerate(class_names)}
        offset = 1.0 if box_convention == "exact" else 0.0

        records, self.ids = [], []
        for xml_path, root in parsed:
            path = self._find_image(xml_path, _text(root, "filename"), image_dir)
            if path is None:
                bad.report(
                    xml_path,
                    f"image file not found: {_text(root, 'filename')!r} "
                    f"(searched image_dir, the XML's folder, ../JPEGImages)",
                )
                continue
            size = root.find("size")
            try:
                hw = (int(float(_text(size, "height"))), int(float(_text(size, "width"))))
            except (TypeError, ValueError):
                hw = (0, 0)
            if hw[0] <= 0 or hw[1] <= 0:
                try:
                    hw = decode.read_image_size(path)  # some VOC-style tools write size 0
                except DataError as e:
                    bad.report(xml_path, str(e), kind="unreadable image")
                    continue

            boxes, labels, difficult, objects = [], [], [], []
            for k, obj in enumerate(root.iter("object")):
                where = f"{xml_path}: object {k}"
                name = _text(obj, "name")
                if name not in label_of:
                    bad.report(where, f"unknown class name {name!r} (known: {list(class_names)})")
                    continue
                is_difficult = _text(obj, "difficult") == "1"
                if is_difficult and not keep_difficult:
                    continue
                bndbox = obj.find("bndbox")
                try:
                    x1, y1, x2, y2 = (float(_text(bndbox, tag)) for tag in ("xmin", "ymin", "xmax", "ymax"))
                except (TypeError, ValueError):
                    bad.report(where, "missing or non-numeric <bndbox> coordinates")
                    continue
                boxes.append([x1 - offset, y1 - offset, x2, y2])
                labels.append(label_of[name])
                difficult.append(is_difficult)
                objects.append(k)
            box_arr, label_arr, keep = checked_boxes(
                boxes, labels, hw, bad, lambda n: f"{xml_path}: object {objects[n]}"
            )
            records.append(
                ImageRecord(
                    path=path,
                    image_id=len(records),
                    boxes=box_arr,
                    labels=label_arr,
                    hw=hw,
                    extra={"difficult": np.array(difficult, bool).reshape(-1)[keep]},
                    where=xml_path,
                )
            )
            self.ids.append(os.path.splitext(os.path.basename(xml_path))[0])
        bad.log_summary()
        super().__init__(records, list(class_names), dict(bad.counts))

    @staticmethod
    def _find_image(xml_path: str, filename: str | None, image_dir: str | None) -> str | None:
        if not filename:
            filename = os.path.splitext(os.path.basename(xml_path))[0] + ".jpg"
        xml_dir = os.path.dirname(xml_path)
        candidates = ([os.path.join(image_dir, filename)] if image_dir else []) + [
            os.path.join(xml_dir, filename),
            os.path.join(xml_dir, os.pardir, "JPEGImages", filename),
        ]
        return next((os.path.normpath(c) for c in candidates if os.path.isfile(c)), None)
