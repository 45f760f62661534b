"""Elementwise detection losses: sigmoid focal, L1, smooth-L1 and GIoU.

Each mirrors the named torch / torchvision function (same formula, same defaults, same
reductions) so that losses agree number for number, while staying finite -- values and
gradients -- at extreme inputs. Half-precision inputs are computed in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from retinanet_jax.ops.boxes import paired_generalized_iou

_REDUCTIONS = ("none", "mean", "sum")


def _upcast(x: jax.Array) -> jax.Array:
    """bf16/f16 -> f32 (as torchvision's ``_upcast_non_float`` guards overflow); f32/f64 kept."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating) or jnp.finfo(x.dtype).bits < 32:
        return x.astype(jnp.float32)
    return x


def _reduce(loss: jax.Array, reduction: str) -> jax.Array:
    if reduction == "none":
        return loss
    if reduction == "mean":
        return jnp.mean(loss)
    if reduction == "sum":
        return jnp.sum(loss)
    raise ValueError(f"Invalid reduction {reduction!r}; expected one of {_REDUCTIONS}")


def _abs(x: jax.Array) -> jax.Array:
    """``|x|`` whose gradient at 0 is 0, like torch's ``sign`` (``jnp.abs``' is 1 there)."""
    return x * jnp.sign(x)


def _modulating_factor(u: jax.Array, gamma: float) -> jax.Array:
    """``u ** gamma`` (the focal term ``(1 - p_t) ** gamma``) with a finite gradient at ``u = 0``."""
    if gamma == 0:
        # torch: 0 ** 0 == 1; the gradient of a constant is 0 (jnp.power's would be 0 * inf).
        return jnp.ones_like(u)
    if float(gamma).is_integer() and gamma > 0:
        # Integer powers (gamma = 2 by default) are exact products with gradient n*u**(n-1),
        # finite everywhere.
        return jax.lax.integer_pow(u, int(gamma))
    # Fractional gamma: d(u**g)/du = g*u**(g-1) is inf at u = 0 for g < 1 (and u = 0 happens for
    # saturated logits), which turns into 0 * inf = nan upstream. Take 0 there instead; also
    # treats rounding-negative u as 0 rather than torch's nan.
    positive = u > 0
    safe_u = jnp.where(positive, u, 1.0)
    return jnp.where(positive, safe_u**gamma, 0.0)


def binary_cross_entropy_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Elementwise ``torch.nn.functional.binary_cross_entropy_with_logits(..., reduction="none")``.

    Stable for any finite logit: ``(1 - t) * x - log(sigmoid(x))`` with a log-sigmoid that never
    exponentiates a positive number.
    """
    logits = _upcast(logits)
    targets = _upcast(targets).astype(logits.dtype)
    return (1.0 - targets) * logits - jax.nn.log_sigmoid(logits)


def sigmoid_focal_loss(
    logits: jax.Array,
    targets: jax.Array,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
    class_weights: jax.Array | None = None,
) -> jax.Array:
    """Sigmoid focal loss; mirrors ``torchvision.ops.sigmoid_focal_loss``.

    Args:
      logits: float ``[..., K]`` raw scores (any shape).
      targets: float, same shape as ``logits``; 1 positive, 0 negative (soft values allowed).
      alpha: weight of positives in ``[0, 1]``; ``-1`` disables the alpha weighting. Static.
      gamma: focusing exponent ``>= 0``; ``gamma = 0`` with ``alpha = -1`` is plain BCE. Static.
      reduction: ``"none"`` | ``"mean"`` | ``"sum"``.
      class_weights: optional float ``[K]`` multiplying the loss of each class (last axis);
        an extension, torchvision has none.

    Returns:
      Loss with the reduction applied (shape of ``logits`` for ``"none"``), float32 or wider.
    """
    if not (0 <= alpha <= 1) and alpha != -1:
        raise ValueError(f"Invalid alpha {alpha}: must be in [0, 1] or -1 to disable it")
    if gamma < 0:
        raise ValueError(f"Invalid gamma {gamma}: must be >= 0")
    logits = _upcast(logits)
    targets = _upcast(targets).astype(logits.dtype)
    p = jax.nn.sigmoid(logits)
    ce = binary_cross_entropy_with_logits(logits, targets)
    p_t = p * targets + (1.0 - p) * (1.0 - targets)
    loss = ce * _modulating_factor(1.0 - p_t, gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1.0 - alpha) * (1.0 - targets)
        loss = alpha_t * loss
    if class_weights is not None:
        loss = loss * _upcast(class_weights).astype(loss.dtype)
    return _reduce(loss, reduction)


def l1_loss(inputs: jax.Array, targets: jax.Array, reduction: str = "mean") -> jax.Array:
    """``|inputs - targets|``; mirrors ``torch.nn.functional.l1_loss`` (same shapes, any rank)."""
    diff = _upcast(inputs) - _upcast(targets)
    return _reduce(_abs(diff), reduction)


def smooth_l1_loss(
    inputs: jax.Array, targets: jax.Array, beta: float = 1.0, reduction: str = "mean"
) -> jax.Array:
    """Huber-like loss; mirrors ``torch.nn.functional.smooth_l1_loss``.

    ``0.5 * d**2 / beta`` where ``|d| < beta``, else ``|d| - 0.5 * beta``; ``beta = 0`` is exactly
    L1 (torch special-cases it to avoid dividing by zero). ``beta`` is static.
    """
    if beta < 0:
        raise ValueError(f"smooth_l1_loss: beta must be >= 0, got {beta}")
    diff = _upcast(inputs) - _upcast(targets)
    abs_diff = _abs(diff)
    if beta == 0:
        return _reduce(abs_diff, reduction)
    loss = jnp.where(abs_diff < beta, 0.5 * diff * diff / beta, abs_diff - 0.5 * beta)
    return _reduce(loss, reduction)


def giou_loss(boxes1: jax.Array, boxes2: jax.Array, reduction: str = "none", eps: float = 1e-7) -> jax.Array:
    """``1 - GIoU`` of paired boxes; mirrors ``torchvision.ops.generalized_box_iou_loss``.

    Args:
      boxes1, boxes2: float ``[..., 4]`` xyxy, paired elementwise (not all-pairs).
      reduction: ``"none"`` | ``"mean"`` | ``"sum"``.
      eps: added to the union and enclosing areas against 0/0 for degenerate boxes.

    Returns:
      ``[...]`` losses in ``[0, 2]`` for valid boxes, with the reduction applied.
    """
    loss = 1.0 - paired_generalized_iou(boxes1, boxes2, eps)
    if reduction == "mean" and loss.size == 0:
        return jnp.sum(loss)  # torchvision returns 0 for the mean of no boxes, not nan
    return _reduce(loss, reduction)
