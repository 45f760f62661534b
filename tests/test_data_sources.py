"""Example sources on small real files: COCO JSON, VOC XML, CSV, image decoding, tfds (faked)."""

import io
import json
import os
import sys
import types

import numpy as np
import pytest
from PIL import Image

from retinanet_jax.data import decode
from retinanet_jax.data.coco_json import CocoJsonSource
from retinanet_jax.data.csv_source import CsvSource
from retinanet_jax.data.errors import DataError
from retinanet_jax.data.voc_xml import VocXmlSource


def _rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write_png(path, array):
    Image.fromarray(array).save(path)
    return array


# ----------------------------------------------------------------------------- decoding


def test_decode_modes_to_rgb_uint8(tmp_path):
    gray = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    rgba = _rgb(12, 10, 1)
    alpha = np.full((12, 10, 1), 7, np.uint8)
    Image.fromarray(np.concatenate([rgba, alpha], -1), "RGBA").save(tmp_path / "rgba.png")
    deep = (np.arange(12 * 10, dtype=np.uint16).reshape(12, 10) * 500).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")  # 16-bit grayscale PNG
    pal = Image.fromarray(gray, "L").convert("P")
    pal.save(tmp_path / "pal.png")

    out = decode.read_image(str(tmp_path / "gray.png"))
    assert out.dtype == np.uint8 and out.shape == (12, 10, 3)
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, -1))

    out = decode.read_image(str(tmp_path / "rgba.png"))
    np.testing.assert_array_equal(out, rgba)  # alpha dropped, colours untouched

    out = decode.read_image(str(tmp_path / "deep.png"))
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    expected = np.rint(deep / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(out, np.repeat(expected[..., None], 3, -1))
    assert out.max() == np.rint(deep.max() / 257.0)

    out = decode.read_image(str(tmp_path / "pal.png"))
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, -1))


def test_decode_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="missing.png: image file not found"):
        decode.read_image(str(tmp_path / "missing.png"))
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="junk.jpg: cannot"):
        decode.read_image(str(tmp_path / "junk.jpg"))
    Image.fromarray(_rgb(64, 64)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.jpg: cannot decode"):
        decode.read_image(str(tmp_path / "cut.jpg"))
    Image.fromarray(np.zeros((4, 4), np.float32), "F").save(tmp_path / "float.tiff")
    with pytest.raises(DataError, match="float.tiff: float image"):
        decode.read_image(str(tmp_path / "float.tiff"))


# ----------------------------------------------------------------------------- COCO JSON


def _coco_dir(tmp_path, annotations, extra_images=()):
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    _write_png(img_dir / "a.png", _rgb(40, 60, 1))
    Image.fromarray(_rgb(30, 20, 2)).save(img_dir / "b.jpg")
    _write_png(img_dir / "c.png", _rgb(10, 10, 3))
    images = [
        {"id": 7, "file_name": "a.png", "height": 40, "width": 60},
        {"id": 9, "file_name": "b.jpg", "height": 30, "width": 20},
        {"id": 11, "file_name": "c.png"},  # no annotations, no size: read from the header
        *extra_images,
    ]
    categories = [{"id": 18, "name": "dog"}, {"id": 3, "name": "car"}, {"id": 44, "name": "bottle"}]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return str(path), str(img_dir)


GOOD_COCO_ANNS = [
    {"id": 1, "image_id": 7, "category_id": 18, "bbox": [10, 5, 20, 10], "iscrowd": 0},
    {"id": 2, "image_id": 7, "category_id": 3, "bbox": [0, 0, 60.5, 40], "iscrowd": 0},
    {"id": 3, "image_id": 7, "category_id": 44, "bbox": [1, 1, 5, 5], "iscrowd": 1},
    {"id": 4, "image_id": 9, "category_id": 44, "bbox": [2, 3, 4, 5]},
]


def test_coco_json_source(tmp_path):
    ann, img_dir = _coco_dir(tmp_path, GOOD_COCO_ANNS)
    src = CocoJsonSource(ann, img_dir)
    assert len(src) == 3
    assert src.class_names == ["car", "dog", "bottle"]  # sorted by category id 3, 18, 44
    assert src.label_to_category_id == [3, 18, 44]
    ex = src[0]
    assert ex["image_id"] == 7 and ex["image"].shape == (40, 60, 3)
    np.testing.assert_array_equal(ex["image"], _rgb(40, 60, 1))
    # The crowd box is excluded; the 0.5 px overshoot is clipped to the image width.
    np.testing.assert_allclose(ex["boxes"], [[10, 5, 30, 15], [0, 0, 60, 40]])
    np.testing.assert_array_equal(ex["labels"], [1, 0])
    assert ex["boxes"].dtype == np.float32 and ex["labels"].dtype == np.int32
    np.testing.assert_array_equal(src[1]["labels"], [2])
    empty = src[2]
    assert empty["image_id"] == 11 and empty["boxes"].shape == (0, 4)
    assert empty["labels"].shape == (0,)
    assert src.image_size(1) == (30, 20) and src.image_size(2) == (10, 10)


@pytest.mark.parametrize(
    "bad_ann, message",
    [
        ({"id": 55, "image_id": 7, "category_id": 3, "bbox": [10, 10, 0, 5]}, "degenerate box"),
        ({"id": 55, "image_id": 7, "category_id": 3, "bbox": [50, 10, 15, 5]}, "out-of-image box"),
        ({"id": 55, "image_id": 7, "category_id": 99, "bbox": [1, 1, 5, 5]}, "unknown category_id"),
        ({"id": 55, "image_id": 1234, "category_id": 3, "bbox": [1, 1, 5, 5]}, "unknown image_id"),
    ],
)
def test_coco_json_bad_records(tmp_path, bad_ann, message):
    ann, img_dir = _coco_dir(tmp_path, GOOD_COCO_ANNS + [bad_ann])
    with pytest.raises(DataError, match=f"instances.json: annotation id 55.*{message}"):
        CocoJsonSource(ann, img_dir)
    src = CocoJsonSource(ann, img_dir, on_bad_record="drop")
    assert sum(src.dropped.values()) == 1
    np.testing.assert_allclose(src[0]["boxes"], [[10, 5, 30, 15], [0, 0, 60, 40]])


def test_coco_json_missing_and_unreadable_images(tmp_path):
    extra = [{"id": 12, "file_name": "gone.png", "height": 5, "width": 5}]
    ann, img_dir = _coco_dir(tmp_path, GOOD_COCO_ANNS, extra)
    with pytest.raises(DataError, match="image id 12: image file not found: .*gone.png"):
        CocoJsonSource(ann, img_dir)
    assert len(CocoJsonSource(ann, img_dir, on_bad_record="drop")) == 3

    (tmp_path / "images" / "gone.png").write_bytes(b"garbage")
    src = CocoJsonSource(ann, img_dir)
    with pytest.raises(DataError, match="gone.png: cannot"):
        src[3]
    # An image whose decoded size contradicts the JSON would misplace its boxes.
    _write_png(tmp_path / "images" / "gone.png", _rgb(6, 5))
    with pytest.raises(DataError, match="gone.png: decoded size"):
        CocoJsonSource(ann, img_dir)[3]


# ----------------------------------------------------------------------------- VOC XML


def _voc_xml(filename, w, h, objects):
    objs = "".join(
        f"<object><name>{name}</name><difficult>{int(diff)}</difficult><bndbox>"
        f"<xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax>"
        f"</bndbox></object>"
        for name, b, diff in objects
    )
    return (
        f"<annotation><filename>{filename}</filename><size><width>{w}</width>"
        f"<height>{h}</height><depth>3</depth></size>{objs}</annotation>"
    )


def _voc_dir(tmp_path, extra_objects=()):
    root = tmp_path / "VOC"
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    Image.fromarray(_rgb(50, 40, 4)).save(root / "JPEGImages" / "000001.jpg")
    # A grayscale image stored next to its XML rather than in JPEGImages/.
    Image.fromarray(_rgb(20, 30, 5)[..., 0], "L").save(root / "Annotations" / "000002.png")
    objects = [("dog", (1, 1, 40, 50), False), ("cat", (5, 6, 10, 12), True), *extra_objects]
    (root / "Annotations" / "000001.xml").write_text(_voc_xml("000001.jpg", 40, 50, objects))
    (root / "Annotations" / "000002.xml").write_text(_voc_xml("000002.png", 30, 20, []))
    return str(root / "Annotations")


def test_voc_xml_source(tmp_path):
    ann_dir = _voc_dir(tmp_path)
    src = VocXmlSource(ann_dir)
    assert src.class_names == ["cat", "dog"] and src.ids == ["000001", "000002"]
    ex = src[0]
    assert ex["image"].shape == (50, 40, 3)
    # 1-based inclusive (1, 1, 40, 50) covers the whole 40x50 image -> [0, 0, 40, 50].
    np.testing.assert_allclose(ex["boxes"], [[0, 0, 40, 50]])  # difficult cat excluded
    np.testing.assert_array_equal(ex["labels"], [1])
    np.testing.assert_array_equal(ex["difficult"], [False])
    gray = src[1]
    assert gray["boxes"].shape == (0, 4) and gray["image"].shape == (20, 30, 3)
    np.testing.assert_array_equal(gray["image"][..., 1], _rgb(20, 30, 5)[..., 0])

    kept = VocXmlSource(ann_dir, keep_difficult=True)
    np.testing.assert_allclose(kept[0]["boxes"], [[0, 0, 40, 50], [4, 5, 10, 12]])
    np.testing.assert_array_equal(kept[0]["difficult"], [False, True])
    raw = VocXmlSource(ann_dir, keep_difficult=True, box_convention="raw")
    np.testing.assert_allclose(raw[0]["boxes"], [[1, 1, 40, 50], [5, 6, 10, 12]])

    fixed = VocXmlSource(ann_dir, class_names=["dog", "cat", "bird"])
    np.testing.assert_array_equal(fixed[0]["labels"], [0])
    assert fixed.class_names == ["dog", "cat", "bird"]


@pytest.mark.parametrize(
    "obj, message",
    [
        (("dog", (10, 10, 5, 20), False), "object 2: degenerate box"),
        (("dog", (10, 10, 45, 20), False), "object 2: out-of-image box"),
        (("unicorn", (1, 1, 5, 5), False), "object 2: unknown class name 'unicorn'"),
    ],
)
def test_voc_xml_bad_records(tmp_path, obj, message):
    ann_dir = _voc_dir(tmp_path, [obj])
    with pytest.raises(DataError, match=f"000001.xml: {message}"):
        VocXmlSource(ann_dir, class_names=["cat", "dog"])
    src = VocXmlSource(ann_dir, class_names=["cat", "dog"], on_bad_record="drop")
    assert sum(src.dropped.values()) == 1
    np.testing.assert_allclose(src[0]["boxes"], [[0, 0, 40, 50]])


def test_voc_xml_missing_image(tmp_path):
    ann_dir = _voc_dir(tmp_path)
    os.remove(os.path.join(tmp_path, "VOC", "JPEGImages", "000001.jpg"))
    with pytest.raises(DataError, match="000001.xml: image file not found: '000001.jpg'"):
        VocXmlSource(ann_dir)
    assert VocXmlSource(ann_dir, on_bad_record="drop").ids == ["000002"]


# ----------------------------------------------------------------------------- CSV


def _csv_dir(tmp_path, extra_rows=""):
    (tmp_path / "imgs").mkdir()
    _write_png(tmp_path / "imgs" / "a.png", _rgb(40, 30, 6))
    rgba = np.concatenate([_rgb(16, 16, 7), np.zeros((16, 16, 1), np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "imgs" / "b.png")
    rows = (
        "image_path,x1,y1,x2,y2,class_name\n"
        "imgs/a.png,1,2,11,22,zebra\n"
        "imgs/b.png,,,,,\n"
        "imgs/a.png,0,0,30.4,40,ant\n" + extra_rows
    )
    (tmp_path / "ann.csv").write_text(rows)
    return str(tmp_path / "ann.csv")


def test_csv_source(tmp_path):
    src = CsvSource(_csv_dir(tmp_path))
    assert src.class_names == ["ant", "zebra"] and len(src) == 2
    ex = src[0]
    np.testing.assert_allclose(ex["boxes"], [[1, 2, 11, 22], [0, 0, 30, 40]])
    np.testing.assert_array_equal(ex["labels"], [1, 0])
    np.testing.assert_array_equal(ex["image"], _rgb(40, 30, 6))
    empty = src[1]
    assert empty["boxes"].shape == (0, 4) and empty["image"].shape == (16, 16, 3)
    np.testing.assert_array_equal(empty["image"], _rgb(16, 16, 7))  # alpha dropped

    (tmp_path / "classes.csv").write_text("zebra,0\nant,1\nbee,2\n")
    src = CsvSource(str(tmp_path / "ann.csv"), classes_file=str(tmp_path / "classes.csv"))
    assert src.class_names == ["zebra", "ant", "bee"]
    np.testing.assert_array_equal(src[0]["labels"], [0, 1])
    (tmp_path / "bad_classes.csv").write_text("zebra,0\nant,2\n")
    with pytest.raises(DataError, match="bad_classes.csv: class ids must be 0..1"):
        CsvSource(str(tmp_path / "ann.csv"), classes_file=str(tmp_path / "bad_classes.csv"))


@pytest.mark.parametrize(
    "row, message",
    [
        ("imgs/a.png,5,5,5,9,ant\n", "line 5: degenerate box"),
        ("imgs/a.png,5,5,10,42,ant\n", "line 5: out-of-image box"),
        ("imgs/a.png,5,5,10,12,yak\n", "line 5: unknown class name 'yak'"),
        ("imgs/a.png,5,x,10,12,ant\n", "line 5: non-numeric"),
        ("imgs/missing.png,5,5,10,12,ant\n", "line 5: .*missing.png: image file not found"),
    ],
)
def test_csv_bad_records(tmp_path, row, message):
    csv_file = _csv_dir(tmp_path, row)
    (tmp_path / "classes.txt").write_text("ant\nzebra\n")
    classes = str(tmp_path / "classes.txt")
    with pytest.raises(DataError, match=f"ann.csv: {message}"):
        CsvSource(csv_file, classes_file=classes)
    src = CsvSource(csv_file, classes_file=classes, on_bad_record="drop")
    assert sum(src.dropped.values()) == 1 and len(src) == 2
    np.testing.assert_allclose(src[0]["boxes"], [[1, 2, 11, 22], [0, 0, 30, 40]])


def test_csv_unreadable_image(tmp_path):
    csv_file = _csv_dir(tmp_path, "imgs/broken.png,1,1,2,2,ant\n")
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(DataError, match="line 5: .*broken.png: cannot read image"):
        CsvSource(csv_file)


# ----------------------------------------------------------------------------- tfds (faked)


class _FakeClassLabel:
    def __init__(self, names):
        self.names = names


class _FakeBuilder:
    """The slice of the tfds builder API TfdsSource uses, serving two VOC-like examples."""

    def __init__(self, name, data_dir=None):
        self.info = types.SimpleNamespace(
            features={
                "image": object(),
                "objects": {
                    "bbox": object(),
                    "label": _FakeClassLabel(["cat", "dog"]),
                    "is_difficult": object(),
                },
            }
        )

    def as_data_source(self, split, decoders=None):  # decoded arrays, whatever the decoders
        return [
            {
                "image": np.full((20, 40, 1), 9, np.uint8),
                "objects": {
                    "bbox": np.array([[0.1, 0.25, 0.5, 1.0], [0, 0, 0.5, 0.5]], np.float32),
                    "label": np.array([1, 0]),
                    "is_difficult": np.array([False, True]),
                },
            },
            {
                "image": np.zeros((10, 10, 3), np.uint8),
                "objects": {
                    "bbox": np.zeros((1, 4), np.float32),
                    "label": np.array([0]),
                    "is_difficult": np.array([False]),
                },
            },
        ]


def test_tfds_source_with_fake_tfds(monkeypatch, tmp_path):
    fake = types.SimpleNamespace(builder=_FakeBuilder, decode=types.SimpleNamespace(SkipDecoding=object))
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    from retinanet_jax.data.tfds_source import TfdsSource

    src = TfdsSource("voc/2007", "train", size_cache_dir=str(tmp_path))
    assert src.class_names == ["cat", "dog"] and len(src) == 2
    assert src.image_size(0) == (20, 40) and src.image_size(1) == (10, 10)
    ex = src[0]
    assert ex["image"].shape == (20, 40, 3) and ex["image_id"] == 0
    # normalized [ymin, xmin, ymax, xmax] -> xyxy pixels; the difficult object is excluded.
    np.testing.assert_allclose(ex["boxes"], [[10, 2, 40, 10]])
    np.testing.assert_array_equal(ex["labels"], [1])
    np.testing.assert_array_equal(ex["difficult"], [False])
    with pytest.raises(DataError, match=r"voc/2007\[train\] index 1: object 0: degenerate box"):
        src[1]
    dropped = TfdsSource("voc/2007", "train", on_bad_record="drop")[1]
    assert dropped["boxes"].shape == (0, 4)
    kept = TfdsSource("voc/2007", "train", keep_difficult=True)[0]
    np.testing.assert_array_equal(kept["difficult"], [False, True])


def test_tfds_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails
    from retinanet_jax.data.tfds_source import TfdsSource

    with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
        TfdsSource()


def _tfds_example(image_id, hw, bbox, label, **flags):
    n = len(label)
    objects = {"bbox": np.asarray(bbox, np.float32).reshape(n, 4), "label": np.asarray(label, np.int64)}
    objects.update({k: np.asarray(v, bool) for k, v in flags.items()})
    image = np.random.default_rng(image_id).integers(0, 256, (*hw, 3), dtype=np.uint8)
    return {"image": image, "image/id": image_id, "objects": objects}


def test_tfds_coco_and_voc_with_mock_data():
    """Real tfds builders (coco/2017, voc/2007 features and class names) serving known examples
    through tfds.testing.mock_data: boxes to pixels, crowd / difficult, empty image, ids."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from retinanet_jax.data.tfds_source import COCO_CATEGORY_IDS, TfdsSource

    coco = [
        _tfds_example(
            42, (40, 60), [[0.25, 0.5, 0.75, 1.0], [0.0, 0.0, 0.5, 0.5]], [0, 79], is_crowd=[False, True]
        ),
        _tfds_example(7, (30, 20), np.zeros((0, 4)), [], is_crowd=[]),
    ]
    with tfds.testing.mock_data(as_data_source_fn=lambda self, split, **kw: coco):
        src = TfdsSource("coco/2017", "validation")
        assert len(src) == 2 and len(src.class_names) == 80  # names: label.txt, absent in mocks
        assert src.label_to_category_id == list(COCO_CATEGORY_IDS)
        ex = src[0]
        assert ex["image_id"] == 42 and ex["image"].shape == (40, 60, 3)
        # tfds bbox = normalized [ymin, xmin, ymax, xmax]; the crowd box is dropped.
        np.testing.assert_array_equal(ex["boxes"], [[30, 10, 60, 30]])
        np.testing.assert_array_equal(ex["labels"], [0])
        assert src[1]["boxes"].shape == (0, 4) and src[1]["image_id"] == 7
        assert TfdsSource("coco/2017", "validation", keep_crowd=True)[0]["labels"].tolist() == [0, 79]

    voc = [
        _tfds_example(
            0,
            (50, 50),
            [[0.1, 0.1, 0.5, 0.5], [0.2, 0.2, 0.4, 0.9]],
            [14, 6],
            is_difficult=[False, True],
            is_truncated=[False, False],
        )
    ]
    with tfds.testing.mock_data(as_data_source_fn=lambda self, split, **kw: voc):
        src = TfdsSource("voc/2007", "test")
        assert len(src.class_names) == 20 and src.label_to_category_id == list(range(20))
        ex = src[0]
        np.testing.assert_allclose(ex["boxes"], [[5, 5, 25, 25]], rtol=1e-6)
        assert ex["labels"].tolist() == [14] and ex["difficult"].tolist() == [False]
        kept = TfdsSource("voc/2007", "test", keep_difficult=True)[0]
        assert kept["difficult"].tolist() == [False, True]


def _jpeg(hw, seed):
    """A JPEG file's bytes of size (h, w), as a prepared tfds dataset stores images."""
    buffer = io.BytesIO()
    Image.fromarray(_rgb(*hw, seed=seed)).save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


class _PreparedSplit:
    """What ``builder.as_data_source`` serves for a prepared split: decoded images, or with
    ``decoders={"image": tfds.decode.SkipDecoding()}`` the encoded bytes; counts reads."""

    def __init__(self, encoded, skip):
        self.encoded, self.skip, self.reads = encoded, skip, 0

    def __len__(self):
        return len(self.encoded)

    def __getitem__(self, i):
        self.reads += 1
        ex = self.encoded[i]
        image = ex["image"] if self.skip else np.asarray(Image.open(io.BytesIO(ex["image"])))
        return {**ex, "image": image}


def _coco_jpegs(sizes):
    return [
        {
            "image": _jpeg(hw, i),
            "image/id": 100 + i,
            "objects": {
                "bbox": np.array([[0.1, 0.2, 0.6, 0.7]], np.float32),
                "label": np.array([i % 80]),
                "is_crowd": np.array([False]),
            },
        }
        for i, hw in enumerate(sizes)
    ]


def _serve(encoded, opened):
    """as_data_source_fn for tfds.testing.mock_data; ``opened`` collects the splits served."""
    import tensorflow_datasets as tfds

    def as_data_source(builder, split, decoders=None, **kw):
        skip = isinstance((decoders or {}).get("image"), tfds.decode.SkipDecoding)
        opened.append(_PreparedSplit(encoded, skip))
        return opened[-1]

    return as_data_source


def test_tfds_reports_image_sizes_from_headers_once_then_from_its_cache(tmp_path):
    """image_size: the decoded images' sizes, read from the JPEG headers of the undecoded split
    once; a second source reads the cache (no header), a changed record count reads again, a
    stale cache is named when a decoded image disagrees."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from retinanet_jax.data.tfds_source import TfdsSource

    sizes = [(480, 640), (640, 427), (375, 500), (612, 612), (360, 640)]
    encoded, opened = _coco_jpegs(sizes), []
    cache = str(tmp_path / "cache")
    with tfds.testing.mock_data(as_data_source_fn=_serve(encoded, opened)):
        src = TfdsSource("coco/2017", "train", size_cache_dir=cache)
        assert [src.image_size(i) for i in range(5)] == sizes
        assert [src[i]["image"].shape[:2] for i in range(5)] == sizes
        headers = [d for d in opened if d.skip]
        assert len(headers) == 1 and headers[0].reads == 5 and src.size_reads == 5
        [path] = src.size_cache_paths()
        stored = json.load(open(path))
        assert stored["dataset"] == "coco/2017/1.1.0" and stored["split"] == "train"
        assert stored["count"] == 5 and stored["hw"] == [list(s) for s in sizes]

        again = TfdsSource("coco/2017", "train", size_cache_dir=cache)
        assert [again.image_size(i) for i in range(5)] == sizes
        assert again.size_reads == 0 and len([d for d in opened if d.skip]) == 1  # no header read

        # By default: next to the dataset (its version directory), else the user cache.
        default = TfdsSource("coco/2017", "train").size_cache_paths()
        assert default[0].startswith(os.path.join(str(src._builder_dir), "retinanet_jax-image_sizes-"))
        assert default[1].endswith(
            os.path.join("coco", "2017", "1.1.0", "retinanet_jax-image_sizes-train.json")
        )

    with tfds.testing.mock_data(as_data_source_fn=_serve(_coco_jpegs(sizes + [(427, 640)]), opened)):
        more = TfdsSource("coco/2017", "train", size_cache_dir=cache)
        assert more.image_size(5) == (427, 640) and more.size_reads == 6  # count changed: read again

    stored["hw"][1] = [427, 640]  # a stale cache with the right count
    with open(path, "w") as f:
        json.dump(stored, f)
    with tfds.testing.mock_data(as_data_source_fn=_serve(encoded, opened)):
        stale = TfdsSource("coco/2017", "train", size_cache_dir=cache)
        assert stale.image_size(1) == (427, 640) and stale.size_reads == 0
        with pytest.raises(DataError, match=r"index 1: decoded size \(640, 427\) differs from the cached"):
            stale[1]


def test_tfds_coco_training_uses_canvases_fitted_to_the_image_sizes(tmp_path, monkeypatch, caplog):
    """train.py's program on a mock COCO (v1 resize 800 / 1333, global batch 8): 4:3 landscape
    and portrait images train on 800 x 1088 and 1088 x 800 canvases, not on the (1344, 1344)
    canvas of images of unknown size. The run is stopped once its pipeline is built."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from config_utils import tiny_config

    from retinanet_jax.data import TrainBatchIterator
    from retinanet_jax.training import loop as train_loop

    class Stop(Exception):
        pass

    built = []

    class Recorded(TrainBatchIterator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(train_loop, "TrainBatchIterator", Recorded)
    monkeypatch.setattr(train_loop, "create_train_state", stop)
    # No step runs, so the weights do not matter: zeros instead of compiling the init (~20 s).
    build = train_loop.build_model
    monkeypatch.setattr(
        train_loop, "build_model", lambda c, n, **kw: build(c, n, **{**kw, "pretrained": False})
    )
    data = {"name": "coco/2017", "size_cache_dir": str(tmp_path / "sizes")}
    cfg = tiny_config(
        **{
            "dataset.source": "tfds",
            "dataset.train": {**data, "split": "train"},
            "dataset.val": {**data, "split": "validation"},
            "input.min_sizes": (800,),
            "input.max_size": 1333,
            "input.worker_count": 0,
            "optim.epochs": 3,  # 3 x 2 steps: the tiny config's 6 steps
            "eval.enabled": False,
        }
    )
    assert cfg.input.canvases == "fit" and cfg.batch_size == 8
    encoded = _coco_jpegs([(480, 640)] * 8 + [(640, 480)] * 8)
    with tfds.testing.mock_data(as_data_source_fn=_serve(encoded, [])), caplog.at_level("INFO"):
        with pytest.raises(Stop):
            train_loop.train_and_evaluate(cfg, str(tmp_path / "run"))
        [pipeline] = built
        try:
            assert pipeline.canvases == [(800, 1088), (1088, 800)]
            assert pipeline.steps_per_epoch == 2
            assert next(pipeline)["images"].shape[1:3] in [(800, 1088), (1088, 800)]
        finally:
            pipeline.close()
    assert "training canvases: 2 canvases (h x w: images) 800x1088: 8, 1088x800: 8" in caplog.text


def _load_all(src):
    """(index -> example for the records that load, index -> DataError message for the rest)."""
    loaded, refused = {}, {}
    for i in range(len(src)):
        try:
            loaded[i] = src[i]
        except DataError as e:
            refused[i] = str(e)
    return loaded, refused


def test_tfds_random_mock_data_reads_or_names_the_record():
    """tfds's own random examples: each is read, or rejected naming dataset, split and index.

    tfds's random COCO records draw every per-object field's length independently, so all four
    are corrupt and refused (exact messages). Records 1 and 3 repaired by hand (fields cut to a
    common length, bbox corners ordered) then load with exactly the boxes computed here from
    the raw record, while 0 and 2 stay refused."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from retinanet_jax.data.tfds_source import TfdsSource

    def lengths(raw):
        return {
            k: len(
                np.asarray(raw["objects"][k]).reshape(-1, 4)
                if k == "bbox"
                else np.asarray(raw["objects"][k]).reshape(-1)
            )
            for k in ("bbox", "is_crowd", "label")
        }

    def message(i, raw):
        return f"tfds coco/2017[train] index {i}: objects fields have different lengths {lengths(raw)}"

    with tfds.testing.mock_data(num_examples=4):
        src = TfdsSource("coco/2017", "train", on_bad_record="drop")
        raws = [src._data[i] for i in range(4)]
        loaded, refused = _load_all(src)
    assert all(len(set(lengths(r).values())) > 1 for r in raws)  # what tfds generates
    assert loaded == {} and refused == {i: message(i, raws[i]) for i in range(4)}

    def repaired(raw):
        objects = {k: np.asarray(v) for k, v in raw["objects"].items()}
        n = min(len(v) for v in objects.values())
        objects = {k: v[:n] for k, v in objects.items()}
        b = objects["bbox"]  # [ymin, xmin, ymax, xmax], normalized
        objects["bbox"] = np.stack(
            [
                np.minimum(b[:, 0], b[:, 2]),
                np.minimum(b[:, 1], b[:, 3]),
                np.maximum(b[:, 0], b[:, 2]),
                np.maximum(b[:, 1], b[:, 3]),
            ],
            1,
        )
        return {**raw, "objects": objects}

    mixed = [raws[0], repaired(raws[1]), raws[2], repaired(raws[3])]
    with tfds.testing.mock_data(as_data_source_fn=lambda self, split, **kw: mixed):
        loaded, refused = _load_all(TfdsSource("coco/2017", "train", on_bad_record="drop"))
    assert sorted(loaded) == [1, 3]
    assert refused == {0: message(0, raws[0]), 2: message(2, raws[2])}
    for i, ex in loaded.items():
        raw = mixed[i]
        h, w = np.asarray(raw["image"]).shape[:2]
        keep = ~raw["objects"]["is_crowd"].astype(bool)
        b = raw["objects"]["bbox"][keep].astype(np.float32)
        want = np.stack([b[:, 1] * w, b[:, 0] * h, b[:, 3] * w, b[:, 2] * h], 1).astype(np.float32)
        assert keep.sum() > 0 and ex["image_id"] == int(raw["image/id"])
        assert ex["image"].dtype == np.uint8 and ex["image"].shape == (h, w, 3)
        np.testing.assert_array_equal(ex["image"], np.asarray(raw["image"]))
        np.testing.assert_allclose(ex["boxes"], want, rtol=1e-6)
        assert ex["labels"].tolist() == raw["objects"]["label"][keep].tolist()
