"""conv.py: same values and gradients as lax.conv_general_dilated, GEMM paths on CPU."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from retinanet_jax.backends import select
from retinanet_jax.backends.cpu import conv, winograd
from retinanet_jax.backends.cpu import pool as cpu_pool

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


@pytest.mark.parametrize(
    "shape, k, stride, pad, cout",
    [
        ((2, 17, 15, 8), 3, 1, 1, 12),  # odd sizes
        ((2, 16, 16, 8), 3, 2, 1, 6),  # strided 3x3 (ResNet / P6, P7)
        ((2, 16, 16, 8), 1, 2, 0, 5),  # strided 1x1 (downsample)
        ((2, 15, 17, 8), 1, 2, 0, 5),  # strided 1x1, odd sizes (last row/column read)
        ((2, 16, 14, 6), 1, 1, 0, 9),  # 1x1, Cin < Cout (the other transposed operand)
        ((1, 20, 22, 3), 7, 2, 3, 4),  # the stem
        ((2, 9, 9, 4), 3, 2, 1, 7),  # last row/column of the padded input unused
    ],
)
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
        def f(w):
            return fn(x, w, (1, 1), pad, dimension_numbers=NHWC)

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
    got = conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC, rhs_dilation=(2, 2))
    want = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC, rhs_dilation=(2, 2))
    np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the GEMM paths are CPU-only")
def test_bf16_wide_conv_is_gemms_without_f32_copies():
    x, w = jnp.ones((1, 8, 8, 256), jnp.bfloat16), jnp.ones((3, 3, 256, 256), jnp.bfloat16)

    def f(x, w):
        return conv.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC)

    hlo = jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w).astype(jnp.float32)), (0, 1))).lower(x, w)
    hlo = hlo.compile().as_text()
    assert "convolution" not in hlo and "dot" in hlo
    assert "f32[1,10,8,768]" not in hlo  # window copies stay 16-bit (bitcast to uint16)

    # Stride 2 (ResNet stages 2-4, P6/P7): the input gradient too, one GEMM per output phase
    # (XLA's transposed conv ran in f32).
    def s2(x, w):
        return conv.conv_general_dilated(x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=NHWC)

    hlo = jax.jit(jax.grad(lambda x, w: jnp.sum(s2(x, w).astype(jnp.float32)), (0, 1))).lower(x, w)
    assert "convolution" not in hlo.compile().as_text()


# ------------------------------------------------- each CPU path, at shapes that take it
# Error model for a result summing K products of rms magnitude m (m = rms(a) * rms(b) of the two
# factors), against a float64 reference on the *same* operand values (so no operand rounding,
# which would add ~sqrt(K) * 2^-8 * m for bf16 operands):
# - float32 accumulation: GEMM micro-kernels (and XLA's conv) add the K products one after the
#   other; each addition errs by up to u32 |s_k| (u32 = 2^-24) with independent signs, so the
#   error is ~ u32 * sqrt(sum_k s_k^2 / 3). The partial sums s_k are a random walk of size
#   ~sqrt(k) m plus the drift towards the result (k / K) y, which gives
#   rms ~ u32 * sqrt(K) * (sqrt(K / 6) m + |y| / 3) <= u32 * sqrt(K) * (sqrt(K) m + |y|).
#   Tolerance: 4x that unit (measured worst over each result: 1.14x unit, 1x1 forward);
#   Winograd's transforms (sums of up to 4 inputs and 9 products) add rounding: 8x (measured
#   worst 1.89x, kernel gradient);
# - a result in bf16 is rounded once more: + 2^-8 |ref| (round to nearest, 8 significant
#   bits); an f32 result + 2^-24 |ref|.
# A wrong kernel element, tap or layout errs by O(sqrt(K) m), ~10^3 times these bounds.
U32, U16 = 2.0**-24, 2.0**-8
PATHS = ("_conv_rows", "_input_grad_rows", "_input_grad_phases", "_kernel_grad_gemm", "_dot")


def _count_paths(monkeypatch):
    """Counting wrappers (trace time) around conv.py's GEMM forms and winograd.conv3x3."""
    counts = dict.fromkeys(PATHS + ("winograd",), 0)

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    for name in PATHS:
        monkeypatch.setattr(conv, name, counting(name, getattr(conv, name)))
    monkeypatch.setattr(winograd, "conv3x3", counting("winograd", winograd.conv3x3))
    return counts


def _reference64(x, w, g, strides, padding, wrt):
    """lax.conv_general_dilated in float64 on the same operand values: value and the vjp of g."""

    def conv64(x, w):
        return lax.conv_general_dilated(
            x, w, strides, padding, dimension_numbers=NHWC, precision=lax.Precision.HIGHEST
        )

    def f(x, w, g):
        y, vjp = jax.vjp(conv64, x, w)
        dx, dw = vjp(g)
        return [v for v, k in ((y, "y"), (dx, "dx"), (dw, "dw")) if k in wrt]

    with jax.enable_x64(True):
        return [np.asarray(v) for v in jax.jit(f)(*(np.asarray(a, np.float64) for a in (x, w, g)))]


def _ours(x, w, g, strides, padding, preferred, wrt):
    """conv.conv_general_dilated's value and vjp of g, compiled: (results, compiled HLO text)."""

    def ours(x, w):
        return conv.conv_general_dilated(
            x, w, strides, padding, dimension_numbers=NHWC, preferred_element_type=preferred
        )

    def f(x, w, g):
        y, vjp = jax.vjp(ours, x, w)
        dx, dw = vjp(g)
        return {"y": y, "dx": dx, "dw": dw}

    compiled = (
        jax.jit(lambda x, w, g: {k: v for k, v in f(x, w, g).items() if k in wrt}).lower(x, w, g).compile()
    )
    out = compiled(x, w, g)
    return {k: out[k] for k in wrt}, compiled.as_text()


def _assert_close_to_rounding(got, ref, k, m, factor, bf16_result, what):
    tol = factor * U32 * np.sqrt(k) * (np.sqrt(k) * m + np.abs(ref)) + (U16 if bf16_result else U32) * np.abs(
        ref
    )
    err = np.abs(np.asarray(got, np.float64) - ref)
    worst = tuple(int(i) for i in np.unravel_index(np.argmax(err - tol), err.shape))
    assert np.all(err <= tol), (
        f"{what}: error {err[worst]:.3g} > tolerance {tol[worst]:.3g} at "
        f"{worst} (ref {ref[worst]:.4g}; K={k}, m={m:.3g})"
    )


CPU_PATH_CASES = {
    # name: (x shape, kernel shape, stride, pad, operand dtype, preferred, results,
    #        {path function: taken?})
    # 1x1 stride 2 (ResNet downsample): forward, input and kernel gradient are dots.
    "1x1_s2_f32": (
        (2, 32, 32, 64),
        (1, 1, 64, 128),
        2,
        0,
        jnp.float32,
        None,
        ("y", "dx", "dw"),
        {"_dot": True},
    ),
    # f32 3x3 kernel gradient on a 64x64 map, Cin*Cout = 128*512 >= 256^2 (_gemm_kernel_grad);
    # 128 input channels: not Winograd. Forward and input gradient stay XLA's (DCE'd here).
    "kgrad_f32": (
        (1, 64, 64, 128),
        (3, 3, 128, 512),
        1,
        1,
        jnp.float32,
        None,
        ("dw",),
        {"_kernel_grad_gemm": True, "_conv_rows": False, "winograd": False},
    ),
    # bf16 3x3 with both channel counts >= 128 (_gemm_conv): forward, input (stride 1: a conv of
    # g with the flipped kernel; stride 2: one GEMM per output phase) and kernel gradient.
    "gemm_bf16_s1": (
        (2, 16, 16, 128),
        (3, 3, 128, 128),
        1,
        1,
        jnp.bfloat16,
        jnp.float32,
        ("y", "dx", "dw"),
        {
            "_conv_rows": True,
            "_input_grad_rows": True,
            "_input_grad_phases": False,
            "_kernel_grad_gemm": True,
        },
    ),
    "gemm_bf16_s2": (
        (2, 16, 16, 128),
        (3, 3, 128, 128),
        2,
        1,
        jnp.bfloat16,
        jnp.float32,
        ("y", "dx", "dw"),
        {
            "_conv_rows": True,
            "_input_grad_rows": False,
            "_input_grad_phases": True,
            "_kernel_grad_gemm": True,
        },
    ),
    # f32 stride-2 3x3 on an input of GEMM_STRIDED_MIN_ELEMENTS (64*64*1024: layer2.0 at
    # 800x1216 has 4*200*304*128): forward, input gradient per phase, kernel gradient as GEMMs.
    "gemm_f32_s2": (
        (1, 64, 64, 1024),
        (3, 3, 1024, 64),
        2,
        1,
        jnp.float32,
        None,
        ("y", "dx", "dw"),
        {
            "_conv_rows": True,
            "_input_grad_rows": False,
            "_input_grad_phases": True,
            "_kernel_grad_gemm": True,
        },
    ),
    # f32 stride-1 3x3, 128 channels on a 76x76 map (layer2 at 800 px): Winograd.
    "winograd_f32_128": (
        (1, 76, 76, 128),
        (3, 3, 128, 128),
        1,
        1,
        jnp.float32,
        None,
        ("y", "dx", "dw"),
        {"winograd": True, "_conv_rows": False, "_kernel_grad_gemm": False},
    ),
    # f32 stride-1 3x3, 256 -> 256 channels on a 32x32 map: Winograd F(2x2, 3x3), gradients too.
    "winograd_f32": (
        (1, 32, 32, 256),
        (3, 3, 256, 256),
        1,
        1,
        jnp.float32,
        None,
        ("y", "dx", "dw"),
        {"winograd": True, "_conv_rows": False, "_kernel_grad_gemm": False},
    ),
}


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the GEMM paths are CPU-only")
@pytest.mark.parametrize("case", list(CPU_PATH_CASES))
def test_each_cpu_path_is_taken_and_equals_float64_lax(case, monkeypatch):
    """At shapes that satisfy conv.py's path rules, (1) the path is taken (its function is
    traced, and the compiled program has no convolution left), and (2) value, input gradient
    and kernel gradient equal float64 lax.conv_general_dilated on the same operand values to
    float32 accumulation rounding (plus one bf16 rounding for bf16 results; see above)."""
    x_shape, w_shape, stride, pad, dtype, preferred, wrt, paths = CPU_PATH_CASES[case]
    kh, kw, cin, cout = w_shape
    strides, padding = (stride, stride), ((pad, pad), (pad, pad))
    out_hw = [(size + 2 * pad - k) // stride + 1 for size, k in zip(x_shape[1:3], (kh, kw))]
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=x_shape), dtype)
    w = jnp.asarray(rng.normal(size=w_shape), dtype)
    # The cotangent arrives in the output's dtype; conv.py casts it to the operands' (bf16):
    # bf16 values, so that cast is exact and the reference sees the same cotangent.
    g = jnp.asarray(rng.normal(size=(x_shape[0], *out_hw, cout)), dtype).astype(preferred or dtype)

    counts = _count_paths(monkeypatch)
    got, hlo = _ours(x, w, g, strides, padding, preferred, wrt)
    for name, taken in paths.items():
        assert (counts[name] > 0) == taken, f"{case}: {name} traced {counts[name]} times ({counts})"
    assert "convolution" not in hlo and "dot" in hlo, f"{case}: a convolution is left"

    refs = _reference64(x, w, g, strides, padding, wrt)

    def rms(a):
        return float(np.sqrt(np.mean(np.square(np.asarray(a, np.float64)))))

    terms = {
        "y": (kh * kw * cin, rms(x) * rms(w)),  # per output: kh*kw*Cin products x*w
        "dx": (kh * kw * cout, rms(g) * rms(w)),  # per input pixel: up to kh*kw*Cout g*w
        "dw": (x_shape[0] * out_hw[0] * out_hw[1], rms(x) * rms(g)),
    }  # over batch*space
    factor = 8 if paths.get("winograd") else 4
    for key, ref in zip(wrt, refs):
        k, m = terms[key]
        bf16_result = got[key].dtype == jnp.bfloat16
        assert bf16_result == (dtype == jnp.bfloat16 and key != "y")  # preferred f32 output
        _assert_close_to_rounding(got[key], ref, k, m, factor, bf16_result, f"{case} {key}")


@pytest.mark.parametrize(
    "x_shape, w_shape, stride, forms",
    [
        # float32, batch 4; the shapes of the measurements in docs/performance.md ("Per-shape forms").
        ((4, 26, 26, 256), (3, 3, 256, 256), 1, {"winograd"}),  # P4 / layer3 at 416 px
        ((4, 13, 13, 256), (3, 3, 256, 256), 1, set()),  # P5 at 416 px: XLA's
        ((4, 13, 13, 512), (3, 3, 512, 512), 1, set()),  # layer4 at 416 px
        ((4, 100, 152, 128), (3, 3, 128, 128), 1, {"winograd"}),  # layer2 at 800x1216
        ((4, 52, 52, 128), (3, 3, 128, 128), 1, set()),  # layer2 at 416 px
        ((4, 200, 304, 64), (3, 3, 64, 64), 1, set()),  # layer1 at 800x1216
        ((4, 200, 304, 128), (3, 3, 128, 128), 2, {"gemm_conv"}),  # layer2.0 at 800x1216
        ((4, 200, 304, 64), (3, 3, 64, 128), 2, {"gemm_conv"}),  # R18 layer2.0 at 800x1216
        ((4, 25, 38, 2048), (3, 3, 2048, 256), 2, {"gemm_conv"}),  # v2 P6 at 800x1216
        ((4, 104, 104, 64), (3, 3, 64, 128), 2, set()),  # R18 layer2.0 at 416 px
        ((4, 52, 52, 256), (3, 3, 256, 256), 2, set()),  # layer3.0 at 416 px
        ((4, 800, 1216, 3), (7, 7, 3, 64), 2, set()),  # the stem
        ((4, 52, 52, 256), (3, 3, 256, 819), 1, {"winograd"}),  # COCO class conv P3
    ],
)
def test_float32_shape_rules_pick_the_measured_forms(x_shape, w_shape, stride, forms):
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    strides, pads = (stride, stride), ((w_shape[0] // 2,) * 2,) * 2
    got = {
        "winograd": conv._use_winograd(
            jnp.float32, x, jax.ShapeDtypeStruct(w_shape, jnp.float32), strides, pads
        ),
        "gemm_conv": conv._gemm_conv(jnp.float32, x_shape, w_shape, strides),
    }
    assert {k for k, v in got.items() if v} == forms


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the GEMM paths are CPU-only")
def test_float32_strided_gemm_conv_forward_alone_stays_xla(monkeypatch):
    """The large float32 strided conv of ``gemm_f32_s2`` takes the row-GEMM forward only under
    differentiation (training); its forward alone (inference) is XLA's convolution, which is
    faster there, and bit-identical to lax's."""
    counts = _count_paths(monkeypatch)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 64, 64, 1024)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(2).normal(size=(3, 3, 1024, 64)), jnp.float32)

    def f(x, w):
        return conv.conv_general_dilated(x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=NHWC)

    np.testing.assert_array_equal(
        jax.jit(f)(x, w),
        jax.jit(lambda x, w: conv._lax_conv(x, w, (2, 2), ((1, 1), (1, 1)), None, None))(x, w),
    )
    assert counts["_conv_rows"] == 0
    jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w)), (0, 1))).lower(x, w)
    assert counts["_conv_rows"] == 1


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the forms are chosen for the CPU target")
@pytest.mark.parametrize("mode", conv.MODES)
def test_each_ablation_mode_removes_exactly_its_form(mode, monkeypatch):
    """``implementation("no-<form>")`` traces every CPU form but that one ("lax": none), so
    that the benchmarks' ``--also-modes`` measure what each form is worth in a whole step."""
    counts = _count_paths(monkeypatch)
    f32, bf16 = jnp.float32, jnp.bfloat16
    gemm = ("_conv_rows", "_input_grad_rows", "_input_grad_phases", "_kernel_grad_gemm")
    cases = [  # form, the functions it traces, x shape, kernel shape, stride, dtype
        ("1x1", ("_dot",), (2, 8, 8, 16), (1, 1, 16, 32), 1, f32),
        ("winograd", ("winograd",), (1, 26, 26, 256), (3, 3, 256, 256), 1, f32),
        ("gemm", gemm[:2] + gemm[3:], (2, 8, 8, 128), (3, 3, 128, 128), 1, bf16),
        ("gemm", gemm[2:], (2, 8, 8, 128), (3, 3, 128, 128), 2, bf16),
    ]
    taken = set()
    for form, names, x_shape, w_shape, s, dtype in cases:
        pad = ((w_shape[0] // 2,) * 2,) * 2

        def loss(x, w, s=s, pad=pad):
            y = conv.conv_general_dilated(x, w, (s, s), pad, dimension_numbers=NHWC)
            return jnp.sum(y.astype(f32) ** 2)

        counts.update(dict.fromkeys(counts, 0))
        x, w = jax.ShapeDtypeStruct(x_shape, dtype), jax.ShapeDtypeStruct(w_shape, dtype)
        with conv.implementation(mode):
            jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, w)
        assert all(counts[n] > 0 for n in names) or not any(counts[n] > 0 for n in names), counts
        taken |= {form} if counts[names[0]] > 0 else set()
    pools, real_pool = [], cpu_pool.max_pool
    monkeypatch.setattr(cpu_pool, "max_pool", lambda *a: pools.append(a) or real_pool(*a))
    x = jax.ShapeDtypeStruct((2, 16, 16, 8), f32)
    with conv.implementation(mode):
        jax.make_jaxpr(jax.grad(lambda x: jnp.sum(select.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1))))))(x)
    taken |= {"pool"} if pools else set()
    assert taken == (set() if mode == "lax" else {"1x1", "winograd", "gemm", "pool"} - {mode[3:]})


def test_float32_output_args_give_the_conv_float32_operands_to_round():
    """Under ``float32_output_args(bf16)`` nn.Conv hands its f32 kernel (and an f32 input) to the
    conv, which rounds them for the products: a Winograd-sized conv rounds its transforms once
    (``winograd.conv3x3`` with ``compute_dtype``), a 1x1 conv its operands, as a bf16 layer."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(np.maximum(rng.normal(size=(1, 32, 32, 256)), 0), jnp.float32)
    for k in (3, 1):
        layer = nn.Conv(
            256,
            (k, k),
            padding=((k // 2, k // 2),) * 2,
            dtype=jnp.bfloat16,
            **conv.float32_output_args(jnp.bfloat16),
        )
        params = layer.init(jax.random.key(0), x)
        w, b = params["params"]["kernel"], params["params"]["bias"]
        got = jax.jit(layer.apply)(params, x)
        assert got.dtype == jnp.float32
        if k == 3:
            want = winograd.conv3x3(x, w, compute_dtype=jnp.bfloat16, preferred_element_type=jnp.float32) + b
        else:
            want = (
                jnp.dot(
                    x.astype(jnp.bfloat16), w[0, 0].astype(jnp.bfloat16), preferred_element_type=jnp.float32
                )
                + b
            )
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * float(jnp.abs(want).max()))


@pytest.mark.parametrize(
    "shape,k,stride",
    [
        ((1, 8, 8, 16, 36), 3, 1),  # narrow: lax's conv
        ((1, 8, 8, 128, 128), 3, 2),  # bf16 GEMM forward, input gradient per phase (stride 2)
        ((1, 8, 8, 128, 128), 3, 1),  # bf16 GEMM forward and both gradients
        ((1, 32, 32, 256, 256), 3, 1),  # Winograd
        ((1, 8, 8, 64, 32), 1, 2),  # 1x1
    ],
)
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
        y = conv.conv_general_dilated(
            x.astype(dtype),
            w.astype(dtype),
            (stride, stride),
            pad,
            dimension_numbers=NHWC,
            preferred_element_type=preferred,
        )
        return jnp.sum(jnp.sin(y.astype(jnp.float32))), y

    (_, y16), g16 = jax.jit(
        jax.value_and_grad(lambda x, w: loss(x, w, jnp.bfloat16, jnp.float32), (0, 1), has_aux=True)
    )(x, w)
    (_, y32), g32 = jax.jit(
        jax.value_and_grad(lambda x, w: loss(x, w, jnp.float32, None), (0, 1), has_aux=True)
    )(x, w)
    assert y16.dtype == jnp.float32
    np.testing.assert_allclose(y16, y32, atol=0.03 * float(jnp.std(y32)))
    for a, b in zip(g16, g32):
        assert a.dtype == jnp.float32
        # bf16 operands and cotangents (~3 significant digits) summed over up to 1024 pixels.
        np.testing.assert_allclose(a, b, atol=0.05 * float(jnp.std(b)))
