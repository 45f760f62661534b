"""Detection data: example sources, host-side transforms and the training batch pipeline.

An example is ``{"image": uint8 [H,W,3], "boxes": float32 [N,4] xyxy pixels,
"labels": int32 [N] (0..K-1), "image_id": int}``; sources expose ``class_names``,
``__len__``, ``__getitem__`` and ``image_size(i)``. Nothing here imports jax.
"""

from retinanet_jax.data.coco_json import CocoJsonSource
from retinanet_jax.data.csv_source import CsvSource
from retinanet_jax.data.errors import DataError
from retinanet_jax.data.pipeline import TrainBatchIterator
from retinanet_jax.data.shapes import ShapesSource
from retinanet_jax.data.tfds_source import TfdsSource
from retinanet_jax.data.voc_xml import VOC_CLASSES, VocXmlSource
from retinanet_jax.imageprep.geometry import make_buckets, resized_size

__all__ = [
    "CocoJsonSource",
    "CsvSource",
    "DataError",
    "ShapesSource",
    "TfdsSource",
    "TrainBatchIterator",
    "VOC_CLASSES",
    "VocXmlSource",
    "make_buckets",
    "resized_size",
]
