"""data.registry: sources by name; bad keyword arguments are named, constructor errors pass through."""

import pytest

from retinanet_jax.data import DataError
from retinanet_jax.data.registry import SOURCES, SourceArgumentError, make_source


def test_make_source_builds_by_name():
    src = make_source("shapes", {"split": "validation", "num_images": 2, "image_size": 64})
    assert isinstance(src, SOURCES["shapes"]) and len(src) == 2


def test_unknown_name_and_keys_are_named():
    with pytest.raises(ValueError, match="config.dataset.source: unknown data source 'nope'"):
        make_source("nope", {}, what="config.dataset.source")
    with pytest.raises(SourceArgumentError, match=r"config.dataset.train: unknown arguments \['bogus'\]"):
        make_source("shapes", {"bogus": 1}, where="config.dataset.train")
    with pytest.raises(
        SourceArgumentError, match=r"missing required arguments \['annotation_file', 'image_dir'\]"
    ):
        make_source("coco_json", {})


def test_constructor_errors_keep_their_own_type_and_message(tmp_path):
    with pytest.raises(DataError, match="annotation file not found"):
        make_source("coco_json", {"annotation_file": str(tmp_path / "none.json"), "image_dir": str(tmp_path)})
