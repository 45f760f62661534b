"""RetinaNet classification / regression heads, mirroring torchvision.models.detection.retinanet.

Names follow torchvision's (new, version 2) state_dict: ``conv.1.0`` (conv) / ``conv.1.1``
(GroupNorm, v2) -> ``conv_1_0`` / ``conv_1_1``; ``cls_logits``; ``bbox_reg``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from retinanet_jax import backends

Array = jax.Array

PRIOR_PROBABILITY = 0.01
# RetinaNetClassificationHead: cls_logits bias = -log((1 - p) / p) so every score starts at p.
CLS_PRIOR_BIAS = -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY)
head_kernel_init = nn.initializers.normal(stddev=0.01)


def cls_bias_init(key: Any, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
    """Prior-probability bias of the final class conv (torchvision's RetinaNetClassificationHead)."""
    del key
    return jnp.full(shape, CLS_PRIOR_BIAS, dtype)


def _tower(
    features: Sequence[Array],
    out_features: int,
    final_name: str,
    final_bias_init: Any,
    group_norm: bool,
    dtype: Any,
    train: bool = False,
) -> list[Array]:
    """4 x Conv2dNormActivation(C, C) then a final 3x3 conv to ``out_features``, shared over levels.

    v1: conv3x3 (bias) + ReLU; v2: conv3x3 (no bias) + GroupNorm(32, eps 1e-5) + ReLU. Called inside
    a head's compact ``__call__`` so the layers are that head's direct children (``conv_0_0`` ...).
    Returns one [B, h_l, w_l, out_features] array per level, float32 whatever ``dtype``.
    ``train=False`` with a low-precision ``dtype`` on CPU: the activations between the convs
    stay f32, each conv rounds its own operands (the Winograd ones after their transforms, see
    ``backends.cpu.conv.conv_general_dilated``'s ``compute_dtype``); on GPU / TPU they are
    ``dtype`` (``backends.activation_dtype``).
    """
    c = features[0].shape[-1]

    def conv(n_out: int, name: str, use_bias: bool, bias_init: Any = nn.initializers.zeros) -> nn.Conv:
        # Low-precision compute: every conv adds its bias in f32 and returns f32 (the final
        # ones so that logits and box deltas are float32, the precision contract; the prior bias
        # -4.5951 would be -4.59375 in bf16). In training the tower rounds to ``dtype`` once per
        # layer: after the conv (v1) or after the GroupNorm, which normalises the f32 output (v2).
        # In CPU inference it does not round at all: the next conv does (one rounding per
        # layer too), but the P3/P4 Winograd convs round their transformed input instead, from
        # f32 (bf16 class logits' rms error against f32 4% lower, lively v1 weights at 512x512).
        # GPU / TPU: a bf16 conv converted to f32 for the f32 bias (backends/select.py).
        # Training keeps bf16 activations, so bf16 cotangents (f32 ones cost 3.6% per step
        # where measured, in the ResNet's convs).
        return nn.Conv(
            n_out,
            (3, 3),
            padding=((1, 1), (1, 1)),
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=jnp.float32,
            kernel_init=head_kernel_init,
            bias_init=bias_init,
            **backends.float32_output_args(dtype),  # the conv per platform: backends/select.py
            name=name,
        )

    act_dtype = backends.activation_dtype(dtype, train)  # CPU inference: f32; else dtype

    def to_dtype(x: Array) -> Array:
        return x.astype(act_dtype) if act_dtype is not None else x

    layers = []
    for i in range(4):
        layers.append(conv(c, f"conv_{i}_0", use_bias=not group_norm))
        if group_norm:
            # Two-pass variance (as torch): E[x^2] - E[x]^2 cancels badly when |mean| >> std.
            gn = nn.GroupNorm(
                num_groups=32,
                epsilon=1e-5,
                use_fast_variance=False,
                dtype=act_dtype,
                param_dtype=jnp.float32,
                name=f"conv_{i}_1",
            )
            layers.append(gn)
        else:
            layers.append(to_dtype)
        layers.append(nn.relu)
    final = conv(out_features, final_name, use_bias=True, bias_init=final_bias_init)
    outs = []
    for x in features:
        for layer in layers:
            x = layer(x)
        outs.append(final(x))
    return outs


def _flatten_levels(outs: Sequence[Array], last: int) -> Array:
    # torchvision views (N, A*K, H, W) as (N, A, K, H, W) and permutes to (N, H, W, A, K): channel
    # a*K + k. NHWC already has that channel order last, so a reshape gives [B, H*W*A, K].
    flat = jnp.concatenate([o.reshape(o.shape[0], -1, last) for o in outs], axis=1)
    return flat.astype(jnp.promote_types(flat.dtype, jnp.float32))  # f32, or f64 under float64


class RetinaNetClassificationHead(nn.Module):
    """Mirrors RetinaNetClassificationHead: features [B,h,w,C] per level -> f32 [B, sum(h*w*A), K]."""

    num_classes: int
    num_anchors: int = 9
    group_norm: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[Array], train: bool = False) -> Array:
        outs = _tower(
            features,
            self.num_anchors * self.num_classes,
            "cls_logits",
            cls_bias_init,
            self.group_norm,
            self.dtype,
            train,
        )
        return _flatten_levels(outs, self.num_classes)


class RetinaNetRegressionHead(nn.Module):
    """Mirrors RetinaNetRegressionHead: features [B,h,w,C] per level -> f32 [B, sum(h*w*A), 4]."""

    num_anchors: int = 9
    group_norm: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[Array], train: bool = False) -> Array:
        outs = _tower(
            features,
            self.num_anchors * 4,
            "bbox_reg",
            nn.initializers.zeros,
            self.group_norm,
            self.dtype,
            train,
        )
        return _flatten_levels(outs, 4)


class RetinaNetHead(nn.Module):
    """Mirrors RetinaNetHead: -> {"cls_logits": f32 [B, A, K], "bbox_regression": f32 [B, A, 4]}."""

    num_classes: int
    num_anchors: int = 9
    group_norm: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[Array], train: bool = False) -> dict[str, Array]:
        cls = RetinaNetClassificationHead(
            self.num_classes, self.num_anchors, self.group_norm, self.dtype, name="classification_head"
        )
        reg = RetinaNetRegressionHead(self.num_anchors, self.group_norm, self.dtype, name="regression_head")
        return {"cls_logits": cls(features, train), "bbox_regression": reg(features, train)}
