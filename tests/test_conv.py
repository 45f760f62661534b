"""conv.py: same values and gradients as lax.conv_general_dilated, GEMM kernel gradient on CPU."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from retinanet_jax import conv

NHWC = ("NHWC", "HWIO", "NHWC")


def _grads(fn, x, w, strides, padding, dn):
    def loss(x, w):
        return jnp.sum(jnp.sin(fn(x, w, strides, padding, dimension_numbers=dn)))

    return jax.jit(jax.value_and_grad(loss, (0, 1)))(x, w)


@pytest.mark.parametrize("shape, k, stride, pad, cout", [
    ((2, 17, 15, 8), 3, 1, 1, 12),  # odd sizes
    ((2, 16, 16, 8), 3, 2, 1, 6),  # strided 3x3 (ResNet / P6, P7)
    ((2, 16, 16, 8), 1, 2, 0, 5),  # strided 1x1 (downsample)
    ((1, 20, 22, 3), 7, 2, 3, 4),  # the stem
    ((2, 9, 9, 4), 3, 2, 1, 7),  # last row/column of the padded input unused
])
def test_values_and_gradients_equal_lax(shape, k, stride, pad, cout):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, shape[-1], cout)), jnp.float32)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)  # what flax passes
    padding = ((pad, pad), (pad, pad))
    want_v, (want_dx, want_dw) = _grads(lax.conv_general_dilated, x, w, (stride, stride), padding, dn)
    got_v, (got_dx, got_dw) = _grads(conv.conv_general_dilated, x, w, (stride, stride), padding, dn)
    np.testing.assert_allclose(got_v, want_v, rtol=1e-6)
    np.testing.assert_allclose(got_dx, want_dx, rtol=1e-5, atol=1e-5)
    # Different summation order (GEMM over batch*space vs conv): float32 rounding only.
    np.testing.assert_allclose(got_dw, want_dw, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the GEMM path is CPU-only")
def test_cpu_kernel_gradient_is_the_gemm_path():
    x, w, g = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 8)), jnp.ones((1, 8, 8, 8))

    def kernel_grad_hlo(fn):
        def dw(x, w, g):
            f = lambda w: fn(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC)
            return jax.vjp(f, w)[1](g)[0]
        return jax.jit(dw).lower(x, w, g).compile().as_text()

    ours = kernel_grad_hlo(conv.conv_general_dilated)
    assert "convolution" not in ours and "dot" in ours  # 9 GEMMs, no conv (forward is DCE'd)
    assert "convolution" in kernel_grad_hlo(lax.conv_general_dilated)


def test_unsupported_forms_fall_back_to_lax():
    x = jnp.ones((1, 8, 8, 2))
    w = jnp.ones((3, 3, 2, 3))
    got = conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC,
                                    rhs_dilation=(2, 2))
    want = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC,
                                    rhs_dilation=(2, 2))
    np.testing.assert_array_equal(got, want)


def test_works_as_flax_conv_hook_in_bf16():
    layer = nn.Conv(16, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), dtype=jnp.bfloat16,
                    conv_general_dilated=conv.conv_general_dilated)
    ref = nn.Conv(16, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), dtype=jnp.bfloat16)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 16, 16, 8)), jnp.float32)
    params = ref.init(jax.random.key(0), x)

    def grads(m):
        return jax.jit(jax.grad(lambda p: jnp.sum(m.apply(p, x).astype(jnp.float32) ** 2)))(params)

    g, g_ref = grads(layer), grads(ref)
    assert g["params"]["kernel"].dtype == jnp.float32
    # bf16 compute: our GEMM accumulates in f32, lax's conv may round differently.
    np.testing.assert_allclose(g["params"]["kernel"], g_ref["params"]["kernel"], rtol=5e-2, atol=5e-2)
