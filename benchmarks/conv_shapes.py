"""Per-convolution forward + backward times of ResNet-50-FPN RetinaNet: lax vs conv.py vs torch.

Each distinct conv of the v1 train step (torchvision recipe: layers 2-4 trainable, so no
gradients below layer2) at ``--size`` and ``--batch``, timed as one jitted
``vjp`` (forward, input gradient where the layer needs one, kernel gradient), three ways:
plain ``lax.conv_general_dilated`` (``conv.implementation("lax")``), ``retinanet_jax.backends.cpu.conv``
(what the models use) and torch (NCHW ``conv2d`` + ``backward``, autocast for bf16). The
variants run interleaved after warm-up; medians. ``x n`` = how many convs of that shape one
step runs, so the weighted total approximates the step's conv time.

    PYTHONPATH=. python benchmarks/conv_shapes.py [--dtype f32|bf16] [--size 512] [--batch 4]
        [--all-stages]   (also the stem and layer1, trained from scratch)
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from retinanet_jax.backends.cpu import conv

NHWC = ("NHWC", "HWIO", "NHWC")

# (name, input size / 512 * size, Cin, Cout, kernel, stride, count per step, needs dx)
# From scratch (--all-stages: every stage trainable, as torchvision's builders without weights):
# the stem and layer1 too, and layer2's first convs then need their input gradient.
STEM_AND_LAYER1 = [
    ("conv1 7x7/2 (stem)", 512, 3, 64, 7, 2, 1, False),
    ("layer1.0.conv1 1x1", 128, 64, 64, 1, 1, 1, True),
    ("layer1.x.conv2 3x3", 128, 64, 64, 3, 1, 3, True),
    ("layer1.conv3 1x1", 128, 64, 256, 1, 1, 3, True),
    ("layer1.0.downsample 1x1", 128, 64, 256, 1, 1, 1, True),
    ("layer1.x.conv1 1x1", 128, 256, 64, 1, 1, 2, True),
]
SHAPES = [
    ("layer2.0.conv1 1x1", 128, 256, 128, 1, 1, 1, False),
    ("layer2.0.conv2 3x3/2", 128, 128, 128, 3, 2, 1, True),
    ("layer2.0.downsample 1x1/2", 128, 256, 512, 1, 2, 1, False),
    ("layer2.x.conv1 1x1", 64, 512, 128, 1, 1, 3, True),
    ("layer2.x.conv2 3x3", 64, 128, 128, 3, 1, 3, True),
    ("layer2.conv3 1x1", 64, 128, 512, 1, 1, 4, True),
    ("layer3.0.conv1 1x1", 64, 512, 256, 1, 1, 1, True),
    ("layer3.0.conv2 3x3/2", 64, 256, 256, 3, 2, 1, True),
    ("layer3.0.downsample 1x1/2", 64, 512, 1024, 1, 2, 1, True),
    ("layer3.x.conv1 1x1", 32, 1024, 256, 1, 1, 5, True),
    ("layer3.x.conv2 3x3", 32, 256, 256, 3, 1, 5, True),
    ("layer3.conv3 1x1", 32, 256, 1024, 1, 1, 6, True),
    ("layer4.0.conv1 1x1", 32, 1024, 512, 1, 1, 1, True),
    ("layer4.0.conv2 3x3/2", 32, 512, 512, 3, 2, 1, True),
    ("layer4.0.downsample 1x1/2", 32, 1024, 2048, 1, 2, 1, True),
    ("layer4.x.conv1 1x1", 16, 2048, 512, 1, 1, 2, True),
    ("layer4.x.conv2 3x3", 16, 512, 512, 3, 1, 2, True),
    ("layer4.conv3 1x1", 16, 512, 2048, 1, 1, 3, True),
    ("fpn inner P3 1x1", 64, 512, 256, 1, 1, 1, True),
    ("fpn layer P3 / head P3 3x3", 64, 256, 256, 3, 1, 9, True),
    ("fpn/head P4 3x3", 32, 256, 256, 3, 1, 9, True),
    ("fpn/head P5 3x3", 16, 256, 256, 3, 1, 9, True),
    ("head P6 3x3", 8, 256, 256, 3, 1, 8, True),
    ("cls_logits P3 3x3", 64, 256, 819, 3, 1, 1, True),
    ("cls_logits P4 3x3", 32, 256, 819, 3, 1, 1, True),
    ("bbox_reg P3 3x3", 64, 256, 36, 3, 1, 1, True),
]


def jax_fn(mode: str, k: int, s: int, dtype, needs_dx: bool, x, w, g):
    pad = ((k // 2, k // 2),) * 2

    def f(x, w, g):
        def fwd(x, w):
            return conv.conv_general_dilated(
                x.astype(dtype), w.astype(dtype), (s, s), pad, dimension_numbers=NHWC
            )

        # The forward's output is returned too: otherwise XLA drops the forward as dead code
        # and only the gradients are timed (torch's figure includes its forward).
        if needs_dx:
            y, vjp = jax.vjp(fwd, x, w)
        else:
            y, vjp = jax.vjp(lambda w: fwd(x, w), w)
        return y, vjp(g.astype(dtype))

    with conv.implementation(mode):  # read at trace time
        return jax.jit(f).lower(x, w, g).compile()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--all-stages", action="store_true", help="also the stem and layer1 (from scratch)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    rng = np.random.default_rng(0)
    print(f"{args.dtype}, batch {args.batch}, {args.size}x{args.size}; ms per conv (fwd + bwd), medians")
    print(
        "| conv | x n | lax | conv.py | torch | lax / conv.py | conv.py / torch |\n"
        "|---|---|---|---|---|---|---|"
    )
    totals = np.zeros(3)
    shapes = SHAPES
    if args.all_stages:
        shapes = STEM_AND_LAYER1 + [(*row[:-1], True) for row in SHAPES]
    for name, h, cin, cout, k, s, n, needs_dx in shapes:
        h = h * args.size // 512
        x = rng.standard_normal((args.batch, h, h, cin)).astype(np.float32)
        w = (rng.standard_normal((k, k, cin, cout)) * 0.05).astype(np.float32)
        oh = (h + 2 * (k // 2) - k) // s + 1
        g = rng.standard_normal((args.batch, oh, oh, cout)).astype(np.float32)
        jx, jw, jg = map(jnp.asarray, (x, w, g))
        ours = {m: jax_fn(m, k, s, dtype, needs_dx, jx, jw, jg) for m in ("lax", "auto")}
        tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().requires_grad_(needs_dx)
        tw = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous().requires_grad_(True)
        tg = torch.from_numpy(g).permute(0, 3, 1, 2).contiguous()

        def run_torch():
            with torch.autocast("cpu", torch.bfloat16, enabled=args.dtype == "bf16"):
                y = torch.nn.functional.conv2d(tx, tw, stride=s, padding=k // 2)
            y.backward(tg.to(y.dtype))

        calls = {
            "lax": lambda: jax.block_until_ready(ours["lax"](jx, jw, jg)),
            "auto": lambda: jax.block_until_ready(ours["auto"](jx, jw, jg)),
            "torch": run_torch,
        }
        for c in calls.values():
            c()
        times = {key: [] for key in calls}
        for _ in range(args.reps):
            for key, c in calls.items():
                t = time.perf_counter()
                c()
                times[key].append(time.perf_counter() - t)
        med = [1e3 * statistics.median(times[key]) for key in ("lax", "auto", "torch")]
        totals += n * np.array(med)
        print(
            f"| {name} ({h}x{h}) | {n} | {med[0]:.1f} | {med[1]:.1f} | {med[2]:.1f} | "
            f"{med[0] / med[1]:.2f} | {med[1] / med[2]:.2f} |",
            flush=True,
        )
    print(
        f"| weighted total | | {totals[0]:.0f} | {totals[1]:.0f} | {totals[2]:.0f} | "
        f"{totals[0] / totals[1]:.2f} | {totals[1] / totals[2]:.2f} |"
    )


if __name__ == "__main__":
    main()
