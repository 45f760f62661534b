"""Sliced (tiled) prediction for images far larger than the detector's input, merged on device.

**Tiles.** :func:`tile_grid` cuts the image into overlapping windows of ``tile_size`` ``(h, w)``
pixels, ``tile_overlap`` (a fraction of the tile side, SAHI's ``overlap_*_ratio``, default 0.2
as there) apart; the last window of a row / column is moved back to end at the image border, so
every window lies inside the image and has the full tile size (an image smaller than the tile
in some direction gives windows of the image's size there, placed at the canvas' top-left).

**Resolution.** Tiles are fed at their native resolution (``tile_scale=1``): ``min_size`` /
``max_size`` do **not** resize tiles (they would upsample a 512 px tile to 800 px and defeat the
purpose). ``tile_scale`` resizes every tile by that factor (torch-bilinear as ``predict``);
``min_size`` / ``max_size`` apply only to the optional whole-image pass. Boxes are returned in
the original image's pixels either way.

**Memory.** The image stays on the host: each tile is a numpy view, copied to the device alone
(uint8, one tile at a time) and normalized / padded there; batches of ``batch_size`` tiles on
one fixed canvas ``padded(tile_size * tile_scale)`` go through the same cached jitted detector as
``predict`` (``Predictor.detect``: one compilation per batch shape, whatever the image size).
Per-tile detections (``detections_per_img`` each) are folded, batch by batch, into a fixed-size
device buffer of the ``max_detections`` best-scoring candidates (a running ``top_k``), so the
device holds at most one tile batch, its outputs and a ``[K]`` buffer: no array on the device
depends on the image size, and the merge compiles once. The optional whole-image pass is
downscaled on the host (PIL, antialiased) before it is sent.

**Merge rule** (in one jitted function over the ``K`` buffer, :func:`merge_tile_detections`):

1. *Cut boxes.* A detection is "cut" when it touches (within ``edge_margin`` px) an edge of its
   tile that is not an image border: the object may continue outside the tile, and a detector
   then boxes only the visible part, so a plain NMS (IoU) would keep both the part and the
   whole box when the part is small, or keep the part when it scores higher.
2. *Same object across tiles.* Two detections of the same class from different tiles, at least
   one of them cut, are the same object when they coincide **inside the window both tiles saw**
   (the intersection of the two tiles): IoU of the two boxes clipped to that window >
   ``merge_thresh``. Both tiles see identical pixels there, so the visible part of a cut object
   and the whole object agree in that window, while their full boxes need not. This is the
   idea of SAHI's default merge (``GREEDYNMM`` with the ``IOS`` metric, intersection over the
   smaller box, threshold 0.5: a cut part lies inside the whole box), restricted to pairs that
   involve a cut box and measured in the shared window; plain IoS of the full boxes fails for an
   object wider than the overlap (cut in both tiles, IoS = overlap / part width falls below
   0.5) and would also merge a small whole object lying inside a larger one of its class.
3. *One box per group.* Matches are closed transitively (connected components, min-label
   propagation) so an object cut into 3-4 tiles at a tile corner is one group. A group with an
   uncut member is represented by its best-scoring uncut box (the cut parts add nothing);
   a group of cut parts only (an object larger than the overlap) by their union (SAHI's NMM
   merge: the enclosing box). The group's score is its best score.
4. *Duplicates of whole objects* (an object inside the overlap, seen whole by two tiles) and
   the whole-image pass' boxes: class-aware greedy NMS at ``nms_thresh`` over the group
   representatives, ``ops.nms.batched_nms_padded`` as in the per-image postprocess.

With ``full_image_pass`` the image, resized by ``min_size`` / ``max_size``, is one more
"tile" whose window is the whole image (never cut): large objects, cut in every tile, match its
box in rule 2 and are represented by it.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from retinanet_jax.imageprep.convert import to_uint8_rgb
from retinanet_jax.imageprep.geometry import batch_canvas, padded_size, resized_size
from retinanet_jax.imageprep.normalize import resize_normalize_pad
from retinanet_jax.ops.nms import batched_nms_padded

BUFFER_KEYS = ("boxes", "scores", "labels", "valid", "cut", "window", "tile")


class TileOptions(NamedTuple):
    """Tiling settings (see the module doc); :meth:`of` validates and fills defaults."""

    tile_size: tuple[int, int]
    overlap: float = 0.2
    scale: float = 1.0
    full_image_pass: bool = False
    merge_thresh: float = 0.5
    max_detections: int = 4096
    edge_margin: float = 2.0
    progress: bool | None = None

    @classmethod
    def of(cls, tile_size: Any, **kw: Any) -> TileOptions:
        if isinstance(tile_size, (int, np.integer)):
            tile_size = (int(tile_size), int(tile_size))
        tile_size = tuple(int(v) for v in tile_size)
        if len(tile_size) != 2 or min(tile_size) < 1:
            raise ValueError(f"tile_size must be (h, w) of positive ints, got {tile_size}")
        opts = cls(tile_size, **kw)
        if not 0.0 <= float(opts.overlap) < 1.0:
            raise ValueError(f"tile_overlap is a fraction of the tile in [0, 1), got {opts.overlap}")
        if not float(opts.scale) > 0:
            raise ValueError(f"tile_scale must be > 0, got {opts.scale}")
        if int(opts.max_detections) < 1:
            raise ValueError(f"max_detections must be >= 1, got {opts.max_detections}")
        return opts._replace(
            overlap=float(opts.overlap),
            scale=float(opts.scale),
            merge_thresh=float(opts.merge_thresh),
            max_detections=int(opts.max_detections),
            edge_margin=float(opts.edge_margin),
        )


def _axis_starts(length: int, tile: int, overlap: float) -> list[int]:
    if length <= tile:
        return [0]
    stride = max(1, tile - int(round(tile * overlap)))
    return list(range(0, length - tile, stride)) + [length - tile]


def tile_grid(image_hw: tuple[int, int], tile_hw: tuple[int, int], overlap: float) -> np.ndarray:
    """int64 ``[T, 4]`` windows ``(y0, x0, h, w)`` covering an ``image_hw`` image, row by row."""
    H, W = int(image_hw[0]), int(image_hw[1])
    th, tw = min(int(tile_hw[0]), H), min(int(tile_hw[1]), W)
    ys, xs = _axis_starts(H, th, overlap), _axis_starts(W, tw, overlap)
    return np.asarray([(y, x, th, tw) for y in ys for x in xs], np.int64)


def empty_buffer(k: int) -> dict[str, jax.Array]:
    """The candidate buffer: ``k`` slots of global boxes, scores, labels, flags, tile windows."""
    return {
        "boxes": jnp.zeros((k, 4), jnp.float32),
        "scores": jnp.zeros((k,), jnp.float32),
        "labels": jnp.full((k,), -1, jnp.int32),
        "valid": jnp.zeros((k,), bool),
        "cut": jnp.zeros((k,), bool),
        "window": jnp.zeros((k, 4), jnp.float32),
        "tile": jnp.full((k,), -2, jnp.int32),
    }


@functools.partial(jax.jit, static_argnames=("edge_margin",))
def accumulate(
    buffer, boxes, scores, labels, num_valid, windows, interior, tile_ids, tile_valid, *, edge_margin: float
):
    """Fold one batch of per-tile detections into ``buffer`` (the best ``K`` by score, sorted).

    ``boxes`` [B, D, 4] in each tile's own pixels; ``windows`` f32 [B, 4] each tile's
    ``(x0, y0, x1, y1)`` in the image; ``interior`` bool [B, 4]: which of (left, top, right,
    bottom) is an interior edge; ``tile_ids`` int32 [B]; ``tile_valid`` bool [B] (False: padding).
    """
    k = buffer["scores"].shape[0]
    b, d = scores.shape
    shift = jnp.stack([windows[:, 0], windows[:, 1], windows[:, 0], windows[:, 1]], -1)
    g = boxes.astype(jnp.float32) + shift[:, None, :]
    valid = (jnp.arange(d)[None, :] < num_valid[:, None]) & tile_valid[:, None]
    win = windows[:, None, :]
    m = jnp.float32(edge_margin)
    near = jnp.stack(
        [
            g[..., 0] <= win[..., 0] + m,
            g[..., 1] <= win[..., 1] + m,
            g[..., 2] >= win[..., 2] - m,
            g[..., 3] >= win[..., 3] - m,
        ],
        -1,
    )
    cut = jnp.any(near & interior[:, None, :], axis=-1) & valid
    new = {
        "boxes": g.reshape(-1, 4),
        "scores": scores.reshape(-1).astype(jnp.float32),
        "labels": labels.reshape(-1).astype(jnp.int32),
        "valid": valid.reshape(-1),
        "cut": cut.reshape(-1),
        "window": jnp.broadcast_to(win, (b, d, 4)).reshape(-1, 4),
        "tile": jnp.broadcast_to(tile_ids[:, None], (b, d)).reshape(-1).astype(jnp.int32),
    }
    cat = {key: jnp.concatenate([buffer[key], new[key]]) for key in BUFFER_KEYS}
    _, idx = jax.lax.top_k(jnp.where(cat["valid"], cat["scores"], -jnp.inf), k)
    return {key: v[idx] for key, v in cat.items()}


def _clip_iou(a, b, wa, wb):
    """[C, K] IoU of boxes ``a`` [C, 4] and ``b`` [K, 4], both clipped to the intersection of
    their windows ``wa`` [C, 4] / ``wb`` [K, 4]; 0 where the clipped boxes are empty."""
    lo_x = jnp.maximum(wa[:, None, 0], wb[None, :, 0])
    lo_y = jnp.maximum(wa[:, None, 1], wb[None, :, 1])
    hi_x = jnp.minimum(wa[:, None, 2], wb[None, :, 2])
    hi_y = jnp.minimum(wa[:, None, 3], wb[None, :, 3])

    def clip(c, lo, hi):
        return jnp.clip(c, lo, jnp.maximum(lo, hi))

    ax1, ax2 = clip(a[:, None, 0], lo_x, hi_x), clip(a[:, None, 2], lo_x, hi_x)
    ay1, ay2 = clip(a[:, None, 1], lo_y, hi_y), clip(a[:, None, 3], lo_y, hi_y)
    bx1, bx2 = clip(b[None, :, 0], lo_x, hi_x), clip(b[None, :, 2], lo_x, hi_x)
    by1, by2 = clip(b[None, :, 1], lo_y, hi_y), clip(b[None, :, 3], lo_y, hi_y)
    iw = jnp.maximum(jnp.minimum(ax2, bx2) - jnp.maximum(ax1, bx1), 0)
    ih = jnp.maximum(jnp.minimum(ay2, by2) - jnp.maximum(ay1, by1), 0)
    inter = iw * ih
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1), 0)


@functools.partial(jax.jit, static_argnames=("nms_thresh", "merge_thresh", "class_agnostic", "num_cut"))
def merge_tile_detections(
    buffer,
    *,
    nms_thresh: float = 0.5,
    merge_thresh: float = 0.5,
    class_agnostic: bool = False,
    num_cut: int | None = None,
):
    """The merge rule of the module doc over a buffer from :func:`accumulate` (sorted by score).

    ``num_cut``: static number of cut candidates matched ([num_cut, K] pairs; default K // 2;
    further cut boxes, the lowest-scoring ones, only take part in the NMS).
    Returns ``(boxes [K, 4], scores [K], labels [K], num_valid)`` sorted by score, padded rows
    with box 0, score 0, label -1.
    """
    boxes, scores, labels = buffer["boxes"], buffer["scores"], buffer["labels"]
    valid, cut, window, tile = buffer["valid"], buffer["cut"], buffer["window"], buffer["tile"]
    k = scores.shape[0]
    c = max(1, min(k, k // 2 if num_cut is None else int(num_cut)))
    iota = jnp.arange(k, dtype=jnp.int32)
    # Rules 1-2: [C, K] matches between the best C cut boxes and every candidate.
    _, cidx = jax.lax.top_k(jnp.where(valid & cut, scores, -jnp.inf), c)
    c_ok = (valid & cut)[cidx]
    match = _clip_iou(boxes[cidx], boxes, window[cidx], window) > merge_thresh
    match &= c_ok[:, None] & valid[None, :] & (tile[cidx][:, None] != tile[None, :])
    if not class_agnostic:
        match &= labels[cidx][:, None] == labels[None, :]

    # Rule 3: connected components; the buffer is sorted by score, so each component's label
    # converges to the index of its best-scoring member.
    def step(state):
        lab, _ = state
        lab_c = jnp.minimum(lab[cidx], jnp.min(jnp.where(match, lab[None, :], k), axis=1))
        lab_c = jnp.where(c_ok, lab_c, k)
        new = jnp.minimum(lab, jnp.min(jnp.where(match, lab_c[:, None], k), axis=0))
        new = new.at[cidx].min(lab_c)
        return new, jnp.any(new != lab)

    lab, _ = jax.lax.while_loop(lambda s: s[1], step, (iota, jnp.bool_(True)))
    seg = functools.partial(jax.ops.segment_min, segment_ids=lab, num_segments=k)
    big = jnp.float32(jnp.inf)
    union = jnp.stack(
        [
            seg(jnp.where(valid, boxes[:, 0], big)),
            seg(jnp.where(valid, boxes[:, 1], big)),
            -seg(jnp.where(valid, -boxes[:, 2], big)),
            -seg(jnp.where(valid, -boxes[:, 3], big)),
        ],
        -1,
    )
    best_whole = seg(jnp.where(valid & ~cut, iota, k))
    has_whole = best_whole < k
    rep = jnp.where(has_whole[:, None], boxes[jnp.where(has_whole, best_whole, 0)], union)
    root = valid & (lab == iota)
    rep = jnp.where(root[:, None], rep, 0)

    # Rule 4: class-aware NMS over the group representatives.
    keep, num = batched_nms_padded(rep, scores, labels, root, nms_thresh, k, class_agnostic=class_agnostic)
    ok = keep >= 0
    safe = jnp.where(ok, keep, 0)
    return (
        jnp.where(ok[:, None], rep[safe], 0),
        jnp.where(ok, scores[safe], 0),
        jnp.where(ok, labels[safe], -1),
        num,
    )


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def host_downscale(image: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] -> [out_h, out_w, 3] on the host: integer decimation by strides to at most
    twice the target, then PIL's antialiased bilinear resize (never a whole-image copy)."""
    h, w = image.shape[:2]
    oh, ow = int(out_hw[0]), int(out_hw[1])
    if (oh, ow) == (h, w):
        return image
    step = max(1, min(h // (2 * oh), w // (2 * ow)))
    small = np.ascontiguousarray(image[::step, ::step])
    return np.asarray(Image.fromarray(small).resize((ow, oh), Image.BILINEAR))


def _progress_bar(total: int, index: int, show: bool | None):
    if show is None:
        show = total > 1 and sys.stderr.isatty()
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total, unit="tile", desc=f"image {index}", leave=False, dynamic_ncols=True, file=sys.stderr
    )


def tile_detections(predictor: Any, image: Any, options: TileOptions, index: int = 0):
    """Run the detector over the tiles of one image; returns the device candidate buffer of
    :func:`accumulate` (``options.max_detections`` slots), merged by :func:`merge_tile_detections`.

    ``predictor``: a ``Predictor`` (its ``detect``, normalization, ``batch_size``, and
    ``min_size`` / ``max_size`` / ``buckets`` for the whole-image pass).
    """
    arr = to_uint8_rgb(image, index)
    H, W = arr.shape[:2]
    grid = tile_grid((H, W), options.tile_size, options.overlap)
    th, tw = int(grid[0, 2]), int(grid[0, 3])
    s = options.scale
    out_hw = (max(1, int(round(th * s))), max(1, int(round(tw * s))))
    canvas = padded_size(
        (max(1, int(round(options.tile_size[0] * s))), max(1, int(round(options.tile_size[1] * s)))),
        predictor.size_divisible,
    )
    canvas = (
        max(canvas[0], padded_size(out_hw, predictor.size_divisible)[0]),
        max(canvas[1], padded_size(out_hw, predictor.size_divisible)[1]),
    )
    mean, std = predictor.image_mean, predictor.image_std
    buffer = empty_buffer(options.max_detections)
    bar = _progress_bar(len(grid), index, options.progress)
    try:
        for start in range(0, len(grid), predictor.batch_size):
            rows = grid[start : start + predictor.batch_size]
            n = len(rows)
            bsz = min(_next_pow2(n), predictor.batch_size)
            tiles = [
                resize_normalize_pad(arr[y : y + h, x : x + w], out_hw, canvas, mean, std)
                for y, x, h, w in rows
            ]
            tiles += [jnp.zeros_like(tiles[0])] * (bsz - n)
            sizes = np.asarray([out_hw] * bsz, np.int32)
            originals = np.asarray([(th, tw)] * bsz, np.int32)
            outs = predictor.detect(jnp.stack(tiles), sizes, originals)
            pad = np.zeros((bsz - n, 4), np.int64)
            win = np.concatenate([rows, pad])
            windows = np.stack(
                [win[:, 1], win[:, 0], win[:, 1] + win[:, 3], win[:, 0] + win[:, 2]], -1
            ).astype(np.float32)
            interior = np.stack(
                [win[:, 1] > 0, win[:, 0] > 0, win[:, 1] + win[:, 3] < W, win[:, 0] + win[:, 2] < H], -1
            )
            ids = np.arange(start, start + bsz, dtype=np.int32)
            buffer = accumulate(
                buffer, *outs, windows, interior, ids, np.arange(bsz) < n, edge_margin=options.edge_margin
            )
            if bar is not None:
                bar.update(n)
    finally:
        if bar is not None:
            bar.close()
    if options.full_image_pass:
        size = resized_size((H, W), predictor.min_size, predictor.max_size)
        full_canvas = batch_canvas([size], predictor.size_divisible, predictor.buckets)
        small = host_downscale(arr, size)
        batch = resize_normalize_pad(small, size, full_canvas, mean, std)[None]
        outs = predictor.detect(batch, np.asarray([size], np.int32), np.asarray([(H, W)], np.int32))
        buffer = accumulate(
            buffer,
            *outs,
            np.asarray([(0, 0, W, H)], np.float32),
            np.zeros((1, 4), bool),
            np.asarray([-1], np.int32),
            np.ones((1,), bool),
            edge_margin=options.edge_margin,
        )
    return buffer


def predict_tiled(predictor: Any, image: Any, options: TileOptions, index: int = 0) -> dict[str, np.ndarray]:
    """Detections of one image by tiles, merged on device (module doc); the same dict as
    ``predict`` (``boxes`` xyxy original pixels, ``scores``, ``labels``), at most
    ``options.max_detections`` rows sorted by score."""
    buffer = tile_detections(predictor, image, options, index)
    opts = predictor.options
    boxes, scores, labels, num = jax.device_get(
        merge_tile_detections(
            buffer,
            nms_thresh=opts.nms_thresh,
            merge_thresh=options.merge_thresh,
            class_agnostic=opts.class_agnostic,
        )
    )
    n = int(num)
    return {
        "boxes": np.asarray(boxes[:n], np.float32),
        "scores": np.asarray(scores[:n], np.float32),
        "labels": np.asarray(labels[:n], np.int64),
    }
