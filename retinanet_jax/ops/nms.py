"""Fixed-shape, jit- and vmap-able greedy NMS that keeps what torchvision's NMS keeps.

Algorithm (tiled greedy NMS, no Python loop over boxes or classes):
  1. Stable sort by score, descending; invalid entries go last.
  2. Walk the sorted boxes in tiles of ``tile_size`` with ``lax.while_loop``. A tile is first
     suppressed by every box kept so far, held in a compact buffer of ``max_output`` boxes (one
     [tile, max_output] IoU), then resolved internally by iterating
     ``keep = cand & ~any(keep[j] & (IoU[j, i] > t) for j < i)`` to its fixed point. Box i's
     value only depends on boxes before it, so after k sweeps the first k boxes are final and
     the fixed point is exactly greedy NMS; near-duplicate clusters converge in a few sweeps.
  3. Stop once ``max_output`` boxes are kept or the valid boxes run out: later boxes cannot
     change the first ``max_output`` kept ones.
Cost is O(N * (max_output + tile_size)) IoUs instead of O(N^2); memory
O(tile_size * (max_output + tile_size)), so it vmaps over a batch of 8 x 5000 boxes easily.

Suppression rule = torchvision's ``nms`` kernel: a box is dropped if ``IoU > iou_threshold``
(strict) with a kept higher-scoring box of the same label. IoU is computed in float32 with the
kernel's formula ``inter / (area_i + area_j - inter)``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def _iou_gt(a, b, thr):
    """``IoU(a_i, b_j) > thr`` for coordinate tuples ``a = (x1, y1, x2, y2)`` of [P] and b of [Q].

    Operation for operation torchvision's nms kernel (and ``ops.boxes.box_iou``). Coordinates
    travel as separate vectors: XLA:CPU fuses a dynamic slice of a [N, 4] array into the
    pairwise loop so badly that it runs ~7x slower inside the tile loop.
    """
    ax1, ay1, ax2, ay2 = (c[:, None] for c in a)
    bx1, by1, bx2, by2 = (c[None, :] for c in b)
    w = jnp.maximum(jnp.minimum(ax2, bx2) - jnp.maximum(ax1, bx1), 0)
    h = jnp.maximum(jnp.minimum(ay2, by2) - jnp.maximum(ay1, by1), 0)
    inter = w * h
    union = ((ax2 - ax1) * (ay2 - ay1)) + ((bx2 - bx1) * (by2 - by1)) - inter
    # 0/0 (empty boxes) must not suppress; torchvision's nan > thr is False as well.
    return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1), 0) > thr


def _appender(keep, count, d):
    """``append(buffer [d], values [t])``: ``values[keep]`` (in order) written to
    ``buffer[count:]``, what does not fit past ``d`` dropped.

    As a gather, not a scatter: slot ``count + r`` takes the (r+1)-th kept value, whose index is
    the number of tile positions with fewer than r+1 kept values up to them. The same result as
    ``buffer.at[pos].set(values, mode="drop")``, and it converts to ONNX (Gather, Where;
    ``inference/onnx_export.py``), where a scatter that drops out-of-bounds updates does not.
    """
    t = keep.shape[0]
    ranks = jnp.cumsum(keep, dtype=jnp.int32)  # [t]: kept values up to each position
    r = jnp.arange(d, dtype=jnp.int32) - count  # [d]: which kept value each slot would take
    src = jnp.sum((ranks[None, :] <= r[:, None]).astype(jnp.int32), axis=1)
    take = (r >= 0) & (r < ranks[t - 1])
    src = jnp.minimum(src, t - 1)

    def append(buffer, values):
        return jnp.where(take, values[src], buffer)

    return append


def _f32_threshold(t):
    # torchvision compares the float32 IoU against a float64 threshold. For float32 x,
    # x > t (double) <=> x > (largest float32 <= t), so that threshold gives identical decisions.
    if isinstance(t, (int, float, np.floating, np.integer)):
        t32 = np.float32(t)
        if float(t32) > float(t):
            t32 = np.nextafter(t32, np.float32(-np.inf))
        return t32
    return jnp.asarray(t, jnp.float32)


def batched_nms_padded(
    boxes: jnp.ndarray,
    scores: jnp.ndarray,
    labels: jnp.ndarray,
    valid: jnp.ndarray,
    iou_threshold: float,
    max_output: int,
    class_agnostic: bool = False,
    *,
    tile_size: int = 64,
    coordinate_trick_max_boxes: int = 1000,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Greedy class-aware NMS with static shapes.

    Args:
      boxes: float [N, 4] xyxy. scores: float [N]. labels: int [N]. valid: bool [N]
        (False entries are ignored: never kept, never suppress).
      iou_threshold: a box is suppressed by a kept box of the same label (any label if
        ``class_agnostic``) when their IoU is strictly greater than this.
      max_output: static number of output slots.
      tile_size: static tile length, a speed knob only (results do not depend on it). 64 was
        fastest on CPU for N=5000 (32..512 tried); larger tiles mean fewer sequential loop
        steps, which may suit accelerators.
      coordinate_trick_max_boxes: when at most this many boxes are valid, IoUs are computed on
        boxes shifted by ``label * (max_coord + 1)``, exactly as torchvision.ops.batched_nms
        does on CPU (its ``_batched_nms_coordinate_trick`` for ``boxes.numel() <= 4000``). This
        reproduces its float32 rounding of the shifted coordinates; 0 disables it.
    Returns:
      keep: int32 [max_output] indices into the inputs, sorted by score descending (ties by
        index), like torchvision.ops.batched_nms / nms; -1 after the first ``num_valid``.
      num_valid: int32 scalar, number of kept boxes (<= max_output).
    Vmappable over a leading batch axis.
    """
    n = boxes.shape[0]
    d = int(max_output)
    t_sz = int(min(tile_size, max(n, 1)))
    num_tiles = max(1, math.ceil(n / t_sz))
    n_pad = num_tiles * t_sz
    thr = _f32_threshold(iou_threshold)

    boxes = jnp.asarray(boxes, jnp.float32)
    scores = jnp.asarray(scores, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)
    valid = jnp.asarray(valid, bool)
    n_valid = jnp.sum(valid, dtype=jnp.int32)

    if not class_agnostic and coordinate_trick_max_boxes > 0:
        max_coord = jnp.max(jnp.where(valid[:, None], boxes, -jnp.inf))
        offsets = labels.astype(jnp.float32) * (max_coord + jnp.float32(1))
        use_trick = n_valid <= coordinate_trick_max_boxes
        boxes = boxes + jnp.where(use_trick & valid, offsets, 0)[:, None]

    # Stable sort on (invalid, -score): valid boxes first, by descending score, ties by index.
    iota = jnp.arange(n, dtype=jnp.int32)
    _, _, order = jax.lax.sort(((~valid).astype(jnp.int32), -scores, iota), num_keys=2, is_stable=True)
    pad = n_pad - n
    s_coords = tuple(jnp.pad(boxes[order, i], (0, pad)) for i in range(4))
    s_labels = jnp.pad(labels[order], (0, pad), constant_values=-1)
    s_valid = jnp.pad(valid[order], (0, pad))
    s_index = jnp.pad(order, (0, pad), constant_values=-1)

    upper = jnp.arange(t_sz)[:, None] < jnp.arange(t_sz)[None, :]  # [suppressor, candidate]
    tiles_needed = (n_valid + t_sz - 1) // t_sz

    def same_class(la, lb):
        if class_agnostic:
            return jnp.ones((la.shape[0], lb.shape[0]), bool)
        return la[:, None] == lb[None, :]

    def body(state):
        t, count, kept_boxes, kept_labels, kept_valid, out = state
        start = t * t_sz
        tb = tuple(jax.lax.dynamic_slice_in_dim(c, start, t_sz) for c in s_coords)
        tl = jax.lax.dynamic_slice_in_dim(s_labels, start, t_sz)
        tv = jax.lax.dynamic_slice_in_dim(s_valid, start, t_sz)
        ti = jax.lax.dynamic_slice_in_dim(s_index, start, t_sz)

        # Suppression by boxes kept in earlier tiles.
        cross = _iou_gt(kept_boxes, tb, thr) & same_class(kept_labels, tl) & kept_valid[:, None]
        cand = tv & ~jnp.any(cross, axis=0)

        # Greedy resolution inside the tile, as a fixed point; a matvec per sweep.
        inner = (_iou_gt(tb, tb, thr) & same_class(tl, tl) & upper).astype(jnp.float32)

        def sweep(c):
            keep, _ = c
            new = cand & ~((keep.astype(jnp.float32) @ inner) > 0)
            return new, jnp.any(new != keep)

        keep, _ = jax.lax.while_loop(lambda c: c[1], sweep, sweep((cand, True)))

        # Append kept boxes to the buffer in score order; overflow past max_output is dropped.
        append = _appender(keep, count, d)
        kept_boxes = tuple(append(k, c) for k, c in zip(kept_boxes, tb))
        kept_labels = append(kept_labels, tl)
        kept_valid = append(kept_valid, tv)
        out = append(out, ti)
        count = count + jnp.sum(keep, dtype=jnp.int32)
        return t + 1, count, kept_boxes, kept_labels, kept_valid, out

    def cond(state):
        t, count = state[0], state[1]
        return (t < tiles_needed) & (count < d)

    init = (
        jnp.int32(0),
        jnp.int32(0),
        (jnp.zeros((d,), jnp.float32),) * 4,
        jnp.full((d,), -1, jnp.int32),
        jnp.zeros((d,), bool),
        jnp.full((d,), -1, jnp.int32),
    )
    _, count, _, _, _, out = jax.lax.while_loop(cond, body, init)
    return out, jnp.minimum(count, d)
