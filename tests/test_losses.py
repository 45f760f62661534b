"""retinanet_jax.objective.losses against torch / torchvision.ops, identities and gradients at extremes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from retinanet_jax.objective import losses

# float32 elementwise formulas that differ from torch's kernels only by rounding.
RTOL, ATOL = 1e-5, 1e-6


def _t(x):
    return torch.from_numpy(np.asarray(x))


def _torch_value_and_grad(fn, *arrays):
    ts = [torch.tensor(np.asarray(a), requires_grad=True) for a in arrays]
    out = fn(*ts)
    out.sum().backward()
    return out.detach().numpy(), ts[0].grad.numpy()


def _jax_value_and_grad(fn, *arrays):
    out = fn(*arrays)
    grad = jax.grad(lambda a, *rest: jnp.sum(fn(a, *rest)))(*arrays)
    return np.asarray(out), np.asarray(grad)


def _random_logits_targets(seed, shape=(64, 7), scale=4.0):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(shape) * scale).astype(np.float32)
    targets = (rng.random(shape) < 0.3).astype(np.float32)
    return logits, targets


@pytest.mark.parametrize(
    "alpha,gamma", [(0.25, 2.0), (0.5, 1.0), (-1, 2.0), (0.25, 0.0), (0.75, 1.5), (0.25, 3.0)]
)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_focal_matches_torchvision(alpha, gamma, reduction):
    logits, targets = _random_logits_targets(0)
    ours = losses.sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction=reduction)
    ref = torchvision.ops.sigmoid_focal_loss(
        _t(logits), _t(targets), alpha=alpha, gamma=gamma, reduction=reduction
    )
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.25, 0.5), (-1, 0.0)])
def test_focal_gradient_matches_torch(alpha, gamma):
    logits, targets = _random_logits_targets(1)
    ours, g_ours = _jax_value_and_grad(
        lambda x, t: losses.sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma), logits, targets
    )
    ref, g_ref = _torch_value_and_grad(
        lambda x, t: torchvision.ops.sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma), logits, targets
    )
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(g_ours, g_ref, rtol=1e-4, atol=1e-6)


def test_focal_soft_targets_match_torchvision():
    rng = np.random.default_rng(2)
    logits = (rng.standard_normal((40, 5)) * 3).astype(np.float32)
    targets = rng.random((40, 5)).astype(np.float32)
    ours = losses.sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0)
    ref = torchvision.ops.sigmoid_focal_loss(_t(logits), _t(targets), alpha=0.25, gamma=2.0)
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=RTOL, atol=ATOL)


def test_focal_gamma0_alpha_minus1_is_bce():
    logits, targets = _random_logits_targets(3)
    focal = losses.sigmoid_focal_loss(logits, targets, alpha=-1, gamma=0.0)
    bce = losses.binary_cross_entropy_with_logits(logits, targets)
    ref = F.binary_cross_entropy_with_logits(_t(logits), _t(targets), reduction="none")
    np.testing.assert_allclose(np.asarray(focal), np.asarray(bce), rtol=0, atol=0)
    np.testing.assert_allclose(np.asarray(bce), ref.numpy(), rtol=RTOL, atol=ATOL)


EXTREME = np.array([-1e4, -200.0, -30.0, -17.0, 0.0, 17.0, 30.0, 200.0, 1e4], np.float32)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 2.5])
def test_focal_finite_at_extreme_logits(gamma):
    logits = np.concatenate([EXTREME, EXTREME])
    targets = np.concatenate([np.zeros_like(EXTREME), np.ones_like(EXTREME)])
    value, grad = _jax_value_and_grad(
        lambda x, t: losses.sigmoid_focal_loss(x, t, alpha=0.25, gamma=gamma), logits, targets
    )
    assert np.all(np.isfinite(value)) and np.all(np.isfinite(grad)), (value, grad)
    # Values agree with torchvision even where its gradient is nan (fractional gamma at p_t = 1).
    ref = torchvision.ops.sigmoid_focal_loss(_t(logits), _t(targets), alpha=0.25, gamma=gamma)
    np.testing.assert_allclose(value, ref.numpy(), rtol=RTOL, atol=ATOL)
    # Confident, wrong predictions have loss ~ |logit| and gradient sign pushing back.
    wrong_pos = (targets == 1) & (logits <= -200)
    np.testing.assert_allclose(value[wrong_pos], 0.25 * -logits[wrong_pos], rtol=1e-6)
    assert np.all(grad[wrong_pos] < 0)
    wrong_neg = (targets == 0) & (logits >= 200)
    np.testing.assert_allclose(value[wrong_neg], 0.75 * logits[wrong_neg], rtol=1e-6)
    assert np.all(grad[wrong_neg] > 0)


def test_focal_class_weights():
    logits, targets = _random_logits_targets(4)
    w = np.linspace(0.5, 2.0, logits.shape[-1]).astype(np.float32)
    weighted = losses.sigmoid_focal_loss(logits, targets, class_weights=w)
    plain = losses.sigmoid_focal_loss(logits, targets)
    np.testing.assert_allclose(np.asarray(weighted), np.asarray(plain) * w, rtol=1e-6)
    total = losses.sigmoid_focal_loss(logits, targets, class_weights=w, reduction="sum")
    np.testing.assert_allclose(float(total), float(np.sum(np.asarray(plain) * w)), rtol=1e-5)


def test_focal_invalid_alpha_raises():
    with pytest.raises(ValueError):
        losses.sigmoid_focal_loss(jnp.zeros(3), jnp.zeros(3), alpha=1.5)
    with pytest.raises(ValueError):
        losses.sigmoid_focal_loss(jnp.zeros(3), jnp.zeros(3), reduction="avg")


def test_focal_bf16_inputs_computed_in_f32():
    logits, targets = _random_logits_targets(5)
    lo = jnp.asarray(logits, jnp.bfloat16)
    out = losses.sigmoid_focal_loss(lo, targets)
    assert out.dtype == jnp.float32
    ref = losses.sigmoid_focal_loss(np.asarray(lo.astype(jnp.float32)), targets)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_l1_matches_torch(reduction):
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal((2, 30, 4)).astype(np.float32)
    a[0] = b[0]  # zero difference: torch's gradient is sign(0) = 0
    ours, g_ours = _jax_value_and_grad(lambda x, y: losses.l1_loss(x, y, reduction=reduction), a, b)
    ref, g_ref = _torch_value_and_grad(lambda x, y: F.l1_loss(x, y, reduction=reduction), a, b)
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(g_ours, g_ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("beta", [0.0, 1.0 / 9, 0.5, 1.0, 3.0])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_smooth_l1_matches_torch(beta, reduction):
    rng = np.random.default_rng(7)
    a, b = (rng.standard_normal((2, 50, 4)) * 1.5).astype(np.float32)
    a[0] = b[0]  # zero difference: gradient 0 in both (torch sign(0) = 0)

    def fn(x, y):
        return losses.smooth_l1_loss(x, y, beta=beta, reduction=reduction)

    ours, g_ours = _jax_value_and_grad(fn, a, b)
    ref, g_ref = _torch_value_and_grad(
        lambda x, y: F.smooth_l1_loss(x, y, beta=beta, reduction=reduction), a, b
    )
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(g_ours, g_ref, rtol=RTOL, atol=ATOL)
    assert np.all(np.isfinite(g_ours))


def test_smooth_l1_beta0_is_l1():
    rng = np.random.default_rng(8)
    a, b = rng.standard_normal((2, 20, 4)).astype(np.float32)
    np.testing.assert_array_equal(
        np.asarray(losses.smooth_l1_loss(a, b, beta=0.0, reduction="none")),
        np.asarray(losses.l1_loss(a, b, reduction="none")),
    )


def _random_boxes(rng, n, scale=100.0):
    xy = rng.random((n, 2)) * scale
    wh = rng.random((n, 2)) * scale * 0.5 + 0.5
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_giou_matches_torchvision(reduction):
    rng = np.random.default_rng(9)
    b1 = _random_boxes(rng, 64)
    b2 = _random_boxes(rng, 64)
    b2[:8] = b1[:8]  # identical boxes: loss 0
    b2[8:16] = b1[8:16] + np.float32(300.0)  # disjoint: loss > 1
    b2[16:20, 2] = b2[16:20, 0]  # zero-width boxes, eps keeps them finite

    def fn(x, y):
        return losses.giou_loss(x, y, reduction=reduction)

    ours, g_ours = _jax_value_and_grad(fn, b1, b2)
    ref, g_ref = _torch_value_and_grad(
        lambda x, y: torchvision.ops.generalized_box_iou_loss(x, y, reduction=reduction), b1, b2
    )
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(g_ours, g_ref, rtol=1e-4, atol=1e-7)
    assert np.all(np.isfinite(g_ours))
    if reduction == "none":
        np.testing.assert_allclose(ours[:8], 0.0, atol=1e-6)
        assert np.all(ours[8:16] > 1.0)


def test_giou_degenerate_pairs_finite_grad():
    boxes = np.array([[5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 0.0, 10.0]], np.float32)
    value, grad = _jax_value_and_grad(lambda x, y: losses.giou_loss(x, y), boxes, boxes.copy())
    assert np.all(np.isfinite(value)) and np.all(np.isfinite(grad))
    ref = torchvision.ops.generalized_box_iou_loss(_t(boxes), _t(boxes.copy()))
    np.testing.assert_allclose(value, ref.numpy(), rtol=RTOL, atol=ATOL)


def test_giou_mean_of_nothing_is_zero():
    empty = np.zeros((0, 4), np.float32)
    assert float(losses.giou_loss(empty, empty, reduction="mean")) == 0.0
    ref = torchvision.ops.generalized_box_iou_loss(_t(empty), _t(empty), reduction="mean")
    assert float(ref) == 0.0
