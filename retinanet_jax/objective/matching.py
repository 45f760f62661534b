"""Anchor <-> ground-truth matching with padded ground truth.

Mirrors ``torchvision.models.detection._utils.Matcher(0.5, 0.4, allow_low_quality_matches=True)``
as called by ``torchvision.models.detection.retinanet.RetinaNet.compute_loss``, including its tie
rules, but on fixed-shape, padded ground truth so it runs under ``jax.jit`` / ``jax.vmap``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from retinanet_jax.ops.boxes import box_iou

BELOW_LOW_THRESHOLD = -1  # background; torchvision Matcher.BELOW_LOW_THRESHOLD
BETWEEN_THRESHOLDS = -2  # ignored by the losses; torchvision Matcher.BETWEEN_THRESHOLDS

# Padded ground truth gets this IoU with every anchor. Real IoUs are >= 0 (box_iou guards 0/0),
# so a padding row can never win the argmax over ground truth nor tie with a real maximum, and
# it is below every bg_iou, so an anchor seeing only padding is background.
_PADDING_IOU = -1.0


def match_anchors(
    anchors: jax.Array,
    gt_boxes: jax.Array,
    gt_labels: jax.Array,
    fg_iou: float = 0.5,
    bg_iou: float = 0.4,
    allow_low_quality: bool = True,
) -> jax.Array:
    """Assigns each anchor a ground-truth index for one image.

    Mirrors torchvision ``Matcher.__call__`` + ``Matcher.set_low_quality_matches_`` applied to
    ``box_iou(gt_boxes, anchors)``, and ``RetinaNet.compute_loss``'s rule that an image without
    boxes has every anchor as background.

    Args:
      anchors: float ``[A, 4]`` xyxy pixels.
      gt_boxes: float ``[G, 4]`` xyxy pixels; rows with label ``-1`` are padding.
      gt_labels: int ``[G]``; ``-1`` marks padding (any negative label is treated as padding).
      fg_iou: IoU at or above which an anchor is foreground (torchvision ``high_threshold``).
      bg_iou: IoU below which an anchor is background (torchvision ``low_threshold``).
      allow_low_quality: also match, for every real box, the anchors of highest IoU with it
        (ties included), to the box *they* overlap most (torchvision semantics), even below
        ``fg_iou``.

    Returns:
      int32 ``[A]``: ``>= 0`` index into the (padded) ``gt_boxes`` rows, ``-1`` background,
      ``-2`` between thresholds (ignored). Padding rows are never matched.
    """
    if bg_iou > fg_iou:
        raise ValueError(f"bg_iou ({bg_iou}) must be <= fg_iou ({fg_iou}), as torchvision's Matcher")
    num_anchors = anchors.shape[0]
    if gt_boxes.shape[0] == 0:
        return jnp.full((num_anchors,), BELOW_LOW_THRESHOLD, jnp.int32)

    valid = gt_labels >= 0  # [G]
    # [G, A], the orientation torchvision's Matcher receives; f32 so thresholds compare as in torch.
    iou = box_iou(gt_boxes.astype(jnp.float32), anchors.astype(jnp.float32))
    iou = jnp.where(valid[:, None], iou, _PADDING_IOU)

    # torch.max(dim=0) returns the first maximal index on ties, as does argmax.
    matched_vals = jnp.max(iou, axis=0)
    all_matches = jnp.argmax(iou, axis=0).astype(jnp.int32)
    matches = jnp.where(
        matched_vals < bg_iou,
        BELOW_LOW_THRESHOLD,
        jnp.where(matched_vals < fg_iou, BETWEEN_THRESHOLDS, all_matches),
    )

    if allow_low_quality:
        # For each real box, every anchor attaining its best IoU (ties included) takes back its
        # argmax match -- to whichever box it overlaps most, not necessarily this one
        # (set_low_quality_matches_ assigns all_matches[pred_inds]).
        best_per_gt = jnp.max(iou, axis=1, keepdims=True)  # [G, 1]
        is_best = (iou == best_per_gt) & valid[:, None]
        matches = jnp.where(jnp.any(is_best, axis=0), all_matches, matches)

    # No real box (torchvision skips the matcher: all background) needs no special case: the
    # padding IoU is below any bg_iou and padding never takes part in low-quality matches.
    return matches.astype(jnp.int32)
