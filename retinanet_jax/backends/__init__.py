"""Per-platform kernels and precision choices, selected in one place (``select.py``).

``models/`` and the programs above them use only this selection point; ``backends/cpu/`` holds
the CPU-only forms it picks for the CPU target. ``with backends.target("cuda"):`` traces the
GPU program on any machine (cross-platform lowering, ``jax.export``).
"""

from retinanet_jax.backends.select import (
    CPU_SCOPE,
    activation_dtype,
    conv_general_dilated,
    current,
    float32_output_args,
    is_cpu,
    max_pool,
    norm_conv_args,
    platform_for,
    target,
)

__all__ = [
    "CPU_SCOPE",
    "activation_dtype",
    "conv_general_dilated",
    "current",
    "float32_output_args",
    "is_cpu",
    "max_pool",
    "norm_conv_args",
    "platform_for",
    "target",
]
