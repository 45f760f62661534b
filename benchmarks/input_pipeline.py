"""Input pipeline throughput: decoded + augmented images/s at COCO scale (800 x 1333 canvas).

Writes a handful of 640x480 / 480x640 JPEGs (synthetic shapes) with a CSV into a temp dir,
then times ``TrainBatchIterator`` (JPEG decode, resize to short side 800 with PIL bilinear,
random flip, pad to an 800x1344 / 1344x800 canvas, box padding, batching) for several
worker counts, after a warm-up that absorbs worker start-up.

    python benchmarks/input_pipeline.py [--images 16] [--batch 2] [--steps 20] [--workers 0 1 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from PIL import Image  # noqa: E402

from retinanet_jax.data.csv_source import CsvSource  # noqa: E402
from retinanet_jax.data.pipeline import TrainBatchIterator  # noqa: E402
from retinanet_jax.data.shapes import ShapesSource  # noqa: E402


def write_dataset(folder: str, num_images: int) -> str:
    """Writes JPEGs (alternating landscape / portrait) and a CSV; returns the CSV path."""
    landscape = ShapesSource(num_images=num_images, image_size=(480, 640), max_objects=8)
    portrait = ShapesSource(num_images=num_images, image_size=(640, 480), max_objects=8)
    rows = []
    for i in range(num_images):
        ex = (landscape if i % 2 == 0 else portrait)[i]
        name = f"img{i:03d}.jpg"
        Image.fromarray(ex["image"]).save(os.path.join(folder, name), quality=90)
        names = landscape.class_names
        rows += [
            f"{name},{b[0]},{b[1]},{b[2]},{b[3]},{names[lab]}"
            for b, lab in zip(ex["boxes"].tolist(), ex["labels"].tolist())
        ] or [f"{name},,,,,"]
    path = os.path.join(folder, "annotations.csv")
    with open(path, "w") as f:
        f.write("\n".join(rows) + "\n")
    return path


def measure(source, workers: int, batch: int, steps: int) -> tuple[float, float]:
    """(images per second, CPU ms per image in this process) over ``steps`` batches after
    two warm-up batches. CPU time excludes other processes on a shared machine."""
    it = TrainBatchIterator(
        source,
        batch_size=batch,
        min_sizes=(800,),
        max_size=1333,
        max_boxes=100,
        worker_count=workers,
        worker_buffer_size=2,
    )
    try:
        for _ in range(2):
            next(it)
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(steps):
            batch_arrays = next(it)
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu_start
        assert batch_arrays["images"].shape[1:] in ((800, 1344, 3), (1344, 800, 3))
    finally:
        it.close()
    return steps * batch / elapsed, 1e3 * cpu / (steps * batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        source = CsvSource(write_dataset(folder, args.images))
        print(
            f"{len(source)} JPEGs 640x480/480x640 -> canvas 800x1344, batch {args.batch}, "
            f"{os.cpu_count()} CPUs"
        )
        print(f"{'workers':>8} {'images/s':>10} {'images/s/worker':>16} {'main CPU ms/image':>18}")
        for workers in args.workers:
            rate, cpu_ms = measure(source, workers, args.batch, args.steps)
            print(f"{workers:>8} {rate:>10.1f} {rate / max(workers, 1):>16.1f} {cpu_ms:>18.1f}")


if __name__ == "__main__":
    main()
