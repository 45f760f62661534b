"""ResNet's stem max pool with a backward that XLA:CPU runs fast.

Why: jax differentiates ``lax.reduce_window`` max by ``select_and_scatter_add``, which XLA:CPU
(jax 0.10) runs as a variadic reduce-window over the input and four int32 iota planes (the
argmax's coordinates) followed by a scatter: 52-74 ms per training step for the 3x3 / 2 pool on
4 x 208 x 208 x 64 (400 px), besides the iotas themselves; torchvision's whole stem backward is
~45-80 ms (``benchmarks/train_step_vs_torchvision.py --profile``, docs/performance.md).

Here the gradient is routed tap by tap: for each of the kh*kw window offsets, in row-major
order, the outputs whose maximum sits at that offset (and at no earlier one) send their
cotangent to it; each phase of the input grid (row and column modulo the stride) sums the
shifted planes of the taps that land on it, and the phases are interleaved (one pass). The
first maximum in row-major order takes the gradient, as in XLA's ``select_and_scatter`` with
``ge`` (jax's rule) and in torch's ``max_pool2d`` CPU kernel (strict ``>`` scan), so ties
(ReLU zeros) go where they go there: 2-2.5x faster than jax's on the stem's shape (fwd + bwd,
4 x 208 x 208 x 64).

CPU only: chosen for the CPU target by ``retinanet_jax.backends.select`` (GPU / TPU programs use
``lax.reduce_window`` and its own gradient).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def _padded(x: jax.Array, padding) -> jax.Array:
    # -inf padding, as nn.max_pool / torch's MaxPool2d: a pad value is never a window's maximum.
    pads = ((0, 0, 0), *((lo, hi, 0) for lo, hi in padding), (0, 0, 0))
    return lax.pad(x, jnp.array(-jnp.inf, x.dtype), pads)


def _forward(x, window, strides, padding):
    return lax.reduce_window(
        x, -jnp.inf, lax.max, (1, *window, 1), (1, *strides, 1), ((0, 0), *padding, (0, 0))
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, padding):
    return _forward(x, window, strides, padding)


def _max_pool_fwd(x, window, strides, padding):
    y = _forward(x, window, strides, padding)
    return y, (x, y)


def _max_pool_bwd(window, strides, padding, res, g):
    x, y = res
    xp = _padded(x, padding)
    n, hp, wp, c = xp.shape
    (kh, kw), (sh, sw) = window, strides
    oh, ow = y.shape[1:3]
    zero = jnp.zeros((), g.dtype)
    taken = jnp.zeros(y.shape, bool)
    routed = {}
    for i in range(kh):
        for j in range(kw):
            end = (n, i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, c)
            tap = lax.slice(xp, (0, i, j, 0), end, (1, sh, sw, 1))
            first = (tap == y) & ~taken
            taken = taken | first
            routed[i, j] = jnp.where(first, g, zero)
    # Output (oy, ox) sends tap (i, j) to padded input (sh*oy + i, sw*ox + j). Per input phase
    # (p, q) = (row % sh, col % sw) that is a sum of shifted (not interior-padded) planes, one
    # per tap with i = p (mod sh) and j = q (mod sw); the phases are then interleaved.
    mh, mw = -(-hp // sh), -(-wp // sw)

    def shifted(a, dy, dx):  # a[m - dy, l - dx] on the [mh, mw] phase grid (negative pads crop)
        return lax.pad(a, zero, ((0, 0, 0), (dy, mh - oh - dy, 0), (dx, mw - ow - dx, 0), (0, 0, 0)))

    phases = []
    for p in range(sh):
        row = []
        for q in range(sw):
            terms = [
                shifted(routed[i, j], (i - p) // sh, (j - q) // sw)
                for i in range(p, kh, sh)
                for j in range(q, kw, sw)
            ]
            row.append(sum(terms[1:], terms[0]) if terms else jnp.zeros((n, mh, mw, c), g.dtype))
        phases.append(jnp.stack(row))
    dxp = jnp.stack(phases).transpose(2, 3, 0, 4, 1, 5).reshape(n, mh * sh, mw * sw, c)
    (top, _), (left, _) = padding
    return (dxp[:, top : top + x.shape[1], left : left + x.shape[2]],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(
    x: jax.Array,
    window: tuple[int, int],
    strides: tuple[int, int],
    padding: tuple[tuple[int, int], tuple[int, int]],
) -> jax.Array:
    """``nn.max_pool(x, window, strides, padding)`` (explicit padding, -inf padded) on NHWC
    ``x: [B, H, W, C]``: the same values; the gradient routed as described in the module doc
    (equal to jax's own)."""
    window = tuple(int(k) for k in window)
    strides = tuple(int(s) for s in strides)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _max_pool(x, window, strides, padding)
