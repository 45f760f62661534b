"""Winograd F(2x2, 3x3): a stride-1 3x3 convolution with 2.25x fewer multiplications.

Why: RetinaNet's heads are ten 3x3 stride-1 convs per pyramid level (about 60% of a
ResNet-50-FPN training step's FLOPs, the FPN and ResNet 3x3s add more). Direct convolution
(XLA's, or torch's oneDNN) spends 9 multiply-adds per output pixel and channel pair; Winograd's
minimal filtering (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016)
spends 16 per 2x2 output tile, i.e. 4. On CPU the work becomes 16 independent GEMMs
``V[t] [M, Cin] @ U[t] [Cin, Cout]`` over the M = batch*tiles positions, which XLA:CPU runs
near its matmul peak, plus elementwise transforms:

    y_tile = A^T [ (G w G^T) (.) (B^T d B) ] A,    d = the 4x4 input window of a 2x2 tile.

jax's autodiff gives the backward in the same form: the input gradient is 16 GEMMs
``dM[t] @ U[t]^T`` and the kernel gradient 16 GEMMs ``V[t]^T @ dM[t]`` (both 2.25x fewer
FLOPs than direct; ``_gemms`` picks their form), with the transposed transforms around them.
F(2x2, 3x3)'s transform coefficients are 0, +-1 and 1/2, so float32 results differ from direct
convolution by rounding only (max error ~1e-5 of the output scale, tests/test_winograd.py).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Lavin & Gray (2016), F(2x2, 3x3). B^T and A^T are applied by hand below (adds only).
_G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]], np.float32)
# A (4x2) = (A^T)^T; _AA[4a+b, 2p+q] = A[a,p] A[b,q] maps a tile's 2x2 output gradient to its 16
# transformed planes (the transpose of the output transform).
_A = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, -1.0], [0.0, -1.0]], np.float32)
_AA = np.einsum("ap,bq->abpq", _A, _A).reshape(16, 4)


def _input_1d(d0: Array, d1: Array, d2: Array, d3: Array) -> tuple[Array, ...]:
    """B^T applied along one axis of a 4-tap window: B^T = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]]."""
    return d0 - d2, d1 + d2, d2 - d1, d1 - d3


def _output_1d(m0: Array, m1: Array, m2: Array, m3: Array) -> tuple[Array, Array]:
    """A^T applied along one axis: A^T = [[1,1,1,0],[0,1,-1,-1]]."""
    return m0 + m1 + m2, m1 - m2 - m3


def kernel_transform(w: Array) -> Array:
    """``U = G w G^T`` for each (Cin, Cout) pair. w: [3, 3, Cin, Cout] HWIO -> [16, Cin, Cout] f32."""
    g = jnp.asarray(_G)
    u = jnp.einsum("ai,ijck,bj->abck", g, w.astype(jnp.float32), g, precision=jax.lax.Precision.HIGHEST)
    return u.reshape(16, *w.shape[2:])


def input_transform(x: Array, padding: Sequence[tuple[int, int]]) -> tuple[list[Array], tuple[int, ...]]:
    """``V = B^T d B`` for every 4x4 window at stride 2. x: [B, H, W, Cin] NHWC.

    Returns the 16 planes of V, each [B*th*tw, Cin] (t = 4*row + col of the transformed tile;
    kept apart, not stacked: a stacked V costs a copy per GEMM operand), and
    (B, th, tw, oh, ow): tile counts and the convolution's output size.
    """
    (pt, pb), (pl, pr) = padding
    n, h, w, c = x.shape
    oh, ow = h + pt + pb - 2, w + pl + pr - 2
    th, tw = -(-oh // 2), -(-ow // 2)
    # Tiles cover 2*th+2 rows: zero rows beyond the conv's own padding only feed the extra
    # output row/column of an odd-sized output, which is cropped.
    xp = jnp.pad(x, ((0, 0), (pt, 2 * th + 2 - h - pt), (pl, 2 * tw + 2 - w - pl), (0, 0)))
    rows = _input_1d(*[xp[:, i : i + 2 * th : 2] for i in range(4)])
    v = [t for r in rows for t in _input_1d(*[r[:, :, j : j + 2 * tw : 2] for j in range(4)])]
    return [t.reshape(n * th * tw, c) for t in v], (n, th, tw, oh, ow)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def output_transform(m: Sequence[Array], dims: tuple[int, ...]) -> Array:
    """``y = A^T m A``: the 16 planes [B*th*tw, Cout] -> y [B, oh, ow, Cout]."""
    n, th, tw, oh, ow = dims
    m = [t.reshape(n, th, tw, -1) for t in m]
    # Along tile rows (plane t = 4*a + b), for each column b: s[p][b], p = output row.
    cols = [_output_1d(*[m[4 * a + b] for a in range(4)]) for b in range(4)]
    y = [_output_1d(*[cols[b][p] for b in range(4)]) for p in range(2)]  # y[p][q]
    y = jnp.stack([jnp.stack(yp, axis=3) for yp in y], axis=2)  # [B, th, 2, tw, 2, Cout]
    return y.reshape(n, 2 * th, 2 * tw, -1)[:, :oh, :ow]


def _output_transform_fwd(m, dims):
    return output_transform(m, dims), jnp.zeros((), m[0].dtype)  # the planes' dtype


def _output_transform_bwd(dims, like, g):
    """dm = (A (x) A) g per tile: one [16, 4] x [4, B*th*tw*Cout] product on g laid out by
    output position within the tile (one copy of g).

    Why not the 16 sums autodiff writes: XLA:CPU fuses g's producer into each of those 16
    consumers, so it is recomputed by each of the 9 planes that read an element. For the class
    logits that producer is the whole focal-loss gradient (about a tenth of a bf16 train step
    went there); a matrix product reads its operand once, from one materialised copy.
    Coefficients are 0 and +-1, so the f32 result is the same sums."""
    n, th, tw, oh, ow = dims
    c = g.shape[-1]
    g = jnp.pad(g, ((0, 0), (0, 2 * th - oh), (0, 2 * tw - ow), (0, 0)))  # cropped outputs: 0
    g = g.reshape(n, th, 2, tw, 2, c).transpose(2, 4, 0, 1, 3, 5).reshape(4, -1)
    dm = jnp.dot(jnp.asarray(_AA, g.dtype), g, preferred_element_type=jnp.float32)
    return (tuple(dm.reshape(16, n * th * tw, c).astype(like.dtype)),)


output_transform.defvjp(_output_transform_fwd, _output_transform_bwd)


@jax.custom_vjp
def _gemms(v: tuple[Array, ...], u: Array) -> tuple[Array, ...]:
    """The 16 products ``V[t] [M, Cin] @ U[t] [Cin, Cout]`` -> f32 [M, Cout] each.

    Forward: 16 plain dots on the separate planes (bf16 x bf16 -> f32 runs natively on CPU).
    Backward: two batched dots over stacked planes, ``dV = dM U^T`` and ``dU = V^T dM`` (as
    separate dots the kernel gradient contracts over M, a form XLA:CPU runs slowly)."""
    return tuple(jnp.dot(v_t, u[t], preferred_element_type=jnp.float32) for t, v_t in enumerate(v))


def _gemms_fwd(v, u):
    return _gemms(v, u), (v, u)


def swap_last_axes(a: Array) -> Array:
    """``a`` with its last two axes swapped, as a copy XLA:CPU keeps for a bf16 matrix product.

    A plain bf16 transpose feeding a dot is folded into the dot's dimension numbers, and
    XLA:CPU (jax 0.10) then runs that dot in f32, both operands converted and copied (1.5-2x
    slower). Built from the transposes of two halves it is not folded and the dot stays
    bf16 x bf16 -> f32. Moved as uint16 bits (XLA:CPU copies bf16 through f32). Other dtypes:
    a plain transpose."""
    perm = (*range(a.ndim - 2), a.ndim - 1, a.ndim - 2)
    if a.dtype != jnp.bfloat16 or a.shape[-1] < 2:
        return a.transpose(perm)
    b, h = jax.lax.bitcast_convert_type(a, jnp.uint16), a.shape[-1] // 2
    b = jnp.concatenate([b[..., :h].transpose(perm), b[..., h:].transpose(perm)], axis=-2)
    return jax.lax.bitcast_convert_type(b, a.dtype)


def _gemms_bwd(res, g):
    v, u = res
    dm = jnp.stack(g).astype(u.dtype)
    dv = jnp.einsum("tmk,tck->tmc", dm, u, preferred_element_type=jnp.float32)
    du = jnp.einsum("tcm,tmk->tck", swap_last_axes(jnp.stack(v)), dm, preferred_element_type=jnp.float32)
    return tuple(dv[t].astype(v_t.dtype) for t, v_t in enumerate(v)), du.astype(u.dtype)


_gemms.defvjp(_gemms_fwd, _gemms_bwd)


def conv3x3(
    x: Array,
    w: Array,
    padding: Sequence[tuple[int, int]] = ((1, 1), (1, 1)),
    precision: Any = None,
    preferred_element_type: Any = None,
    compute_dtype: Any = None,
) -> Array:
    """Stride-1, undilated 3x3 convolution by Winograd F(2x2, 3x3).

    x: [B, H, W, Cin] NHWC, w: [3, 3, Cin, Cout] HWIO, padding ((top, bottom), (left, right)).
    Returns [B, H + top + bottom - 2, W + left + right - 2, Cout], equal to
    ``lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=NHWC)`` up to float
    rounding. Transforms run in float32; the GEMMs in ``compute_dtype`` (default: the operands'
    common dtype) with f32 accumulation. The transformed operands are rounded to it once, so
    f32 ``x`` / ``w`` with a bf16 ``compute_dtype`` avoid rounding them before the transform as
    well (per conv 1.49x the rms error of a direct bf16 conv instead of 1.73x: the transforms'
    sums and differences cancel, so their rounding costs more than the operands').
    """
    if w.shape[:2] != (3, 3):
        raise ValueError(f"conv3x3 needs a 3x3 kernel, got {w.shape}")
    cd = compute_dtype if compute_dtype is not None else jnp.result_type(x, w)
    out_dtype = preferred_element_type or cd
    with jax.named_scope("winograd"):  # marks the form in lowered modules (op locations)
        v, dims = input_transform(x.astype(jnp.float32), padding)
        u = kernel_transform(w).astype(cd)
        m = _gemms(tuple(v_t.astype(cd) for v_t in v), u)
        return output_transform(m, dims).astype(out_dtype)
