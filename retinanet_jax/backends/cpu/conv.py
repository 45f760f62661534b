"""A drop-in ``lax.conv_general_dilated`` that runs RetinaNet's convolutions faster on CPU.

Why: XLA:CPU (jax 0.10) is slow on some convolution forms that torch's oneDNN runs near peak
(per-shape numbers: ``benchmarks/conv_shapes.py``; 2 cores, batch 4, 512x512):

- 1x1 convs: the forward is 1.5-2.5x slower as a convolution than as a matrix product, and
  their kernel gradient 3-9x slower. On CPU a 1x1 conv here *is* a GEMM
  ``[B*H*W, Cin] x [Cin, Cout]`` (on a strided slice for stride 2), with GEMM gradients.
- kxk kernel gradients with a large feature map and many channels (the 3x3 head convs at
  P3, above all the 819-output class conv) are 1.3-3x slower than the same FLOPs as GEMMs
  of shifted input windows against the output gradient,
  ``dW[i, j] = sum_{b,y,x} xpad[b, s*y + i, s*x + j, :]^T g[b, y, x, :]`` (one GEMM per kernel
  row, its kw taps side by side). On smaller maps XLA's own is as fast, so
  ``_gemm_kernel_grad`` picks by shape.
- bfloat16: XLA:CPU converts bf16 convolutions to f32, but runs bf16 x bf16 -> f32 dots
  natively at ~2x the f32 rate. Wide bf16 kxk convs (``_gemm_conv``) therefore run as GEMMs
  too: forward, input gradient (strided ones one GEMM per output phase) and kernel gradient.
- Stride-1 3x3 convs with many channels on large maps (``_use_winograd``: the P3/P4 head and
  FPN convs, layer3, and layer2 at 800 px) run by Winograd F(2x2, 3x3) (``winograd.py``):
  2.25x fewer multiplications, forward and both gradients, in either dtype.
- float32 strided kxk convs on large inputs (ResNet's first 3x3 of a stage, v2's P6 at 800 px)
  as GEMMs like bf16 ones (XLA's strided convolution falls off there).

GEMMs contracting over batch*space are written as ``transpose(A) @ B`` with the transpose
materialised: XLA:CPU sends that form to its fast matmul library (YNNPACK) but the folded
"contract dim 0" form to a slower generic one. The forward of a float32 kxk conv outside the
Winograd and strided-GEMM rules is lax's (bit-identical); GEMM and Winograd forms equal it to
float rounding.

CPU only: this module is chosen for the CPU target by ``retinanet_jax.backends.select`` (the
one selection point; GPU / TPU programs never trace it). Called directly it emits the CPU forms
whatever the platform. Use with Flax via the selection point,
``nn.Conv(..., conv_general_dilated=retinanet_jax.backends.conv_general_dilated)``, or directly
``nn.Conv(..., conv_general_dilated=retinanet_jax.backends.cpu.conv.conv_general_dilated)``.
Anything but an NHWC/HWIO, undilated, ungrouped conv with explicit padding falls back to
``lax.conv_general_dilated`` unchanged; ``with conv.implementation("lax"):`` does so for every
conv traced inside (for benchmarks and A/B tests), ``"no-winograd"``, ``"no-1x1"``,
``"no-gemm"`` and ``"no-pool"`` leave out one CPU form (per-form ablations: is each still worth
it on a machine?).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from retinanet_jax.backends.cpu import winograd

_NHWC = ("NHWC", "HWIO", "NHWC")
_MODE = contextvars.ContextVar("retinanet_jax_conv_mode", default="auto")
_FAST = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))  # the dtypes the CPU forms are for
# "auto": every CPU form where its rule applies; "lax": none (plain lax); "no-<form>": every
# form but one, for per-form ablations (``--also-modes`` of the benchmarks): "winograd"
# (``_use_winograd``), "1x1" (1x1 convs as GEMMs), "gemm" (kxk convs and kernel gradients as
# GEMMs: ``_gemm_conv``, ``_gemm_kernel_grad``), "pool" (the stem max pool's backward,
# ``pool.py``: ``backends.select`` asks :func:`form_enabled`).
MODES = ("auto", "lax", "no-winograd", "no-1x1", "no-gemm", "no-pool")


@contextlib.contextmanager
def implementation(mode: str) -> Iterator[None]:
    """Trace-time switch: "auto" (default: on CPU, Winograd for wide stride-1 3x3 convs and
    GEMM paths where they pay off), "lax" (plain ``lax.conv_general_dilated``), or
    "no-winograd" / "no-1x1" / "no-gemm" / "no-pool" (every form but that one: ``MODES``).
    Only affects functions *traced* inside."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    token = _MODE.set(mode)
    try:
        yield
    finally:
        _MODE.reset(token)


def form_enabled(form: str) -> bool:
    """Whether the CPU form ``form`` ("winograd", "1x1", "gemm", "pool") may be traced under the
    :func:`implementation` mode in force: every form in "auto", none in "lax", all but ``form``
    in "no-<form>". Read at trace time."""
    mode = _MODE.get()
    return mode != "lax" and mode != f"no-{form}"


def _is_nhwc(dimension_numbers: Any, lhs_ndim: int) -> bool:
    if dimension_numbers is None or lhs_ndim != 4:
        return False
    want = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), _NHWC)
    if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        return tuple(map(tuple, dimension_numbers)) == tuple(map(tuple, want))
    return tuple(dimension_numbers) == _NHWC


def _lax_conv(x, w, strides, padding, precision, preferred):
    return lax.conv_general_dilated(
        x,
        w,
        strides,
        padding,
        dimension_numbers=_NHWC,
        precision=precision,
        preferred_element_type=preferred,
    )


def _out_dtype(x, w, preferred):
    return preferred if preferred is not None else jnp.result_type(x, w)


def _bits(x):
    """16-bit floats as uint16 for pure data movement (pad / slice / concat / transpose).

    XLA:CPU's float normalization runs most bf16 ops, copies included, through f32: a
    bf16 window copy became convert -> f32 copy -> convert (2x the bytes, 3 passes).
    Integer views move as they are; ``_unbits`` restores the type before a dot."""
    return lax.bitcast_convert_type(x, jnp.uint16) if x.dtype == jnp.bfloat16 else x


def _unbits(x, dtype):
    return lax.bitcast_convert_type(x, dtype) if x.dtype != dtype else x


def _is_1x1(w, padding) -> bool:
    return w.shape[:2] == (1, 1) and all(p == (0, 0) for p in padding)


def _strided(x, strides):
    """The pixels a padding-free 1x1 conv reads: ``x[:, ::sy, ::sx]``."""
    if strides == (1, 1):
        return x
    return _unbits(lax.slice(_bits(x), (0,) * 4, x.shape, (1, *strides, 1)), x.dtype)


def _dot(a, b, precision):
    # f32 accumulation: XLA:CPU runs bf16 x bf16 -> f32 dots natively (~2x f32), but
    # bf16 -> bf16 ones through a slow conversion.
    acc = jnp.promote_types(a.dtype, jnp.float32)
    return jnp.dot(a, b, precision=precision, preferred_element_type=acc)


def _transposed(a):
    # Materialised transpose: without the barrier XLA folds it into the dot's dimension
    # numbers, which XLA:CPU then runs through its generic (slower) dot. (XLA:CPU drops
    # barriers before fusion, so a's elementwise producers may still fuse into the copy.)
    if a.dtype == jnp.bfloat16:
        # bf16: the barrier does not stop the folding, and the folded dot then runs in f32
        # (see winograd.swap_last_axes; in f32 the barrier form is ~10% faster than that one).
        return winograd.swap_last_axes(a)
    return _unbits(lax.optimization_barrier(_bits(a).T), a.dtype)


def _gemm_kernel_grad(x_shape, w_shape, g_shape) -> bool:
    """CPU only: kernel gradient as GEMMs (True) or XLA's convolution (False).

    1x1: always (3-7x faster). kxk: when the output map and both channel counts are large
    (>= 64x64 and Cin*Cout >= 256*256: RetinaNet's P3 head convs, 1.3-3x faster); on
    smaller maps or narrow convs (regression 36 outputs, ResNet 128-channel 3x3s) XLA's
    convolution is as fast or faster.
    """
    kh, kw, cin, cout = w_shape
    if (kh, kw) == (1, 1):
        return True
    return g_shape[1] * g_shape[2] >= 64 * 64 and cin * cout >= 256 * 256


def _row_windows(x, kernel_hw, strides, padding, out_hw):
    """For each kernel row i, the input windows of its kw taps side by side:
    ``[B*oh*ow, kw*Cin]`` (kept as uint16 bits, see ``_bits``)."""
    (kh, kw), (sy, sx), (oh, ow) = kernel_hw, strides, out_hw
    (pt, pb), (pl, pr) = padding
    xp = jnp.pad(_bits(x), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    n, hp, _, cin = xp.shape
    cols = (
        jnp.concatenate(
            [
                lax.slice(xp, (0, 0, j, 0), (n, hp, j + (ow - 1) * sx + 1, cin), (1, 1, sx, 1))
                for j in range(kw)
            ],
            axis=-1,
        )
        if kw > 1
        else xp[:, :, : (ow - 1) * sx + 1 : sx]
    )
    return [
        lax.slice(cols, (0, i, 0, 0), (n, i + (oh - 1) * sy + 1, ow, kw * cin), (1, sy, 1, 1)).reshape(
            -1, kw * cin
        )
        for i in range(kh)
    ]


def _kernel_grad_gemm(x, g, kernel_hw, strides, padding, precision):
    """f32 dW [kh, kw, Cin, Cout] as kh GEMMs ``g^T [Cout, M] @ rows_i [M, kw*Cin]`` over the
    M = batch*space positions (g transposed once, shared by all kernel rows)."""
    n, oh, ow, cout = g.shape
    g_t = _transposed(g.reshape(-1, cout))
    rows = _row_windows(x, kernel_hw, strides, padding, (oh, ow))
    dw_t = jnp.stack([_dot(g_t, _unbits(r, x.dtype), precision) for r in rows])
    return dw_t.reshape(kernel_hw[0], cout, kernel_hw[1], x.shape[-1]).transpose(0, 2, 3, 1)


# Where Winograd beats XLA's convolution (f32) or the GEMM forms below (bf16), timed per conv
# (forward + both gradients, batch 4, 2-core AVX-512 CPU; docs/performance.md, "Per-shape forms"):
# (min channels, min output pixels per image) pairs, a conv qualifies under any of them.
# float32: 256+ channels from 26x26 maps on (P4 / layer3 at 416 px: 48 against 54-60 ms, at
# 13x13 slower: 94 against 66), 128 channels from 76x76 on (layer2 at 800x1216, 100x152: 368
# against 827 ms, XLA's convolution falls off there; at 64x64 no faster). bfloat16: 256+
# channels from 32x32 (below that the GEMM forms).
WINOGRAD_RULES = {
    jnp.dtype(jnp.float32): ((256, 26 * 26), (128, 76 * 76)),
    jnp.dtype(jnp.bfloat16): ((256, 32 * 32),),
}


def _use_winograd(dtype, x, w, strides, padding) -> bool:
    """CPU only: a stride-1 3x3 conv by Winograd F(2x2, 3x3) (``winograd.py``).

    2.25x fewer multiplications for forward, input and kernel gradient, but memory-bound
    transforms and 16 small GEMMs per conv: used where measured faster (``WINOGRAD_RULES``:
    wide channels on large enough maps; elsewhere XLA's conv in float32, the GEMM forms below
    in bfloat16).
    """
    rules = WINOGRAD_RULES.get(jnp.dtype(dtype), ())
    out_pixels = (x.shape[1] + sum(padding[0]) - 2) * (x.shape[2] + sum(padding[1]) - 2)
    channels = min(w.shape[2], w.shape[3])
    return (
        w.shape[:2] == (3, 3)
        and strides == (1, 1)
        and all(lo <= 1 and hi <= 1 for lo, hi in padding)
        and any(channels >= c and out_pixels >= p for c, p in rules)
    )


# A float32 strided kxk conv runs as GEMMs (row-GEMM forward, input gradient per output phase,
# GEMM kernel gradient) from this many input elements (batch * H * W * Cin) on: XLA's strided
# convolution and its transpose fall off on large inputs (layer2.0 at 800x1216, 200x304x128:
# 623 against 1220 ms; layer3.0 100x152x256: 465 against 731; v2's P6 on C5, 25x38x2048: 222
# against 364) and tie below (layer3.0 / layer4.0 at 416 px, 2.8M and 1.4M elements).
GEMM_STRIDED_MIN_ELEMENTS = 4 * 2**20


def _gemm_conv(x_dtype, x_shape, w_shape, strides) -> bool:
    """CPU only: a kxk conv as GEMMs: forward, input gradient (stride 1: a conv of g with the
    flipped kernel; strided: one GEMM per output phase) and kernel gradient.

    bfloat16: XLA:CPU runs bf16 convolutions in f32 (it converts them), but bf16 x bf16 -> f32
    dots natively at ~2x the f32 rate. The GEMM form pays for window copies and f32 partial
    sums, so it is kept to convs with both channel counts >= 128 (everything but the stem and
    the 36-output regression conv; 256 instead of 128 was 2.6% slower per train step, 32 no
    faster). float32: strided convs with 64+ channels on inputs of
    ``GEMM_STRIDED_MIN_ELEMENTS`` or more; other f32 kxk convs stay XLA's (stride 1: as fast
    as the f32 GEMM forms or faster, the stem: no faster form found).
    """
    channels = min(w_shape[2], w_shape[3])
    if x_dtype == jnp.bfloat16:
        return channels >= 128
    return (
        x_dtype == jnp.float32
        and strides != (1, 1)
        and channels >= 64
        and x_shape[0] * x_shape[1] * x_shape[2] * x_shape[3] >= GEMM_STRIDED_MIN_ELEMENTS
    )


def _conv_rows(x, w, strides, padding, precision):
    """f32 result of a kxk conv as kh GEMMs ``rows_i [B*oh*ow, kw*Cin] @ [kw*Cin, Cout]``
    (K = kw*Cin: fewer, larger GEMMs than k*k single taps)."""
    kh, kw, cin, cout = w.shape
    (pt, pb), (pl, pr) = padding
    oh = (x.shape[1] + pt + pb - kh) // strides[0] + 1
    ow = (x.shape[2] + pl + pr - kw) // strides[1] + 1
    rows = _row_windows(x, (kh, kw), strides, padding, (oh, ow))
    y = sum(_dot(_unbits(r, x.dtype), w[i].reshape(kw * cin, cout), precision) for i, r in enumerate(rows))
    return y.reshape(x.shape[0], oh, ow, cout)


def _input_grad_rows(w, g, x_hw, padding, precision):
    """Stride-1 input gradient: the conv of g with the flipped, in/out-swapped kernel."""
    kh, kw = w.shape[:2]
    pads = []
    for size, out, k, (lo, _) in zip(x_hw, g.shape[1:3], (kh, kw), padding):
        top = k - 1 - lo
        pads.append((top, size - out + k - 1 - top))
    w_t = w[::-1, ::-1].transpose(0, 1, 3, 2)
    return _conv_rows(g, w_t, (1, 1), tuple(pads), precision)


def _input_grad_phases(w, g, x_hw, strides, padding, precision):
    """Strided input gradient as GEMMs, one per output phase (sub-pixel decomposition).

    Input row ``r = s*m + p`` (phase p) receives ``g[m + d_t] w[t]`` from exactly the taps t with
    ``(p + lo - t) % s == 0``, ``d_t = (p + lo - t) // s``: per phase a stride-1 product of
    shifted g windows ``[B*mh*mw, taps*Cout]`` with those taps ``[taps*Cout, Cin]`` (3x3 stride
    2: 1, 2, 2 and 4 taps, the 9 in all). The phases are then interleaved. f32 result.
    """
    kh, kw, cin, cout = w.shape
    n = g.shape[0]
    mh, mw = (-(-size // s) for size, s in zip(x_hw, strides))

    def taps(k, s, lo, p):
        return [(t, (p + lo - t) // s) for t in range(k) if (p + lo - t) % s == 0]

    phase_taps = [[taps(k, s, lo, p) for p in range(s)] for k, s, (lo, _) in zip((kh, kw), strides, padding)]
    shifts = [[d for ph in axis for _, d in ph] or [0] for axis in phase_taps]
    before = [max(0, -min(d)) for d in shifts]  # zero rows/cols where m + d falls outside g
    after = [max(0, m + max(d) - size) for m, d, size in zip((mh, mw), shifts, g.shape[1:3])]
    gp = jnp.pad(_bits(g), ((0, 0), (before[0], after[0]), (before[1], after[1]), (0, 0)))
    phases = []
    for ty in phase_taps[0]:
        row = []
        for tx in phase_taps[1]:
            if not ty or not tx:
                row.append(jnp.zeros((n * mh * mw, cin), jnp.float32))
                continue
            wins = [
                lax.slice(
                    gp,
                    (0, before[0] + dy, before[1] + dx, 0),
                    (n, before[0] + dy + mh, before[1] + dx + mw, cout),
                )
                for _, dy in ty
                for _, dx in tx
            ]
            cols = _unbits(jnp.concatenate(wins, axis=-1), g.dtype).reshape(-1, len(wins) * cout)
            w_p = jnp.concatenate([w[i, j].T for i, _ in ty for j, _ in tx], axis=0)
            row.append(_dot(cols, w_p, precision))
        phases.append(jnp.stack(row))
    dx = jnp.stack(phases).reshape(strides[0], strides[1], n, mh, mw, cin)
    dx = dx.transpose(2, 3, 0, 4, 1, 5).reshape(n, mh * strides[0], mw * strides[1], cin)
    return dx[:, : x_hw[0], : x_hw[1]]


def _conv_cpu(x, w, strides, padding, precision, preferred, gemm, differentiated=False):
    if not _is_1x1(w, padding):
        # A float32 GEMM conv (strided, large) takes the row-GEMM forward only in a program that
        # also takes its gradient (``_conv_fwd``): there its row windows are shared with the
        # kernel gradient's and the pair is faster (layer2.0 / layer3.0 at 800x1216: 973 / 719
        # against 1006 / 801 ms with XLA's forward); alone (inference) XLA's strided forward is
        # 1.1-2.3x faster than the row GEMMs. bf16: always (XLA runs bf16 convs in f32).
        gemm_forward = x.dtype != jnp.float32 or differentiated
        if gemm and gemm_forward and _gemm_conv(x.dtype, x.shape, w.shape, strides):
            return _conv_rows(x, w, strides, padding, precision).astype(_out_dtype(x, w, preferred))
        return _lax_conv(x, w, strides, padding, precision, preferred)
    y = _dot(_strided(x, strides), w[0, 0], precision)  # [B,h,w,Cin] @ [Cin,Cout]
    return y.astype(_out_dtype(x, w, preferred))


def _grads_lax(x, w, g, strides, padding, precision, preferred):
    # Gradients in the operands' dtype whatever ``preferred`` (a bf16 conv with f32 output
    # still back-propagates bf16, as every other bf16 layer): differentiate the conv without
    # it, the cotangent cast to match.
    del preferred
    g = g.astype(jnp.result_type(x, w))
    _, vjp = jax.vjp(lambda x_, w_: _lax_conv(x_, w_, strides, padding, precision, None), x, w)
    return vjp(g)


def _grads_cpu(x, w, g, strides, padding, precision, preferred, gemm):
    g = g.astype(x.dtype)
    if _is_1x1(w, padding):
        xs = _strided(x, strides)
        dxs = _dot(g, w[0, 0].T, precision).astype(x.dtype)
        # Stride s: the conv read every s-th pixel; the others get zero gradient.
        pads = (
            [(0, 0, 0)]
            + [
                (0, size - ((out - 1) * s + 1), s - 1)
                for size, out, s in zip(x.shape[1:3], g.shape[1:3], strides)
            ]
            + [(0, 0, 0)]
        )
        dx = _unbits(lax.pad(_bits(dxs), jnp.zeros((), _bits(dxs).dtype), pads), x.dtype)
        c, o = x.shape[-1], g.shape[-1]
        x2, g2 = xs.reshape(-1, c), g.reshape(-1, o)
        # Transpose the narrower operand (less memory traffic). Not in bf16: XLA folds the
        # result's transpose into the dot, which then has a transposed bf16 operand again, and
        # XLA:CPU (jax 0.10) cannot run that ("Unsupported element type for DotThunk").
        if c <= o or x2.dtype == jnp.bfloat16:
            dw = _dot(_transposed(x2), g2, precision)
        else:
            dw = _dot(_transposed(g2), x2, precision).T
        return dx, dw[None, None].astype(w.dtype)
    gemm_conv = gemm and _gemm_conv(x.dtype, x.shape, w.shape, strides)
    if not (gemm_conv or (gemm and _gemm_kernel_grad(x.shape, w.shape, g.shape))):
        return _grads_lax(x, w, g, strides, padding, precision, preferred)
    if gemm_conv and strides == (1, 1):
        dx = _input_grad_rows(w, g, x.shape[1:3], padding, precision).astype(x.dtype)
    elif gemm_conv:
        # Stride 2 (ResNet's first 3x3 of stages 2-4, P6/P7): bf16 1.6-1.7x faster than XLA's
        # transposed conv, which it runs in f32; large f32 ones, see GEMM_STRIDED_MIN_ELEMENTS.
        dx = _input_grad_phases(w, g, x.shape[1:3], strides, padding, precision).astype(x.dtype)
    else:
        # Input gradient: lax's transpose rule. jax.vjp re-traces the forward, which XLA
        # removes as dead code since only the cotangent is used.
        _, vjp_x = jax.vjp(lambda x_: _lax_conv(x_, w, strides, padding, precision, None), x)
        (dx,) = vjp_x(g)  # g is in x's dtype here (see _grads_lax)
    dw = _kernel_grad_gemm(x, g, w.shape[:2], strides, padding, precision)
    return dx, dw.astype(w.dtype)


def _plain(
    dimension_numbers, lhs_ndim, padding, lhs_dilation, rhs_dilation, feature_group_count, batch_group_count
) -> bool:
    """An NHWC/HWIO, undilated, ungrouped conv with explicit padding (the forms handled here)."""
    return (
        _is_nhwc(dimension_numbers, lhs_ndim)
        and not isinstance(padding, str)
        and all(d == 1 for d in (lhs_dilation or (1, 1)))
        and all(d == 1 for d in (rhs_dilation or (1, 1)))
        and feature_group_count == 1
        and batch_group_count == 1
    )


# ``gemm``: whether the kxk GEMM forms may be used (False in mode "no-gemm"; a static argument,
# decided when the forward is traced, so the backward agrees with it).
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _conv(x, w, strides, padding, precision, preferred, gemm):
    return _conv_cpu(x, w, strides, padding, precision, preferred, gemm)


def _conv_fwd(x, w, strides, padding, precision, preferred, gemm):
    # Only under differentiation (jax.custom_vjp); an undifferentiated call runs ``_conv``.
    out = _conv_cpu(x, w, strides, padding, precision, preferred, gemm, differentiated=True)
    return out, (x, w)


def _conv_bwd(strides, padding, precision, preferred, gemm, res, g):
    x, w = res
    return _grads_cpu(x, w, g, strides, padding, precision, preferred, gemm)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    compute_dtype: Any = None,
) -> jax.Array:
    """``lax.conv_general_dilated`` (same signature and result, up to float rounding for 1x1
    kernels) with the CPU GEMM paths above for NHWC/HWIO ``[B,H,W,Cin] x [kh,kw,Cin,Cout]``.

    ``compute_dtype`` (e.g. bf16; None = the operands' own): the precision of the products
    whatever precision the operands arrive in. Winograd rounds its *transformed* operands to it
    (so an f32 input or kernel is rounded once, not before and again after its transform: per
    bf16 Winograd conv 1.49x the rms error of a direct bf16 conv instead of 1.73x, measured on
    ReLU'd normal inputs); every other form rounds the operands."""
    plain = _plain(
        dimension_numbers,
        lhs.ndim,
        padding,
        lhs_dilation,
        rhs_dilation,
        feature_group_count,
        batch_group_count,
    )
    cd = jnp.dtype(compute_dtype) if compute_dtype is not None else None
    # The forms here are speed paths for float32 / bfloat16; any other dtype (float64: the
    # multi-device equality tests) gets lax's convolution.
    plain = plain and jnp.dtype(cd if cd is not None else jnp.result_type(lhs, rhs)) in _FAST
    if plain:
        strides = tuple(int(s) for s in window_strides)
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
        plain = form_enabled("1x1") or not _is_1x1(rhs, pads)
    if plain and form_enabled("winograd"):
        if _use_winograd(cd if cd is not None else jnp.result_type(lhs, rhs), lhs, rhs, strides, pads):
            # Its gradients are Winograd-form GEMMs too (see winograd.py), so no _conv custom_vjp.
            return winograd.conv3x3(
                lhs,
                rhs,
                padding=pads,
                precision=precision,
                preferred_element_type=preferred_element_type,
                compute_dtype=cd,
            )
    if cd is not None:
        lhs, rhs = lhs.astype(cd), rhs.astype(cd)
    if not plain or _MODE.get() == "lax":
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation,
            rhs_dilation,
            dimension_numbers,
            feature_group_count,
            batch_group_count,
            precision,
            preferred_element_type,
        )
    return _conv(lhs, rhs, strides, pads, precision, preferred_element_type, form_enabled("gemm"))


def _promote_none(inputs, kernel, bias, dtype=None):
    # nn.Conv's promote_dtype hook: operands and bias as they are; the conv rounds the operands
    # to its compute_dtype itself (Winograd after its transforms), the bias stays float32.
    del dtype
    return inputs, kernel, bias


def float32_output_args(dtype: Any) -> dict[str, Any]:
    """``nn.Conv`` keyword arguments: products in ``dtype``, output and bias add in float32.

    For a bfloat16 conv whose output goes on in f32 (a bias add, a norm): the GEMMs accumulate
    in f32 anyway, so the output costs no rounding. A bf16 bias would (one in [4, 8) sits on a
    1/32 grid), and with the bias added in f32 its gradient, a sum over batch*space, is
    accumulated in f32 (jax sums a bf16 cotangent with bf16 partial sums, slowly on CPU, and
    loses the small terms). The f32 kernel (and an f32 input) reach the conv unrounded: see
    ``compute_dtype`` in ``conv_general_dilated``. float32 ``dtype``: the plain hook.
    """
    if jnp.dtype(dtype or jnp.float32) == jnp.float32:
        return dict(conv_general_dilated=conv_general_dilated)
    return dict(
        conv_general_dilated=functools.partial(
            conv_general_dilated, compute_dtype=dtype, preferred_element_type=jnp.float32
        ),
        promote_dtype=_promote_none,
    )
