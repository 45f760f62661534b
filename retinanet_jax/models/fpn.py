"""Feature pyramid P3-P7 on C3-C5, mirroring torchvision.ops.FeaturePyramidNetwork + LastLevelP6P7.

Names follow torchvision's state_dict (``inner_blocks.0.0`` -> ``inner_blocks_0_0``,
``extra_blocks.p6`` -> ``extra_blocks/p6``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from retinanet_jax import backends

Array = jax.Array

# torchvision FeaturePyramidNetwork / LastLevelP6P7: kaiming_uniform_(a=1) => bound sqrt(3 / fan_in).
fpn_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


def torch_nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source index per output index of F.interpolate(mode="nearest", size=out_size) on one axis.

    Mirrors ATen's ``nearest_idx`` (UpSample.h), including its float32 scale arithmetic.
    """
    if out_size == in_size:
        return np.arange(out_size)
    if out_size == 2 * in_size:
        return np.arange(out_size) >> 1
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(src, in_size - 1)


def upsample_nearest(x: Array, size: tuple[int, int]) -> Array:
    """x [B,h,w,C] -> [B,H,W,C] exactly as F.interpolate(x, size=(H, W), mode="nearest")."""
    b, h, w, c = x.shape
    ih, iw = torch_nearest_indices(h, size[0]), torch_nearest_indices(w, size[1])
    if np.array_equal(ih, np.arange(size[0]) // 2) and np.array_equal(iw, np.arange(size[1]) // 2):
        # The FPN case (lateral = ceil(2x smaller) level): a 2x repeat then crop, which XLA fuses
        # into the add, instead of a gather.
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        return x[:, : size[0], : size[1]]
    return jnp.take(jnp.take(x, jnp.asarray(ih), axis=1), jnp.asarray(iw), axis=2)


class FeaturePyramidNetwork(nn.Module):
    """FPN with 1x1 laterals, 3x3 outputs, nearest top-down and P6/P7 (LastLevelP6P7).

    ``__call__([C3, C4, C5]) -> [P3, P4, P5, P6, P7]``, each [B, h_l, w_l, out_channels] in dtype.
    ``p6_from_c5``: v2 (LastLevelP6P7(2048, 256)) feeds C5 to P6, v1 (LastLevelP6P7(256, 256)) P5.
    """

    out_channels: int = 256
    p6_from_c5: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, feats: Sequence[Array]) -> list[Array]:
        conv = _conv_factory(self.out_channels, self.dtype)
        n = len(feats)
        last_inner = conv(1, 1, f"inner_blocks_{n - 1}_0")(feats[-1])
        results = [conv(3, 1, f"layer_blocks_{n - 1}_0")(last_inner)]
        for idx in range(n - 2, -1, -1):
            lateral = conv(1, 1, f"inner_blocks_{idx}_0")(feats[idx])
            last_inner = lateral + upsample_nearest(last_inner, lateral.shape[1:3])
            results.insert(0, conv(3, 1, f"layer_blocks_{idx}_0")(last_inner))
        p6_input = feats[-1] if self.p6_from_c5 else results[-1]
        return results + LastLevelP6P7(self.out_channels, self.dtype, name="extra_blocks")(p6_input)


class LastLevelP6P7(nn.Module):
    """Mirrors torchvision.ops.feature_pyramid_network.LastLevelP6P7: x -> [P6, P7]."""

    out_channels: int = 256
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> list[Array]:
        conv = _conv_factory(self.out_channels, self.dtype)
        p6 = conv(3, 2, "p6")(x)
        # No ReLU on P6 itself, only on the way into P7.
        p7 = conv(3, 2, "p7")(nn.relu(p6))
        return [p6, p7]


def _conv_factory(features: int, dtype: Any):
    def make(k: int, stride: int, name: str) -> Any:
        p = k // 2
        conv = nn.Conv(
            features,
            (k, k),
            strides=(stride, stride),
            padding=((p, p), (p, p)),
            dtype=dtype,
            param_dtype=jnp.float32,
            kernel_init=fpn_kernel_init,
            bias_init=nn.initializers.zeros,
            # Low precision: bias added (and its gradient summed) in f32, output cast back.
            **backends.float32_output_args(dtype),  # the conv per platform: backends/select.py
            name=name,
        )
        return lambda x: conv(x).astype(dtype) if dtype is not None else conv(x)

    return make
