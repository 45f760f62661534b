"""RetinaNet training objective: match anchors, then focal + box losses, torchvision's definitions.

``retinanet_losses`` mirrors ``torchvision.models.detection.retinanet.RetinaNet.compute_loss``
(-> ``RetinaNetClassificationHead.compute_loss`` and ``RetinaNetRegressionHead.compute_loss`` /
``_box_loss``) on padded, fixed-shape ground truth; ``compute_losses`` is the public entry point
that runs the model first.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from retinanet_jax.objective import losses
from retinanet_jax.objective.matching import BETWEEN_THRESHOLDS, match_anchors
from retinanet_jax.ops import anchors as anchors_lib
from retinanet_jax.ops.box_coder import decode_boxes, encode_boxes

BOX_LOSSES = ("l1", "smooth_l1", "giou")
NORMALIZATIONS = ("per_image", "global")
# torchvision's regression head type per variant (retinanet_resnet50_fpn_v2 sets "giou").
DEFAULT_BOX_LOSS = {"v1": "l1", "v2": "giou"}


def _per_image_sums(
    cls_logits: jax.Array,
    bbox_regression: jax.Array,
    anchors: jax.Array,
    gt_boxes: jax.Array,
    gt_labels: jax.Array,
    *,
    box_loss: str,
    focal_alpha: float,
    focal_gamma: float,
    smooth_l1_beta: float,
    giou_eps: float,
    class_weights: jax.Array | None,
    fg_iou: float,
    bg_iou: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One image: (focal loss sum over non-ignored anchors, box loss sum over foreground, #fg)."""
    num_classes = cls_logits.shape[-1]
    matched = match_anchors(anchors, gt_boxes, gt_labels, fg_iou=fg_iou, bg_iou=bg_iou)
    foreground = matched >= 0
    gt_index = jnp.maximum(matched, 0)

    # Classification: one-hot of the matched box's label on foreground anchors, zeros elsewhere;
    # anchors between the thresholds are left out of the sum.
    target = jax.nn.one_hot(gt_labels[gt_index], num_classes, dtype=jnp.float32)
    target = jnp.where(foreground[:, None], target, 0.0)
    focal = losses.sigmoid_focal_loss(
        cls_logits, target, alpha=focal_alpha, gamma=focal_gamma, class_weights=class_weights
    )
    keep = (matched != BETWEEN_THRESHOLDS)[:, None]
    cls_sum = jnp.sum(jnp.where(keep, focal, 0.0))

    # Regression on foreground only. Other anchors get themselves as stand-in target (encodes to
    # 0, GIoU defined) so the masked-out terms -- and their gradients -- stay finite: a padding
    # box of zeros would encode to log(0) = -inf and 0 * inf = nan in the backward pass.
    matched_boxes = jnp.where(foreground[:, None], gt_boxes[gt_index], anchors)
    if box_loss == "giou":
        per_anchor = losses.giou_loss(decode_boxes(bbox_regression, anchors), matched_boxes, eps=giou_eps)
    else:
        deltas = encode_boxes(matched_boxes, anchors)
        if box_loss == "l1":
            elementwise = losses.l1_loss(bbox_regression, deltas, reduction="none")
        else:
            elementwise = losses.smooth_l1_loss(
                bbox_regression, deltas, beta=smooth_l1_beta, reduction="none"
            )
        per_anchor = jnp.sum(elementwise, axis=-1)
    box_sum = jnp.sum(jnp.where(foreground, per_anchor, 0.0))
    return cls_sum, box_sum, jnp.sum(foreground).astype(jnp.float32)


def retinanet_losses(
    cls_logits: jax.Array,
    bbox_regression: jax.Array,
    anchors: jax.Array,
    gt_boxes: jax.Array,
    gt_labels: jax.Array,
    *,
    box_loss: str = "l1",
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    smooth_l1_beta: float = 1.0,
    giou_eps: float = 1e-7,
    class_weights: jax.Array | None = None,
    normalization: str = "per_image",
    fg_iou: float = 0.5,
    bg_iou: float = 0.4,
) -> dict[str, jax.Array]:
    """RetinaNet losses from raw head outputs; mirrors torchvision ``RetinaNet.compute_loss``.

    Args:
      cls_logits: ``[B, A, K]`` class logits (any float dtype; computed in float32, or float64
        for float64 outputs).
      bbox_regression: ``[B, A, 4]`` box deltas (dx, dy, dw, dh) w.r.t. the anchors.
      anchors: ``[A, 4]`` xyxy pixels, shared by the batch (``anchors.anchors_for_image``).
      gt_boxes: ``[B, G, 4]`` xyxy pixels; ``gt_labels``: int ``[B, G]`` in ``[0, K)``, ``-1`` =
        padding. An image with no real box has all anchors negative and regression loss 0.
      box_loss: ``"l1"`` (v1) or ``"smooth_l1"`` on encoded targets, ``"giou"`` (v2) on decoded
        boxes -- torchvision ``_box_loss``; ``smooth_l1_beta`` and ``giou_eps`` as its defaults.
      focal_alpha, focal_gamma, class_weights (``[K]`` or None): see ``losses.sigmoid_focal_loss``.
      normalization: ``"per_image"`` (torchvision): each image's sums / max(1, its #foreground),
        then the mean over images. ``"global"``: batch sums / max(1, batch #foreground).
      fg_iou, bg_iou: matcher thresholds (torchvision ``fg_iou_thresh`` / ``bg_iou_thresh``).

    Returns:
      ``{"classification": f32 scalar, "bbox_regression": f32 scalar}``.
    """
    if box_loss not in BOX_LOSSES:
        raise ValueError(f"box_loss must be one of {BOX_LOSSES}, got {box_loss!r}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    # float32, or float64 when the outputs are (the float64 equality tests); bf16 upcast.
    dtype = jnp.promote_types(jnp.result_type(cls_logits, bbox_regression), jnp.float32)
    cls_logits = jnp.asarray(cls_logits, dtype)
    bbox_regression = jnp.asarray(bbox_regression, dtype)
    anchors = jnp.asarray(anchors, dtype)
    gt_boxes = jnp.asarray(gt_boxes, dtype)
    gt_labels = jnp.asarray(gt_labels, jnp.int32)
    batch, num_anchors = cls_logits.shape[:2]
    if anchors.shape[0] != num_anchors or bbox_regression.shape[:2] != (batch, num_anchors):
        raise ValueError(
            f"shape mismatch: cls_logits {cls_logits.shape}, bbox_regression {bbox_regression.shape}, "
            f"anchors {anchors.shape}"
        )
    if gt_boxes.shape[1] == 0:
        # G = 0 cannot be indexed; one padding row means the same thing (no boxes).
        gt_boxes = jnp.zeros((batch, 1, 4), dtype)
        gt_labels = jnp.full((batch, 1), -1, jnp.int32)
    if class_weights is not None:
        class_weights = jnp.asarray(class_weights, dtype)

    def per_image(logits, deltas, boxes, labels):
        return _per_image_sums(
            logits, deltas, anchors, boxes, labels,
            box_loss=box_loss, focal_alpha=focal_alpha, focal_gamma=focal_gamma,
            smooth_l1_beta=smooth_l1_beta, giou_eps=giou_eps, class_weights=class_weights,
            fg_iou=fg_iou, bg_iou=bg_iou,
        )  # fmt: skip

    cls_sum, box_sum, num_fg = jax.vmap(per_image)(cls_logits, bbox_regression, gt_boxes, gt_labels)
    if normalization == "per_image":
        norm = jnp.maximum(num_fg, 1.0)
        return {"classification": jnp.mean(cls_sum / norm), "bbox_regression": jnp.mean(box_sum / norm)}
    norm = jnp.maximum(jnp.sum(num_fg), 1.0)
    return {"classification": jnp.sum(cls_sum) / norm, "bbox_regression": jnp.sum(box_sum) / norm}


def compute_losses(
    model: Any,
    variables: Any,
    images: jax.Array,
    targets: dict[str, jax.Array],
    *,
    box_loss: str | None = None,
    **kwargs: Any,
) -> dict[str, jax.Array]:
    """Losses of ``model`` on a batch, torchvision's definitions (``RetinaNet.compute_loss``).

    Args:
      model: a ``retinanet_jax`` RetinaNet module; run in eval mode (BatchNorm statistics are
        read, never updated).
      variables: its ``{"params", "batch_stats"}``.
      images: float32 ``[B, H, W, 3]``, normalized and padded exactly as the model consumes them.
      targets: ``{"boxes": f32 [B, G, 4] xyxy in those pixels, "labels": int32 [B, G]}``,
        label ``-1`` = padding.
      box_loss: default ``"l1"`` for ``model.variant == "v1"``, ``"giou"`` for ``"v2"``.
      **kwargs: forwarded to ``retinanet_losses`` (focal_alpha, normalization, ...).

    Returns:
      ``{"classification": f32 scalar, "bbox_regression": f32 scalar}``. Differentiable in
      ``variables`` and usable under ``jax.jit`` (with ``model`` closed over or static).
    """
    if box_loss is None:
        variant = getattr(model, "variant", "v1")
        if variant not in DEFAULT_BOX_LOSS:
            raise ValueError(f"no default box_loss for model variant {variant!r}; pass box_loss=")
        box_loss = DEFAULT_BOX_LOSS[variant]
    outputs = model.apply(variables, images, train=False)
    anchors = anchors_lib.anchors_for_model(model, tuple(images.shape[1:3]))
    return retinanet_losses(
        outputs["cls_logits"],
        outputs["bbox_regression"],
        anchors,
        targets["boxes"],
        targets["labels"],
        box_loss=box_loss,
        **kwargs,
    )
