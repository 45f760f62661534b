"""winograd.py: F(2x2, 3x3) equals direct convolution (values and gradients) up to rounding."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from retinanet_jax.backends.cpu import conv, winograd

NHWC = ("NHWC", "HWIO", "NHWC")


def _direct(x, w, padding):
    return lax.conv_general_dilated(
        x, w, (1, 1), padding, dimension_numbers=NHWC, precision=lax.Precision.HIGHEST
    )


def _value_and_grads(fn, x, w, padding):
    # sin: a cotangent that differs at every output pixel, so misplaced gradients show.
    def loss(x, w):
        return jnp.sum(jnp.sin(fn(x, w, padding)))

    return jax.jit(jax.value_and_grad(loss, (0, 1)))(x, w), jax.jit(fn, static_argnums=2)(x, w, padding)


@pytest.mark.parametrize(
    "shape, cout, padding",
    [
        ((2, 16, 16, 8), 12, ((1, 1), (1, 1))),  # even output: whole tiles
        ((2, 17, 15, 8), 5, ((1, 1), (1, 1))),  # odd output sizes: the last tile row/column cropped
        ((1, 9, 10, 3), 4, ((0, 0), (0, 0))),  # 'VALID'
        ((1, 8, 11, 4), 6, ((1, 0), (0, 1))),  # asymmetric padding
        ((3, 1, 1, 4), 2, ((1, 1), (1, 1))),  # a 1x1 map (P7 of a small image)
    ],
)
def test_equals_direct_convolution(shape, cout, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, shape[-1], cout)), jnp.float32)
    (want_l, (want_dx, want_dw)), want = _value_and_grads(_direct, x, w, padding)
    (got_l, (got_dx, got_dw)), got = _value_and_grads(
        lambda x, w, p: winograd.conv3x3(x, w, p, precision=lax.Precision.HIGHEST), x, w, padding
    )
    assert got.shape == want.shape
    # float32 rounding only (the transforms add at most 4 terms with coefficients 1 and 1/2);
    # a misplaced tap or tile would be off by O(1) of the scale.
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(got_dx, want_dx, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(want_dx))))
    np.testing.assert_allclose(got_dw, want_dw, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(want_dw))))
    np.testing.assert_allclose(got_l, want_l, rtol=1e-5)


def test_identity_kernel_is_identity():
    # The centre tap alone copies the input (to rounding: the tiles sum and cancel terms).
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 7, 9, 5)), jnp.float32)
    w = jnp.zeros((3, 3, 5, 5)).at[1, 1].set(jnp.eye(5))
    np.testing.assert_allclose(winograd.conv3x3(x, w, precision=lax.Precision.HIGHEST), x, rtol=0, atol=1e-6)


def test_bfloat16_gemms_stay_close_to_float32():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 12, 12, 64)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 64, 64)) / 24, jnp.float32)
    want = _direct(x, w, ((1, 1), (1, 1)))
    got = winograd.conv3x3(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    # bf16 operands (8-bit mantissa) summed over 576 taps in f32: ~1% of the output scale.
    np.testing.assert_allclose(
        got.astype(jnp.float32), want, rtol=0, atol=2e-2 * float(jnp.max(jnp.abs(want)))
    )


def test_rejects_other_kernels():
    with pytest.raises(ValueError, match="3x3"):
        winograd.conv3x3(jnp.ones((1, 4, 4, 2)), jnp.ones((5, 5, 2, 2)))


def _hlo(fn, x, w):
    return jax.jit(jax.grad(lambda x, w: jnp.sum(fn(x, w)), (0, 1))).lower(x, w).compile().as_text()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="Winograd is the CPU path")
def test_conv_hook_uses_winograd_for_wide_stride1_3x3_on_cpu():
    x, w = jnp.ones((1, 32, 32, 256)), jnp.ones((3, 3, 256, 256))

    def f(x, w, strides=(1, 1)):
        return conv.conv_general_dilated(x, w, strides, ((1, 1), (1, 1)), dimension_numbers=NHWC)

    assert "convolution" not in _hlo(f, x, w)  # forward, input and kernel gradient: GEMMs
    with conv.implementation("lax"):
        assert "convolution" in _hlo(f, x, w)
    assert "convolution" in _hlo(lambda x, w: f(x, w, (2, 2)), x, w)  # stride 2: direct
    narrow = jnp.ones((1, 32, 32, 128))
    assert "convolution" in _hlo(f, narrow, jnp.ones((3, 3, 128, 256)))  # below the channel rule
    assert "convolution" in _hlo(f, x[:, :16, :16], w)  # a 16x16 map: below the size rule
    # Through the hook, values equal lax's to rounding.
    rng = np.random.default_rng(3)
    xr = jnp.asarray(rng.normal(size=(1, 33, 35, 256)), jnp.float32)
    wr = jnp.asarray(rng.normal(size=(3, 3, 256, 256)) / 48, jnp.float32)
    np.testing.assert_allclose(jax.jit(f)(xr, wr), _direct(xr, wr, ((1, 1), (1, 1))), rtol=0, atol=1e-5)


def test_output_gradient_producer_is_computed_once():
    # The output transform's transpose reads the cotangent once (one matrix product). Written as
    # 16 sums, XLA:CPU fused the cotangent's producer into each of them (here cos, 16 times): in
    # a train step that producer is the whole focal-loss gradient, recomputed for every plane.
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(2, 32, 32, 64)), jnp.float32)  # odd sizes pad g first
    w = jnp.asarray(rng.normal(size=(3, 3, 64, 64)) / 24, jnp.float32)
    y = jnp.asarray(rng.normal(size=(2, 32, 32, 64)), jnp.float32)

    def loss(x, w):
        return jnp.sum(jnp.sin(winograd.conv3x3(x, w) + y))

    hlo = jax.jit(jax.grad(loss, (0, 1))).lower(x, w).compile().as_text()
    assert hlo.count("cosine(") == 1
    # ... and the gradients are still the direct convolution's (f32: rounding only).
    got = jax.jit(jax.grad(loss, (0, 1)))(x, w)
    want = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(_direct(x, w, ((1, 1), (1, 1))) + y)), (0, 1)))(x, w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * float(jnp.abs(r).max()))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="Winograd is the CPU path")
def test_bf16_kernel_gradient_stays_bf16():
    # The kernel gradient's 16 products V[t]^T dM[t] take a transposed V. Folded into the dot,
    # XLA:CPU ran them in f32 on f32 copies of V and dM; swap_last_axes keeps them bf16.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 32, 32, 64)), jnp.bfloat16)  # 2 * 16 * 16 = 512 tiles
    w = jnp.asarray(rng.normal(size=(3, 3, 64, 48)), jnp.bfloat16)
    r = jnp.asarray(rng.normal(size=(2, 32, 32, 48)), jnp.float32)

    def loss(x, w):
        return jnp.sum(winograd.conv3x3(x, w).astype(jnp.float32) * r)

    hlo = jax.jit(jax.grad(loss, (0, 1))).lower(x, w).compile().as_text()
    # The computation holding the dot that gives dU [16, Cin, Cout]: its operands' types.
    heads = re.findall(r"\((.*)\) -> f32\[16,64,48\](?:\{[^}]*\})? \{\n((?:.*\n)*?)\}", hlo)
    operands = [params for params, body in heads if " dot(" in body]
    assert operands and all("f32" not in p and p.count("bf16[16,") == 2 for p in operands), operands
    v = jnp.asarray(rng.normal(size=(3, 5, 4)), jnp.bfloat16)
    np.testing.assert_array_equal(winograd.swap_last_axes(v), v.transpose(0, 2, 1))


def test_bf16_compute_from_float32_operands_rounds_the_transforms_once():
    """``compute_dtype=bf16`` on f32 operands: V = B^T x B and U = G w G^T are computed from the
    f32 values and rounded to bf16 once. Rounding x and w to bf16 first (what a bf16 layer
    did) is a second rounding, which the transforms' cancelling sums amplify: here the rms
    error against the f32 conv is 0.86x the bf16-operand one (1.49x / 1.73x a direct bf16
    conv's, measured in session 6)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(np.maximum(rng.normal(size=(1, 32, 32, 256)), 0), jnp.float32)  # post-ReLU
    w = jnp.asarray(rng.normal(size=(3, 3, 256, 256)) * 0.03, jnp.float32)
    pad = ((1, 1), (1, 1))
    exact = _direct(x, w, pad)
    got = jax.jit(
        lambda x, w: winograd.conv3x3(
            x, w, pad, compute_dtype=jnp.bfloat16, preferred_element_type=jnp.float32
        )
    )(x, w)
    assert got.dtype == jnp.float32

    # The same arithmetic spelt out: transforms in f32, rounded once, exact products.
    def rnd(a):
        return a.astype(jnp.bfloat16).astype(jnp.float32)

    v, dims = winograd.input_transform(x, pad)
    u = rnd(winograd.kernel_transform(w))
    m = [jnp.dot(rnd(v_t), u[t], precision=lax.Precision.HIGHEST) for t, v_t in enumerate(v)]
    want = winograd.output_transform(m, dims)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(jnp.abs(exact).max()))

    def rms_error(y):
        return float(jnp.sqrt(jnp.mean((y - exact) ** 2) / jnp.mean(exact**2)))

    rounded_first = winograd.conv3x3(
        x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), pad, preferred_element_type=jnp.float32
    )
    assert rms_error(got) < 0.92 * rms_error(rounded_first), (rms_error(got), rms_error(rounded_first))
