"""training.py: the sharded train step.

A tiny RetinaNet (ResNet-18, 32 FPN channels, 3 classes) on 64x64 canvases, global batch 8.
Compiles are the cost here, so runs are cached per (frozen_bn, mesh) and shared by tests.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from retinanet_jax.imageprep.normalize import normalize_images
from retinanet_jax.models.retinanet import RetinaNet
from retinanet_jax.parallel import mesh as parallel
from retinanet_jax.training import optim
from retinanet_jax.training import step as training

BATCH, CANVAS, STEPS = 8, (64, 64), 3
# SGD as torchvision v1 but without warmup, so three steps move the params visibly.
OPT = optim.OptimConfig(base_lr=0.02, warmup_steps=0)


def tiny_model(frozen_bn: bool) -> RetinaNet:
    return RetinaNet(num_classes=3, backbone="resnet18", fpn_channels=32, frozen_bn=frozen_bn)


@functools.cache
def tiny_variables(frozen_bn: bool) -> dict:
    """Deterministic numpy variables with the model's structure (no init compile needed)."""
    model = tiny_model(frozen_bn)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *CANVAS, 3)))
    rng = np.random.default_rng(0)

    def fill(path, s):
        keys = [str(getattr(k, "key", k)) for k in path]
        name = keys[-1]
        if name == "kernel":
            # torchvision's inits: heads normal(std=0.01), elsewhere He (kaiming) normal.
            std = 0.01 if "head" in keys else np.sqrt(2.0 / np.prod(s.shape[:-1]))
            return (rng.normal(size=s.shape) * std).astype(s.dtype)
        if name == "bias" and "cls_logits" in keys:
            return np.full(s.shape, -np.log(99.0), s.dtype)  # prior probability 0.01
        if name in ("scale", "var"):
            return (1.0 + 0.1 * rng.uniform(size=s.shape)).astype(s.dtype)
        return (0.01 * rng.normal(size=s.shape)).astype(s.dtype) if s.shape else np.zeros((), s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def make_batch(seed: int, canvas=CANVAS) -> dict:
    rng = np.random.default_rng(seed)
    h, w = canvas
    sizes = np.stack([rng.integers(h // 2, h + 1, BATCH), rng.integers(w // 2, w + 1, BATCH)], 1)
    boxes = np.zeros((BATCH, 3, 4), np.float32)
    labels = np.full((BATCH, 3), -1, np.int32)
    for i in range(BATCH - 1):  # the last image has no boxes
        for j in range(1 + i % 3):
            x0, y0 = rng.uniform(0, sizes[i, 1] / 2), rng.uniform(0, sizes[i, 0] / 2)
            bw, bh = rng.uniform(12, sizes[i, 1] / 2), rng.uniform(12, sizes[i, 0] / 2)
            boxes[i, j] = (x0, y0, x0 + bw, y0 + bh)
            labels[i, j] = rng.integers(0, 3)
    return {
        "images": rng.integers(0, 256, (BATCH, h, w, 3), dtype=np.uint8),
        "image_sizes": sizes.astype(np.int32),
        "boxes": boxes,
        "labels": labels,
    }


@functools.cache
def make_tx():
    # One tx for every state: tx is static in TrainState, so a new tx means a new trace.
    return optim.make_optimizer(OPT, steps_per_epoch=100, global_batch_size=BATCH)


def new_state(frozen_bn: bool, mesh, trainable_backbone_layers: int = 3):
    model = tiny_model(frozen_bn)
    tx, schedule = make_tx()
    return training.create_train_state(
        model, tiny_variables(frozen_bn), tx, trainable_backbone_layers, mesh=mesh, schedule=schedule
    )


MESHES = {
    "1dev": lambda: parallel.make_mesh(devices=jax.devices()[:1]),
    "8dev": lambda: parallel.make_mesh(),
    "4x2": lambda: parallel.make_mesh(model=2),
}


@functools.cache
def step_fn(frozen_bn: bool, mesh_key: str) -> training.TrainStep:
    return training.make_train_step(tiny_model(frozen_bn), MESHES[mesh_key]())


def to_host(tree):
    return jax.tree.map(np.asarray, tree)


@functools.cache
def run(frozen_bn: bool, mesh_key: str):
    """STEPS steps from the same start; returns (final state on host, per-step metrics)."""
    fn = step_fn(frozen_bn, mesh_key)
    state = new_state(frozen_bn, fn.mesh)
    metrics = []
    for i in range(STEPS):
        state, m = fn(state, make_batch(i))
        metrics.append(to_host(m))
    return to_host(state), metrics


def assert_trees_close(a, b, scale_tol):
    """Per leaf: |a - b| <= scale_tol * (|b| + max |b|), i.e. relative to the leaf's scale.

    Elementwise relative error is meaningless for entries near zero (a momentum entry of
    1e-11 differs by 100% when the cross-device sum order changes), so the absolute part is
    tied to the largest entry of the same tensor.
    """
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for (path, x), y in zip(la, lb):
        atol = scale_tol * float(np.max(np.abs(y), initial=0.0))
        np.testing.assert_allclose(x, y, rtol=scale_tol, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("frozen_bn", [True, False], ids=["frozen_bn", "trainable_bn"])
def test_8_devices_equal_1_device(frozen_bn):
    s8, m8 = run(frozen_bn, "8dev")
    s1, m1 = run(frozen_bn, "1dev")
    start = to_host(new_state(frozen_bn, None))
    # The update is real: params moved well beyond the tolerance below.
    moved = max(
        np.max(np.abs(a - b)) for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(start.params))
    )
    assert moved > 1e-3
    # Same math; only the order of the cross-device reductions differs (f32 sums over 8
    # shards vs one): 1e-5 of each tensor's scale after 3 steps (measured: params <1e-7,
    # momentum <2e-6, BN running stats <1e-6).
    assert_trees_close(s8.params, s1.params, 1e-5)
    assert_trees_close(s8.opt_state, s1.opt_state, 1e-5)
    # Trainable BN: running stats come from the *global* batch statistics; per-device
    # statistics (1 image each) would be far off.
    assert_trees_close(s8.batch_stats, s1.batch_stats, 1e-5)
    for a, b in zip(m8, m1):
        for k in ("loss", "classification", "bbox_regression", "grad_norm", "lr"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=k)
        assert a["is_finite"] and b["is_finite"]
    if not frozen_bn:  # the running statistics really were updated
        assert not np.allclose(
            s1.batch_stats["backbone"]["body"]["bn1"]["mean"],
            start.batch_stats["backbone"]["body"]["bn1"]["mean"],
        )
        assert int(s1.batch_stats["backbone"]["body"]["bn1"]["num_batches_tracked"]) == STEPS
    else:
        assert_trees_close(s1.batch_stats, start.batch_stats, 0.0)


@pytest.mark.slow
def test_model_axis_sharding_equals_1_device():
    s42, m42 = run(True, "4x2")
    s1, m1 = run(True, "1dev")
    assert_trees_close(s42.params, s1.params, 1e-5)
    np.testing.assert_allclose(m42[-1]["loss"], m1[-1]["loss"], rtol=1e-5)


@pytest.mark.parametrize("frozen_bn", [True, False], ids=["frozen_bn", "trainable_bn"])
def test_frozen_params_bitwise_unchanged_and_stateless(frozen_bn):
    final, _ = run(frozen_bn, "8dev")
    start = to_host(new_state(frozen_bn, None))
    assert final.frozen_params  # conv1 + layer1 (+ all body BN when frozen) are frozen
    for a, b in zip(jax.tree.leaves(final.frozen_params), jax.tree.leaves(start.frozen_params)):
        np.testing.assert_array_equal(a, b)
    # Optimizer state (SGD momentum) covers exactly the trainable partition.
    trace = optax.tree_utils.tree_get(final.opt_state, "trace")
    assert jax.tree.structure(trace) == jax.tree.structure(final.params)
    frozen_keys = {k for k in _flat_keys(final.frozen_params)}
    assert not frozen_keys & set(_flat_keys(final.params))
    assert int(final.step) == STEPS and int(final.skipped) == 0


def _flat_keys(tree):
    return [
        "/".join(str(getattr(k, "key", k)) for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)
    ]


@pytest.mark.parametrize(
    "layers, trainable_tops",
    [
        (0, set()),
        (3, {"layer2", "layer3", "layer4"}),
        (5, {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"}),
    ],
)
def test_trainable_backbone_layers_semantics(layers, trainable_tops):
    state = new_state(False, None, trainable_backbone_layers=layers)
    tops = {k.split("/")[2].split("_")[0] for k in _flat_keys(state.params) if k.startswith("backbone/body/")}
    assert tops == trainable_tops
    assert any(k.startswith("backbone/fpn/") for k in _flat_keys(state.params))
    assert any(k.startswith("head/") for k in _flat_keys(state.params))
    # Frozen BN (torchvision FrozenBatchNorm2d): body BN affine params never train.
    frozen_bn_state = new_state(True, None, trainable_backbone_layers=5)
    assert not [
        k
        for k in _flat_keys(frozen_bn_state.params)
        if k.startswith("backbone/body/") and k.split("/")[-1] == "scale"
    ]


def test_compiles_once_per_canvas_shape():
    # This step function is shared with other tests, which only use the 64x64 canvas.
    fn = step_fn(True, "8dev")
    state = new_state(True, fn.mesh)
    state, _ = fn(state, make_batch(10))
    assert fn.trace_count == 1 and fn.cache_size() == 1
    state, _ = fn(state, make_batch(11))
    assert fn.trace_count == 1
    for seed in (12, 13):
        state, _ = fn(state, make_batch(seed, canvas=(96, 64)))
        assert fn.trace_count == 2 and fn.cache_size() == 2
    state, _ = fn(state, make_batch(14))
    assert fn.trace_count == 2


def _nan_in_head(state):
    """Copy of ``state`` whose classification-head bias is NaN (forward -> NaN loss)."""
    params = jax.tree.map(lambda x: x, state.params)
    cls = params["head"]["classification_head"]["cls_logits"]
    cls["bias"] = jnp.full_like(cls["bias"], jnp.nan)
    return state.replace(params=jax.device_put(params, parallel.tree_shardings(params, state_mesh(state))))


def state_mesh(state):
    return jax.tree.leaves(state.params)[0].sharding.mesh


def test_nonfinite_loss_raises_naming_the_step_and_keeps_state():
    fn = step_fn(True, "8dev")
    state, m = fn(new_state(True, fn.mesh), make_batch(0))  # step 1 is fine
    bad = _nan_in_head(state)
    before = to_host(bad)
    with pytest.raises(FloatingPointError, match="non-finite loss at step 2") as err:
        fn(bad, make_batch(1))
    after = to_host(err.value.state)
    assert err.value.step == 2
    for tree in ("params", "frozen_params", "opt_state", "batch_stats"):
        for a, b in zip(jax.tree.leaves(getattr(after, tree)), jax.tree.leaves(getattr(before, tree))):
            np.testing.assert_array_equal(a, b)  # NaN == NaN here: the update was not applied

    fn.skip_nonfinite = True  # host-side option only: shares the compiled step
    try:
        s = err.value.state
        s, m = fn(s, make_batch(2))
        s, m = fn(s, make_batch(3))
    finally:
        fn.skip_nonfinite = False
    assert not m["is_finite"]
    assert int(s.step) == 4 and int(s.skipped) == 3  # the raised one + two skipped
    # Only step 1 was applied: the schedule's count did not advance on skipped steps.
    assert int(optax.tree_utils.tree_get(s.opt_state, "count")) == 1


def test_bf16_compute_keeps_f32_params_and_close_loss():
    """One bf16 step against the f32 step from the same state and batch.

    The step's gradient is read off its SGD update: momentum starts at 0 and there is no
    warmup, so ``p1 = p0 - lr * (g + wd * p0)``. Tolerances from bf16 rounding (eps 2**-8,
    relative error <= 2**-9 per rounding, ~2**-9/sqrt(3) rms):
    - the loss is f32 (focal loss on f32 logits) averaged over thousands of anchors whose
      bf16 errors are independent: measured 1.4e-6 relative; one bf16 rounding of the loss
      itself would be up to 2**-9 = 2e-3, so 2**-12 separates the two;
    - the final head convs' gradients are f32 sums of (bf16 activation) x (f32 cotangent):
      the activations reaching them went through ~2 roundings in the head at that depth, so
      4 * 2**-8 = 1.6e-2 (measured <= 7.2e-3);
    - deeper leaves compound ~2 roundings per layer over up to ~40 layers forward + backward,
      and a kernel gradient is a sum with heavy cancellation of random-sign terms (its norm is
      ~10x below the norm of its terms on this random model), so per leaf only
      sqrt(80) * 2**-8 * 10 = 0.35 relative (measured <= 0.26), while the whole gradient,
      dominated by the heads, is within 3e-2 (measured 1.7e-2; 1.5e-4 in its norm).
    """
    model = tiny_model(True)
    mesh = parallel.make_mesh()
    fn16 = training.make_train_step(model, mesh, compute_dtype=jnp.bfloat16)
    fn32 = step_fn(True, "8dev")
    p0 = to_host(new_state(True, mesh).params)
    state, m16 = fn16(new_state(True, mesh), make_batch(0))
    s32, m32 = fn32(new_state(True, fn32.mesh), make_batch(0))
    assert fn16.model.dtype == jnp.bfloat16
    for leaf in jax.tree.leaves((state.params, state.opt_state, state.frozen_params)):
        assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
    assert m16["is_finite"]
    # bf16 activations change the loss a little (so bf16 really ran), not a lot.
    rel = abs(float(m16["loss"]) - float(m32["loss"])) / float(m32["loss"])
    assert 0 < rel < 2**-12, rel

    lr, wd = float(m32["lr"]), OPT.weight_decay
    assert float(m16["lr"]) == lr and OPT.momentum > 0 and OPT.warmup_steps == 0

    def grads(s):
        return {
            jax.tree_util.keystr(k): (a.astype(np.float64) - np.asarray(b, np.float64)) / lr - wd * a
            for (k, a), b in zip(jax.tree_util.tree_leaves_with_path(p0), jax.tree.leaves(to_host(s.params)))
        }

    g16, g32 = grads(state), grads(s32)
    assert g16.keys() == g32.keys() and len(g16) > 40
    err = {k: np.linalg.norm(g16[k] - g32[k]) / np.linalg.norm(g32[k]) for k in g32}
    final = [k for k in err if "cls_logits" in k or "bbox_reg" in k]
    assert len(final) == 4
    for k in final:
        assert err[k] < 4 * 2**-8, (k, err[k])
    worst = max(err, key=err.get)
    assert err[worst] < 0.35, (worst, err[worst])
    flat16, flat32 = (np.concatenate([g[k].ravel() for k in sorted(g)]) for g in (g16, g32))
    assert np.linalg.norm(flat16 - flat32) < 3e-2 * np.linalg.norm(flat32)
    np.testing.assert_allclose(float(m16["grad_norm"]), float(m32["grad_norm"]), rtol=1e-2)
    # The bf16 run really differs (bf16 ran), and the update moved every trainable leaf.
    assert any(err[k] > 0 for k in err)
    assert all(np.any(g32[k] != 0) for k in g32)


def test_normalize_images_matches_torchvision_arithmetic_and_zeroes_padding():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    sizes = np.array([[8, 8], [5, 3]], np.int32)
    got = np.asarray(jax.jit(normalize_images)(images, sizes))
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    want = (images.astype(np.float32) / np.float32(255) - mean) / std
    want[1, 5:] = 0
    want[1, :, 3:] = 0
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mesh_key", [None, "1dev", "8dev"])
def test_created_state_leaves_have_their_own_buffers(mesh_key):
    """Adam's zero moments mu / nu start equal (optax may hand out one buffer for both); the
    step donates the state, so no two leaves -- nor a leaf and the caller's variables -- may
    share a buffer."""
    model = tiny_model(False)
    tx = optax.adam(1e-3)
    variables = jax.tree.map(jnp.asarray, tiny_variables(False))
    mesh = None if mesh_key is None else MESHES[mesh_key]()
    state = training.create_train_state(model, variables, tx, 5, mesh=mesh)
    pointers = [
        s.data.unsafe_buffer_pointer() for leaf in jax.tree.leaves(state) for s in leaf.addressable_shards
    ]
    assert len(pointers) == len(set(pointers))
    given = {
        s.data.unsafe_buffer_pointer() for leaf in jax.tree.leaves(variables) for s in leaf.addressable_shards
    }
    assert not given & set(pointers)


# ------------------------------------------------- multi-device equality in float64
#
# The recipes we ship, run in float64 (jax_enable_x64, float64 compute dtype, float64 params,
# optimizer state and BatchNorm statistics): 8 devices, and a (data 4, model 2) mesh, give the
# update of 1 device to float64 rounding. In float32 the same comparison cannot be tight on
# every leaf: gradients that are cancellation noise differ with the summation order, and Adam
# turns that noise into lr-sized updates (test_adamw_float32_drift_is_rounding_noise; the
# measurements: docs/performance.md, "Multi-device equality (float64)").

import dataclasses  # noqa: E402
import os  # noqa: E402
import runpy  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _shipped_optim(config_file: str, **changes) -> optim.OptimConfig:
    c = runpy.run_path(os.path.join(ROOT, "configs", config_file))["get_config"]()
    return dataclasses.replace(optim.OptimConfig.from_mapping(c.optim), **changes)


# name -> (optimizer settings, steps per epoch, model fields, trainable_backbone_layers)
RECIPES = {
    # configs/base.py (torchvision v1): SGD, momentum 0.9, coupled wd 1e-4, linear lr scaling,
    # warmup, multistep; 2 steps per epoch and a milestone at epoch 1, so the 3 steps see the
    # warmup (lr / 1000), the full lr and the decayed one. v1 model, frozen BN, 3 layers.
    "sgd_v1": (
        _shipped_optim("base.py", milestones=(1,), epochs=2),
        2,
        dict(variant="v1", frozen_bn=True),
        3,
    ),
    # configs/shapes.py: AdamW (wd 0.05, none on norm params), clipping at norm 10, warmup and
    # a per-step cosine over an epoch of 4 steps. v2 model (GroupNorm heads), trainable BN
    # (normalizing with global batch statistics), every layer trains.
    "adamw_shapes": (_shipped_optim("shapes.py"), 4, dict(variant="v2", frozen_bn=False), 5),
}
DTYPE_NAMES = {"float32": jnp.float32, "float64": jnp.float64}


def _recipe_model(recipe: str) -> RetinaNet:
    return RetinaNet(num_classes=3, backbone="resnet18", fpn_channels=32, **RECIPES[recipe][2])


@functools.cache
def _recipe_variables(recipe: str) -> dict:
    """Deterministic float32 numpy variables (tiny_variables' rule, for any model)."""
    shapes = jax.eval_shape(_recipe_model(recipe).init, jax.random.key(0), jnp.zeros((1, *CANVAS, 3)))
    rng = np.random.default_rng(0)

    def fill(path, s):
        keys = [str(getattr(k, "key", k)) for k in path]
        if not jnp.issubdtype(s.dtype, jnp.floating):
            return np.zeros(s.shape, s.dtype)
        if keys[-1] == "kernel":
            std = 0.01 if "head" in keys else np.sqrt(2.0 / np.prod(s.shape[:-1]))
            return (rng.normal(size=s.shape) * std).astype(s.dtype)
        if keys[-1] == "bias" and "cls_logits" in keys:
            return np.full(s.shape, -np.log(99.0), s.dtype)
        if keys[-1] in ("scale", "var"):
            return (1.0 + 0.1 * rng.uniform(size=s.shape)).astype(s.dtype)
        return (0.01 * rng.normal(size=s.shape)).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.cache
def run_recipe(recipe: str, mesh_key: str, dtype_name: str):
    """STEPS steps of ``recipe`` on ``mesh_key`` in ``dtype_name`` (float64: under
    jax_enable_x64, params / optimizer state / BN statistics float64 too). Returns (the state
    on the host before and after every step, per-step metrics, {param path: partition spec})."""
    cfg, steps_per_epoch, _, layers = RECIPES[recipe]
    dtype = DTYPE_NAMES[dtype_name]
    model = _recipe_model(recipe)
    with jax.enable_x64(dtype_name == "float64"):
        tx, schedule = optim.make_optimizer(cfg, steps_per_epoch, BATCH)
        fn = training.make_train_step(model, MESHES[mesh_key](), compute_dtype=dtype)
        state = training.create_train_state(
            model, _recipe_variables(recipe), tx, layers, mesh=fn.mesh, schedule=schedule, param_dtype=dtype
        )
        states, metrics = [to_host(state)], []
        for i in range(STEPS):
            state, m = fn(state, make_batch(i))
            states.append(to_host(state))
            metrics.append(to_host(m))
        specs = {
            jax.tree_util.keystr(k): tuple(x.sharding.spec)
            for k, x in jax.tree_util.tree_leaves_with_path(state.params)
        }
    return states, metrics, specs


# Tolerance of the float64 comparisons, relative to each tensor's largest entry. A sum of n
# terms computed in two orders differs by at most ~log2(n) roundings of its terms' magnitude
# (XLA's blocked / tree reductions; 13 for the 8192 pixels of a batch reduction here), i.e.
# relative to the result by 13 * eps * (sum |terms|) / |sum|. The cancellation ratio
# (sum |terms|) / |sum| reaches ~1e4 on the noise-only leaves: their float32 gradients are
# wrong by >= 10% (test_adamw_float32_drift_is_rounding_noise), i.e. 1e-1 / (13 * 6e-8).
# Relative errors add up over ~100 dependent operations (forward + backward through ~40
# layers, the update) and the 3 steps: 13 * 1.1e-16 * 1e4 * 100 * 3 = 4e-9. Measured: see
# the tests (<= 1e-12 on most leaves). float32's eps (6e-8) in the same bound gives 2:
# float32 runs agree only where the sums do not cancel.
F64_TOL = 1e-8


def assert_float64_close(a, b, tol: float = F64_TOL) -> float:
    """Every float leaf float64 and |a - b| <= tol * max|b| per leaf; integer leaves equal.
    Returns the largest difference relative to its leaf's scale."""
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    worst = 0.0
    for (path, x), y in zip(la, lb):
        name = jax.tree_util.keystr(path)
        if not jnp.issubdtype(y.dtype, jnp.floating):
            np.testing.assert_array_equal(x, y, err_msg=name)
            continue
        assert x.dtype == y.dtype == np.float64, (name, x.dtype, y.dtype)
        scale = float(np.max(np.abs(y), initial=0.0))
        diff = float(np.max(np.abs(x - y), initial=0.0))
        assert diff <= tol * scale, (name, diff, scale)
        worst = max(worst, diff / scale if scale else 0.0)
    return worst


def _assert_same_run(got, want):
    (s_got, m_got, _), (s_want, m_want, _) = got, want
    start, end = s_want[0], s_want[-1]
    # Real updates, far beyond the tolerance: the params moved.
    moved = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(jax.tree.leaves(end.params), jax.tree.leaves(start.params))
    )
    assert moved > 1e-4, moved
    worst = {
        key: assert_float64_close(getattr(s_got[-1], key), getattr(end, key))
        for key in ("params", "frozen_params", "opt_state", "batch_stats", "step")
    }
    for a, b in zip(m_got, m_want):
        assert a["is_finite"] and b["is_finite"]
        for k in ("loss", "classification", "bbox_regression", "grad_norm"):
            assert a[k].dtype == np.float64
            np.testing.assert_allclose(a[k], b[k], rtol=F64_TOL, atol=0, err_msg=k)
        np.testing.assert_array_equal(a["lr"], b["lr"])
    return worst


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_float64_8_devices_equal_1_device(recipe):
    worst = _assert_same_run(run_recipe(recipe, "8dev", "float64"), run_recipe(recipe, "1dev", "float64"))
    print(f"{recipe}: largest difference relative to its leaf's scale {worst}")
    states = run_recipe(recipe, "1dev", "float64")[0]
    start, end = states[0], states[-1]
    if RECIPES[recipe][2]["frozen_bn"]:
        assert_float64_close(end.batch_stats, start.batch_stats, 0.0)  # FrozenBatchNorm2d
    else:  # running statistics from the *global* batch statistics, updated every step
        bn1 = end.batch_stats["backbone"]["body"]["bn1"]
        assert not np.allclose(bn1["mean"], start.batch_stats["backbone"]["body"]["bn1"]["mean"])
        assert int(bn1["num_batches_tracked"]) == STEPS


@pytest.mark.slow
def test_float64_data_model_mesh_equals_1_device():
    """(data 4, model 2): kernels split over "model" by output channel, batch over "data"."""
    sharded = run_recipe("adamw_shapes", "4x2", "float64")
    assert any("model" in spec for spec in sharded[2].values())  # the rule split some kernels
    worst = _assert_same_run(sharded, run_recipe("adamw_shapes", "1dev", "float64"))
    print(f"4x2 mesh: largest difference relative to its leaf's scale {worst}")


def test_float64_compute_needs_x64(tmp_path):
    from retinanet_jax.training import loop

    c = runpy.run_path(os.path.join(ROOT, "configs", "tiny.py"))["get_config"]()
    c.model.compute_dtype = "float64"
    assert not jax.config.jax_enable_x64
    with pytest.raises(ValueError, match="compute_dtype='float64' needs jax_enable_x64"):
        loop.train_and_evaluate(c, str(tmp_path))


@pytest.mark.slow
def test_adamw_float32_drift_is_rounding_noise():
    """Why float32 AdamW runs on 8 and 1 devices differ beyond float32 noise, and float64 not.

    Step 1's Adam direction is ``g / (|g| + eps)`` per element (m = (1-b1) g, v = (1-b2) g^2
    after bias correction), so an element whose gradient is within a few rounding errors of
    0 gets an update of up to ``lr`` whose size and sign are the rounding's. Derived: an
    element whose two float32 updates differ by more than 1% of lr has two gradients that
    differ by more than ~1% of the smaller one, so its gradient is at most ~100 of its own
    rounding errors (|g32 - g64|, 8 and 1 devices) from 0: low signal-to-noise, where the
    typical element has >= 1e3. Which elements those are (and how many, a few thousand of
    11.5M) depends on the machine's summation order; the statements below do not. In float64
    the same step agrees to float64 rounding.
    """
    b1 = RECIPES["adamw_shapes"][0].adam_b1
    runs = {
        (d, m): run_recipe("adamw_shapes", m, d) for d in ("float32", "float64") for m in ("8dev", "1dev")
    }

    def flat(tree):
        return {
            jax.tree_util.keystr(k): np.asarray(v, np.float64)
            for k, v in jax.tree_util.tree_leaves_with_path(tree)
        }

    def grads(dtype, mesh):  # step 1's (clipped) gradient, from Adam's first moment (1 - b1) g
        mu = flat(optax.tree_utils.tree_get(runs[(dtype, mesh)][0][1].opt_state, "mu"))
        return {k: m / (1 - b1) for k, m in mu.items()}

    def cat(fn):
        return np.concatenate([np.asarray(fn(k)).ravel() for k in keys])

    g = {(d, m): grads(d, m) for d, m in runs}
    keys = list(g[("float64", "1dev")])
    lr = float(runs[("float32", "1dev")][1][0]["lr"])
    p8, p1 = (flat(runs[("float32", m)][0][1].params) for m in ("8dev", "1dev"))
    dp = cat(lambda k: np.abs(p8[k] - p1[k]))
    g64 = cat(lambda k: g[("float64", "1dev")][k])
    g8, g1 = cat(lambda k: g[("float32", "8dev")][k]), cat(lambda k: g[("float32", "1dev")][k])
    noise = np.abs(g8 - g64) + np.abs(g1 - g64)  # float32 rounding of the two gradients
    snr = np.abs(g64) / np.maximum(noise, 1e-300)
    moved_apart = dp > 0.01 * lr
    print(
        f"moved apart: {moved_apart.sum()} of {dp.size}, at most {dp.max() / lr:.2f} lr; signal/noise "
        f"median {np.median(snr[moved_apart]):.3g} (moved), {np.median(snr):.3g} (all), "
        f"max {snr[moved_apart].max():.3g} (moved)"
    )
    # Adam made lr-sized differences (float32 noise in the params would be ~1e-7 * 1e-2) ...
    assert moved_apart.any() and dp.max() > 0.1 * lr, dp.max() / lr
    # ... on elements whose gradient is at the level of its float32 rounding (derived bound
    # ~100: docstring; 200 for the step's weight decay and clipping), unlike the typical one.
    assert np.max(snr[moved_apart]) < 200, np.max(snr[moved_apart])
    assert np.median(snr) > 1e3, np.median(snr)
    # float64: 8 and 1 devices agree to float64 rounding, in the gradient and in the step
    # (measured 2.6e-15 in the params, i.e. 1e-9 lr, against 0.55 lr in float32).
    g64_8 = cat(lambda k: g[("float64", "8dev")][k])
    assert np.max(np.abs(g64_8 - g64)) < 1e-9 * np.max(np.abs(g64))
    q8, q1 = (flat(runs[("float64", m)][0][1].params) for m in ("8dev", "1dev"))
    assert max(float(np.max(np.abs(q8[k] - q1[k]))) for k in keys) < 1e-6 * lr
