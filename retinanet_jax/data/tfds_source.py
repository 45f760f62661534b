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
- Image sizes (``image_size``, which the pipeline's canvases need) are read once from the
  encoded images' headers (the split read with ``tfds.decode.SkipDecoding()`` for ``image``,
  PIL parsing the header only: tfds features hold no image size) and cached in a small JSON,
  ``retinanet_jax-image_sizes-<split>.json`` in ``size_cache_dir``, by default the dataset's
  own version directory (``builder.data_dir``, shared by every host and run) or, where that is
  not writable, ``~/.cache/retinanet_jax/tfds/<name>/<version>/``. The cache names the
  dataset, version and split and is read again only if the split's record count is unchanged;
  the scan reads the whole split once (COCO train: ~18 GB), so a multi-host run's first start
  is quicker if one process has read the sizes before (``TfdsSource(...).image_size(0)``).
Bad boxes are checked when an example is read: ``on_bad_record="error"`` raises naming the
dataset, split and index; ``"drop"`` drops the box (and logs it).

tensorflow_datasets is imported only when a source is created.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import uuid
from typing import Any

import numpy as np
from PIL import Image

from retinanet_jax.data.errors import DataError
from retinanet_jax.data.records import BadRecords, box_faults
from retinanet_jax.imageprep import convert

log = logging.getLogger(__name__)

# COCO's 80 category ids in increasing order (ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 unused).
COCO_CATEGORY_IDS = tuple(i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))

SIZE_CACHE_FORMAT = "retinanet_jax.image_sizes.v1"
USER_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "retinanet_jax", "tfds")
_SCAN_CHUNK = 1024  # records per read while scanning headers (array_record reads a chunk in parallel)


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
      size_cache_dir: where the image-size cache lives (local path or gs://...); None: the
        dataset's directory, else ~/.cache/retinanet_jax/tfds/ (see module doc).
    """

    def __init__(
        self,
        name: str = "coco/2017",
        split: str = "train",
        data_dir: str | None = None,
        keep_crowd: bool = False,
        keep_difficult: bool = False,
        on_bad_record: str = "error",
        size_cache_dir: str | None = None,
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
        self.data_dir = data_dir
        self.size_cache_dir = size_cache_dir
        info = builder.info
        self._full_name = str(getattr(info, "full_name", "") or name)  # e.g. "coco/2017/1.1.0"
        self._builder_dir = getattr(builder, "data_dir", None)  # the version directory
        self._sizes: list[tuple[int, int] | None] | None = None
        self.size_reads = 0  # image headers read by this object (0 when the cache was used)

    def __len__(self) -> int:
        return len(self._data)

    def image_size(self, i: int) -> tuple[int, int] | None:
        """(h, w) of image ``i`` from its encoded header (all read once, then cached; see the
        module doc); None if the header is unreadable."""
        if self._sizes is None:
            self._sizes = self._load_sizes()
        return self._sizes[int(i)]

    # ------------------------------------------------------------------ image-size cache

    def size_cache_paths(self) -> list[str]:
        """Where the size cache is looked for, and written to (the first that accepts it)."""
        tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.split)
        name = f"retinanet_jax-image_sizes-{tag}.json"
        if self.size_cache_dir is not None:
            dirs = [str(self.size_cache_dir)]
        else:
            dirs = [
                d for d in (self._builder_dir, os.path.join(USER_CACHE, *self._full_name.split("/"))) if d
            ]
        return [os.path.join(str(d), name) for d in dirs]

    def _load_sizes(self) -> list[tuple[int, int] | None]:
        from etils import epath

        count = len(self._data)
        for path in self.size_cache_paths():
            try:
                cached = json.loads(epath.Path(path).read_text())
            except Exception:  # noqa: BLE001  (absent, unreadable: any file system's error)
                continue
            if (
                isinstance(cached, dict)
                and cached.get("format") == SIZE_CACHE_FORMAT
                and cached.get("dataset") == self._full_name
                and cached.get("split") == self.split
                and cached.get("count") == count
                and len(cached.get("hw", ())) == count
            ):
                return [None if hw is None else (int(hw[0]), int(hw[1])) for hw in cached["hw"]]
            log.info("%s: stale image-size cache (other dataset, split or count), reading again", path)
        sizes = self._scan_sizes()
        payload = json.dumps(
            {
                "format": SIZE_CACHE_FORMAT,
                "dataset": self._full_name,
                "split": self.split,
                "count": count,
                "hw": [None if s is None else list(s) for s in sizes],
            },
            separators=(",", ":"),
        )
        for path in self.size_cache_paths():
            try:
                target = epath.Path(path)
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.parent / f"{target.name}.{uuid.uuid4().hex}.tmp"  # hosts may share the dir
                tmp.write_text(payload)
                tmp.rename(target)
                log.info("tfds %s[%s]: image sizes cached in %s", self.name, self.split, path)
                break
            except Exception as e:  # noqa: BLE001  (read-only, e.g. a public gs:// bucket: next place)
                log.info("tfds %s[%s]: cannot write %s (%s)", self.name, self.split, path, e)
        else:
            log.warning("tfds %s[%s]: image sizes not cached (no writable place)", self.name, self.split)
        return sizes

    def _scan_sizes(self) -> list[tuple[int, int] | None]:
        """Every image's (h, w) from its encoded header, without decoding pixels."""
        tfds = _import_tfds()
        builder = tfds.builder(self.name, data_dir=self.data_dir)
        raw = builder.as_data_source(split=self.split, decoders={"image": tfds.decode.SkipDecoding()})
        n = len(raw)
        log.info(
            "tfds %s[%s]: reading the sizes of %d images from their headers (once: cached)",
            self.name,
            self.split,
            n,
        )
        getitems = getattr(raw, "__getitems__", None)
        sizes: list[tuple[int, int] | None] = []
        for start in range(0, n, _SCAN_CHUNK):
            keys = range(start, min(n, start + _SCAN_CHUNK))
            records = getitems(list(keys)) if getitems is not None else [raw[k] for k in keys]
            sizes += [_encoded_size(r["image"]) for r in records]
            self.size_reads += len(keys)
        return sizes

    def __getitem__(self, i: int) -> dict[str, Any]:
        ex = self._data[int(i)]
        where = f"tfds {self.name}[{self.split}] index {i}"
        try:  # grayscale replicated, alpha dropped: the rules of data.decode and predict
            image = convert.array_to_rgb(np.asarray(ex["image"]), f"{where}: image")
        except (TypeError, ValueError) as e:
            raise DataError(str(e)) from None
        h, w = image.shape[:2]
        if self._sizes is not None and self._sizes[int(i)] not in (None, (h, w)):
            raise DataError(
                f"{where}: decoded size {(h, w)} differs from the cached header size "
                f"{self._sizes[int(i)]}; delete the stale cache {self.size_cache_paths()}"
            )
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


def _encoded_size(image: Any) -> tuple[int, int] | None:
    """(h, w) of an encoded image from its header (PIL reads no pixels until asked); an array
    (already decoded, e.g. a mock) gives its shape; None if the header cannot be read."""
    if isinstance(image, (bytes, np.bytes_)) or (isinstance(image, np.ndarray) and image.dtype.kind in "SO"):
        data = image.item() if isinstance(image, np.ndarray) else image
        try:
            with Image.open(io.BytesIO(bytes(data))) as im:
                w, h = im.size
        except (OSError, ValueError, SyntaxError):
            return None
        return int(h), int(w)
    shape = np.shape(image)
    return (int(shape[0]), int(shape[1])) if len(shape) >= 2 else None
