"""The GPU / TPU programs, lowered on this CPU machine (cross-platform lowering, as ``jax.export``).

What the accelerator will run, read from the StableHLO module that ``jax.export`` lowers for
``cuda`` and ``tpu``: the v1 COCO recipe's sharded bf16 train step (ResNet-50-FPN, frozen BN,
3 trainable stages, SGD as configs/coco_r50_fpn_v1.py; 512x512, global batch 8 over the 8 fake
CPU devices of conftest.py) and the jitted detector (forward + postprocess, 512x512, batch 2).
Nothing is compiled or run. Checked: every convolution is a bf16 ``stablehlo.convolution``
(operands and result), none of the CPU-only forms (``backends.CPU_SCOPE`` in no op location, no
Winograd), no host callback, the train state donated, bias gradients summed in f32, class logits
and box deltas converted to f32 at their conv. The same programs lowered for ``cpu`` still get
the CPU forms. Trace + lowering times are printed (``pytest -s``) and held to a budget.

Markers are op locations: the CPU forms are traced inside ``jax.named_scope(backends.CPU_SCOPE)``
(Winograd inside a further "winograd" scope), and the lowered module's locations name the
scope of every op, forward and gradient (``transpose(jvp(cpu_conv))``).
"""

from __future__ import annotations

import functools
import re
import runpy
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retinanet_jax import backends
from retinanet_jax.inference.detector import DetectorOptions, detect_jit
from retinanet_jax.inference.export import export_detector
from retinanet_jax.models import heads as H
from retinanet_jax.models.resnet import ResNet
from retinanet_jax.models.retinanet import RetinaNet
from retinanet_jax.ops import anchors as anchors_lib
from retinanet_jax.parallel import mesh as parallel
from retinanet_jax.training.optim import OptimConfig, make_optimizer
from retinanet_jax.training.step import create_train_state, make_train_step

ROOT = Path(__file__).resolve().parents[1]
CANVAS = (512, 512)
NUM_CLASSES = 91  # COCO's torchvision label space (91 ids)
NUM_ANCHORS = 9
MAX_BOXES = 128  # configs/base.py input.max_boxes
ACCELERATORS = ("cuda", "tpu")
# Seconds for trace + lowering of one program (measured 3-10 s on the 2-core CPU): a regression
# that makes tracing blow up (e.g. every branch of a per-platform switch traced) shows here.
BUDGET_S = 60.0
HOST_CALLBACK = re.compile(r"callback", re.I)  # xla_python_cpu_callback, xla_ffi_python_*_callback


# ----------------------------------------------------------------------------- module parsing

_TENSOR = r"tensor<([^>]*)>"


def _elem(tensor_body: str) -> str:
    return tensor_body.split("x")[-1]


def _shape(tensor_body: str) -> tuple[int, ...]:
    return tuple(int(d) for d in tensor_body.split("x")[:-1])


def convolutions(text: str) -> list[tuple[str, str, str, str]]:
    """(result name, lhs, rhs, result tensor bodies) of every ``stablehlo.convolution``."""
    pat = re.compile(
        r"(%[\w#]+) = stablehlo\.convolution\(.*:\s*\(" + _TENSOR + ", " + _TENSOR + r"\)\s*->\s*" + _TENSOR
    )
    found = [m.groups() for m in pat.finditer(text)]
    assert len(found) == text.count("stablehlo.convolution"), "unparsed convolution ops"
    return found


def custom_call_targets(text: str) -> set[str]:
    return set(re.findall(r"stablehlo\.custom_call @([\w.$-]+)", text)) | set(
        re.findall(r'call_target_name = "([^"]+)"', text)
    )


def main_arg_attrs(text: str) -> list[str]:
    """The attribute dict of every argument of the module's public ``main``."""
    sig = re.search(r"func\.func public @main\((.*?)\)\s*->", text, re.S).group(1)
    parts = re.split(r"%arg\d+: ", sig)[1:]
    return [p for p in parts]


def bf16_add_reductions(text: str) -> list[int]:
    """Elements summed per output by every add-``stablehlo.reduce`` over bf16 values."""
    pat = re.compile(
        r"stablehlo\.reduce\(.*applies stablehlo\.add across dimensions = \[([\d, ]*)\]"
        r"\s*:\s*\(" + _TENSOR
    )
    sizes = []
    for dims, operand in pat.findall(text):
        if _elem(operand) == "bf16":
            shape = _shape(operand)
            sizes.append(int(np.prod([shape[int(d)] for d in dims.split(",")])))
    return sizes


def converted_to_f32(text: str, value: str) -> bool:
    return (
        re.search(r"stablehlo\.convert " + re.escape(value) + r"\b.*->\s*tensor<[^>]*xf32>", text) is not None
    )


# ----------------------------------------------------------------------------- programs


def _timed_export(fn, platform, *args):
    start = time.perf_counter()
    exported = jax.export.export(fn, platforms=(platform,))(*args)
    text = exported.mlir_module()
    return text, time.perf_counter() - start


@pytest.fixture(scope="module")
def v1_recipe():
    cfg = runpy.run_path(str(ROOT / "configs" / "coco_r50_fpn_v1.py"))["get_config"]()
    model = RetinaNet(
        num_classes=NUM_CLASSES,
        variant=cfg.model.variant,
        backbone=cfg.model.backbone,
        bn_eps=cfg.model.bn_eps,
        frozen_bn=cfg.model.frozen_bn,
        fpn_channels=cfg.model.fpn_channels,
    )
    return cfg, model


@pytest.fixture(scope="module")
def train_program(v1_recipe):
    """(step_fn, abstract sharded state, abstract sharded batch, number of state leaves)."""
    cfg, model = v1_recipe
    mesh = parallel.make_mesh()  # ("data", "model") = (8, 1) over the 8 fake devices
    assert mesh.devices.size == 8
    global_batch = 8
    tx, schedule = make_optimizer(OptimConfig.from_mapping(cfg.optim), 1000, global_batch)

    def init():
        variables = model.init(jax.random.key(0), jnp.zeros((1, *CANVAS, 3)))
        return create_train_state(
            model, variables, tx, cfg.model.trainable_backbone_layers, schedule=schedule
        )

    state = jax.eval_shape(init)  # abstract: nothing allocated
    state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        state,
        parallel.tree_shardings(state, mesh),
    )
    bs = parallel.batch_sharding(mesh)
    batch = {
        "images": jax.ShapeDtypeStruct((global_batch, *CANVAS, 3), jnp.uint8, sharding=bs),
        "image_sizes": jax.ShapeDtypeStruct((global_batch, 2), jnp.int32, sharding=bs),
        "boxes": jax.ShapeDtypeStruct((global_batch, MAX_BOXES, 4), jnp.float32, sharding=bs),
        "labels": jax.ShapeDtypeStruct((global_batch, MAX_BOXES), jnp.int32, sharding=bs),
    }
    step = make_train_step(model, mesh, dict(cfg.loss), compute_dtype=jnp.bfloat16)
    return step, state, batch, len(jax.tree.leaves(state))


def _lower_train(train_program, platform):
    step, state, batch, _ = train_program
    with backends.target(platform):  # TrainStep keys its jit by the target
        fn = step.jitted(state)
    text, seconds = _timed_export(fn, platform, state, batch)
    print(
        f"\n[lowering] bf16 train_step ResNet-50-FPN v1 {CANVAS} batch 8 on 8 devices, "
        f"{platform}: trace + lower {seconds:.1f} s"
    )
    return text, seconds


@pytest.fixture(scope="module")
def predict_program(v1_recipe):
    _, model = v1_recipe
    model = model.clone(dtype=jnp.bfloat16)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *CANVAS, 3))))
    anchors = anchors_lib.anchors_for_model(model, CANVAS)
    args = (
        variables,
        jax.ShapeDtypeStruct((2, *CANVAS, 3), jnp.float32),
        jax.ShapeDtypeStruct((2, 2), jnp.int32),
        jax.ShapeDtypeStruct(anchors.shape, jnp.float32),
    )
    return model, args


def _lower_predict(predict_program, platform):
    model, args = predict_program
    fn = jax.jit(functools.partial(detect_jit, model=model, options=DetectorOptions(), target=platform))
    text, seconds = _timed_export(fn, platform, *args)
    print(
        f"\n[lowering] bf16 detect (forward + postprocess) {CANVAS} batch 2, {platform}: "
        f"trace + lower {seconds:.1f} s"
    )
    return text, seconds


def _assert_accelerator_program(text: str) -> list[tuple[str, str, str, str]]:
    convs = convolutions(text)
    assert convs
    kinds = {(_elem(a), _elem(b), _elem(c)) for _, a, b, c in convs}
    assert kinds == {("bf16", "bf16", "bf16")}, kinds  # bf16 convs, none mixed, none f32
    assert backends.CPU_SCOPE not in text and "winograd" not in text  # no CPU-only form traced
    targets = custom_call_targets(text)
    assert not {t for t in targets if HOST_CALLBACK.search(t)}, targets
    return convs


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("platform", ACCELERATORS)
def test_train_step_for_accelerators_is_bf16_lax_convs_donated_and_f32_bias_grads(train_program, platform):
    text, seconds = _lower_train(train_program, platform)
    assert seconds < BUDGET_S
    convs = _assert_accelerator_program(text)
    # Forward: ResNet-50 53 + FPN 8 + heads 10 x 5 levels = 111 convs; the backward adds the
    # input and kernel gradients of the trainable ones (layer2-4, FPN, heads): all convolutions,
    # none turned into GEMMs.
    assert len(convs) > 2 * 111
    # Donated state: every state argument aliases an output or is a buffer donor; the batch not.
    n_state = train_program[3]
    attrs = main_arg_attrs(text)
    assert len(attrs) == n_state + 4
    donated = ["tf.aliasing_output" in a or "jax.buffer_donor" in a for a in attrs]
    assert all(donated[:n_state]) and not any(donated[n_state:])
    # Bias gradients (sums over batch x space) in f32: the only bf16 sums are the FPN's nearest
    # 2x upsampling gradients (<= 4 terms each).
    assert max(bf16_add_reductions(text), default=0) <= 4


@pytest.mark.parametrize("platform", ACCELERATORS)
def test_predict_for_accelerators_is_bf16_lax_convs_with_f32_logits(predict_program, platform):
    text, seconds = _lower_predict(predict_program, platform)
    assert seconds < BUDGET_S
    convs = _assert_accelerator_program(text)
    assert len(convs) == 53 + 8 + 10 * 5  # every model conv a convolution (ResNet, FPN, heads)
    # Class logits and box deltas: their bf16 conv converted to f32 (then the f32 bias).
    finals = [
        (name, out)
        for name, _, _, out in convs
        if _shape(out)[-1] in (NUM_ANCHORS * NUM_CLASSES, NUM_ANCHORS * 4)
    ]
    assert len(finals) == 2 * 5
    assert all(converted_to_f32(text, name) for name, _ in finals)


def test_cpu_programs_still_get_the_cpu_forms(train_program, predict_program):
    """The same functions lowered for ``cpu``: the CPU forms (GEMMs, Winograd) replace most
    convolutions, under the CPU scope."""
    for text, seconds, n_accelerator in (
        (*_lower_train(train_program, "cpu"), 2 * 111),
        (*_lower_predict(predict_program, "cpu"), 111),
    ):
        assert seconds < BUDGET_S
        assert f"/{backends.CPU_SCOPE}/" in text and f"{backends.CPU_SCOPE}/winograd" in text
        assert len(convolutions(text)) < n_accelerator // 4  # the rest are GEMMs
        assert "stablehlo.dot_general" in text


def test_the_target_selects_the_forms_at_trace_time():
    assert backends.current() == "cpu" and backends.is_cpu()  # conftest: the CPU backend
    assert backends.platform_for(("cpu", "cuda", "tpu")) == "cuda"
    assert backends.platform_for("tpu") == "tpu" and backends.platform_for(["cpu"]) == "cpu"
    with backends.target("gpu"):
        assert backends.current() == "cuda" and not backends.is_cpu()
        with backends.target("cpu"):
            assert backends.is_cpu()
        assert not backends.is_cpu()
    assert backends.is_cpu()

    x, w = jnp.ones((1, 32, 32, 256), jnp.bfloat16), jnp.ones((3, 3, 256, 256), jnp.bfloat16)

    def conv_text(platform):
        f = functools.partial(
            backends.conv_general_dilated,
            window_strides=(1, 1),
            padding=((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        with backends.target(platform):  # a fresh jit per call: traced under the context
            return (
                jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(f(x, w).astype(jnp.float32)), (0, 1)))
                .lower(x, w)
                .as_text(debug_info=True)
            )

    cpu, gpu = conv_text("cpu"), conv_text("cuda")
    assert "winograd" in cpu and "stablehlo.convolution" not in cpu
    assert "winograd" not in gpu and backends.CPU_SCOPE not in gpu
    assert gpu.count("stablehlo.convolution") == 3  # forward, input and kernel gradient


def test_accelerator_forms_follow_the_standard_precision_policy():
    """The accelerator forms run on the CPU too (plain lax convs): bf16 activations in inference
    (the residual stream; on CPU f32), class logits and box deltas in f32 with the exact f32
    prior bias."""
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    net = ResNet("resnet18", dtype=jnp.bfloat16)
    v = jax.eval_shape(net.init, jax.random.key(0), x)
    with backends.target("tpu"):
        assert {c.dtype for c in jax.eval_shape(net.apply, v, x)} == {jnp.dtype(jnp.bfloat16)}
    assert {c.dtype for c in jax.eval_shape(net.apply, v, x)} == {jnp.dtype(jnp.float32)}

    head = H.RetinaNetHead(num_classes=5, dtype=jnp.bfloat16)
    feats = [jnp.zeros((1, 4, 4, 16), jnp.float32)]
    hv = head.init(jax.random.key(1), feats)
    with backends.target("cuda"):
        out = jax.jit(head.apply)(hv, feats)
    assert out["cls_logits"].dtype == out["bbox_regression"].dtype == jnp.float32
    # Zero features: exactly the f32 prior bias (-4.5951...), not its bf16 rounding (-4.59375).
    np.testing.assert_array_equal(out["cls_logits"], np.float32(H.CLS_PRIOR_BIAS))


def test_multi_platform_export_traces_the_accelerator_forms():
    """``export_detector`` for ("cpu", "cuda") is one trace with the accelerator forms, so its
    CPU program runs lax convs; ("cpu",) alone gets the CPU forms. Zero weights: the baked-in
    constants are splats, so the module stays small."""
    model = RetinaNet(num_classes=3, backbone="resnet18", fpn_channels=256, dtype=jnp.bfloat16)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
    variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    texts = {}
    for platforms in (("cpu", "cuda"), ("cpu",)):
        exported = export_detector(model, variables, batch_size=1, canvas=(64, 64), platforms=platforms)
        assert exported.platforms == platforms
        texts[platforms] = exported.mlir_module()
    assert backends.CPU_SCOPE not in texts[("cpu", "cuda")]
    assert {(_elem(a), _elem(b), _elem(c)) for _, a, b, c in convolutions(texts[("cpu", "cuda")])} == {
        ("bf16", "bf16", "bf16")
    }
    assert backends.CPU_SCOPE in texts[("cpu",)]


def test_only_the_selection_point_imports_the_cpu_kernels():
    """conv.py / winograd.py are reached through backends/select.py only (models/ and the
    programs above import ``retinanet_jax.backends``)."""
    import ast

    import retinanet_jax

    package = Path(retinanet_jax.__file__).parent
    kernels = ("retinanet_jax.backends.cpu.conv", "retinanet_jax.backends.cpu.winograd")
    found = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        if rel.startswith("backends/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found += [f"{rel}:{node.lineno}" for n in names if n.startswith(kernels)]
    assert found == []
