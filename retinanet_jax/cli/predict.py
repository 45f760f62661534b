"""``retinanet-jax predict``: images, folders or globs -> COCO results JSON and drawn overlays.

Inputs are expanded in order: a file is taken as is, a directory gives its files with an image
extension (sorted; ``recursive`` descends), anything else is a glob pattern (``**`` allowed).
Image ids are 1..N in that order. Unreadable files (missing, not an image, truncated, ...) are
reported on stderr by name and skipped; the caller exits non-zero at the end if any failed.
"""

from __future__ import annotations

import concurrent.futures
import glob
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from retinanet_jax.cli.progress import ImageProgress

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")


def expand_inputs(inputs: Sequence[str], recursive: bool = False) -> tuple[list[str], list[str]]:
    """(image paths in order without duplicates, error messages for inputs that match nothing)."""
    paths, errors, seen = [], [], set()
    for item in inputs:
        if os.path.isfile(item):
            found = [item]
        elif os.path.isdir(item):
            walk = (
                (os.path.join(d, f) for d, _, fs in os.walk(item) for f in fs)
                if recursive
                else (os.path.join(item, f) for f in os.listdir(item))
            )
            found = sorted(p for p in walk if p.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(p))
            if not found:
                errors.append(
                    f"{item}: no image files in this directory (extensions {', '.join(IMAGE_EXTENSIONS)})"
                )
        else:
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not found:
                errors.append(f"{item}: no such file, directory or matching files")
        for p in found:
            key = os.path.abspath(p)
            if key not in seen:
                seen.add(key)
                paths.append(p)
    return paths, errors


def _decode(path: str) -> tuple[np.ndarray | None, str | None]:
    from retinanet_jax.data.decode import read_image
    from retinanet_jax.data.errors import DataError

    try:
        return read_image(path), None
    except (DataError, OSError, ValueError) as e:
        return None, str(e) if path in str(e) else f"{path}: {e}"


def _decoded_chunks(paths: list[str], size: int) -> Iterator[list[tuple[int, str, Any, Any]]]:
    """Chunks of ``(index, path, image or None, error or None)``; the next chunk decodes in
    threads while the caller runs the current one (PIL releases the GIL while decoding)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        starts = range(0, len(paths), size)
        submit = lambda s: [pool.submit(_decode, p) for p in paths[s : s + size]]  # noqa: E731
        pending = submit(0) if paths else []
        for s in starts:
            current, pending = pending, (submit(s + size) if s + size < len(paths) else [])
            yield [(s + i, paths[s + i], *f.result()) for i, f in enumerate(current)]


def _overlay_names(paths: list[str]) -> list[str]:
    """PNG file names for overlays: the input's stem, made unique with the image id."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    return [f"{s}.png" if counts[s] == 1 else f"{s}_{i + 1}.png" for i, s in enumerate(stems)]


def run_predict(
    loaded: Any,
    inputs: Sequence[str],
    *,
    output: str,
    draw_dir: str | None,
    display_thresh: float,
    recursive: bool,
    batch_size: int,
    draw_max_size: int | None = None,
    **predict_options: Any,
) -> int:
    """Run the whole command; returns the exit status (0 ok, 1 some inputs failed).

    With ``tile_size`` in ``predict_options`` images are predicted by tiles (``batch_size``
    tiles per step) and decoded one at a time, so that only one large image is in memory.
    Overlays are drawn at most ``draw_max_size`` px on their long side."""
    from retinanet_jax.cli import draw
    from retinanet_jax.evaluation.loop import detections_to_coco, write_json_atomic
    from retinanet_jax.inference.predict import Predictor

    paths, errors = expand_inputs(inputs, recursive)
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    predictor = Predictor(loaded.model, loaded.variables, batch_size=batch_size, **predict_options)
    if draw_dir:
        os.makedirs(draw_dir, exist_ok=True)
        overlay = _overlay_names(paths)
    results: list[dict] = []
    failed = list(errors)
    progress = ImageProgress(len(paths))
    try:
        tiled = predict_options.get("tile_size") is not None
        for chunk in _decoded_chunks(paths, 1 if tiled else batch_size):
            good = [(i, p, im) for i, p, im, err in chunk if err is None]
            for _, path, _, err in chunk:
                if err is not None:
                    failed.append(err)
                    progress.warn(f"error: {err}")
            dets = predictor([im for _, _, im in good]) if good else []
            for (i, path, image), det in zip(good, dets):
                coco = detections_to_coco([{**det, "image_id": i + 1}], loaded.category_ids)
                for entry, label in zip(coco, det["labels"]):
                    entry["file_name"] = path
                    if loaded.class_names is not None:
                        entry["category_name"] = loaded.label_name(int(label))
                results += coco
                if draw_dir:
                    picture = draw.draw_detections(
                        image,
                        det["boxes"],
                        det["scores"],
                        det["labels"],
                        loaded.label_name,
                        threshold=display_thresh,
                        max_size=draw_max_size,
                    )
                    picture.save(os.path.join(draw_dir, overlay[i]), format="PNG")
            progress.update(len(chunk), len(chunk) - len(good))
    finally:
        progress.close()
    write_json_atomic(results, output)  # makes local parent directories; gs:// works too
    ok = len(paths) - (len(failed) - len(errors))
    print(
        f"{ok} images, {len(results)} detections (score > {predictor.options.score_thresh}) "
        f"-> {output}" + (f"; overlays -> {draw_dir}" if draw_dir else "")
    )
    if failed:
        print(f"{len(failed)} input(s) failed:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0
