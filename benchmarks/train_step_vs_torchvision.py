"""One RetinaNet training step: retinanet_jax vs torchvision, side by side, per configuration.

A configuration ("cell") is backbone x BatchNorm / trainable stages x head x image size:
  backbone  r18 | r50                   (torchvision.models.resnet18 / resnet50, no weights)
  bn        frozen3 | train5            FrozenBatchNorm2d + trainable_backbone_layers 3 (the
                                        fine-tuning recipe) | BatchNorm2d in train mode + all 5
                                        stages (from scratch: torchvision's builders use 5
                                        without weights); --cell also takes frozen5 and train3
                                        (to split a cell's cost: BatchNorm vs stages 1-2)
  head      v1 | v2                     retinanet_resnet50_fpn (L1 loss, P6 from P5) |
                                        retinanet_resnet50_fpn_v2 (GroupNorm head, GIoU loss,
                                        P6 from C5)
  size      400 | 512 | 800x1216        images of that size (H x W); GeneralizedRCNNTransform's
                                        min/max size are set so it keeps them, and pads the
                                        batch to multiples of 32 (400 -> 416): ours gets the
                                        same padded canvas with image_sizes 400
Both sides start from the same weights (ported with ``from_torchvision``), see the same batch
and run the same recipe: SGD momentum 0.9, weight decay 1e-4. Default data: 90 classes (COCO's
91 logits with background), 8 boxes per image; the small-dataset case of issue 17 is
``--classes 1 --boxes 20 --max-boxes 128 --box-px 10 40`` (one class, ~20 small objects,
our config's default ``input.max_boxes``).

Timing: everything in a cell warmed up first, then the variants run interleaved (A B A B ...),
one step each, and the medians are reported. Our FLOP/s are compared with a jitted float32 (and
bf16) 2048x2048 matmul measured in the same run, so the share is relative to what this machine
actually delivers. XLA flags come from the environment (``XLA_FLAGS``), so run the script once
per flag set to compare them.

    # one cell (default: the README row, r50 frozen3 v1 512)
    PYTHONPATH=. python benchmarks/train_step_vs_torchvision.py [--reps 5] [--batch 4]
        [--cell r50,frozen3,v1,512] [--also-modes lax] [--no-torch] [--no-bf16]
        [--profile 3]   (then ms per layer, forward and backward, ours vs torchvision)
    # what each CPU form is worth: ours again with every form but one (conv.MODES)
        --also-modes lax,no-winograd,no-1x1,no-gemm,no-pool
    # the matrix of issue 17: {r18,r50} x {frozen3,train5} x {v1,v2} x {400,800x1216}, f32
    PYTHONPATH=. python benchmarks/train_step_vs_torchvision.py --matrix --no-bf16 --reps 3 \\
        --classes 1 --boxes 20 --max-boxes 128 --box-px 10 40
        [--cells r18,train5,*,400 ...]   (a subset: fnmatch patterns per field)
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import functools
import gc
import itertools
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
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from benchmarks import op_profile
from retinanet_jax.backends.cpu import conv, hostmem
from retinanet_jax.interop.torchvision import from_torchvision
from retinanet_jax.parallel import mesh as parallel
from retinanet_jax.training import optim
from retinanet_jax.training import step as training

MATRIX = {
    "backbone": ("r18", "r50"),
    "bn": ("frozen3", "train5"),
    "head": ("v1", "v2"),
    "size": ("400", "800x1216"),
}


@dataclasses.dataclass(frozen=True)
class Cell:
    backbone: str  # r18 | r50
    bn: str  # frozen3 | train5
    head: str  # v1 | v2
    size: str  # "400" or "HxW"

    @classmethod
    def parse(cls, spec: str) -> Cell:
        fields = spec.split(",")
        if len(fields) != 4:
            raise SystemExit(f"--cell {spec!r}: want backbone,bn,head,size e.g. r18,train5,v1,400")
        cell = cls(*fields)
        for name, allowed in zip(("backbone", "head"), (MATRIX["backbone"], MATRIX["head"])):
            if getattr(cell, name) not in allowed:
                raise SystemExit(f"--cell {spec!r}: {name} must be one of {allowed}")
        if cell.bn not in ("frozen3", "frozen5", "train3", "train5"):
            raise SystemExit(f"--cell {spec!r}: bn must be frozen3 | frozen5 | train3 | train5")
        cell.hw  # noqa: B018 - validates the size
        return cell

    @property
    def hw(self) -> tuple[int, int]:
        h, _, w = self.size.partition("x")
        return (int(h), int(w or h))

    @property
    def frozen(self) -> bool:
        return self.bn.startswith("frozen")

    @property
    def trainable_layers(self) -> int:
        return int(self.bn[-1])

    def __str__(self) -> str:
        return f"{self.backbone},{self.bn},{self.head},{self.size}"


def torchvision_model(cell: Cell, num_classes: int) -> torch.nn.Module:
    """torchvision's RetinaNet for ``cell``, built as retinanet_resnet50_fpn(_v2) builds it, with
    the cell's backbone and norm layer and no pretrained files."""
    torch.manual_seed(0)
    norm = FrozenBatchNorm2d if cell.frozen else torch.nn.BatchNorm2d
    body = getattr(torchvision.models, {"r18": "resnet18", "r50": "resnet50"}[cell.backbone])(
        weights=None, norm_layer=norm
    )
    c5 = body.fc.in_features
    p6_in = 256 if cell.head == "v1" else c5  # v1: P6 from P5; v2: from C5
    backbone = _resnet_fpn_extractor(
        body, cell.trainable_layers, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(p6_in, 256)
    )
    h, w = cell.hw
    kw = dict(min_size=min(h, w), max_size=max(h, w))
    if cell.head == "v1":
        return TVRetinaNet(backbone, num_classes, **kw)
    head = RetinaNetHead(256, 9, num_classes, norm_layer=functools.partial(torch.nn.GroupNorm, 32))
    head.regression_head._loss_type = "giou"
    return TVRetinaNet(backbone, num_classes, head=head, **kw)


def make_data(args: argparse.Namespace, hw: tuple[int, int], seed: int = 0) -> dict[str, np.ndarray]:
    """``args.boxes`` boxes per image (sides uniform in ``args.box_px``, default 24 px .. 0.4 of
    the image), padded to ``args.max_boxes`` rows (labels -1), labels in [1, classes]."""
    rng = np.random.default_rng(seed)
    h, w = hw
    b, n = args.batch, args.boxes
    lo, hi = args.box_px or (24, 0.4 * min(h, w))
    wh = rng.uniform(lo, hi, (b, n, 2))
    xy = rng.uniform(0, 1, (b, n, 2)) * (np.array([w, h]) - wh)
    boxes = np.zeros((b, max(args.max_boxes, n), 4), np.float32)
    labels = np.full((b, max(args.max_boxes, n)), -1, np.int32)
    boxes[:, :n] = np.concatenate([xy, xy + wh], -1)
    labels[:, :n] = rng.integers(1, args.classes + 1, (b, n))
    return {
        "images": rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8),  # torchvision's input
        "image_sizes": np.full((b, 2), hw, np.int32),
        "boxes": boxes,
        "labels": labels,
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


def run_cell(cell: Cell, args: argparse.Namespace) -> dict:
    """Builds both frameworks for ``cell``, warms up, times interleaved; returns the figures."""
    data = make_data(args, cell.hw)
    tv = torchvision_model(cell, args.classes + 1).train()
    model, variables = from_torchvision(
        tv.state_dict(),
        cell.head,
        backbone={"r18": "resnet18", "r50": "resnet50"}[cell.backbone],
        bn_eps=1e-5,
        frozen_bn=cell.frozen,
    )
    loss_cfg = {"box_loss": "l1" if cell.head == "v1" else "giou"}

    # ---- torchvision: images as float tensors in [0, 1] (what its data loader yields).
    tv_images = [torch.from_numpy(im).permute(2, 0, 1).float().div(255) for im in data["images"]]
    tv_targets = [  # the real boxes only: torchvision takes a list, no padding rows
        {"boxes": torch.from_numpy(b[: args.boxes]), "labels": torch.from_numpy(lab[: args.boxes]).long()}
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
    # Our canvas: the image zero-padded to multiples of 32, as torchvision's batch_images pads.
    h, w = cell.hw
    canvas = np.zeros((args.batch, -(-h // 32) * 32, -(-w // 32) * 32, 3), np.uint8)
    canvas[:, :h, :w] = data["images"]
    batch = parallel.shard_batch({**data, "images": canvas}, mesh)
    ours = {}
    dtypes = [("f32", None)] + ([] if args.no_bf16 else [("bf16", jnp.bfloat16)])
    extra_modes = [m for m in args.also_modes.split(",") if m]
    for name, dtype in dtypes + [(f"{n}+{m}", d) for n, d in dtypes for m in extra_modes]:
        step = training.make_train_step(model, mesh, loss_cfg, compute_dtype=dtype)
        state = training.create_train_state(
            model, variables, tx, cell.trainable_layers, mesh=mesh, schedule=schedule
        )
        # FLOPs of the plain (direct convolution) step, the work torchvision does: with
        # Winograd our step does fewer, so "% f32 peak" can pass 100% (effective rate).
        # A step function of its own: jit caches traces regardless of the conv mode.
        with conv.implementation("lax"):
            flops_step = training.make_train_step(model, mesh, loss_cfg, compute_dtype=dtype)
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

    times = {label: [] for label, _ in variants}
    faults = {label: [] for label, _ in variants}
    for _ in range(args.reps):
        for label, fn in variants:
            for _ in range(args.settle):
                fn()
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            times[label].append(timed(fn))
            faults[label].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    profiles = None
    if args.profile:
        # Per-layer profiles (f32), after the timing so that they cannot disturb it.
        entry = ours["f32"]
        hlo = entry["step"].jitted(entry["state"]).lower(entry["state"], entry["step"].place_batch(batch))
        profiles = (
            op_profile.profile_ours(lambda: our_step("f32"), args.profile, hlo.compile().as_text()),
            op_profile.profile_torch(tv, lambda: tv_step(False), args.profile),
        )
    return {
        "profiles": profiles,
        "labels": [label for label, _ in variants],
        "median": {k: statistics.median(v) for k, v in times.items()},
        "faults": {k: statistics.median(v) for k, v in faults.items()},
        "first": first,
        "flops": {k: v["flops"] for k, v in ours.items()},
    }


def ratios(res: dict) -> dict[str, float]:
    """``torchvision time / ours`` per "ours" variant (>1: ours is faster)."""
    med = res["median"]
    out = {}
    for label in med:
        if label.startswith("ours"):
            ref = "torchvision bf16 autocast" if "bf16" in label else "torchvision f32"
            ref = ref if ref in med else next(iter(med))  # --no-torch: vs the first variant
            out[label] = med[ref] / med[label]
    return out


def print_cell(cell: Cell, res: dict, args: argparse.Namespace, peak32: float) -> None:
    med = res["median"]
    print(
        f"\n[{cell}] first-step loss, same batch (ours from the same start): "
        + ", ".join(f"{k} {v[1]:.4f}" for k, v in res["first"].items())
    )
    print(
        f"{'variant':28s} {'step s':>8s} {'img/s':>7s} {'GFLOP/s':>8s} {'%f32 peak':>9s} "
        f"{'compile s':>9s} {'faults/step':>11s}"
    )
    for label in res["labels"]:
        ips = args.batch / med[label]
        row = f"{label:28s} {med[label]:8.3f} {ips:7.3f}"
        if label.startswith("ours"):
            gflops = res["flops"][label.split()[1]] / med[label] / 1e9
            row += f" {gflops:8.1f} {100 * gflops * 1e9 / peak32:8.1f}% {res['first'][label][0]:9.1f}"
        else:
            row += " " * 30
        print(row + f" {res['faults'][label]:11.0f}")
    for label, r in ratios(res).items():
        print(f"{label} vs torchvision: {r:.3f}x (images/s ratio)")


def matrix_cells(patterns: list[str]) -> list[Cell]:
    cells = [Cell(*fields) for fields in itertools.product(*MATRIX.values())]
    if not patterns:
        return cells
    keep = []
    for cell in cells:
        for pat in patterns:
            parts = pat.split(",")
            if len(parts) == 4 and all(fnmatch.fnmatch(v, p) for v, p in zip(str(cell).split(","), parts)):
                keep.append(cell)
                break
    if not keep:
        raise SystemExit(f"--cells {patterns}: no cell of the matrix matches")
    return keep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--cell", default="r50,frozen3,v1,512", help="backbone,bn,head,size")
    parser.add_argument("--matrix", action="store_true", help="every cell of MATRIX (or --cells)")
    parser.add_argument("--cells", nargs="*", default=[], help="with --matrix: fnmatch patterns")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--classes", type=int, default=90, help="object classes (COCO: 90 + background)")
    parser.add_argument("--boxes", type=int, default=8, help="ground-truth boxes per image")
    parser.add_argument("--max-boxes", type=int, default=8, help="ours: padded rows (input.max_boxes)")
    parser.add_argument("--box-px", type=float, nargs=2, default=None, help="box side range, px")
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
        "(plain XLA convolutions), no-winograd, no-1x1, no-gemm (every CPU form but that one)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after timing, N more f32 steps of each under its profiler: ms per layer, forward "
        "and backward, side by side (benchmarks/op_profile.py)",
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
    peak32 = matmul_peak(jnp.float32)
    peak16 = matmul_peak(jnp.bfloat16)
    print(f"matmul 2048^2 peak: f32 {peak32 / 1e9:.1f} GFLOP/s, bf16 {peak16 / 1e9:.1f} GFLOP/s")

    cells = matrix_cells(args.cells) if args.matrix else [Cell.parse(args.cell)]
    summary = []
    for cell in cells:
        t = time.perf_counter()
        res = run_cell(cell, args)
        print_cell(cell, res, args, peak32)
        if res["profiles"]:
            op_profile.print_profiles(
                *res["profiles"], res["median"]["ours f32"], res["median"]["torchvision f32"]
            )
        print(f"cell wall time {time.perf_counter() - t:.0f} s, load average {os.getloadavg()[0]:.1f}")
        summary.append((cell, res))
        jax.clear_caches()  # one cell's executables are not needed by the next
        gc.collect()
        # flush: piped output is block-buffered, and a matrix runs for an hour
        print(f"model FLOPs per step (XLA cost analysis, f32): {res['flops']['f32'] / 1e9:.1f} G", flush=True)

    if len(summary) > 1:
        names = [label for label in summary[0][1]["labels"] if label.startswith("ours")]
        print(
            "\n| backbone | BN, trainable stages | head | size | "
            + " | ".join(f"{n} step s / torchvision s / ratio" for n in names)
            + " |"
        )
        print("| --- | --- | --- | --- |" + " --- |" * len(names))
        for cell, res in summary:
            med, rat = res["median"], ratios(res)
            cols = []
            for n in names:
                ref = "torchvision bf16 autocast" if "bf16" in n else "torchvision f32"
                cols.append(f"{med[n]:.2f} / {med.get(ref, float('nan')):.2f} / **{rat[n]:.2f}x**")
            print(f"| {cell.backbone} | {cell.bn} | {cell.head} | {cell.size} | " + " | ".join(cols) + " |")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    hostmem.reexec_with_hugepages()  # both frameworks run in this process: same allocator
    main()
