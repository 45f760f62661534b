"""Which CPU form per part of a float32 3x3 conv: forward, input gradient, kernel gradient.

For each shape, one jitted ``vjp`` (forward output, input gradient and kernel gradient all
returned, so XLA drops none of them) per combination of forms, next to ``conv.py``'s own choice
("auto") and torch (NCHW ``conv2d`` + ``backward``). The forms, from
``retinanet_jax.backends.cpu``: ``lax`` (XLA's convolution / its transposes), ``wino``
(Winograd F(2x2, 3x3): a part taken from one vjp of ``winograd.conv3x3``), ``rows`` (row-GEMM
forward; stride-1 input gradient as a row-GEMM conv of g), ``phases`` (strided input gradient,
one GEMM per output phase), ``gemm`` (kernel gradient as GEMMs). A combination is written
forward/input/kernel, e.g. ``rows/phases/gemm``. Each is checked against ``lax/lax/lax``
(relative 1e-4), then all run interleaved after warm-up; min | median ms of ``--reps``, and
min / torch's min. These figures chose the float32 rules in ``conv.py``
(``WINOGRAD_RULES``, ``GEMM_STRIDED_MIN_ELEMENTS``; docs/performance.md, "Per-shape forms").

    PYTHONPATH=. python benchmarks/conv_forms.py [--size 416|800] [--reps 7] [--only l2,P4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from retinanet_jax.backends.cpu import conv, winograd

L, W, R, P, G = "lax", "wino", "rows", "phases", "gemm"
S1 = [(L, L, L), (W, W, W), (L, L, W), (W, L, L)]
S2 = [(L, L, L), (L, P, L), (R, P, G)]
# (name, map index, Cin, Cout, stride, combinations); map index into MAPS[size]: the input map.
SHAPES = [
    ("l1 3x3 64", 0, 64, 64, 1, S1),
    ("l2.0 3x3/2 64>128 (R18)", 0, 64, 128, 2, S2),
    ("l2.0 3x3/2 128 (R50)", 0, 128, 128, 2, S2),
    ("l2 3x3 128", 1, 128, 128, 1, S1),
    ("l3.0 3x3/2 128>256 (R18)", 1, 128, 256, 2, S2),
    ("l3.0 3x3/2 256 (R50)", 1, 256, 256, 2, S2),
    ("l3 3x3 256", 2, 256, 256, 1, S1),
    ("l4.0 3x3/2 512 (R50)", 2, 512, 512, 2, S2),
    ("l4 3x3 512", 3, 512, 512, 1, S1 + [(R, R, G)]),
    ("P3 3x3 256", 1, 256, 256, 1, S1),
    ("P4 3x3 256", 2, 256, 256, 1, S1),
    ("P5 3x3 256", 3, 256, 256, 1, S1 + [(R, R, G)]),
    ("P6 v2 3x3/2 2048>256", 3, 2048, 256, 2, S2),
    ("box P3 3x3 256>36", 1, 256, 36, 1, [(L, L, L), (L, R, L)]),
    ("class P3 3x3 256>18", 1, 256, 18, 1, [(L, L, L), (L, R, L)]),
    ("class P3 3x3 256>9", 1, 256, 9, 1, [(L, L, L), (L, R, L)]),
]
# Input maps of stages 1-4 (C2..C5) for a 416x416 and an 800x1216 canvas.
MAPS = {
    "416": [(104, 104), (52, 52), (26, 26), (13, 13)],
    "800": [(200, 304), (100, 152), (50, 76), (25, 38)],
}


def combination(forms: tuple[str, str, str], strides, pad):
    """``f(x, w)`` with the given forward / input-gradient / kernel-gradient forms."""
    fwd_form, dx_form, dw_form = forms

    def lax_conv(x, w):
        return conv._lax_conv(x, w, strides, pad, None, None)

    def forward(x, w):
        if fwd_form == W:
            return winograd.conv3x3(x, w, pad)
        if fwd_form == R:
            return conv._conv_rows(x, w, strides, pad, None)
        return lax_conv(x, w)

    @jax.custom_vjp
    def f(x, w):
        return forward(x, w)

    def f_fwd(x, w):
        return forward(x, w), (x, w)

    def f_bwd(res, g):
        x, w = res
        wino = (
            jax.vjp(lambda a, b: winograd.conv3x3(a, b, pad), x, w)[1](g) if W in (dx_form, dw_form) else None
        )
        if dx_form == W:
            dx = wino[0]
        elif dx_form == R:
            dx = conv._input_grad_rows(w, g, x.shape[1:3], pad, None)
        elif dx_form == P:
            dx = conv._input_grad_phases(w, g, x.shape[1:3], strides, pad, None)
        else:
            dx = jax.vjp(lambda x_: lax_conv(x_, w), x)[1](g)[0]
        if dw_form == W:
            dw = wino[1]
        elif dw_form == G:
            dw = conv._kernel_grad_gemm(x, g, w.shape[:2], strides, pad, None)
        else:
            dw = jax.vjp(lambda w_: lax_conv(x, w_), w)[1](g)[0]
        return dx, dw

    f.defvjp(f_fwd, f_bwd)
    return f


def value_and_grads(f):
    def run(x, w, g):
        y, vjp = jax.vjp(f, x, w)
        return (y, *vjp(g))

    return jax.jit(run)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="416", choices=sorted(MAPS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--only", default="", help="comma-separated name prefixes")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    only = [o for o in args.only.split(",") if o]
    rng = np.random.default_rng(0)
    pad = ((1, 1), (1, 1))
    print(
        f"f32, batch {args.batch}, {args.size} px canvas; ms min | median of {args.reps}, (min / torch's min)"
    )
    for name, level, cin, cout, s, combos in SHAPES:
        if only and not any(name.startswith(o) for o in only):
            continue
        h, w_ = MAPS[args.size][level]
        strides = (s, s)
        x = rng.standard_normal((args.batch, h, w_, cin)).astype(np.float32)
        w = (rng.standard_normal((3, 3, cin, cout)) * 0.05).astype(np.float32)
        g = rng.standard_normal((args.batch, (h - 1) // s + 1, (w_ - 1) // s + 1, cout)).astype(np.float32)
        jx, jw, jg = map(jnp.asarray, (x, w, g))
        fns = {"/".join(c): value_and_grads(combination(c, strides, pad)) for c in combos}
        fns["auto"] = value_and_grads(
            lambda a, b: conv.conv_general_dilated(a, b, strides, pad, dimension_numbers=conv._NHWC)
        )
        ref = fns["lax/lax/lax"](jx, jw, jg)
        for key, fn in fns.items():
            for got, want in zip(fn(jx, jw, jg), ref):
                err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
                assert err < 1e-4, f"{name} {key}: relative error {err:.2g}"
        tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
        tw = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous().requires_grad_(True)
        tg = torch.from_numpy(g).permute(0, 3, 1, 2).contiguous()

        def run_torch():
            torch.nn.functional.conv2d(tx, tw, stride=s, padding=1).backward(tg)

        calls = {k: (lambda fn=fn: jax.block_until_ready(fn(jx, jw, jg))) for k, fn in fns.items()}
        calls["torch"] = run_torch
        for c in calls.values():
            c()
        times = {k: [] for k in calls}
        for _ in range(args.reps):
            for k, c in calls.items():
                t = time.perf_counter()
                c()
                times[k].append(1e3 * (time.perf_counter() - t))
        best = {k: min(v) for k, v in times.items()}
        cells = "  ".join(
            f"{k} {best[k]:.1f}|{statistics.median(times[k]):.1f} ({best[k] / best['torch']:.2f})"
            for k in calls
        )
        print(f"{name} {h}x{w_}: {cells}", flush=True)


if __name__ == "__main__":
    main()
