"""Device kit: retinanet_jax against torchvision on one GPU, in one command, one table.

What it measures (ResNet-50-FPN RetinaNet v1, 91 classes, both frameworks from the same random
"lively" weights of ``tests/tv_utils._make_lively``, ported with ``from_torchvision``):

* **Training** at 800x1344, batch 8 and 16, torchvision's v1 recipe (FrozenBatchNorm2d eps 0,
  ``trainable_backbone_layers=3``, SGD momentum 0.9, weight decay 1e-4). Ours: the library's own
  step, ``training.step.create_train_state`` / ``make_train_step`` with
  ``training.optim.make_optimizer(TORCHVISION_V1)``, in bf16 and f32 compute. torchvision: eager
  with AMP bf16 + channels_last, eager f32, and ``torch.compile`` of the backbone and head (AMP
  bf16 + channels_last; the transform and loss stay eager: their per-image Python loops are
  graph breaks) in a child process with a time cap. Both sides sync once per step, as users'
  loops do (ours reads the finite-loss flag, torchvision's reference ``loss.item()``); the batch
  is already on the device for both.
* **Prediction latency** at batch 1 and 8 on 800x1333 uint8 images (canvas 800x1344): ours is
  ``retinanet_jax.Predictor`` (jitted forward + fixed-shape postprocess + rescale), torchvision
  ``model.eval()(images)`` incl. its transform and postprocess. "ms" is end to end (host uint8 in,
  host numpy detections out); "device ms" is the model call on images already on the device.
* **Detections**: our f32 detections against torchvision's f32 ones on the same images (share of
  torchvision's detections matched one-to-one by ours: same label, IoU >= 0.9, |score difference|
  <= 0.02; ``predict_vs_torchvision.match_fraction``). bf16 rows: ours bf16 vs torchvision AMP.

Timing: warm-up steps first (the first call of ours includes tracing + XLA compilation: "compile s"
= first call - median step), then ``--repeats`` rounds in which the variants alternate (ours,
torchvision, ours, ...), each timing ``--steps`` steps between ``jax.block_until_ready`` /
``torch.cuda.synchronize``; figures are medians over the rounds. The torch.compile rows run after,
in their own process (not interleaved).

MFU = model FLOPs per image x images/s / peak. Model FLOPs: the forward's convolutions (and dots),
counted analytically from our model's jaxpr (2 x output elements x kernel elements per output
channel), cross-checked against ``torch.utils.flop_counter`` on torchvision's backbone + head;
training = 3 x forward (the usual convention: it overstates our backward a little, since the frozen
stem and layer1 need no weight gradients). Both frameworks' rows use the same count. Peaks (dense,
i.e. NVIDIA's "with sparsity" figures halved), from NVIDIA's H200 datasheet (H200 SXM / H200 NVL):
BF16 Tensor Core 1,979 / 1,671 TFLOP/s with sparsity -> 989.5 / 835.5 dense; TF32 Tensor Core
989 / 835 with sparsity -> 494.5 / 417.5 dense; FP32 67 / 60 TFLOP/s. f32 rows run true float32
(TF32 off on both sides: ``jax.default_matmul_precision("float32")`` around our f32 calls,
``torch.backends.cudnn.allow_tf32 = False``) against the FP32 peak; ``--tf32`` runs them in TF32
on both sides against the TF32 peak instead. Other GPUs: see PEAKS, or ``--peak-bf16/--peak-f32``.

Environment: XLA flags are jax's defaults (none set). Both frameworks share the GPU in this one
process, so ``XLA_PYTHON_CLIENT_MEM_FRACTION`` defaults to 0.45 here (jax's default 0.75 would
leave torch 35 GB) unless set; torch uses ``cudnn.benchmark = True`` (fixed shapes).

HOW TO RUN IT ON A LENT H200 (the device tool; the machine's python3 is 3.12 with jax 0.11.2
CUDA 13, flax, optax, orbax, torch 2.11 and torchvision 0.26 in one venv). The script imports
no package that is missing there, so nothing needs carrying::

    run(command="PYTHONUNBUFFERED=1 python3 benchmarks/device_check.py --out $OUT/device_check.json",
        timeout_s=540)

Expected: ~5-7 min (most of it XLA compiling 4 train steps + 4 detectors, ~20-60 s each, and
torch.compile, capped by ``--compile-cap-s`` and the ``--budget-s 400`` total budget, past which
the remaining groups are skipped and named in the output). Quicker variants:
``--batches 8 --no-torch-compile`` (~3 min); ``--only ours`` / ``--only torch`` if the two
frameworks' CUDA libraries cannot share one process (then run twice; no match figures).

For the REST of the package on that machine (tests, train.py, evaluation) carry the wheels of
``benchmarks/device_requirements.txt`` (~5 MB), downloaded here for Python 3.12 into the
git-ignored ``build/``, then installed there without an index::

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d build/device_wheels -r benchmarks/device_requirements.txt
    run(command="python3 -m pip install -q --no-index --no-deps --target /tmp/site \
        build/device_wheels/*.whl && export PYTHONPATH=/tmp/site && python3 -m pytest ...",
        carry=["build/device_wheels"])

CPU check (the test runs it): ``JAX_PLATFORMS=cpu python benchmarks/device_check.py --smoke``
(ResNet-18, 128x128, batch 2, one timed step, f32 training and prediction, torch.compile with
the "eager" backend: every code path of the script for both frameworks; ~2-3 min on 2 cores).

    python benchmarks/device_check.py [--smoke] [--out FILE.json] [--batches 8,16]
        [--predict-batches 1,8] [--steps 5] [--repeats 3] [--warmup 2] [--no-torch-compile]
        [--compile-cap-s 240] [--budget-s 400] [--tf32] [--only ours|torch]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Dense peaks in TFLOP/s: bf16 tensor core, tf32 tensor core, fp32 (no tensor cores).
# NVIDIA datasheets give tensor-core figures "with sparsity": dense is half.
PEAKS = {
    "H200 NVL": {"bf16": 835.5, "tf32": 417.5, "f32": 60.0},  # H200 datasheet, NVL column
    "H200": {"bf16": 989.5, "tf32": 494.5, "f32": 67.0},  # H200 datasheet, SXM column
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "f32": 51.0},
    "H100": {"bf16": 989.5, "tf32": 494.5, "f32": 67.0},  # H100 SXM
    "A100": {"bf16": 312.0, "tf32": 156.0, "f32": 19.5},
}
TRAINABLE_LAYERS = 3
NUM_CLASSES = 91


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny CPU-sized run of every code path (ResNet-18, 128x128, batch 2, 1 step)",
    )
    p.add_argument("--out", default=None, help="write the figures as JSON to this file")
    p.add_argument("--backbone", default=None, help="resnet50 (default) | resnet18 | ...")
    p.add_argument("--size", default=None, help="training canvas HxW (default 800x1344)")
    p.add_argument(
        "--predict-size",
        default=None,
        help="prediction image HxW (default 800x1333: canvas 800x1344, no rescale)",
    )
    p.add_argument("--batches", default=None, help="training batch sizes (default 8,16)")
    p.add_argument("--predict-batches", default=None, help="prediction batch sizes (default 1,8)")
    p.add_argument("--train-dtypes", default=None, help="bf16,f32 (default both)")
    p.add_argument("--predict-dtypes", default=None, help="bf16,f32 (default both)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps per round (5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps / calls first (2)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (3; prediction 2x)")
    p.add_argument("--tf32", action="store_true", help="f32 rows in TF32 on both sides (TF32 peak)")
    p.add_argument("--only", choices=["ours", "torch"], default=None, help="one framework only")
    p.add_argument("--no-torch-compile", action="store_true")
    p.add_argument("--torch-compile-backend", default=None, help="inductor (default; smoke: eager)")
    p.add_argument(
        "--compile-cap-s",
        type=float,
        default=None,
        help="time cap of the torch.compile child process (240 s; smoke 150)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="total seconds; later groups are skipped once it would be exceeded (400)",
    )
    p.add_argument("--peak-bf16", type=float, default=None, help="TFLOP/s (default: from PEAKS)")
    p.add_argument("--peak-f32", type=float, default=None, help="TFLOP/s (default: from PEAKS)")
    p.add_argument("--tc-child", default=None, help=argparse.SUPPRESS)  # torch.compile child
    args = p.parse_args(argv)
    smoke = args.smoke
    defaults = dict(
        backbone="resnet18" if smoke else "resnet50",
        size="128x128" if smoke else "800x1344",
        predict_size="128x128" if smoke else "800x1333",
        batches="2" if smoke else "8,16",
        predict_batches="1" if smoke else "1,8",
        # smoke: f32 training (torch's CPU autocast is slow, XLA:CPU's bf16 step slow to compile)
        train_dtypes="f32" if smoke else "bf16,f32",
        predict_dtypes="f32" if smoke else "bf16,f32",
        steps=1 if smoke else 5,
        warmup=1 if smoke else 2,
        repeats=1 if smoke else 3,
        torch_compile_backend="eager" if smoke else "inductor",
        compile_cap_s=150.0 if smoke else 240.0,
        budget_s=1e9 if smoke else 400.0,
    )
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.size = tuple(int(x) for x in args.size.lower().split("x"))
    args.predict_size = tuple(int(x) for x in args.predict_size.lower().split("x"))
    args.batches = [int(b) for b in str(args.batches).split(",") if b]
    args.predict_batches = [int(b) for b in str(args.predict_batches).split(",") if b]
    args.train_dtypes = [d for d in args.train_dtypes.split(",") if d]
    args.predict_dtypes = [d for d in args.predict_dtypes.split(",") if d]
    for d in args.train_dtypes + args.predict_dtypes:
        if d not in ("bf16", "f32"):
            raise SystemExit(f"dtype must be bf16 or f32, got {d!r}")
    return args


class Budget:
    """Seconds left of --budget-s; a group is skipped when its estimate does not fit."""

    def __init__(self, seconds: float):
        self.t0, self.seconds, self.skipped = time.perf_counter(), seconds, []

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def allows(self, what: str, estimate_s: float) -> bool:
        if estimate_s <= self.left():
            return True
        self.skipped.append(f"{what} (estimated {estimate_s:.0f} s, {max(self.left(), 0):.0f} s left)")
        print(f"SKIPPED {what}: budget ({self.skipped[-1]})", flush=True)
        return False


def log(*a):
    print(*a, flush=True)


# --------------------------------------------------------------------------- torchvision side


def tv_weights(backbone: str, seed: int = 0) -> dict:
    """torchvision RetinaNet state_dict (v1 layout, FrozenBatchNorm2d: no num_batches_tracked)
    with random "lively" weights: hundreds of detections on random images, O(1) features."""
    import torch
    import torchvision
    from torchvision.models.detection import RetinaNet as TVRetinaNet
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    sys.path.insert(0, ROOT)
    from tests.tv_utils import _make_lively

    torch.manual_seed(seed)
    body = getattr(torchvision.models, backbone)(weights=None)  # BatchNorm2d: calibrated by _make_lively
    net = TVRetinaNet(
        _resnet_fpn_extractor(body, 5, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256)),
        NUM_CLASSES,
    ).eval()
    _make_lively(net, seed)
    return {
        k: v.detach().clone() for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")
    }


def tv_model(
    backbone: str, sd: dict, *, min_size: int, max_size: int, device: str, channels_last: bool, train: bool
):
    """retinanet_resnet50_fpn's v1 architecture (any ResNet body) with FrozenBatchNorm2d (eps 0,
    as the COCO_V1 weights run), trainable_backbone_layers=3, the given weights."""
    import torch
    import torchvision
    from torchvision.models.detection import RetinaNet as TVRetinaNet
    from torchvision.models.detection._utils import overwrite_eps
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    from torchvision.ops.misc import FrozenBatchNorm2d

    body = getattr(torchvision.models, backbone)(weights=None, norm_layer=FrozenBatchNorm2d)
    backbone_fpn = _resnet_fpn_extractor(
        body, TRAINABLE_LAYERS, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256)
    )
    net = TVRetinaNet(backbone_fpn, NUM_CLASSES, min_size=min_size, max_size=max_size)
    net.load_state_dict(sd)
    overwrite_eps(net, 0.0)
    net = net.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return net.train(train)


def make_train_data(batch: int, hw: tuple[int, int], max_boxes: int = 8, seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    h, w = hw
    xy = rng.uniform(0, 0.6, (batch, max_boxes, 2)) * (w, h)
    wh = rng.uniform(0.1, 0.4, (batch, max_boxes, 2)) * (w, h)
    return {
        "images": rng.integers(0, 256, (batch, h, w, 3), dtype=np.uint8),
        "image_sizes": np.full((batch, 2), (h, w), np.int32),
        "boxes": np.concatenate([xy, xy + wh], -1).astype(np.float32),
        "labels": rng.integers(1, NUM_CLASSES, (batch, max_boxes)).astype(np.int32),
    }


def tv_train_fn(net, data: dict, device: str, amp: bool, batch: int):
    """One torchvision training step (reference engine: autocast forward, loss.item())."""
    import torch

    images = [torch.from_numpy(im).to(device).permute(2, 0, 1).float().div(255) for im in data["images"]]
    targets = [
        {"boxes": torch.from_numpy(b).to(device), "labels": torch.from_numpy(lab).long().to(device)}
        for b, lab in zip(data["boxes"], data["labels"])
    ]
    # lr: the recipe's 0.01 x batch / 16 at the first warm-up step (start factor 1/1000), as ours.
    opt = torch.optim.SGD(
        [p for p in net.parameters() if p.requires_grad],
        lr=0.01 * batch / 16 / 1000,
        momentum=0.9,
        weight_decay=1e-4,
    )

    def step() -> float:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            losses = net(images, targets)
            loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def torch_sync(device: str):
    import torch

    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def torch_compile_child(cfg: dict) -> None:
    """Child process: torchvision training with torch.compile'd backbone + head; one JSON line
    per finished batch size (the parent's time cap may kill it part way)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = True
    sync = torch_sync(device)
    sd = tv_weights(cfg["backbone"])
    h, w = cfg["size"]
    for batch in cfg["batches"]:
        net = tv_model(
            cfg["backbone"],
            sd,
            min_size=h,
            max_size=max(h, w),
            device=device,
            channels_last=cfg["amp"],
            train=True,
        )
        net.backbone = torch.compile(net.backbone, backend=cfg["backend"])
        net.head = torch.compile(net.head, backend=cfg["backend"])
        step = tv_train_fn(net, make_train_data(batch, (h, w)), device, amp=cfg["amp"], batch=batch)
        t = time.perf_counter()
        step()
        sync()
        first = time.perf_counter() - t
        for _ in range(max(cfg["warmup"] - 1, 0)):
            step()
        times = []
        for _ in range(cfg["repeats"]):
            sync()
            t = time.perf_counter()
            for _ in range(cfg["steps"]):
                step()
            sync()
            times.append((time.perf_counter() - t) / cfg["steps"])
        med = statistics.median(times)
        print(
            "TC_RESULT "
            + json.dumps({"batch": batch, "step_s": med, "compile_s": first - med, "times": times}),
            flush=True,
        )
        del net, step
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


def run_torch_compile(args, cap_s: float) -> tuple[dict, str]:
    """{batch: result} from the child, and a note (why some or all are missing)."""
    cfg = {
        "backbone": args.backbone,
        "size": list(args.size),
        "batches": args.batches,
        "backend": args.torch_compile_backend,
        "amp": "bf16" in args.train_dtypes,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
    }
    cmd = [sys.executable, os.path.abspath(__file__), "--tc-child", json.dumps(cfg)]
    results, note = {}, ""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=cap_s)
        out, rc = proc.stdout, proc.returncode
        if rc:
            note = f"child exit {rc}: " + ((proc.stderr.strip().splitlines() or ["?"])[-1])[:200]
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        note = f"time cap {cap_s:.0f} s reached"
    for line in out.splitlines():
        if line.startswith("TC_RESULT "):
            r = json.loads(line[len("TC_RESULT ") :])
            results[r["batch"]] = r
    return results, note


# --------------------------------------------------------------------------- FLOPs


def count_matmul_flops(jaxpr) -> int:
    """2 x MACs of every conv_general_dilated / dot_general in a jaxpr (sub-jaxprs included)."""
    import numpy as np

    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            rhs, out = eqn.invars[1].aval, eqn.outvars[0].aval
            dn = eqn.params["dimension_numbers"]
            cout = rhs.shape[dn.rhs_spec[0]]
            total += 2 * int(np.prod(out.shape)) * int(np.prod(rhs.shape)) // cout
        elif name == "dot_general":
            lhs, out = eqn.invars[0].aval, eqn.outvars[0].aval
            (lc, _), _ = eqn.params["dimension_numbers"]
            total += 2 * int(np.prod(out.shape)) * int(np.prod([lhs.shape[d] for d in lc]))
        for v in eqn.params.values():
            for sub in v if isinstance(v, (list, tuple)) else [v]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += count_matmul_flops(inner)
    return total


def forward_flops(model, variables, hw) -> int:
    """Forward FLOPs of one image on an ``hw`` canvas, from our model's jaxpr (plain lax convs)."""
    import jax
    import jax.numpy as jnp

    from retinanet_jax.backends.cpu import conv

    x = jax.ShapeDtypeStruct((1, *hw, 3), jnp.float32)
    with conv.implementation("lax"):
        closed = jax.make_jaxpr(lambda v, im: model.apply(v, im))(variables, x)
    return count_matmul_flops(closed.jaxpr)


def torch_forward_flops(net, hw, device) -> int | None:
    """torch.utils.flop_counter on torchvision's backbone + head (the transform and postprocess
    do no convolutions), one image."""
    import torch

    try:
        from torch.utils.flop_counter import FlopCounterMode

        x = torch.zeros(1, 3, *hw, device=device)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net.head(list(net.backbone(x).values()))
        return int(counter.get_total_flops())
    except Exception as e:  # a cross-check only
        log(f"(torch flop counter unavailable: {type(e).__name__}: {e})")
        return None


# --------------------------------------------------------------------------- main run


def median_round(fns: dict, repeats: int, inner: int, sync) -> dict:
    """Interleaved rounds: each round runs every variant ``inner`` times; medians per call."""
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            sync()
            t = time.perf_counter()
            for _ in range(inner):
                fn()
            sync()
            times[k].append((time.perf_counter() - t) / inner)
    return {k: (statistics.median(v), v) for k, v in times.items()}


def main(args) -> int:
    t_start = time.perf_counter()
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
    sys.path.insert(0, ROOT)
    import jax
    import jax.numpy as jnp
    import numpy as np

    jax_devices = jax.devices()  # the jax backend first, then torch's CUDA context
    import torch
    import torchvision

    from retinanet_jax.inference.predict import Predictor
    from retinanet_jax.interop.torchvision import from_torchvision
    from retinanet_jax.parallel import mesh as parallel
    from retinanet_jax.training import optim
    from retinanet_jax.training import step as training

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from predict_vs_torchvision import match_fraction

    budget = Budget(args.budget_s)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch_sync(device)
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    f32_precision = "tensorfloat32" if args.tf32 else "float32"
    run_ours, run_torch = args.only in (None, "ours"), args.only in (None, "torch")

    dev0 = jax_devices[0]
    torch_dev = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu"
    env = {
        "jax": jax.__version__,
        "jax_device": f"{dev0.platform}: {dev0.device_kind}",
        "jax_device_count": len(jax_devices),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torch_device": f"{device}: {torch_dev}",
        "python": platform.python_version(),
        "argv": sys.argv[1:],
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "XLA_PYTHON_CLIENT_MEM_FRACTION": os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"],
    }
    log(
        f"jax {env['jax']} on {env['jax_device']} (x{env['jax_device_count']}); torch {env['torch']}, "
        f"torchvision {env['torchvision']} on {env['torch_device']}; python {env['python']}"
    )
    log(
        f"XLA_FLAGS={env['XLA_FLAGS']!r}, "
        f"XLA_PYTHON_CLIENT_MEM_FRACTION={env['XLA_PYTHON_CLIENT_MEM_FRACTION']}, "
        f"f32 = {'TF32' if args.tf32 else 'true float32 (TF32 off)'} on both sides"
    )
    name = f"{dev0.device_kind} {torch_dev}"
    peak_key = next((k for k in PEAKS if k in name), None)
    peaks = dict(PEAKS[peak_key]) if peak_key else {}
    if args.peak_bf16:
        peaks["bf16"] = args.peak_bf16
    if args.peak_f32:
        peaks["f32" if not args.tf32 else "tf32"] = args.peak_f32
    peak_of = {"bf16": peaks.get("bf16"), "f32": peaks.get("tf32" if args.tf32 else "f32")}
    log(
        f"peaks (dense TFLOP/s, {peak_key or 'unknown device: no MFU'}): bf16 {peak_of['bf16']}, "
        f"f32 {peak_of['f32']} ({'TF32' if args.tf32 else 'FP32'})"
    )

    # ---- the same weights on both sides
    t = time.perf_counter()
    sd = tv_weights(args.backbone)
    model, variables = from_torchvision({k: v.numpy() for k, v in sd.items()}, "v1", backbone=args.backbone)
    variables = jax.device_put(variables)
    log(f"weights: {args.backbone}, lively random, ported ({time.perf_counter() - t:.1f} s)")

    fwd_flops = forward_flops(model, variables, args.size)
    tv_eval = tv_model(
        args.backbone,
        sd,
        min_size=args.size[0],
        max_size=max(args.size),
        device=device,
        channels_last=False,
        train=False,
    )
    torch_flops = torch_forward_flops(tv_eval, args.size, device)
    del tv_eval
    flops = {
        "forward_per_image": fwd_flops,
        "train_per_image": 3 * fwd_flops,
        "torch_flop_counter_forward": torch_flops,
        "canvas": list(args.size),
    }
    agree = (
        ""
        if torch_flops is None
        else f" (torch flop counter: {torch_flops / 1e9:.2f}, {100 * (torch_flops / fwd_flops - 1):+.2f}%)"
    )
    log(
        f"model FLOPs per image at {args.size[0]}x{args.size[1]}: forward {fwd_flops / 1e9:.2f} G{agree}; "
        f"training 3x = {3 * fwd_flops / 1e9:.2f} G"
    )

    rows = []
    dtypes = {"bf16": jnp.bfloat16, "f32": None}

    def precision_ctx(dtype_name):
        import contextlib

        return (
            jax.default_matmul_precision(f32_precision) if dtype_name == "f32" else contextlib.nullcontext()
        )

    # ---- training
    mesh = parallel.make_mesh(devices=jax_devices[:1])
    last_s = {}  # seconds the last group of each task took (the next one's estimate)

    def train_group(batch):
        # Mostly compilation, which does not grow with the batch; the steps do.
        est = 1.25 * last_s["train"] if "train" in last_s else 30.0
        if not budget.allows(f"training batch {batch}", est):
            return
        t_group = time.perf_counter()
        data = make_train_data(batch, args.size)
        variants, first_s, holders = {}, {}, []
        if run_ours:
            tx, schedule = optim.make_optimizer(
                optim.TORCHVISION_V1, steps_per_epoch=10_000, global_batch_size=batch
            )
            for dn in args.train_dtypes:
                step_fn = training.make_train_step(model, mesh, compute_dtype=dtypes[dn])
                holder = {
                    "state": training.create_train_state(
                        model, variables, tx, TRAINABLE_LAYERS, mesh=mesh, schedule=schedule
                    )
                }
                holders.append(holder)
                placed = step_fn.place_batch(data)

                def ours(step_fn=step_fn, holder=holder, placed=placed, dn=dn):
                    with precision_ctx(dn):
                        holder["state"], metrics = step_fn(holder["state"], placed)  # waits (finite flag)
                    return metrics

                variants[("ours", dn)] = ours
        if run_torch:
            for dn in args.train_dtypes:
                net = tv_model(
                    args.backbone,
                    sd,
                    min_size=args.size[0],
                    max_size=max(args.size),
                    device=device,
                    channels_last=dn == "bf16",
                    train=True,
                )
                variants[("torchvision", dn)] = tv_train_fn(net, data, device, amp=dn == "bf16", batch=batch)
        losses = {}
        for key, fn in variants.items():  # warm-up; the first call of ours compiles
            sync()
            t = time.perf_counter()
            out = fn()
            sync()
            jax.block_until_ready([h["state"] for h in holders])
            first_s[key] = time.perf_counter() - t
            losses[key] = float(out["loss"]) if isinstance(out, dict) else out
            for _ in range(args.warmup - 1):
                fn()
            log(
                f"  train b{batch} {key[0]} {key[1]}: first step {first_s[key]:.1f} s, loss {losses[key]:.4f}"
            )
        # Ours wait for each step's finite-loss flag; the barrier also waits for the last updates.
        med = median_round(
            variants,
            args.repeats,
            args.steps,
            lambda: (sync(), jax.block_until_ready([h["state"] for h in holders])),
        )
        for (fw, dn), (step_s, times) in med.items():
            peak = peak_of[dn]
            row = {
                "task": "train",
                "framework": fw,
                "mode": _mode(fw, dn, args.tf32),
                "dtype": dn,
                "batch": batch,
                "ms": 1e3 * step_s,
                "images_per_s": batch / step_s,
                "mfu": (3 * fwd_flops * batch / step_s / (peak * 1e12)) if peak else None,
                "compile_s": first_s[(fw, dn)] - step_s if fw == "ours" else None,
                "first_step_s": first_s[(fw, dn)],
                "first_loss": losses[(fw, dn)],
                "times_s": times,
            }
            ref = med.get(("torchvision", dn))
            row["vs_torch"] = ref[0] / step_s if (fw == "ours" and ref) else None
            rows.append(row)
        variants.clear()  # free the device states before the next batch size
        holders.clear()
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        last_s["train"] = time.perf_counter() - t_group
        log(f"  training batch {batch}: {last_s['train']:.0f} s")

    # ---- prediction
    ph, pw = args.predict_size
    min_size, max_size = min(ph, pw), max(ph, pw)
    tv_pred = {}
    if run_torch:
        for dn in args.predict_dtypes:
            tv_pred[dn] = tv_model(
                args.backbone,
                sd,
                min_size=min_size,
                max_size=max_size,
                device=device,
                channels_last=dn == "bf16",
                train=False,
            )

    def predict_group(batch):
        est = last_s.get("predict", 30.0)
        if not budget.allows(f"prediction batch {batch}", est):
            return
        t_group = time.perf_counter()
        rng = np.random.default_rng(1)
        images = [rng.integers(0, 256, (ph, pw, 3), dtype=np.uint8) for _ in range(batch)]
        e2e, dev_only, first_s, dets = {}, {}, {}, {}
        if run_ours:
            for dn in args.predict_dtypes:
                pred = Predictor(
                    model, variables, min_size=min_size, max_size=max_size, batch_size=batch, dtype=dtypes[dn]
                )
                prepared = pred.preprocess(images)

                def ours_e2e(pred=pred, dn=dn):
                    with precision_ctx(dn):
                        return pred(images)

                def ours_dev(pred=pred, prepared=prepared, dn=dn):
                    with precision_ctx(dn):
                        return jax.block_until_ready(pred.detect(*prepared))

                e2e[("ours", dn)], dev_only[("ours", dn)] = ours_e2e, ours_dev
        if run_torch:
            for dn, net in tv_pred.items():
                on_device = [
                    torch.from_numpy(im).to(device).permute(2, 0, 1).float().div(255) for im in images
                ]

                def tv_e2e(net=net, dn=dn):
                    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=dn == "bf16"):
                        x = [
                            torch.from_numpy(im).to(device).permute(2, 0, 1).float().div(255) for im in images
                        ]
                        out = net(x)
                    return [
                        {k: (v.float() if v.is_floating_point() else v).cpu().numpy() for k, v in d.items()}
                        for d in out
                    ]

                def tv_dev(net=net, dn=dn, x=on_device):
                    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=dn == "bf16"):
                        out = net(x)
                    sync()
                    return out

                e2e[("torchvision", dn)], dev_only[("torchvision", dn)] = tv_e2e, tv_dev
        for key, fn in e2e.items():  # warm-up (ours: compiles the preprocess + detector)
            t = time.perf_counter()
            dets[key] = fn()
            first_s[key] = time.perf_counter() - t
            for _ in range(args.warmup - 1):
                fn()
            dev_only[key]()
            log(
                f"  predict b{batch} {key[0]} {key[1]}: first call {first_s[key]:.1f} s, "
                f"{sum(len(d['scores']) for d in dets[key])} detections"
            )
        reps = 2 * args.repeats
        med = median_round(e2e, reps, 1, sync)
        med_dev = median_round(dev_only, reps, 1, sync)
        for (fw, dn), (lat, times) in med.items():
            row = {
                "task": "predict",
                "framework": fw,
                "mode": _mode(fw, dn, args.tf32, train=False),
                "dtype": dn,
                "batch": batch,
                "ms": 1e3 * lat,
                "device_ms": 1e3 * med_dev[(fw, dn)][0],
                "images_per_s": batch / lat,
                "mfu": None,
                "compile_s": first_s[(fw, dn)] - lat if fw == "ours" else None,
                "first_call_s": first_s[(fw, dn)],
                "times_s": times,
                "detections": sum(len(d["scores"]) for d in dets[(fw, dn)]),
            }
            ref = med.get(("torchvision", dn))
            row["vs_torch"] = ref[0] / lat if (fw == "ours" and ref) else None
            if fw == "ours" and ("torchvision", dn) in dets:
                row["match"] = match_fraction(dets[("torchvision", dn)], dets[(fw, dn)])
            rows.append(row)
        del e2e, dev_only
        last_s["predict"] = time.perf_counter() - t_group
        log(f"  prediction batch {batch}: {last_s['predict']:.0f} s")

    # Order by what the budget should keep first: the first training batch size, prediction
    # (latency and the detection match), then the other training batch sizes.
    for batch in args.batches[:1]:
        train_group(batch)
    for batch in args.predict_batches:
        predict_group(batch)
    for batch in args.batches[1:]:
        train_group(batch)
    rows.sort(key=lambda r: r["task"] != "train")  # stable: training rows first, as run
    tv_pred.clear()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()

    # ---- torch.compile (child process, capped)
    tc_note = "off (--no-torch-compile)" if args.no_torch_compile else ""
    if run_torch and not args.no_torch_compile and args.batches:
        cap = min(args.compile_cap_s, budget.left())
        if cap < 60:
            tc_note = f"skipped: {max(budget.left(), 0):.0f} s of the budget left"
            budget.skipped.append("torch.compile " + tc_note)
        else:
            log(f"  torch.compile ({args.torch_compile_backend}) in a child process, cap {cap:.0f} s ...")
            results, tc_note = run_torch_compile(args, cap)
            for batch in args.batches:
                r = results.get(batch)
                if r is None:
                    continue
                dn = "bf16" if "bf16" in args.train_dtypes else "f32"
                peak = peak_of[dn]
                ref = next(
                    (
                        x
                        for x in rows
                        if x["task"] == "train"
                        and x["framework"] == "torchvision"
                        and x["dtype"] == dn
                        and x["batch"] == batch
                    ),
                    None,
                )
                mode = "AMP bf16 CL" if dn == "bf16" else ("TF32" if args.tf32 else "f32")
                rows.append(
                    {
                        "task": "train",
                        "framework": "torchvision",
                        "mode": f"torch.compile({args.torch_compile_backend}) {mode}",
                        "dtype": dn,
                        "batch": batch,
                        "ms": 1e3 * r["step_s"],
                        "images_per_s": batch / r["step_s"],
                        "mfu": (3 * fwd_flops * batch / r["step_s"] / (peak * 1e12)) if peak else None,
                        "compile_s": r["compile_s"],
                        "times_s": r["times"],
                        "vs_eager": (ref["ms"] / 1e3 / r["step_s"]) if ref else None,
                    }
                )
            log(
                f"  torch.compile: {len(results)} of {len(args.batches)} batch sizes"
                + (f"; {tc_note}" if tc_note else "")
            )

    total = time.perf_counter() - t_start
    print_table(rows, env, flops, peak_of, args, tc_note, budget.skipped, total)
    if args.out:
        doc = {
            "env": env,
            "peaks_tflops": peak_of,
            "peak_source": peak_key,
            "flops": flops,
            "rows": rows,
            "torch_compile_note": tc_note,
            "skipped": budget.skipped,
            "total_s": total,
            "config": {k: v for k, v in vars(args).items() if k != "tc_child"},
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1, default=str)
        log(f"wrote {args.out}")
    return 0


def _mode(fw: str, dn: str, tf32: bool, train: bool = True) -> str:
    f32 = "TF32" if tf32 else "f32"
    if fw == "ours":
        return "jit bf16" if dn == "bf16" else f"jit {f32}"
    return "eager AMP bf16 CL" if dn == "bf16" else f"eager {f32}"


def _fmt(v, spec, none="-"):
    return none if v is None else format(v, spec)


def print_table(rows, env, flops, peak_of, args, tc_note, skipped, total):
    h, w = args.size
    log("")
    log(
        f"RetinaNet v1 {args.backbone}-FPN, train canvas {h}x{w}, predict images "
        f"{args.predict_size[0]}x{args.predict_size[1]}; jax {env['jax']} ({env['jax_device']}), "
        f"torch {env['torch']} / torchvision {env['torchvision']} ({env['torch_device']})"
    )
    log(
        f"MFU: {3 * flops['forward_per_image'] / 1e9:.1f} GFLOP per training image (3x forward) / "
        f"peak bf16 {_fmt(peak_of['bf16'], '.1f')}, f32 {_fmt(peak_of['f32'], '.1f')} TFLOP/s; "
        f"medians of {args.repeats} interleaved rounds x {args.steps} steps "
        f"(prediction: {2 * args.repeats} calls)"
    )
    log(
        "| task | framework | mode | batch | ms | device ms | images/s | MFU % | compile s "
        "| vs torch | match % |"
    )
    log("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        vs = r.get("vs_torch") if r.get("vs_torch") is not None else r.get("vs_eager")
        vs_s = "-" if vs is None else (f"{vs:.2f}x" + (" eager" if "vs_eager" in r else ""))
        log(
            f"| {r['task']} | {r['framework']} | {r['mode']} | {r['batch']} | {r['ms']:.1f} | "
            f"{_fmt(r.get('device_ms'), '.1f')} | {r['images_per_s']:.2f} | "
            f"{_fmt(None if r['mfu'] is None else 100 * r['mfu'], '.1f')} | {_fmt(r['compile_s'], '.1f')} | "
            f"{vs_s} | {_fmt(None if r.get('match') is None else 100 * r['match'], '.1f')} |"
        )
    log(
        "vs torch: our images/s / torchvision eager's in the same precision (torch.compile rows: "
        "/ eager's). match %: torchvision's detections matched by ours (same label, IoU >= 0.9, "
        "|dscore| <= 0.02), same images and weights; ms (predict): host uint8 in -> numpy "
        "detections out; device ms: the model call on device-resident images."
    )
    if tc_note:
        log(f"torch.compile: {tc_note}")
    for s in skipped:
        log(f"skipped: {s}")
    log(f"total {total:.0f} s")


if __name__ == "__main__":
    _args = parse_args()
    if _args.tc_child:
        torch_compile_child(json.loads(_args.tc_child))
        sys.exit(0)
    sys.exit(main(_args))
