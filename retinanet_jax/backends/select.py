"""The one place that picks per-platform convolution kernels and precision deviations.

``models/`` build every convolution and the few dtype choices that differ between backends from
this module; they never import ``backends/cpu`` (tests/test_architecture.py). Everything here is
resolved at TRACE time from the *target* platform: ``jax.default_backend()``, or the platform
set by ``with target("cuda"):`` (cross-platform lowering, ``jax.export``; see
``inference/export.py``). Nothing here traces more than one platform's program: no
``lax.platform_dependent``, no custom_vjp outside the CPU forms.

CPU (``target() == "cpu"``): ``backends/cpu/conv.py``'s forms (Winograd F(2x2, 3x3), GEMM forms,
their custom VJPs), ``backends/cpu/pool.py``'s max-pool backward, and the CPU precision
choices, exactly as measured in docs/performance.md: under
bf16 compute every conv with a bias (and every ResNet conv in inference) returns its f32
accumulation and adds its bias in f32; inference keeps the ResNet residual stream, the stem and
the head towers' activations in f32. Traced under the name scope :data:`CPU_SCOPE`, so a lowered
module shows where they are (its op locations name ``cpu_conv``).

GPU / TPU (any other target): the standard mixed-precision policy. Parameters, optimizer state,
normalization statistics, class logits, box deltas, losses, box decoding and NMS in float32;
activations and convolutions in the compute dtype (bf16). Every convolution is a plain
``lax.conv_general_dilated`` on operands of the compute dtype with a result of that dtype
(cuDNN and the TPU MXU accumulate in f32 internally and round once, at the output). A conv that
must give float32 (``float32_output_args``: the FPN, the head towers and the final class / box
convs, i.e. every conv with a bias) converts that result to f32 and adds its f32 bias in f32;
so class logits and box deltas are f32 with the exact f32 bias, and a bias gradient is a sum of
an f32 cotangent (bf16 partial sums lost its small terms: tests/test_models.py). The conv's
gradients stay bf16 (the cotangent is rounded once, by the convert's transpose).

Why not ask the accelerator conv for an f32 result (``preferred_element_type=f32``, what the CPU
GEMMs do for free): XLA:GPU's float normalization does not support mixed-precision convolutions
(``ConvBfloat16Support::SupportsMixedPrecisions`` is false for kConvolution), so a bf16 x bf16 ->
f32 conv becomes an f32 conv on f32-converted operands; and jax's transpose rules differentiate
such a conv with f32 x f32 convolutions (the f32 cotangent against the converted operand), in
training on either accelerator. The cost of the choice: the conv's sum is rounded to bf16 once
(relative 2^-9) before the f32 bias, also for the logits.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from retinanet_jax.backends.cpu import conv as cpu_conv
from retinanet_jax.backends.cpu import pool as cpu_pool

CPU = "cpu"
# Name scope around every CPU-backend convolution (its forward and, under ``transpose(jvp(...))``,
# its gradients): tests search lowered modules for it.
CPU_SCOPE = "cpu_conv"

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "retinanet_jax_target_platform", default=None
)
_ALIASES = {"gpu": "cuda"}


def _canonical(platform: str) -> str:
    p = str(platform).lower()
    return _ALIASES.get(p, p)


def platform_for(platforms: str | Sequence[str]) -> str:
    """The platform whose forms a program lowered for ``platforms`` is traced with: the first
    non-CPU one if any (a multi-platform export, e.g. ("cpu", "cuda", "tpu"), is traced once, so
    its CPU program then uses the accelerator forms: plain lax convs and bf16 activations), else
    "cpu"."""
    if isinstance(platforms, str):
        platforms = (platforms,)
    names = [_canonical(p) for p in platforms]
    if not names:
        raise ValueError("platforms must not be empty")
    return next((p for p in names if p != CPU), CPU)


def current() -> str:
    """The target platform of what is traced now: the innermost ``target(...)``, else
    ``jax.default_backend()`` ("gpu" is reported as "cuda")."""
    t = _TARGET.get()
    return t if t is not None else _canonical(jax.default_backend())


def is_cpu() -> bool:
    """Whether what is traced now targets the CPU backend (and so gets the CPU forms)."""
    return current() == CPU


@contextlib.contextmanager
def target(platforms: str | Sequence[str] | None) -> Iterator[str]:
    """Trace-time switch of the target platform (``"cpu"``, ``"cuda"``, ``"rocm"``, ``"tpu"``, or
    a sequence of them, see :func:`platform_for`; None keeps the current one). Only affects
    functions *traced* inside: jit caches do not see it, so a jitted function that was already
    traced for other shapes-and-target must carry the target in its key (``detect_jit`` and
    ``TrainStep`` do)."""
    if platforms is None:
        yield current()
        return
    token = _TARGET.set(platform_for(platforms))
    try:
        yield _TARGET.get()
    finally:
        _TARGET.reset(token)


# --------------------------------------------------------------------------- convolution


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    compute_dtype: Any = None,
) -> jax.Array:
    """``lax.conv_general_dilated`` for the target platform (the ``nn.Conv`` hook of models/).

    CPU: ``backends.cpu.conv.conv_general_dilated`` (GEMM and Winograd forms), in the name scope
    :data:`CPU_SCOPE`. GPU / TPU: ``lax.conv_general_dilated`` on operands cast to
    ``compute_dtype`` (None: as given), its result cast to ``preferred_element_type``."""
    layout = dict(
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
    )
    if is_cpu():
        with jax.named_scope(CPU_SCOPE):
            return cpu_conv.conv_general_dilated(
                lhs,
                rhs,
                window_strides,
                padding,
                **layout,
                preferred_element_type=preferred_element_type,
                compute_dtype=compute_dtype,
            )
    # Operands rounded to the compute dtype here (``float32_output_args`` hands over the f32
    # kernel), the conv in that dtype, its result converted to ``preferred_element_type``: a
    # bf16 conv, never a mixed-precision one (see the module doc).
    if compute_dtype is not None:
        lhs, rhs = lhs.astype(compute_dtype), rhs.astype(compute_dtype)
    y = lax.conv_general_dilated(lhs, rhs, window_strides, padding, **layout)
    return y if preferred_element_type is None else y.astype(preferred_element_type)


def max_pool(
    x: jax.Array,
    window: tuple[int, int],
    strides: tuple[int, int],
    padding: tuple[tuple[int, int], tuple[int, int]],
) -> jax.Array:
    """``nn.max_pool`` (-inf padding, as torch's ``MaxPool2d``) for the target platform on NHWC
    ``x: [B, H, W, C]``. CPU: ``backends.cpu.pool.max_pool`` (same values and gradient, a
    backward XLA:CPU runs 2-2.5x faster), in :data:`CPU_SCOPE`, except in the ablation modes
    "lax" and "no-pool" of ``cpu.conv.implementation``. GPU / TPU: ``lax.reduce_window`` and
    jax's own gradient."""
    if is_cpu() and cpu_conv.form_enabled("pool"):
        with jax.named_scope(CPU_SCOPE):
            return cpu_pool.max_pool(x, window, strides, padding)
    return lax.reduce_window(
        x, -jnp.inf, lax.max, (1, *window, 1), (1, *strides, 1), ((0, 0), *padding, (0, 0))
    )


def _promote_none(inputs, kernel, bias, dtype=None):
    # nn.Conv's promote_dtype hook: operands and bias as they are; the conv rounds the operands
    # to its compute dtype itself (Winograd after its transforms), the bias stays float32.
    del dtype
    return inputs, kernel, bias


def _at_least_f32(dtype: Any) -> Any:
    return jnp.promote_types(dtype if dtype is not None else jnp.float32, jnp.float32)


def float32_output_args(dtype: Any) -> dict[str, Any]:
    """``nn.Conv`` keyword arguments: products in ``dtype``, output and bias add in float32 (at
    least: a float64 ``dtype`` keeps float64), on every platform; how the conv gets there is
    the platform's (module doc). For a ``dtype`` of at least float32: the plain hook."""
    out = _at_least_f32(dtype)
    if jnp.dtype(dtype if dtype is not None else jnp.float32) == out:
        return dict(conv_general_dilated=conv_general_dilated)
    return dict(
        conv_general_dilated=functools.partial(
            conv_general_dilated, compute_dtype=dtype, preferred_element_type=out
        ),
        promote_dtype=_promote_none,
    )


def norm_conv_args(dtype: Any, train: bool) -> dict[str, Any]:
    """``nn.Conv`` keyword arguments for a bias-free conv whose output goes into a norm applied
    in f32 (ResNet's convs into BatchNorm).

    CPU inference: :func:`float32_output_args` (the f32 accumulation into the f32 norm: one
    rounding fewer and one pass less, bf16 prediction ~5% faster; in training the f32 cotangent
    this gives every conv cost 3.6% per step, so training returns ``dtype``). GPU / TPU: the
    conv returns ``dtype`` (module doc), which the norm reads in f32."""
    if is_cpu() and not train:
        return float32_output_args(dtype)
    return dict(conv_general_dilated=conv_general_dilated)


def activation_dtype(dtype: Any, train: bool) -> Any:
    """dtype of the activations that inference keeps between layers where CPU measurements
    chose f32: the ResNet residual stream (block outputs C2..C5), the stem's output and
    max-pool, and the head towers' activations.

    CPU inference: float32 (at least), each conv rounding its own operands (bf16 class logits'
    rms error against f32 0.0160 -> 0.0126, no slower on XLA:CPU, whose bf16 max-pool is slow;
    docs/performance.md). Training, and GPU / TPU always: ``dtype`` (the standard policy: bf16
    activations)."""
    if is_cpu() and not train:
        return _at_least_f32(dtype)
    return dtype
