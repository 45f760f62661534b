"""Sliced prediction throughput: images/s and tiles/s of ``rj.predict(..., tile_size=...)``.

A tiny RetinaNet (ResNet-18 body, 32 FPN channels, random "lively" weights that detect plenty,
so the merge has real work) on synthetic noise images of two sizes. Each size is run once to
compile (detector batch shapes, the per-tile resize, the merge), then timed; the time covers
everything a user waits for: host tile cutting, transfers, detector, merge and the device ->
host copy of the detections.

    PYTHONPATH=. python benchmarks/tiled_predict.py [--sizes 2048x2048 4096x4096] [--tile 512]
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import retinanet_jax as rj
from retinanet_jax.inference import tiling
from tests.detection_utils import lively_variables  # run from the repository root (PYTHONPATH=.)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["2048x2048", "4096x4096"], help="HxW images")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=float, default=0.2)
    ap.add_argument("--batch-size", type=int, default=8, help="tiles per step")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()

    model = rj.RetinaNet(num_classes=3, backbone="resnet18", fpn_channels=32, variant="v1")
    predictor = rj.Predictor(
        model,
        lively_variables(model),
        batch_size=args.batch_size,
        detections_per_img=100,
        tile_size=args.tile,
        tile_overlap=args.overlap,
        tile_options={"progress": False},
    )
    print(
        f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}); resnet18 fpn32, tile "
        f"{args.tile}, overlap {args.overlap}, {args.batch_size} tiles/step, "
        f"{predictor.tiling.max_detections} candidates"
    )
    for size in args.sizes:
        h, w = (int(v) for v in size.split("x"))
        image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
        tiles = len(tiling.tile_grid((h, w), predictor.tiling.tile_size, args.overlap))
        t0 = time.perf_counter()
        predictor([image])  # compile
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            dets = predictor([image])[0]
            times.append(time.perf_counter() - t0)
        best = min(times)
        print(
            f"{h}x{w}: {tiles} tiles, {len(dets['boxes'])} detections; first call {compile_s:.1f} s; "
            f"{best:.2f} s/image = {1 / best:.3f} images/s, {tiles / best:.1f} tiles/s"
        )


if __name__ == "__main__":
    main()
