"""End-to-end prediction speed: retinanet_jax.Predictor vs torchvision's model(images), same weights.

    python benchmarks/predict_vs_torchvision.py [--quick] [--full] [--variant v1]
        [--xla-flags "--xla_cpu_use_onednn=true"] [--sweep] [--dtype-ablation] [--forms-ablation]

Both frameworks start from uint8 HxWx3 images (torchvision: to_tensor-equivalent conversion is
timed too) and end with boxes in original pixels. Images are sized so that torchvision resizes
them (x2 upsampling) to the 800x1216 and 512x512 canvases. Timings are medians of interleaved
runs (ours, torchvision, ours, ...) after warm-up. Weights: random "lively" ones (tests/tv_utils)
so that there are hundreds of detections. ``--sweep`` reruns the small case in subprocesses, one
per XLA CPU flag set, and prints a table. XLA flags must be set before jax starts, hence the
``--xla-flags`` option (added to XLA_FLAGS) rather than a runtime switch. ``--dtype-ablation``
times bf16 prediction with the ResNet body, the FPN or the heads kept in f32 (same weights) and
prints each one's match with our f32 detections (batch 1; ours only, interleaved).
``--forms-ablation`` times the jitted detector (forward + postprocess, batch 1, f32 and bf16)
with every CPU convolution form, with none (``lax``) and with every form but one
(``retinanet_jax.backends.cpu.conv.MODES``), interleaved, next to torchvision's model on the
same canvas: what each form is worth in prediction on this machine (each timed call follows an
untimed one of the same variant).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One canvas per case: (original h, w) -> resized x2 by torchvision to (canvas h, w).
CASES = {"512": ((256, 256), 512, 1333), "800x1216": ((400, 608), 800, 1333)}
# bf16 = f32 detections over more images than the timed one (untimed): one image's 300
# detections give the match rate with a sampling error of about +-1.3 points.
MATCH_IMAGES = {"512": 8, "800x1216": 4}

SWEEP_FLAGS = [
    "",
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_experimental_onednn_custom_call=true",
    "--xla_cpu_experimental_onednn_fusion_type=dot,eltwise",
    "--xla_cpu_use_xnnpack=true",
    "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce",
    "--xla_cpu_experimental_ynn_fusion_type=dot,individual_convolution",
    "--xla_cpu_enable_fast_math=true",
    "--xla_cpu_use_thunk_runtime=false",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="batch 1 only, 2 repeats, bf16 on 512 only")
    p.add_argument("--full", action="store_true", help="also 800x1216 at batch 8 (slow on 2 cores)")
    p.add_argument("--variant", default="v1", choices=["v1", "v2"])
    p.add_argument("--repeats", type=int, default=None, help="timed runs per framework and case")
    p.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for this run")
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument("--cases", default=None, help="comma list of CASE:BATCH, e.g. 512:1,800x1216:1")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--sweep", action="store_true", help="XLA flag sweep on 512:1 (subprocesses)")
    p.add_argument("--json", action="store_true", help="print one JSON line (used by --sweep)")
    p.add_argument(
        "--dtype-ablation",
        action="store_true",
        help="bf16 with some parts in f32 (ResNet body / FPN / heads): time and bf16=f32 match",
    )
    p.add_argument(
        "--forms-ablation",
        action="store_true",
        help="the detector with each CPU conv form switched off in turn (conv.MODES), vs torchvision",
    )
    p.add_argument(
        "--conv-micro",
        action="store_true",
        help="3x3 conv 256->256 at 100x152: f32 vs bf16, as conv / im2col dot / 9 dots",
    )
    return p.parse_args(argv)


# --------------------------------------------------------------------------- measurement helpers


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


class MatmulPeak:
    """float32 matmul throughput (GFLOP/s) of a jitted jnp.dot; sampled between the timed runs,
    because on a shared machine the available compute drifts."""

    def __init__(self, jax, jnp, n=2048):
        import numpy as np

        self.n, self.jax = n, jax
        self.a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
        self.f = jax.jit(lambda x, y: jnp.dot(x, y))
        self.f(self.a, self.a).block_until_ready()
        self.samples = []

    def sample(self, reps=2):
        for _ in range(reps):
            t = time.perf_counter()
            self.f(self.a, self.a).block_until_ready()
            self.samples.append(2 * self.n**3 / (time.perf_counter() - t) / 1e9)
        return self.samples[-1]

    def median(self, last=None):
        return median(self.samples[-last:] if last else self.samples)


def match_fraction(ref_dets, got_dets, iou_min=0.9, score_tol=0.02, cap=None):
    """Share of ``ref`` detections matched one-to-one (greedy in score order) by ``got`` ones:
    same label, IoU >= iou_min (or all coordinates within 0.5 px for degenerate boxes),
    |score difference| <= score_tol.

    ``cap`` (detections_per_img): in an image whose ``cap`` slots are all filled, ref detections
    scoring within score_tol of its lowest kept score are left out: a score change inside the
    tolerance can legitimately move them across the top-``cap`` cut."""
    import numpy as np

    total = matched = 0
    for r, g in zip(ref_dets, got_dets):
        if cap is not None and len(r["scores"]) >= cap:
            keep = r["scores"] >= r["scores"].min() + score_tol  # sorted by score: a prefix
            r = {k: v[keep] for k, v in r.items()}
        total += len(r["scores"])
        if not len(r["scores"]) or not len(g["scores"]):
            continue
        a, b = r["boxes"], g["boxes"]
        lt = np.maximum(a[:, None, :2], b[None, :, :2])
        rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
        inter = np.prod(np.clip(rb - lt, 0, None), -1)

        def area(x):
            return np.prod(x[:, 2:] - x[:, :2], -1)

        iou = inter / np.maximum(area(a)[:, None] + area(b)[None] - inter, 1e-9)
        close = np.abs(a[:, None] - b[None]).max(-1) <= 0.5
        ok = (
            ((iou >= iou_min) | close)
            & (r["labels"][:, None] == g["labels"][None])
            & (np.abs(r["scores"][:, None] - g["scores"][None]) <= score_tol)
        )
        used = np.zeros(len(b), bool)
        for i in range(len(a)):
            c = np.flatnonzero(ok[i] & ~used)
            if len(c):
                used[c[0]] = True
                matched += 1
    return matched / max(total, 1)


# --------------------------------------------------------------------------- one benchmark run


def run(args):
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, ROOT)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from retinanet_jax.backends.cpu import conv
    from retinanet_jax.inference.postprocess import postprocess
    from retinanet_jax.inference.predict import Predictor
    from retinanet_jax.ops import anchors as anchors_lib
    from tests.tv_utils import make_jax_from_tv

    torch.set_num_threads(args.threads)
    log = (
        (lambda *a: print(*a, file=sys.stderr, flush=True))
        if args.json
        else (lambda *a: print(*a, flush=True))
    )
    repeats = args.repeats or (2 if args.quick else 5)
    if args.cases:
        cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases.split(",")]
    elif args.quick:
        cases = [("512", 1), ("800x1216", 1)]
    else:
        cases = [("512", 1), ("512", 8), ("800x1216", 1)] + ([("800x1216", 8)] if args.full else [])
    bf16_cases = (
        []
        if args.no_bf16
        else ([c for c in cases if c == ("512", 1)] if args.quick else [c for c in cases if c[1] == 1])
    )

    tv, model, variables = make_jax_from_tv(args.variant)
    peak = MatmulPeak(jax, jnp)
    log(
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}  "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}  torch threads={torch.get_num_threads()}  "
        f"f32 matmul (jitted jnp.dot 2048^3): {peak.sample(3):.1f} GFLOP/s"
    )

    def tv_predict(images):
        with torch.no_grad():
            x = [torch.from_numpy(im).permute(2, 0, 1).float().div(255) for im in images]
            dets = tv(x)
        # Under autocast, boxes / scores come out in bf16: compare them as float32.
        return [{k: (v.float() if v.is_floating_point() else v).numpy() for k, v in d.items()} for d in dets]

    def tv_predict_bf16(images):
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            return tv_predict(images)

    def staged(pred, images):
        """predictor(images) for one chunk, with a barrier between stages to time them."""
        t0 = time.perf_counter()
        batch, sizes, originals = pred.preprocess(images)
        batch.block_until_ready()
        t1 = time.perf_counter()
        out = pred.detect(batch, sizes, originals)
        jax.block_until_ready(out)
        t2 = time.perf_counter()
        dets = pred.to_numpy(out, len(images))
        t3 = time.perf_counter()
        return dets, (t1 - t0, t2 - t1, t3 - t2)

    results = []
    for name, batch_size in cases:
        (h, w), min_size, max_size = CASES[name]
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(batch_size)]
        tv.transform.min_size, tv.transform.max_size = (min_size,), max_size
        for dtype in ["f32"] + (["bf16"] if (name, batch_size) in bf16_cases else []):
            pred = Predictor(
                model,
                variables,
                min_size=min_size,
                max_size=max_size,
                batch_size=batch_size,
                dtype=jnp.bfloat16 if dtype == "bf16" else None,
            )
            tv_fn = tv_predict_bf16 if dtype == "bf16" else tv_predict
            t = time.perf_counter()
            dets, _ = staged(pred, images)  # compiles
            first = time.perf_counter() - t
            tv_fn(images)  # warm-up
            ours, theirs, stages = [], [], []
            for _ in range(repeats):  # interleaved A B A B
                t = time.perf_counter()
                dets, st = staged(pred, images)
                ours.append(time.perf_counter() - t)
                stages.append(st)
                t = time.perf_counter()
                ref = tv_fn(images)
                theirs.append(time.perf_counter() - t)
                peak.sample()
            case_peak = peak.median(last=2 * repeats)
            t_ours, t_tv = median(ours), median(theirs)
            pre, det, post_host = (median([s[i] for s in stages]) for i in range(3))
            # Forward-only FLOPs from XLA's cost analysis; postprocess time from a jit of it alone
            # on the model's outputs, so forward time = detect stage - postprocess.
            batch, sizes, originals = pred.preprocess(images)
            fwd = jax.jit(pred.model.apply)
            # FLOPs of the direct-convolution forward (torchvision's work): Winograd does
            # fewer on CPU, so the peak share is an effective rate and can pass 100%.
            # (A function of its own: jit caches traces regardless of the conv mode.)
            with conv.implementation("lax"):
                flops = (
                    jax.jit(lambda v, b: pred.model.apply(v, b))
                    .lower(pred.variables, batch)
                    .compile()
                    .cost_analysis()
                )
            flops = (flops[0] if isinstance(flops, (list, tuple)) else flops)["flops"]
            raw = fwd(pred.variables, batch)
            canvas = batch.shape[1:3]
            pp = jax.jit(
                lambda c, r, a, s: postprocess(c, r, a, anchors_lib.num_anchors_per_level(canvas), s)
            )
            a = jnp.asarray(anchors_lib.anchors_for_image(canvas))
            jax.block_until_ready(pp(raw["cls_logits"], raw["bbox_regression"], a, sizes))
            pts = []
            for _ in range(3):
                t = time.perf_counter()
                jax.block_until_ready(pp(raw["cls_logits"], raw["bbox_regression"], a, sizes))
                pts.append(time.perf_counter() - t)
            t_pp = median(pts)
            t_fwd = max(det - t_pp, 1e-9)
            row = dict(
                case=f"{name} x{batch_size}",
                dtype=dtype,
                jax_s=t_ours,
                tv_s=t_tv,
                ratio=t_ours / t_tv,
                gflop=flops / 1e9,
                fwd_gflops=flops / 1e9 / t_fwd,
                peak=case_peak,
                peak_share=flops / 1e9 / t_fwd / case_peak,
                pre_share=pre / t_ours,
                post_share=(t_pp + post_host) / t_ours,
                compile_s=first - t_ours,
                n_dets=sum(len(d["scores"]) for d in dets),
                tv_match=match_fraction(ref, dets),
            )
            if dtype == "bf16":
                f32_dets = next(r for r in results if r["case"] == row["case"])["_dets"]
                row["match_f32"] = match_fraction(f32_dets, dets)
                row["match_f32_clear"] = match_fraction(f32_dets, dets, cap=pred.options.detections_per_img)
                # The same criterion for torchvision's own autocast against its float32 run: what
                # bf16 rounding does to this model's detections in the reference framework.
                tv_f32 = next(r for r in results if r["case"] == row["case"])["_ref"]
                row["tv_match_f32"] = match_fraction(tv_f32, ref)
                rng_more = np.random.default_rng(0)
                more = [
                    rng_more.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(MATCH_IMAGES[name])
                ]
                f32_pred = Predictor(
                    model, variables, min_size=min_size, max_size=max_size, batch_size=batch_size
                )
                row["match_f32_images"] = len(more)
                row["match_f32_more"] = match_fraction(f32_pred(more), pred(more))
            row["_ref"] = ref
            row["_dets"] = dets
            results.append(row)
            log(
                f"  {row['case']:<13} {dtype:<4} ours {t_ours:7.3f}s  torchvision {t_tv:7.3f}s  "
                f"ratio {row['ratio']:.2f}  compile {row['compile_s']:.1f}s"
            )
    return peak.median(), results


def mixed_precision_model(model, f32_parts):
    """``model`` (a RetinaNet) computing in its dtype except ``f32_parts`` ("body", "fpn",
    "head"), which compute in float32: the same parameter tree, so the same variables apply.
    For --dtype-ablation only (the library has one compute dtype per model)."""
    import flax.linen as nn
    import jax.numpy as jnp

    from retinanet_jax.models.fpn import FeaturePyramidNetwork
    from retinanet_jax.models.heads import RetinaNetHead
    from retinanet_jax.models.resnet import ResNet, stage_channels
    from retinanet_jax.models.retinanet import RetinaNet

    def dt(part):
        return jnp.float32 if part in f32_parts else model.dtype

    class Backbone(nn.Module):
        @nn.compact
        def __call__(self, images, train=False):
            _, c3, c4, c5 = ResNet(model.backbone, model.bn_eps, model.frozen_bn, dt("body"), name="body")(
                images, train
            )
            p6_from_c5 = model.variant == "v2" and stage_channels(model.backbone)[-1] != model.fpn_channels
            fpn = FeaturePyramidNetwork(model.fpn_channels, p6_from_c5, dt("fpn"), name="fpn")
            return fpn([c3.astype(dt("fpn")), c4.astype(dt("fpn")), c5.astype(dt("fpn"))])

    class Mixed(RetinaNet):
        @nn.compact
        def __call__(self, images, train=False):
            features = Backbone(name="backbone")(images.astype(dt("body")), train)
            head = RetinaNetHead(
                model.num_classes,
                model.num_anchors,
                group_norm=model.variant == "v2",
                dtype=dt("head"),
                name="head",
            )
            return head([f.astype(dt("head")) for f in features])

    return Mixed(
        **{
            f: getattr(model, f)
            for f in (
                "num_classes",
                "variant",
                "backbone",
                "bn_eps",
                "frozen_bn",
                "num_anchors",
                "fpn_channels",
                "dtype",
                "anchor_sizes",
                "aspect_ratios",
            )
        }
    )


def dtype_ablation(args):
    """bf16 prediction with parts of the network in f32: time and match with our f32 detections."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, ROOT)
    import jax.numpy as jnp
    import numpy as np

    from retinanet_jax.inference.predict import Predictor
    from tests.tv_utils import make_jax_from_tv

    _, model, variables = make_jax_from_tv(args.variant)
    variants = [
        ("all bf16", ()),
        ("ResNet body f32", ("body",)),
        ("FPN f32", ("fpn",)),
        ("heads f32", ("head",)),
        ("body + FPN f32 (heads bf16)", ("body", "fpn")),
        ("all f32", ("body", "fpn", "head")),
    ]
    repeats = args.repeats or 3
    print("| case | bf16 except | ours s | vs all bf16 | bf16=f32 % | clear of cut % |")
    print("|---|---|---|---|---|---|")
    for name in ["512", "800x1216"]:
        (h, w), min_size, max_size = CASES[name]
        images = [np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)]
        f32_dets = Predictor(model, variables, min_size=min_size, max_size=max_size, batch_size=1)(images)
        preds = {}
        for label, parts in variants:
            m = mixed_precision_model(model.clone(dtype=jnp.bfloat16), parts)
            pred = Predictor(m, variables, min_size=min_size, max_size=max_size, batch_size=1)
            preds[label] = (pred, pred(images), [])  # compiles
        for _ in range(repeats):  # interleaved
            for label, (pred, _, times) in preds.items():
                t = time.perf_counter()
                pred(images)
                times.append(time.perf_counter() - t)
        base = median(preds["all bf16"][2])
        for label, (pred, dets, times) in preds.items():
            print(
                f"| {name} x1 | {label} | {median(times):.3f} | {median(times) / base:.2f} | "
                f"{100 * match_fraction(f32_dets, dets):.1f} | "
                f"{100 * match_fraction(f32_dets, dets, cap=pred.options.detections_per_img):.1f} |",
                flush=True,
            )


def forms_ablation(args):
    """The jitted detector (forward + postprocess) of one canvas per conv mode, interleaved with
    torchvision's model on the same normalized canvas (its transform keeps the size): ms and
    time relative to every form on ("auto"). Batch 1, f32 and bf16 (torch autocast)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, ROOT)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from retinanet_jax.backends.cpu import conv
    from retinanet_jax.inference.detector import DetectorOptions, detect
    from retinanet_jax.ops import anchors as anchors_lib
    from tests.tv_utils import make_jax_from_tv

    torch.set_num_threads(args.threads)
    tv, model, variables = make_jax_from_tv(args.variant)
    repeats = args.repeats or 5
    print("| canvas | dtype | variant | min ms | median ms | median / every form's |")
    print("|---|---|---|---|---|---|")
    for name in ["512", "800x1216"] if not args.cases else [c.split(":")[0] for c in args.cases.split(",")]:
        (h, w), _, _ = CASES[name]
        canvas = (2 * h, 2 * w)  # what the case's images are resized to
        tv.transform.min_size, tv.transform.max_size = (min(canvas),), max(canvas)
        image = np.random.default_rng(0).random((1, *canvas, 3), np.float32)
        sizes = jnp.asarray([canvas], jnp.int32)
        anchors = jnp.asarray(anchors_lib.anchors_for_model(model, canvas))
        for dtype in ["f32"] + ([] if args.no_bf16 else ["bf16"]):
            m = model if dtype == "f32" else model.clone(dtype=jnp.bfloat16)
            runs = {}
            for mode in conv.MODES:
                # A jit of its own per mode: jit's cache does not see the (trace-time) mode.
                fn = jax.jit(lambda v, x, s, a, m=m: detect(m, v, x, s, a, DetectorOptions()))
                args_ = (variables, image, sizes, anchors)
                with conv.implementation(mode):
                    jax.block_until_ready(fn(*args_))  # compiles
                runs[f"ours {mode}"] = lambda fn=fn, a=args_: jax.block_until_ready(fn(*a))
            x = torch.from_numpy(image[0]).permute(2, 0, 1).contiguous()

            def tv_run(bf16=dtype == "bf16"):
                with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                    tv([x])

            runs["torchvision"] = tv_run
            tv_run()  # warm-up
            times = {k: [] for k in runs}
            for _ in range(repeats):  # interleaved
                for k, fn in runs.items():
                    # One untimed call first: a call right after the other framework's (or
                    # another variant's) runs up to 30% slower (shared allocator and caches).
                    fn()
                    t = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t)
            base = median(times["ours auto"])
            for k, ts in times.items():
                t = median(ts)
                ms = f"{1e3 * min(ts):.0f} | {1e3 * t:.0f}"
                row = f"| {canvas[0]}x{canvas[1]} | {dtype} | {k} | {ms} | {t / base:.2f} |"
                print(row, flush=True)


def print_table(peak, results):
    print(
        "\nratio = ours / torchvision end to end (medians of interleaved runs); peak = f32 jnp.dot "
        "2048^3 GFLOP/s sampled between those runs; % peak = forward GFLOP/s / peak"
    )
    print(
        "| case | dtype | ours s | tv s | ratio | fwd GFLOP | fwd GFLOP/s | peak | % peak | pre % "
        "| post % | compile s | dets | =tv % | bf16=f32 % | bf16=f32 % more images | clear of cut % "
        "| tv bf16=f32 % |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        bf = (
            f"{100 * r['match_f32']:.1f} | {100 * r['match_f32_more']:.1f} | "
            f"{100 * r['match_f32_clear']:.1f} | {100 * r['tv_match_f32']:.1f}"
            if "match_f32" in r
            else "- | - | - | -"
        )
        print(
            f"| {r['case']} | {r['dtype']} | {r['jax_s']:.3f} | {r['tv_s']:.3f} | {r['ratio']:.2f} | "
            f"{r['gflop']:.0f} | {r['fwd_gflops']:.1f} | {r['peak']:.0f} | {100 * r['peak_share']:.0f} | "
            f"{100 * r['pre_share']:.1f} | {100 * r['post_share']:.1f} | {r['compile_s']:.1f} | "
            f"{r['n_dets']} | {100 * r['tv_match']:.1f} | {bf} |"
        )
    print(
        "=tv %: our detections matching torchvision's (its own dtype); bf16=f32 %: our bf16 "
        "detections matching our f32 ones (same label, IoU >= 0.9, |dscore| <= 0.02), on the "
        "timed image and pooled over MATCH_IMAGES images (8 at 512, 4 at 800x1216, the first "
        "being the timed one); clear of "
        "cut %: the same, leaving out f32 detections scoring within 0.02 of the lowest kept one "
        "in images that fill all detections_per_img slots (those can swap with bf16 rounding); "
        "tv bf16=f32 %: torchvision's autocast detections matching its float32 ones, same rule."
    )


def sweep(args):
    rows = []
    for flags in SWEEP_FLAGS:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--json",
            "--cases",
            "512:1",
            "--repeats",
            str(args.repeats or 3),
            "--variant",
            args.variant,
            f"--xla-flags={flags}",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not line:
            err = (proc.stderr.strip().splitlines() or ["?"])[-1][:100]
            rows.append((flags or "(default)", None, err))
        else:
            rows.append((flags or "(default)", json.loads(line[-1]), ""))
        print(f"done: {flags or '(default)'}", file=sys.stderr, flush=True)
    print("\nXLA CPU flag sweep, 512x512 batch 1, ratio = ours / torchvision (same process, interleaved)")
    print(
        "| XLA_FLAGS | peak GFLOP/s | f32 ours s | f32 ratio | % peak | bf16 ours s | bf16 ratio "
        "| bf16=f32 % | note |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for flags, res, err in rows:
        if res is None:
            print(f"| {flags} | - | - | - | - | - | - | - | failed: {err} |")
            continue
        f, b = res["rows"][0], (res["rows"][1] if len(res["rows"]) > 1 else None)
        bcols = f"{b['jax_s']:.3f} | {b['ratio']:.2f} | {100 * b['match_f32']:.1f}" if b else "- | - | -"
        print(
            f"| {flags} | {f['peak']:.0f} | {f['jax_s']:.3f} | {f['ratio']:.2f} | "
            f"{100 * f['peak_share']:.0f} | {bcols} | |"
        )


def conv_micro(args):
    """Why bf16 barely helps on XLA CPU: shows whether the compiled bf16 conv runs in f32, and
    times the conv written three ways (conv, im2col + one dot, sum of 9 shifted dots)."""
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
    import jax
    import jax.numpy as jnp
    import numpy as np

    h, w, c = 100, 152, 256
    dims = ("NHWC", "HWIO", "NHWC")

    def conv(x, k):
        return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=dims)

    def patches(x):
        xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        return [xp[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)]

    def im2col(x, k):
        cols = jnp.concatenate(patches(x), -1).reshape(-1, 9 * c)
        return jnp.dot(cols, k.reshape(9 * c, c), preferred_element_type=jnp.float32).astype(x.dtype)

    def shifted(x, k):
        acc = sum(
            jnp.dot(p.reshape(-1, c), k.reshape(9, c, c)[n], preferred_element_type=jnp.float32)
            for n, p in enumerate(patches(x))
        )
        return acc.astype(x.dtype)

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, h, w, c)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, c, c)) * 0.05, jnp.float32)
    txt = jax.jit(conv).lower(x.astype(jnp.bfloat16), k.astype(jnp.bfloat16)).compile().as_text()
    upcast = any("f32[" in ln and "convolution(" in ln for ln in txt.splitlines())
    print(
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}: compiled bf16 conv runs in "
        f"{'f32 (inputs converted up)' if upcast else 'bf16'}"
    )
    fns = {
        (n, d): (jax.jit(f), x.astype(d), k.astype(d))
        for n, f in [("conv", conv), ("im2col", im2col), ("9 dots", shifted)]
        for d in (jnp.float32, jnp.bfloat16)
    }
    times = {key: [] for key in fns}
    for f, a, b in fns.values():
        f(a, b).block_until_ready()
    for _ in range(args.repeats or 5):  # interleaved
        for key, (f, a, b) in fns.items():
            t = time.perf_counter()
            f(a, b).block_until_ready()
            times[key].append(time.perf_counter() - t)
    flop = 2 * h * w * c * c * 9
    print("| form | f32 GFLOP/s | bf16 GFLOP/s |\n|---|---|---|")
    for name in ("conv", "im2col", "9 dots"):
        g = [flop / median(times[(name, d)]) / 1e9 for d in (jnp.float32, jnp.bfloat16)]
        print(f"| {name} | {g[0]:.1f} | {g[1]:.1f} |")


def main(argv=None):
    args = parse_args(argv)
    if args.sweep:
        return sweep(args)
    if args.conv_micro:
        return conv_micro(args)
    if args.dtype_ablation:
        return dtype_ablation(args)
    if args.forms_ablation:
        return forms_ablation(args)
    t0 = time.time()
    peak, results = run(args)
    if args.json:
        rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
        print(json.dumps({"peak": peak, "rows": rows}))
        return
    print_table(peak, results)
    print(f"total benchmark time {time.time() - t0:.0f}s")


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    from retinanet_jax.backends.cpu import hostmem

    hostmem.reexec_with_hugepages()  # both frameworks run in this process: same allocator
    main()
