"""benchmarks/small_data.py: the synthetic small custom dataset that chooses the :scratch recipe
and runs the learning benchmark. It must be what its docstring says (VOC layout our source
reads, 10-60 objects of ~10-40 px per 400 px tile, boxes inside the image) and deterministic."""

from __future__ import annotations

import filecmp
import importlib.util
import os

import numpy as np

from retinanet_jax.data.voc_xml import VocXmlSource

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("small_data", os.path.join(ROOT, "benchmarks", "small_data.py"))
small_data = importlib.util.module_from_spec(spec)
spec.loader.exec_module(small_data)


def test_small_data_is_a_voc_folder_of_small_objects(tmp_path):
    small_data.write_dataset(str(tmp_path / "a"), train=4, val=2, seed=3)
    small_data.write_dataset(str(tmp_path / "b"), train=4, val=2, seed=3)
    kw = dict(annotation_dir=str(tmp_path / "a" / "Annotations"))
    train = VocXmlSource(image_set=str(tmp_path / "a" / "ImageSets" / "Main" / "train.txt"), **kw)
    val = VocXmlSource(image_set=str(tmp_path / "a" / "ImageSets" / "Main" / "val.txt"), **kw)
    assert (len(train), len(val)) == (4, 2)
    assert train.class_names == sorted(small_data.CLASSES)
    sides = []
    for src in (train, val):
        for i in range(len(src)):
            ex = src[i]
            assert ex["image"].shape == (400, 400, 3)
            n = len(ex["boxes"])
            assert small_data.OBJECTS[0] * 0.5 <= n <= small_data.OBJECTS[1]  # a few placements fail
            b = ex["boxes"]
            assert (b[:, :2] >= 0).all() and (b[:, 2:] <= 400).all() and (b[:, 2:] > b[:, :2]).all()
            sides.append(np.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])))
    sides = np.concatenate(sides)
    # sqrt(area): vehicles 10x5 px .. crowns 40 px with a lobed edge (+8%), rotated boxes grow
    assert 5 <= sides.min() and sides.max() <= 60 and 10 <= np.median(sides) <= 35
    # deterministic from the seed; train and val streams differ
    same = filecmp.dircmp(str(tmp_path / "a" / "JPEGImages"), str(tmp_path / "b" / "JPEGImages"))
    assert not same.diff_files and len(same.same_files) == 6
    assert not np.array_equal(train[0]["image"], val[0]["image"])
