"""CSV annotations ``image_path,x1,y1,x2,y2,class_name`` as an example source.

- One row per box, xyxy pixel coordinates as written (pixel edges, no 1-based shift).
- ``image.jpg,,,,,`` (all five box fields empty) lists an image without objects.
- Relative image paths are resolved against the CSV file's folder.
- An optional first row ``image_path,x1,y1,x2,y2,class_name`` is a header and skipped.
- Classes: the sorted set of names in the file, or ``classes_file`` lines ``name`` (label =
  line order) or ``name,id`` (ids must be 0..K-1, label = id; keras-retinanet's format).
- Image sizes come from the image headers, read once at construction (no pixel decoding):
  that is where missing / unreadable images and out-of-image boxes are found.
Errors name the CSV file and line number.
"""

from __future__ import annotations

import collections
import csv
import os

from retinanet_jax.data import decode
from retinanet_jax.data.records import (
    BadRecords,
    DataError,
    FileDetectionSource,
    ImageRecord,
    checked_boxes,
)

HEADER = ["image_path", "x1", "y1", "x2", "y2", "class_name"]


def read_classes_file(path: str) -> list[str]:
    """Class names in label order from ``name`` or ``name,id`` lines."""
    with open(path, newline="") as f:
        rows = [(n, r) for n, r in enumerate(csv.reader(f), 1) if r and any(c.strip() for c in r)]
    if not rows:
        raise DataError(f"{path}: no classes")
    if all(len(r) == 1 for _, r in rows):
        names = [r[0].strip() for _, r in rows]
    else:
        by_id = {}
        for n, r in rows:
            try:
                name, cid = r[0].strip(), int(r[1])
            except (IndexError, ValueError) as e:
                raise DataError(f"{path}: line {n}: expected 'name,id', got {r!r}") from e
            by_id[cid] = name
        if sorted(by_id) != list(range(len(rows))):
            raise DataError(
                f"{path}: class ids must be 0..{len(rows) - 1} without gaps or repeats, got {sorted(by_id)}"
            )
        names = [by_id[i] for i in range(len(rows))]
    if len(set(names)) != len(names):
        raise DataError(f"{path}: duplicate class names")
    return names


class CsvSource(FileDetectionSource):
    """Examples from a box-per-row CSV; ``image_id`` is the order of first appearance.

    Args:
      csv_file: the annotations.
      classes_file: optional class list (see module doc).
      on_bad_record: "error" (raise ``DataError`` naming the CSV file and line) or "drop".
    """

    def __init__(self, csv_file: str, classes_file: str | None = None, on_bad_record: str = "error"):
        bad = BadRecords(on_bad_record, csv_file)
        base = os.path.dirname(os.path.abspath(csv_file))
        try:
            with open(csv_file, newline="") as f:
                rows = list(enumerate(csv.reader(f), 1))
        except FileNotFoundError as e:
            raise DataError(f"{csv_file}: annotation file not found") from e

        # path -> [(line, [x1, y1, x2, y2], class name)], in order of first appearance
        images: dict[str, list] = collections.OrderedDict()
        first_line: dict[str, int] = {}
        for line, row in rows:
            if not row or not any(c.strip() for c in row):
                continue
            if line == 1 and [c.strip() for c in row] == HEADER:
                continue
            where = f"{csv_file}: line {line}"
            if len(row) != 6:
                bad.report(
                    where, f"expected 6 fields image_path,x1,y1,x2,y2,class_name, got {len(row)}: {row!r}"
                )
                continue
            path = os.path.normpath(os.path.join(base, row[0].strip()))
            if path not in images:
                images[path], first_line[path] = [], line
            fields = [c.strip() for c in row[1:]]
            if not any(fields):
                continue  # an image without objects
            try:
                box = [float(v) for v in fields[:4]]
            except ValueError:
                bad.report(where, f"non-numeric or missing box coordinates: {fields[:4]!r}")
                continue
            if not fields[4]:
                bad.report(where, "missing class_name")
                continue
            images[path].append((line, box, fields[4]))

        if classes_file is not None:
            class_names = read_classes_file(classes_file)
        else:
            class_names = sorted({name for anns in images.values() for _, _, name in anns})
        label_of = {name: label for label, name in enumerate(class_names)}

        records = []
        for path, anns in images.items():
            try:
                hw = decode.read_image_size(path)
            except DataError as e:
                bad.report(f"{csv_file}: line {first_line[path]}", str(e), kind="unreadable image")
                continue
            known = []
            for line, box, name in anns:
                if name in label_of:
                    known.append((line, box, label_of[name]))
                else:
                    bad.report(
                        f"{csv_file}: line {line}", f"unknown class name {name!r} (known: {class_names})"
                    )
            boxes, labels, _ = checked_boxes(
                [a[1] for a in known],
                [a[2] for a in known],
                hw,
                bad,
                lambda n: f"{csv_file}: line {known[n][0]}",
            )
            records.append(
                ImageRecord(
                    path=path,
                    image_id=len(records),
                    boxes=boxes,
                    labels=labels,
                    hw=hw,
                    where=f"{csv_file}: line {first_line[path]}",
                )
            )
        bad.log_summary()
        super().__init__(records, class_names, dict(bad.counts))
