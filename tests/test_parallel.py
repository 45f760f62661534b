"""parallel.py: mesh construction, the parameter sharding rule, batch placement."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from retinanet_jax.parallel import mesh as parallel


def test_make_mesh_shapes_and_axes():
    assert jax.device_count() == 8  # conftest's fake CPU devices
    m = parallel.make_mesh()
    assert m.axis_names == ("data", "model") and dict(m.shape) == {"data": 8, "model": 1}
    m = parallel.make_mesh(model=2)
    assert dict(m.shape) == {"data": 4, "model": 2}
    m = parallel.make_mesh(devices=jax.devices()[:1])
    assert dict(m.shape) == {"data": 1, "model": 1} and m.devices.item() == jax.devices()[0]
    m = parallel.make_mesh(data=2)  # a subset of the devices
    assert dict(m.shape) == {"data": 2, "model": 1}


def test_make_mesh_rejects_impossible_shapes():
    with pytest.raises(ValueError, match="model=3"):
        parallel.make_mesh(model=3)
    with pytest.raises(ValueError, match="needs 16 devices"):
        parallel.make_mesh(data=16)


@pytest.mark.parametrize(
    "shape, model, spec",
    [
        ((3, 3, 16, 64), 2, P(None, None, None, "model")),  # conv kernel, 64 % 2 == 0
        ((1, 1, 256, 819), 2, P()),  # K-class logits conv: 819 % 2 != 0 -> replicated
        ((64,), 2, P()),  # bias / BN scale
        ((), 2, P()),  # optimizer count
        ((3, 3, 16, 64), 1, P()),  # no model axis -> all replicated
    ],
)
def test_param_spec_rule(shape, model, spec):
    assert parallel.param_spec(shape, model) == spec


def test_tree_shardings_split_kernels_over_model():
    mesh = parallel.make_mesh(model=2)
    tree = {
        "conv": {"kernel": np.ones((3, 3, 4, 8), np.float32), "bias": np.ones((8,), np.float32)},
        "count": np.zeros((), np.int32),
    }
    placed = jax.device_put(tree, parallel.tree_shardings(tree, mesh))
    k = placed["conv"]["kernel"]
    assert k.sharding.spec == P(None, None, None, "model")
    assert {s.data.shape for s in k.addressable_shards} == {(3, 3, 4, 4)}
    assert placed["conv"]["bias"].sharding.spec == P()
    assert placed["count"].sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(k), tree["conv"]["kernel"])


def test_sharded_conv_kernel_gives_the_replicated_result():
    mesh = parallel.make_mesh(model=2)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 16, 16, 4)).astype(np.float32)
    w = rng.normal(size=(3, 3, 4, 8)).astype(np.float32)

    def conv(x, w):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(y * y, axis=(1, 2, 3))

    xs = parallel.shard_batch({"x": x}, mesh)["x"]
    ws = jax.device_put(w, parallel.tree_shardings(w, mesh))
    got = jax.jit(conv)(xs, ws)
    want = jax.jit(conv)(x, w)  # one device
    # Same per-output arithmetic; only the cross-channel sum order may differ.
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5)


def test_shard_batch_splits_rows_over_data():
    mesh = parallel.make_mesh(model=2)  # data = 4
    batch = {
        "images": np.arange(8 * 2 * 2 * 3, dtype=np.uint8).reshape(8, 2, 2, 3),
        "labels": np.arange(8 * 5, dtype=np.int32).reshape(8, 5),
    }
    out = parallel.shard_batch(batch, mesh)
    for key in batch:
        arr = out[key]
        assert arr.shape == batch[key].shape and arr.dtype == batch[key].dtype
        assert arr.sharding.spec == P("data")
        # 4 data shards of 2 rows, each held by both devices of its model pair.
        assert len(arr.addressable_shards) == 8
        assert {s.data.shape[0] for s in arr.addressable_shards} == {2}
        np.testing.assert_array_equal(np.asarray(arr), batch[key])
    assert parallel.local_batch_size(8, mesh) == 8


def test_shard_batch_rejects_indivisible_batch():
    mesh = parallel.make_mesh()  # data = 8
    with pytest.raises(ValueError, match="not divisible by the data axis"):
        parallel.shard_batch({"x": np.zeros((6, 3), np.float32)}, mesh)
