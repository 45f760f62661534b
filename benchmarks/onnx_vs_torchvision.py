"""The exported ONNX detector in onnxruntime vs ours in JAX vs torchvision, same weights, same canvas.

    python benchmarks/onnx_vs_torchvision.py [--variant v1] [--canvas 800 1216] [--repeats 5]
        [--threads 2] [--onnx FILE]

One uint8 image of exactly the canvas size (800x1216 by default: torchvision's resize keeps it,
scale 1), batch 1, weights: random "lively" ones (tests/tv_utils) so that there are hundreds of
detections. Timed, interleaved (A B C D A B C D ...) after warm-up, medians:

- onnxruntime (CPU execution provider) on the file from ``retinanet-jax export --format onnx``
  (exported here unless ``--onnx`` names one): normalization, forward, top-k, NMS in the graph;
- ``rj.Predictor`` end to end (image preparation, the jitted detector, to numpy);
- the jitted detector alone: ``jax.jit`` of the same function that was exported
  (``inference.export.detector_fn``, uint8 canvas in), with XLA:CPU's own forms (Winograd etc.);
- torchvision ``model([image])`` in eval mode (its transform, forward, postprocess).

Also prints how many of ``rj.Predictor``'s detections onnxruntime reproduces (same label,
IoU >= 0.99, score within 1e-3). onnxruntime and torch get ``--threads`` threads.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="v1", choices=["v1", "v2"])
    p.add_argument("--canvas", type=int, nargs=2, default=(800, 1216), metavar=("H", "W"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op and torch threads")
    p.add_argument("--onnx", help="an exported file for this variant and canvas (default: export now)")
    args = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import jax
    import numpy as np
    import onnxruntime as ort
    import torch
    from test_detection_parity import count_matches
    from tv_utils import make_jax_from_tv

    from retinanet_jax.inference.export import detector_fn
    from retinanet_jax.inference.onnx_export import export_onnx, save_onnx
    from retinanet_jax.inference.predict import Predictor

    torch.set_num_threads(args.threads)
    h, w = args.canvas
    tv, model, variables = make_jax_from_tv(args.variant)
    tv.transform.min_size, tv.transform.max_size = (min(h, w),), max(h, w)
    image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    canvas, sizes = image[None], np.asarray([[h, w]], np.int32)

    path = args.onnx
    if path is None:
        t = time.perf_counter()
        proto = export_onnx(model, variables, batch_size=1, canvas=(h, w))
        path = os.path.join(tempfile.mkdtemp(), "detector.onnx")
        save_onnx(path, proto, {})
        print(f"export to ONNX: {time.perf_counter() - t:.1f} s, {os.path.getsize(path) / 1e6:.1f} MB")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.log_severity_level = 3  # no notices about unused loop-body constants
    t = time.perf_counter()
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    print(f"onnxruntime {ort.__version__} session: {time.perf_counter() - t:.1f} s")

    def run_ort():
        b, s, lab, n = sess.run(None, {"images": canvas, "image_sizes": sizes})
        k = int(n[0])
        return {"boxes": b[0, :k], "scores": s[0, :k], "labels": lab[0, :k]}

    pred = Predictor(model, variables, min_size=min(h, w), max_size=max(h, w), batch_size=1)
    jitted = jax.jit(detector_fn(model, variables, (h, w)))

    def run_jit():
        return jax.block_until_ready(jitted(canvas, sizes))

    def run_tv():
        with torch.no_grad():
            return tv([torch.from_numpy(image).permute(2, 0, 1).float().div(255)])

    fns = {
        "onnxruntime (CPU EP)": run_ort,
        "rj Predictor": lambda: pred([image]),
        "jitted detector (XLA:CPU)": run_jit,
        "torchvision": run_tv,
    }
    for name, fn in fns.items():  # warm-up (compiles)
        t = time.perf_counter()
        fn()
        print(f"first call {name}: {time.perf_counter() - t:.1f} s")
    times = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)

    ours = pred([image])[0]
    got = run_ort()
    matched = count_matches(ours, got)
    print(
        f"\n{args.variant}, canvas {h}x{w}, batch 1, {args.repeats} interleaved runs, medians "
        f"(onnxruntime / torch threads {args.threads}, jax devices {jax.devices()})"
    )
    base = median(times["torchvision"])
    print("| runtime | median s | / torchvision |\n|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {median(ts):.3f} | {median(ts) / base:.2f} |")
    print(
        f"\nonnxruntime reproduces {matched} of {len(ours['scores'])} rj.predict detections "
        f"({len(got['scores'])} from onnxruntime)"
    )


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    from retinanet_jax.backends.cpu import hostmem

    hostmem.reexec_with_hugepages()  # all runtimes run in this process: same allocator
    main()
