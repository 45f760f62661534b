"""benchmarks/op_profile.py: wall-time attribution and the HLO -> layer map of the --profile table."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest
from jax import lax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("op_profile", os.path.join(ROOT, "benchmarks", "op_profile.py"))
op_profile = importlib.util.module_from_spec(spec)
spec.loader.exec_module(op_profile)


def test_overlapping_spans_share_the_wall_time():
    # a alone 0-2, a and b together 2-4 (1 each), b alone 4-5, c alone 6-7 (5-6 idle).
    got = op_profile.split_wall_time([(0, 4, "a"), (2, 5, "b"), (6, 7, "c")])
    assert got == pytest.approx({"a": 3.0, "b": 2.0, "c": 1.0})
    assert sum(got.values()) == pytest.approx(6.0)  # the busy wall time, not thread time


def test_labels_follow_the_model_scopes():
    label = op_profile._label
    assert label("jit(f)/jvp(RetinaNet)/backbone/body/conv1/cpu_conv/conv_general_dilated") == "stem"
    assert label("jit(f)/transpose(jvp(RetinaNet))/backbone/body/layer3_1/bn1/mul") == "layer3"
    assert label("jit(f)/jvp(RetinaNet)/backbone/fpn/add") == "fpn"
    assert label("jit(f)/jvp(RetinaNet)/head/regression_head/conv_0_0/relu") == "box head"
    assert label("jit(f)/jvp(vmap())/reduce") == "other"
    assert op_profile.direction("jit(f)/transpose(jvp(RetinaNet))/head/x") == "bwd"
    assert op_profile.direction("jit(f)/jvp(RetinaNet)/head/x") == "fwd"


def test_every_instruction_of_a_conv_gradient_gets_a_source():
    """XLA drops the metadata of some instructions (the kernel-gradient convolution among them);
    they inherit an op_name, and one that reads the cotangent counts as backward."""
    x, w = jnp.ones((2, 16, 16, 3)), jnp.ones((7, 7, 3, 8))

    def loss(w):
        with jax.named_scope("RetinaNet"), jax.named_scope("backbone/body/conv1"):
            dn = ("NHWC", "HWIO", "NHWC")
            y = jnp.tanh(lax.conv_general_dilated(x, w, (2, 2), ((3, 3), (3, 3)), dimension_numbers=dn))
        return jnp.sum(y)

    text = jax.jit(jax.grad(loss)).lower(w).compile().as_text()
    ops = op_profile.hlo_ops(text)
    convs = {name: op for name, (_, op) in ops.items() if "conv" in name}
    assert len(convs) >= 2, sorted(ops)  # the forward and the kernel gradient
    for name, op_name in convs.items():
        assert op_profile._label(op_name) == "stem", (name, op_name)
    assert any(op_profile.direction(op) == "bwd" for op in convs.values()), convs
