"""One RetinaNet training step: retinanet_jax vs torchvision, side by side.

ResNet-50-FPN RetinaNet as torchvision's v1 recipe trains it: FrozenBatchNorm2d, trainable
backbone layers 3, SGD (momentum 0.9, weight decay 1e-4), 91 classes. Both sides start from the
same weights (ported with ``from_torchvision``) and see the same batch (512x512 images, which
``GeneralizedRCNNTransform(min_size=512, max_size=512)`` keeps at 512x512).

Timing: everything warmed up first, then the variants run interleaved (A B A B ...), one step
each, and the medians are reported. Our FLOP/s are compared with a jitted float32 (and bf16)
2048x2048 matmul measured in the same run, so the share is relative to what this machine
actually delivers. XLA flags come from the environment (``XLA_FLAGS``), so run the script once
per flag set to compare them.

    PYTHONPATH=. python benchmarks/train_step_vs_torchvision.py [--reps 5] [--batch 4] [--size 512]
        [--also-modes lax] [--no-torch] [--no-bf16]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torchvision
from torchvision.models.detection import RetinaNet as TVRetinaNet
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from retinanet_jax.backends.cpu import conv, hostmem
from retinanet_jax.interop.torchvision import from_torchvision
from retinanet_jax.parallel import mesh as parallel
from retinanet_jax.training import optim
from retinanet_jax.training import step as training

TRAINABLE_LAYERS = 3


def torchvision_model(size: int) -> torch.nn.Module:
    """retinanet_resnet50_fpn's v1 architecture with FrozenBatchNorm2d and no pretrained files."""
    torch.manual_seed(0)
    body = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    backbone = _resnet_fpn_extractor(
        body, TRAINABLE_LAYERS, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256)
    )
    return TVRetinaNet(backbone, 91, min_size=size, max_size=size)


def make_data(batch: int, size: int, max_boxes: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, size * 0.6, (batch, max_boxes, 2))
    wh = rng.uniform(24, size * 0.4, (batch, max_boxes, 2))
    return {
        "images": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
        "image_sizes": np.full((batch, 2), size, np.int32),
        "boxes": np.concatenate([xy, xy + wh], -1).astype(np.float32),
        "labels": rng.integers(1, 91, (batch, max_boxes)).astype(np.int32),
    }


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def matmul_peak(dtype, n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of a jitted n x n matmul (median of ``reps``)."""
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
    # f32 accumulation: XLA:CPU runs bf16 x bf16 -> f32 dots natively, bf16 -> bf16 via f32.
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    f(a, a).block_until_ready()
    times = [timed(lambda: f(a, a).block_until_ready()) for _ in range(reps)]
    return 2 * n**3 / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-bf16", action="store_true")
    parser.add_argument(
        "--settle",
        type=int,
        default=1,
        help="untimed steps before each timed one: a step right after the other "
        "framework's runs up to 30%% slower (measured; both frameworks share "
        "this process's memory), which a training loop never sees",
    )
    parser.add_argument(
        "--also-modes",
        default="",
        help="comma-separated retinanet_jax.backends.cpu.conv modes to time as well: lax "
        "(plain XLA convolutions)",
    )
    parser.add_argument(
        "--no-torch",
        action="store_true",
        help="ours only (quick A/B of our variants; ratios vs the first one)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, torch threads {torch.get_num_threads()}"
    )
    print(
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r} (see retinanet_jax/backends/cpu/hostmem.py)"
    )

    data = make_data(args.batch, args.size)
    tv = torchvision_model(args.size).train()
    model, variables = from_torchvision(tv.state_dict(), "v1", bn_eps=1e-5, frozen_bn=True)

    # ---- torchvision: images as float tensors in [0, 1] (what its data loader yields).
    tv_images = [torch.from_numpy(im).permute(2, 0, 1).float().div(255) for im in data["images"]]
    tv_targets = [
        {"boxes": torch.from_numpy(b), "labels": torch.from_numpy(lab).long()}
        for b, lab in zip(data["boxes"], data["labels"])
    ]
    tv_opt = torch.optim.SGD(
        [p for p in tv.parameters() if p.requires_grad],
        lr=0.01 * args.batch / 16,
        momentum=0.9,
        weight_decay=1e-4,
    )

    def tv_step(bf16: bool) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            losses = tv(tv_images, tv_targets)
            loss = sum(losses.values())
        tv_opt.zero_grad()
        loss.backward()
        tv_opt.step()
        return float(loss.detach())

    # ---- ours: one device, same weights, same recipe.
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    tx, schedule = optim.make_optimizer(
        optim.TORCHVISION_V1, steps_per_epoch=10_000, global_batch_size=args.batch
    )
    batch = parallel.shard_batch(data, mesh)
    ours = {}
    dtypes = [("f32", None)] + ([] if args.no_bf16 else [("bf16", jnp.bfloat16)])
    extra_modes = [m for m in args.also_modes.split(",") if m]
    for name, dtype in dtypes + [(f"{n}+{m}", d) for n, d in dtypes for m in extra_modes]:
        step = training.make_train_step(model, mesh, compute_dtype=dtype)
        state = training.create_train_state(
            model, variables, tx, TRAINABLE_LAYERS, mesh=mesh, schedule=schedule
        )
        # FLOPs of the plain (direct convolution) step, the work torchvision does: with
        # Winograd our step does fewer, so "% f32 peak" can pass 100% (effective rate).
        # A step function of its own: jit caches traces regardless of the conv mode.
        with conv.implementation("lax"):
            flops_step = training.make_train_step(model, mesh, compute_dtype=dtype)
            flops = flops_step.jitted(state).lower(state, batch).cost_analysis()["flops"]
        mode = name.split("+")[1] if "+" in name else "auto"
        ours[name] = {"step": step, "state": state, "flops": flops, "mode": mode}

    def our_step(name: str) -> float:
        entry = ours[name]
        with conv.implementation(entry["mode"]):  # the first call traces
            entry["state"], metrics = entry["step"](entry["state"], batch)  # waits (finite check)
        return float(metrics["loss"])

    variants = [("torchvision f32", lambda: tv_step(False)), ("ours f32", lambda: our_step("f32"))]
    variants += [(f"ours f32+{m}", lambda m=m: our_step(f"f32+{m}")) for m in extra_modes]
    if not args.no_bf16:
        variants += [
            ("torchvision bf16 autocast", lambda: tv_step(True)),
            ("ours bf16", lambda: our_step("bf16")),
        ]
        variants += [(f"ours bf16+{m}", lambda m=m: our_step(f"bf16+{m}")) for m in extra_modes]
    if args.no_torch:
        variants = [v for v in variants if not v[0].startswith("torchvision")]

    # Warm-up: the first call of ours includes tracing + XLA compilation. torchvision's bf16
    # variant runs on the weights its f32 warm-up steps already changed; ours each have
    # their own state, so "ours" losses are all from the starting weights.
    first = {}
    for label, fn in variants:
        t = time.perf_counter()
        loss = fn()
        first_s = time.perf_counter() - t
        # compile time ~ first call - second call (the rest of the first call is a step)
        first[label] = (first_s - timed(fn), loss)
    print(
        "first-step loss, same batch (ours from the same start): "
        + ", ".join(f"{k} {v[1]:.4f}" for k, v in first.items())
    )

    times = {label: [] for label, _ in variants}
    faults = {label: [] for label, _ in variants}
    for _ in range(args.reps):
        for label, fn in variants:
            for _ in range(args.settle):
                fn()
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            times[label].append(timed(fn))
            faults[label].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    med = {k: statistics.median(v) for k, v in times.items()}

    peak32 = matmul_peak(jnp.float32)
    peak16 = matmul_peak(jnp.bfloat16)
    print(f"\nmatmul 2048^2 peak: f32 {peak32 / 1e9:.1f} GFLOP/s, bf16 {peak16 / 1e9:.1f} GFLOP/s")
    print(
        f"\n{'variant':28s} {'step s':>8s} {'img/s':>7s} {'GFLOP/s':>8s} {'%f32 peak':>9s} "
        f"{'compile s':>9s} {'faults/step':>11s}"
    )
    for label, _ in variants:
        ips = args.batch / med[label]
        row = f"{label:28s} {med[label]:8.3f} {ips:7.3f}"
        if label.startswith("ours"):
            name = label.split()[1]
            gflops = ours[name]["flops"] / med[label] / 1e9
            compile_s = first[label][0]
            row += f" {gflops:8.1f} {100 * gflops * 1e9 / peak32:8.1f}% {compile_s:9.1f}"
        else:
            row += " " * 30
        print(row + f" {statistics.median(faults[label]):11.0f}")
    print()
    for label in med:
        if label.startswith("ours"):
            ref = "torchvision bf16 autocast" if "bf16" in label else "torchvision f32"
            ref = ref if ref in med else next(iter(med))  # --no-torch: vs the first variant
            print(f"{label} / {ref}: {med[ref] / med[label]:.3f}x (images/s ratio)")
    print(
        f"model FLOPs per step (XLA cost analysis, f32): {ours['f32']['flops'] / 1e9:.1f} G; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )


if __name__ == "__main__":
    hostmem.reexec_with_hugepages()  # both frameworks run in this process: same allocator
    main()
