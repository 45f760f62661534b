"""conv.py: same values and gradients as lax.conv_general_dilated, GEMM paths on CPU."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from retinanet_jax.backends.cpu import conv
from retinanet_jax.backends.cpu import winograd

NHWC = ("NHWC", "HWIO", "NHWC")


def _grads(fn, x, w, strides, padding, dn):
    def loss(x, w):
        return jnp.sum(jnp.sin(fn(x, w, strides, padding, dimension_numbers=dn)))

    return jax.jit(jax.value_and_grad(loss, (0, 1)))(x, w)


@pytest.fixture(params=["rule", "gemm_dw", "gemm_conv"])
def kernel_grad_rule(request, monkeypatch):
    """The kxk paths on small float32 shapes: the shape rules (XLA's conv there), the GEMM
    kernel gradient forced, and the whole conv as GEMMs (the bf16 path) forced."""
    if request.param == "gemm_dw":
        monkeypatch.setattr(conv, "_gemm_kernel_grad", lambda *shapes: True)
    if request.param == "gemm_conv":
        monkeypatch.setattr(conv, "_gemm_conv", lambda *args: True)
    return request.param


@pytest.mark.parametrize("shape, k, stride, pad, cout", [
    ((2, 17, 15, 8), 3, 1, 1, 12),  # odd sizes
    ((2, 16, 16, 8), 3, 2, 1, 6),  # strided 3x3 (ResNet / P6, P7)
    ((2, 16, 16, 8), 1, 2, 0, 5),  # strided 1x1 (downsample)
    ((2, 15, 17, 8), 1, 2, 0, 5),  # strided 1x1, odd sizes (last row/column read)
    ((2, 16, 14, 6), 1, 1, 0, 9),  # 1x1, Cin < Cout (the other transposed operand)
    ((1, 20, 22, 3), 7, 2, 3, 4),  # the stem
    ((2, 9, 9, 4), 3, 2, 1, 7),  # last row/column of the padded input unused
])
def test_values_and_gradients_equal_lax(shape, k, stride, pad, cout, kernel_grad_rule):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, shape[-1], cout)), jnp.float32)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)  # what flax passes
    padding = ((pad, pad), (pad, pad))
    want_v, (want_dx, want_dw) = _grads(lax.conv_general_dilated, x, w, (stride, stride), padding, dn)
    got_v, (got_dx, got_dw) = _grads(conv.conv_general_dilated, x, w, (stride, stride), padding, dn)
    # 1x1 forward (and kxk with gemm_conv) is a dot: float32 rounding only; else lax's own.
    exact = k > 1 and kernel_grad_rule != "gemm_conv"
    np.testing.assert_allclose(got_v, want_v, rtol=1e-6 if exact else 1e-5, atol=0 if exact else 1e-4)
    np.testing.assert_allclose(got_dx, want_dx, rtol=1e-5, atol=1e-5 if exact else 1e-4)
    # Different summation order (GEMM over batch*space vs conv): float32 rounding only.
    np.testing.assert_allclose(got_dw, want_dw, rtol=1e-4, atol=1e-4)


def _kernel_grad_hlo(fn, k, x_shape=(1, 8, 8, 4), cout=8):
    x, w = jnp.ones(x_shape), jnp.ones((k, k, x_shape[-1], cout))
    g = jnp.ones(x_shape[:3] + (cout,))
    pad = ((k // 2, k // 2),) * 2

    def dw(x, w, g):
        f = lambda w: fn(x, w, (1, 1), pad, dimension_numbers=NHWC)
        return jax.vjp(f, w)[1](g)[0]
    return jax.jit(dw).lower(x, w, g).compile().as_text()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the GEMM paths are CPU-only")
def test_cpu_gemm_paths():
    # 1x1: forward and kernel gradient are dots; kxk: the rule picks by shape.
    assert "convolution" not in _kernel_grad_hlo(conv.conv_general_dilated, 1)
    assert "convolution" in _kernel_grad_hlo(lax.conv_general_dilated, 1)
    assert "convolution" in _kernel_grad_hlo(conv.conv_general_dilated, 3)  # small: XLA's conv
    big = _kernel_grad_hlo(conv.conv_general_dilated, 3, (1, 64, 64, 256), 256)  # P3 head conv
    assert "convolution" not in big and "dot" in big  # 9 GEMMs, no conv (forward is DCE'd)
    with conv.implementation("lax"):
        assert "convolution" in _kernel_grad_hlo(conv.conv_general_dilated, 1)


def test_unsupported_forms_fall_back_to_lax():
    x = jnp.ones((1, 8, 8, 2))
    w = jnp.ones((3, 3, 2, 3))
    got = conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC,
                                    rhs_dilation=(2, 2))
    want = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC,
                                    rhs_dilation=(2, 2))
    np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the GEMM paths are CPU-only")
def test_bf16_wide_conv_is_gemms_without_f32_copies():
    x, w = jnp.ones((1, 8, 8, 256), jnp.bfloat16), jnp.ones((3, 3, 256, 256), jnp.bfloat16)
    f = lambda x, w: conv.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC)
    hlo = jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w).astype(jnp.float32)), (0, 1))).lower(x, w)
    hlo = hlo.compile().as_text()
    assert "convolution" not in hlo and "dot" in hlo
    assert "f32[1,10,8,768]" not in hlo  # window copies stay 16-bit (bitcast to uint16)
    # Stride 2 (ResNet stages 2-4, P6/P7): the input gradient too, one GEMM per output phase
    # (XLA's transposed conv ran in f32).
    s2 = lambda x, w: conv.conv_general_dilated(x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=NHWC)
    hlo = jax.jit(jax.grad(lambda x, w: jnp.sum(s2(x, w).astype(jnp.float32)), (0, 1))).lower(x, w)
    assert "convolution" not in hlo.compile().as_text()


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


def test_float32_output_args_give_the_conv_float32_operands_to_round():
    """Under ``float32_output_args(bf16)`` nn.Conv hands its f32 kernel (and an f32 input) to the
    conv, which rounds them for the products: a Winograd-sized conv rounds its transforms once
    (``winograd.conv3x3`` with ``compute_dtype``), a 1x1 conv its operands, as a bf16 layer."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(np.maximum(rng.normal(size=(1, 32, 32, 256)), 0), jnp.float32)
    for k in (3, 1):
        layer = nn.Conv(256, (k, k), padding=((k // 2, k // 2),) * 2, dtype=jnp.bfloat16,
                        **conv.float32_output_args(jnp.bfloat16))
        params = layer.init(jax.random.key(0), x)
        w, b = params["params"]["kernel"], params["params"]["bias"]
        got = jax.jit(layer.apply)(params, x)
        assert got.dtype == jnp.float32
        if k == 3:
            want = winograd.conv3x3(x, w, compute_dtype=jnp.bfloat16,
                                    preferred_element_type=jnp.float32) + b
        else:
            want = jnp.dot(x.astype(jnp.bfloat16), w[0, 0].astype(jnp.bfloat16),
                           preferred_element_type=jnp.float32) + b
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("shape,k,stride", [
    ((1, 8, 8, 16, 36), 3, 1),      # narrow: lax's conv
    ((1, 8, 8, 128, 128), 3, 2),    # bf16 GEMM forward, input gradient per phase (stride 2)
    ((1, 8, 8, 128, 128), 3, 1),    # bf16 GEMM forward and both gradients
    ((1, 32, 32, 256, 256), 3, 1),  # Winograd
    ((1, 8, 8, 64, 32), 1, 2),      # 1x1
])
def test_bf16_operands_with_float32_output(shape, k, stride):
    """``preferred_element_type=f32`` on bf16 operands (the heads' final convs): f32 output, and
    gradients (back-propagated in bf16, returned to the f32 inputs) that agree with a float32
    conv to bf16 accuracy."""
    n, h, w_, cin, cout = shape
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(n, h, w_, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, cin, cout)) / np.sqrt(k * k * cin), jnp.float32)
    pad = ((k // 2, k // 2),) * 2

    def loss(x, w, dtype, preferred):
        y = conv.conv_general_dilated(x.astype(dtype), w.astype(dtype), (stride, stride), pad,
                                      dimension_numbers=NHWC, preferred_element_type=preferred)
        return jnp.sum(jnp.sin(y.astype(jnp.float32))), y

    (_, y16), g16 = jax.jit(jax.value_and_grad(
        lambda x, w: loss(x, w, jnp.bfloat16, jnp.float32), (0, 1), has_aux=True))(x, w)
    (_, y32), g32 = jax.jit(jax.value_and_grad(
        lambda x, w: loss(x, w, jnp.float32, None), (0, 1), has_aux=True))(x, w)
    assert y16.dtype == jnp.float32
    np.testing.assert_allclose(y16, y32, atol=0.03 * float(jnp.std(y32)))
    for a, b in zip(g16, g32):
        assert a.dtype == jnp.float32
        # bf16 operands and cotangents (~3 significant digits) summed over up to 1024 pixels.
        np.testing.assert_allclose(a, b, atol=0.05 * float(jnp.std(b)))
