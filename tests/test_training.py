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

from retinanet_jax.training import optim
from retinanet_jax.parallel import mesh as parallel
from retinanet_jax.training import step as training
from retinanet_jax.models.retinanet import RetinaNet

BATCH, CANVAS, STEPS = 8, (64, 64), 3
# SGD as torchvision v1 but without warmup, so three steps move the params visibly.
OPT = optim.OptimConfig(base_lr=0.02, warmup_steps=0)


def tiny_model(frozen_bn: bool) -> RetinaNet:
    return RetinaNet(num_classes=3, backbone="resnet18", fpn_channels=32, frozen_bn=frozen_bn)


@functools.lru_cache(maxsize=None)
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
    return {"images": rng.integers(0, 256, (BATCH, h, w, 3), dtype=np.uint8),
            "image_sizes": sizes.astype(np.int32), "boxes": boxes, "labels": labels}


@functools.lru_cache(maxsize=None)
def make_tx():
    # One tx for every state: tx is static in TrainState, so a new tx means a new trace.
    return optim.make_optimizer(OPT, steps_per_epoch=100, global_batch_size=BATCH)


def new_state(frozen_bn: bool, mesh, trainable_backbone_layers: int = 3):
    model = tiny_model(frozen_bn)
    tx, schedule = make_tx()
    return training.create_train_state(model, tiny_variables(frozen_bn), tx,
                                       trainable_backbone_layers, mesh=mesh, schedule=schedule)


MESHES = {"1dev": lambda: parallel.make_mesh(devices=jax.devices()[:1]),
          "8dev": lambda: parallel.make_mesh(),
          "4x2": lambda: parallel.make_mesh(model=2)}


@functools.lru_cache(maxsize=None)
def step_fn(frozen_bn: bool, mesh_key: str) -> training.TrainStep:
    return training.make_train_step(tiny_model(frozen_bn), MESHES[mesh_key]())


def to_host(tree):
    return jax.tree.map(np.asarray, tree)


@functools.lru_cache(maxsize=None)
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
        np.testing.assert_allclose(x, y, rtol=scale_tol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("frozen_bn", [True, False], ids=["frozen_bn", "trainable_bn"])
def test_8_devices_equal_1_device(frozen_bn):
    s8, m8 = run(frozen_bn, "8dev")
    s1, m1 = run(frozen_bn, "1dev")
    start = to_host(new_state(frozen_bn, None))
    # The update is real: params moved well beyond the tolerance below.
    moved = max(np.max(np.abs(a - b)) for a, b in
                zip(jax.tree.leaves(s1.params), jax.tree.leaves(start.params)))
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
        assert not np.allclose(s1.batch_stats["backbone"]["body"]["bn1"]["mean"],
                               start.batch_stats["backbone"]["body"]["bn1"]["mean"])
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
    return ["/".join(str(getattr(k, "key", k)) for k in p)
            for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


@pytest.mark.parametrize("layers, trainable_tops", [
    (0, set()), (3, {"layer2", "layer3", "layer4"}),
    (5, {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"})])
def test_trainable_backbone_layers_semantics(layers, trainable_tops):
    state = new_state(False, None, trainable_backbone_layers=layers)
    tops = {k.split("/")[2].split("_")[0] for k in _flat_keys(state.params)
            if k.startswith("backbone/body/")}
    assert tops == trainable_tops
    assert any(k.startswith("backbone/fpn/") for k in _flat_keys(state.params))
    assert any(k.startswith("head/") for k in _flat_keys(state.params))
    # Frozen BN (torchvision FrozenBatchNorm2d): body BN affine params never train.
    frozen_bn_state = new_state(True, None, trainable_backbone_layers=5)
    assert not [k for k in _flat_keys(frozen_bn_state.params)
                if k.startswith("backbone/body/") and k.split("/")[-1] == "scale"]


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
    model = tiny_model(True)
    mesh = parallel.make_mesh()
    fn16 = training.make_train_step(model, mesh, compute_dtype=jnp.bfloat16)
    state, m16 = fn16(new_state(True, mesh), make_batch(0))
    _, m32 = run(True, "8dev")
    assert fn16.model.dtype == jnp.bfloat16
    for leaf in jax.tree.leaves((state.params, state.opt_state, state.frozen_params)):
        assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
    assert m16["is_finite"]
    # bf16 activations change the loss a little (so bf16 really ran), not a lot.
    rel = abs(float(m16["loss"]) - float(m32[0]["loss"])) / float(m32[0]["loss"])
    assert 0 < rel < 2e-2, rel


def test_normalize_images_matches_torchvision_arithmetic_and_zeroes_padding():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    sizes = np.array([[8, 8], [5, 3]], np.int32)
    got = np.asarray(jax.jit(training.normalize_images)(images, sizes))
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
    pointers = [s.data.unsafe_buffer_pointer() for leaf in jax.tree.leaves(state)
                for s in leaf.addressable_shards]
    assert len(pointers) == len(set(pointers))
    given = {s.data.unsafe_buffer_pointer() for leaf in jax.tree.leaves(variables)
             for s in leaf.addressable_shards}
    assert not given & set(pointers)
