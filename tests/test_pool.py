"""backends/cpu/pool.py: the stem max pool's CPU backward equals jax's and torch's, ties included."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from retinanet_jax import backends
from retinanet_jax.backends.cpu import pool

PAD = ((1, 1), (1, 1))


def _tied_input(shape, dtype, seed=0):
    """ReLU'd values on a 0.5 grid: most 3x3 windows hold a tie (zeros, equal values)."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(np.maximum(np.round(2 * rng.normal(size=shape)) / 2, 0), dtype)


def _vjp(fn, x, g):
    y, vjp = jax.vjp(fn, x)
    return y, vjp(g)[0]


@pytest.mark.parametrize(
    "shape, window, stride, pad",
    [
        ((2, 20, 22, 5), 3, 2, PAD),  # the ResNet stem's pool
        ((2, 17, 15, 3), 3, 2, PAD),  # odd sizes: the last row / column in one window only
        ((1, 9, 8, 2), 2, 2, ((0, 0), (0, 0))),  # no overlap, no padding
        ((1, 10, 10, 2), 3, 1, PAD),  # stride 1: each pixel in up to 9 windows
    ],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_values_and_gradient_equal_jax_with_ties(shape, window, stride, pad, dtype):
    x = _tied_input(shape, dtype)
    win, strides = (window, window), (stride, stride)
    y_ref = nn.max_pool(x, win, strides, pad)
    # Integer cotangents: the sums a pixel receives from overlapping windows are exact in
    # either order, so the routing (which tied pixel gets each window's gradient) is all that
    # is compared.
    g = jnp.asarray(np.random.default_rng(1).integers(-4, 5, y_ref.shape), dtype)
    want_y, want_dx = _vjp(lambda x: nn.max_pool(x, win, strides, pad), x, g)
    got_y, got_dx = _vjp(lambda x: pool.max_pool(x, win, strides, pad), x, g)
    np.testing.assert_array_equal(np.asarray(got_y, np.float32), np.asarray(want_y, np.float32))
    np.testing.assert_array_equal(np.asarray(got_dx, np.float32), np.asarray(want_dx, np.float32))
    assert got_dx.dtype == dtype


def test_gradient_equals_torch_max_pool2d_with_ties():
    """torch's CPU kernel scans each window row-major with a strict ``>``: the first maximum
    takes the gradient. Ours routes ties the same way."""
    x = _tied_input((2, 20, 22, 4), jnp.float32, seed=3)
    g = np.random.default_rng(4).integers(-4, 5, (2, 10, 11, 4)).astype(np.float32)
    _, got = _vjp(jax.jit(lambda x: pool.max_pool(x, (3, 3), (2, 2), PAD)), x, jnp.asarray(g))
    tx = torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    ty = torch.nn.functional.max_pool2d(tx, 3, 2, padding=1)
    ty.backward(torch.from_numpy(g).permute(0, 3, 1, 2))
    np.testing.assert_array_equal(np.asarray(got), tx.grad.permute(0, 2, 3, 1).numpy())


def test_the_cpu_target_gets_the_cpu_backward_and_accelerators_jax_s():
    x = jnp.ones((1, 16, 16, 4))

    def text(platform):
        f = functools.partial(backends.max_pool, window=(3, 3), strides=(2, 2), padding=PAD)
        with backends.target(platform):
            return jax.jit(jax.grad(lambda x: jnp.sum(f(x)))).lower(x).as_text(debug_info=True)

    cpu, gpu = text("cpu"), text("cuda")
    assert "select_and_scatter" not in cpu and backends.CPU_SCOPE in cpu
    assert "select_and_scatter" in gpu and backends.CPU_SCOPE not in gpu
