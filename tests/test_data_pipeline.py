"""Training batch pipeline: format, buckets, determinism, resume, host sharding, workers."""

import numpy as np
import pytest

from retinanet_jax.data import sampler
from retinanet_jax.data.errors import DataError
from retinanet_jax.data.pipeline import TrainBatchIterator
from retinanet_jax.data.shapes import ShapesSource


class IndexedSource:
    """Constant-colour images whose pixel value is the example index (survives resize and
    flip), alternating landscape / portrait so two canvas buckets are used."""

    class_names = ["a", "b"]

    def __init__(self, n=40, boxes_per_image=2):
        self.n, self.boxes_per_image = n, boxes_per_image

    def __len__(self):
        return self.n

    def image_size(self, i):
        return (20, 40) if i % 2 == 0 else (40, 20)

    def __getitem__(self, i):
        h, w = IndexedSource.image_size(self, i)
        k = self.boxes_per_image
        return {
            "image": np.full((h, w, 3), i, np.uint8),
            "boxes": np.tile(np.array([[1, 2, 11, 12]], np.float32), (k, 1)),
            "labels": np.arange(k, dtype=np.int32) % 2,
            "image_id": i,
        }


KW = dict(batch_size=4, min_sizes=(30, 45), max_size=80, max_boxes=3, seed=3)


def _ids(batch):
    return batch["images"][:, 0, 0, 0].astype(int).tolist()


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_batch_format_and_buckets():
    it = TrainBatchIterator(IndexedSource(), **KW)
    assert it.canvases == [(64, 96), (96, 64)]  # S=45 -> 64, L=80 -> 96 after rounding to 32
    assert it.steps_per_epoch == 10
    for batch in _take(it, 10):
        assert set(batch) == {"images", "image_sizes", "boxes", "labels"}
        assert batch["images"].dtype == np.uint8 and batch["images"].shape[0] == 4
        assert batch["image_sizes"].dtype == np.int32 and batch["image_sizes"].shape == (4, 2)
        assert batch["boxes"].shape == (4, 3, 4) and batch["boxes"].dtype == np.float32
        np.testing.assert_array_equal(batch["labels"], [[0, 1, -1]] * 4)
        hc, wc = batch["images"].shape[1:3]
        ids = _ids(batch)
        # One bucket per batch: landscape sources on the landscape canvas, and vice versa.
        assert len({i % 2 for i in ids}) == 1
        assert (hc, wc) == ((64, 96) if ids[0] % 2 == 0 else (96, 64))
        for img, (h, w), i in zip(batch["images"], batch["image_sizes"], ids):
            # min_size 30 -> scale 1.5; min_size 45 -> scale 2 (max_size 80 binds)
            assert (h, w) in ({(30, 60), (40, 80)} if i % 2 == 0 else {(60, 30), (80, 40)})
            assert np.all(img[:h, :w] == i) and not img[h:].any() and not img[:, w:].any()


def test_epoch_covers_each_example_once_and_order_depends_on_seed():
    it = TrainBatchIterator(IndexedSource(), **KW)
    epoch0 = sum((_ids(b) for b in _take(it, 10)), [])
    assert sorted(epoch0) == list(range(40))
    epoch1 = sum((_ids(b) for b in _take(it, 10)), [])
    assert sorted(epoch1) == list(range(40)) and epoch1 != epoch0
    again = TrainBatchIterator(IndexedSource(), **KW)
    assert sum((_ids(b) for b in _take(again, 10)), []) == epoch0
    other = TrainBatchIterator(IndexedSource(), **{**KW, "seed": 4})
    assert sum((_ids(b) for b in _take(other, 10)), []) != epoch0


def test_resume_from_state_replays_the_same_batches():
    it = TrainBatchIterator(IndexedSource(), **KW)
    _take(it, 7)
    state = it.get_state()
    assert state == {"epoch": 0, "position": 7}
    expected = _take(it, 6)  # crosses the epoch boundary
    assert it.get_state() == {"epoch": 1, "position": 3}
    resumed = TrainBatchIterator(IndexedSource(), **KW, state=dict(state))
    for a, b in zip(expected, _take(resumed, 6)):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    it.set_state(state)
    np.testing.assert_array_equal(next(it)["images"], expected[0]["images"])
    with pytest.raises(ValueError, match="bad pipeline state"):
        it.set_state({"epoch": 0, "position": 10})


def test_two_hosts_partition_each_global_batch():
    kw = {**KW, "batch_size": 5}
    hosts = [TrainBatchIterator(IndexedSource(), **kw, process_index=p, process_count=2) for p in range(2)]
    assert hosts[0].steps_per_epoch == hosts[1].steps_per_epoch == 4  # 20 per bucket / 10
    seen = []
    for step in range(4):
        b0, b1 = next(hosts[0]), next(hosts[1])
        assert b0["images"].shape == b1["images"].shape  # same canvas on every host
        assert not set(_ids(b0)) & set(_ids(b1))
        seen += _ids(b0) + _ids(b1)
        state = {"epoch": 0, "position": step}
        assert _ids(b0) == hosts[0].example_indices(state).tolist()
    assert sorted(seen) == list(range(40))


def test_sampler_drops_partial_groups_and_interleaves():
    keys = np.array([0] * 10 + [1] * 7)
    plan = sampler.epoch_plan(keys, 3, seed=0, epoch=0)
    assert plan.shape == (5, 3) == (sampler.steps_per_epoch(keys, 3), 3)
    assert all(len(set(keys[row])) == 1 for row in plan)
    assert len(set(plan.ravel())) == 15
    np.testing.assert_array_equal(plan, sampler.epoch_plan(keys, 3, seed=0, epoch=0))
    assert not np.array_equal(plan, sampler.epoch_plan(keys, 3, seed=0, epoch=1))


def test_too_many_boxes_error_or_truncate():
    with pytest.raises(DataError, match="image_id .*: 5 boxes exceed max_boxes=3"):
        next(TrainBatchIterator(IndexedSource(boxes_per_image=5), **KW))
    batch = next(TrainBatchIterator(IndexedSource(boxes_per_image=5), **KW, box_overflow="truncate"))
    np.testing.assert_array_equal(batch["labels"], [[0, 1, 0]] * 4)


def test_unknown_image_sizes_use_a_square_canvas_and_small_data_errors():
    class Sizeless(IndexedSource):
        def image_size(self, i):
            return None

    it = TrainBatchIterator(Sizeless(), **KW)
    assert it.canvases == [(96, 96)]
    assert next(it)["images"].shape == (4, 96, 96, 3)
    with pytest.raises(ValueError, match="no full global batch of 64"):
        TrainBatchIterator(IndexedSource(), **{**KW, "batch_size": 64})


def test_shapes_source_through_the_pipeline():
    it = TrainBatchIterator(
        ShapesSource(num_images=8, image_size=64), batch_size=4, min_sizes=(64,), max_size=64, max_boxes=10
    )
    batch = next(it)
    assert batch["images"].shape == (4, 64, 64, 3)
    np.testing.assert_array_equal(batch["image_sizes"], [[64, 64]] * 4)
    valid = batch["labels"] >= 0
    assert valid.any() and np.all(batch["boxes"][valid][:, 2:] <= 64)


@pytest.mark.slow
def test_workers_give_the_same_batches_as_in_process():
    pytest.importorskip("grain", reason="worker processes need grain (pip install grain)")
    serial = _take(TrainBatchIterator(IndexedSource(), **KW), 12)
    parallel = TrainBatchIterator(IndexedSource(), **KW, worker_count=2)
    try:
        for a, b in zip(serial, _take(parallel, 12)):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])
                assert type(b[key]) is np.ndarray  # plain copies, not shared memory
        parallel.set_state({"epoch": 0, "position": 3})
        np.testing.assert_array_equal(next(parallel)["images"], serial[3]["images"])
    finally:
        parallel.close()
