"""ResNet / ResNeXt feature extractor in NHWC, laid out like torchvision.models.resnet.

Module names follow torchvision's state_dict with ``.N`` written as ``_N`` (``layer1.0.conv1`` ->
``layer1_0/conv1``, ``layer1.0.downsample.1`` -> ``layer1_0/downsample_1``) so the port is a rename.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from retinanet_jax import backends

Array = jax.Array

# name -> (block, blocks per stage, groups, width_per_group); torchvision.models.resnet builders.
RESNET_SPECS: dict[str, tuple[str, tuple[int, int, int, int], int, int]] = {
    "resnet18": ("basic", (2, 2, 2, 2), 1, 64),
    "resnet34": ("basic", (3, 4, 6, 3), 1, 64),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 1, 64),
    "resnet101": ("bottleneck", (3, 4, 23, 3), 1, 64),
    "resnet152": ("bottleneck", (3, 8, 36, 3), 1, 64),
    "resnext50_32x4d": ("bottleneck", (3, 4, 6, 3), 32, 4),
    "resnext101_32x8d": ("bottleneck", (3, 4, 23, 3), 32, 8),
}

# torchvision ResNet.__init__: kaiming_normal_(mode="fan_out", nonlinearity="relu"); flax's fan_out
# for an HWIO kernel is H*W*O, the same as torch's for OIHW (also for grouped convs).
resnet_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def stage_channels(backbone: str) -> tuple[int, int, int, int]:
    """Output channels of layer1..layer4 (C2..C5) for a backbone name from RESNET_SPECS."""
    if backbone not in RESNET_SPECS:
        raise ValueError(f"unknown backbone {backbone!r}; expected one of {sorted(RESNET_SPECS)}")
    expansion = 4 if RESNET_SPECS[backbone][0] == "bottleneck" else 1
    return tuple(64 * 2**i * expansion for i in range(4))  # type: ignore[return-value]


def _pad(p: int) -> tuple[tuple[int, int], tuple[int, int]]:
    # Explicit symmetric padding: 'SAME' pads (0, 1) on stride 2 where torch pads (1, 1).
    return ((p, p), (p, p))


class BatchNorm(nn.Module):
    """BatchNorm on NHWC with torch semantics.

    ``frozen=True`` mirrors torchvision.ops.misc.FrozenBatchNorm2d: always the running statistics,
    ``x * w * rsqrt(var + eps) + (b - mean * scale)``. ``frozen=False`` mirrors torch.nn.BatchNorm2d:
    batch statistics when ``train`` (biased variance to normalise, unbiased to update the running
    variance, torch ``momentum`` convention, ``num_batches_tracked`` counted), running ones otherwise.
    Affine ``scale``/``bias`` live in "params" (a training mask freezes them), ``mean``/``var``
    (+ ``num_batches_tracked`` if not frozen) in "batch_stats".
    """

    epsilon: float = 1e-5
    frozen: bool = True
    momentum: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        if not self.frozen:
            count = self.variable("batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32))
        # At least f32 (a float64 compute dtype keeps float64: the float64 equality tests).
        f32 = jnp.promote_types(x.dtype, jnp.float32)
        if train and not self.frozen:
            xf = x.astype(f32)
            mean = jnp.mean(xf, axis=(0, 1, 2))
            var = jnp.mean(jnp.square(xf - mean), axis=(0, 1, 2))
            if not self.is_initializing():
                n = x.shape[0] * x.shape[1] * x.shape[2]
                m = self.momentum
                ra_mean.value = (1.0 - m) * ra_mean.value + m * mean
                ra_var.value = (1.0 - m) * ra_var.value + m * var * (n / max(n - 1, 1))
                count.value = count.value + 1
        else:
            mean, var = ra_mean.value, ra_var.value
        # Fold into one per-channel multiply-add (computed in f32 on [C] vectors) so the feature map
        # is touched once, as FrozenBatchNorm2d does. Applied in f32 whatever the compute dtype
        # (as torch autocast does with FrozenBatchNorm2d's f32 buffers): a bf16-rounded scale is
        # a per-channel 0.4% error. Free on CPU, where XLA computes bf16 elementwise ops in f32.
        mul = scale * jax.lax.rsqrt(var + self.epsilon)
        add = bias - mean * mul
        return (x.astype(f32) * mul + add).astype(self.dtype)


class BasicBlock(nn.Module):
    """Mirrors torchvision.models.resnet.BasicBlock (expansion 1)."""

    planes: int
    stride: int = 1
    downsample: bool = False
    bn_eps: float = 1e-5
    frozen_bn: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        conv, bn, bn_out = _block_layers(self.dtype, self.bn_eps, self.frozen_bn, train)
        out = conv(self.planes, 3, self.stride, 1, name="conv1")(x)
        out = nn.relu(bn(name="bn1")(out, train))
        out = conv(self.planes, 3, 1, 1, name="conv2")(out)
        out = bn_out(name="bn2")(out, train)
        if self.downsample:
            x = conv(self.planes, 1, self.stride, 0, name="downsample_0")(x)
            x = bn_out(name="downsample_1")(x, train)
        return nn.relu(out + x)


class Bottleneck(nn.Module):
    """Mirrors torchvision.models.resnet.Bottleneck (v1.5: stride on the 3x3 conv; expansion 4)."""

    planes: int
    stride: int = 1
    downsample: bool = False
    groups: int = 1
    base_width: int = 64
    bn_eps: float = 1e-5
    frozen_bn: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        conv, bn, bn_out = _block_layers(self.dtype, self.bn_eps, self.frozen_bn, train)
        width = int(self.planes * (self.base_width / 64.0)) * self.groups
        out = conv(width, 1, 1, 0, name="conv1")(x)
        out = nn.relu(bn(name="bn1")(out, train))
        out = conv(width, 3, self.stride, 1, groups=self.groups, name="conv2")(out)
        out = nn.relu(bn(name="bn2")(out, train))
        out = conv(self.planes * 4, 1, 1, 0, name="conv3")(out)
        out = bn_out(name="bn3")(out, train)
        if self.downsample:
            x = conv(self.planes * 4, 1, self.stride, 0, name="downsample_0")(x)
            x = bn_out(name="downsample_1")(x, train)
        return nn.relu(out + x)


def _block_layers(dtype: Any, eps: float, frozen: bool, train: bool):
    """(conv, bn, bn_out) factories of a residual block: ``bn_out`` normalizes into the
    residual stream, whose dtype may differ in inference (see ``_stream_dtype``)."""
    return (
        _conv_factory(dtype, train),
        _bn_factory(eps, frozen, dtype),
        _bn_factory(eps, frozen, _stream_dtype(dtype, train)),
    )


def _conv_factory(dtype: Any, train: bool = False):
    # The conv hook and its output dtype are the target platform's (backends.norm_conv_args):
    # on CPU, low-precision inference returns each conv's f32 accumulation into the f32
    # BatchNorm (one rounding fewer, bf16 prediction ~5% faster; not in training, +3.6% per
    # bf16 step there); on GPU / TPU a bf16 conv, which the BatchNorm reads in f32.
    conv_args = backends.norm_conv_args(dtype, train)

    def make(features: int, k: int, stride: int, pad: int, *, groups: int = 1, name: str) -> nn.Conv:
        return nn.Conv(
            features,
            (k, k),
            strides=(stride, stride),
            padding=_pad(pad),
            use_bias=False,
            feature_group_count=groups,
            dtype=dtype,
            param_dtype=jnp.float32,
            kernel_init=resnet_kernel_init,
            **conv_args,  # per platform: backends/select.py
            name=name,
        )

    return make


def _stream_dtype(dtype: Any, train: bool) -> Any:
    # The residual stream (block outputs, i.e. C2..C5), per target platform
    # (backends.activation_dtype). CPU low-precision inference: float32. Rounded to bf16 after
    # every block, its rounding errors pile up over the 16-33 blocks (bf16 class logits' rms
    # error against f32 9% lower without them, lively v1 weights at 512x512); the convs that
    # read it round their operand anyway. Costs one f32 feature map per block in memory
    # traffic. Training, and GPU / TPU always: ``dtype`` (bf16 activations).
    return backends.activation_dtype(dtype, train)


def _bn_factory(eps: float, frozen: bool, dtype: Any):
    def make(*, name: str) -> BatchNorm:
        return BatchNorm(epsilon=eps, frozen=frozen, dtype=dtype, name=name)

    return make


class ResNet(nn.Module):
    """Mirrors torchvision.models.resnet.ResNet without avgpool/fc.

    ``__call__(x [B,H,W,3]) -> (C2, C3, C4, C5)``, NHWC at strides 4, 8, 16, 32 (ceil halving) with
    ``stage_channels(arch)`` channels, in ``dtype`` when ``train`` or on GPU / TPU, else
    (CPU inference) float32, computed in ``dtype``; see ``_stream_dtype``.
    """

    arch: str = "resnet50"
    bn_eps: float = 1e-5
    frozen_bn: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> tuple[Array, Array, Array, Array]:
        stage_channels(self.arch)  # clear error for an unknown arch
        block_kind, depths, groups, width = RESNET_SPECS[self.arch]
        conv = _conv_factory(self.dtype, train)
        # Low-precision CPU inference: the stem's output and max-pool in f32 too, since XLA:CPU's
        # bf16 reduce_window is slow (13 ms against 2.7 ms for f32 on 256x256x64; 52 against
        # 14 at 400x608). Max commutes with rounding, so layer1's convs see the same values.
        bn_out = _bn_factory(self.bn_eps, self.frozen_bn, _stream_dtype(self.dtype, train))
        x = x.astype(self.dtype)
        x = conv(64, 7, 2, 3, name="conv1")(x)
        x = nn.relu(bn_out(name="bn1")(x, train))
        # -inf padding, as torch's MaxPool2d(3, 2, padding=1).
        x = backends.max_pool(x, (3, 3), (2, 2), _pad(1))
        expansion = 4 if block_kind == "bottleneck" else 1
        inplanes = 64
        outs = []
        for stage, depth in enumerate(depths):
            planes = 64 * 2**stage
            for i in range(depth):
                stride = 2 if (stage > 0 and i == 0) else 1
                common = dict(
                    planes=planes,
                    stride=stride,
                    downsample=(i == 0 and (stride != 1 or inplanes != planes * expansion)),
                    bn_eps=self.bn_eps,
                    frozen_bn=self.frozen_bn,
                    dtype=self.dtype,
                    name=f"layer{stage + 1}_{i}",
                )
                if block_kind == "bottleneck":
                    x = Bottleneck(groups=groups, base_width=width, **common)(x, train)
                else:
                    x = BasicBlock(**common)(x, train)
                inplanes = planes * expansion
            outs.append(x)
        return tuple(outs)  # type: ignore[return-value]
