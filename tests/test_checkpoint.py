"""Checkpoints: any-device-count restore, crash leftovers ignored, retention, clear mismatch errors."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.serialization import to_state_dict

from retinanet_jax.parallel import mesh as parallel
from retinanet_jax.training.checkpoint import Checkpointer, CheckpointMismatchError
from retinanet_jax.training.step import TrainState


def _variables(num_classes=3, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return {
        "params": {
            "head": {
                "cls_logits": {
                    "kernel": jax.random.normal(k[0], (3, 3, 8, 9 * num_classes)),
                    "bias": jnp.zeros((9 * num_classes,)),
                },
                "conv": {"kernel": jax.random.normal(k[1], (3, 3, 8, 8))},
            }
        },
        "batch_stats": {"bn": {"mean": jax.random.normal(k[2], (8,))}},
    }


def _state(mesh, num_classes=3, seed=0, variables=None):
    """A TrainState (small stand-in params, one of them frozen) placed on ``mesh``."""
    v = variables or _variables(num_classes, seed)
    trainable = {
        "head": {
            "cls_logits": v["params"]["head"]["cls_logits"],
            **{k: m for k, m in v["params"]["head"].items() if k not in ("cls_logits", "conv")},
        }
    }
    tx = optax.adamw(1e-3)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        skipped=jnp.zeros((), jnp.int32),
        params=trainable,
        frozen_params={"head": {"conv": v["params"]["head"]["conv"]}},
        batch_stats=v["batch_stats"],
        opt_state=tx.init(trainable),
        tx=tx,
    )
    return jax.tree.map(
        lambda x, sh: jax.device_put(jnp.array(x, copy=True), sh), state, parallel.tree_shardings(state, mesh)
    )


def _advance(state):
    # Non-trivial optimizer moments and step, so the test covers every part of the state.
    grads = jax.tree.map(jnp.ones_like, state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    return state.replace(
        step=state.step + 7, params=optax.apply_updates(state.params, updates), opt_state=opt_state
    )


def _assert_trees_equal(a, b):
    a, b = to_state_dict(a), to_state_dict(b)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_sharded_on_8_devices_restores_on_1_device(tmp_path):
    mesh8 = parallel.make_mesh(data=4, model=2)  # conv kernels split over "model"
    state = _advance(_state(mesh8))
    kernel = state.frozen_params["head"]["conv"]["kernel"]
    assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.save(
            7,
            state,
            config={"lr": 0.1},
            class_names=["a", "b", "c"],
            data_state={"epoch": 1, "position": 3},
            extra={"note": "x", "ids": [1, 2]},
        )

    mesh1 = parallel.make_mesh(devices=jax.devices()[:1])
    template = _state(mesh1, seed=1)  # different values, same structure
    restored = Checkpointer(tmp_path / "ckpt").restore(template)
    assert restored.step == 7
    assert restored.config == {"lr": 0.1} and restored.class_names == ["a", "b", "c"]
    assert restored.data_state == {"epoch": 1, "position": 3}
    assert restored.extra == {"note": "x", "ids": [1, 2]}
    _assert_trees_equal(restored.state, state)
    assert int(restored.state.step) == int(state.step)
    for leaf in jax.tree.leaves(restored.state):
        assert leaf.sharding.device_set == {jax.devices()[0]}
    assert restored.state.tx is template.tx  # static fields come from the template


def test_interrupted_save_is_ignored(tmp_path):
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    state = _state(mesh)
    later = _advance(state)
    d = tmp_path / "ckpt"
    with Checkpointer(d) as ckpt:
        ckpt.save(1, state)
        ckpt.save(2, later)
    # A crash during the save of step 3: orbax's temporary directory, never renamed.
    shutil.copytree(d / "2", d / "3.orbax-checkpoint-tmp-1712345678")
    (d / "3.orbax-checkpoint-tmp-1712345678" / "state" / "junk").write_text("partial")
    ckpt = Checkpointer(d)
    assert ckpt.latest_step() == 2
    restored = ckpt.restore(_state(mesh, seed=3))
    assert restored.step == 2
    _assert_trees_equal(restored.state.params, later.params)
    ckpt.close()


def test_keeps_last_k_plus_best(tmp_path):
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    state = _state(mesh)
    aps = {1: 0.1, 2: 0.5, 3: None, 4: 0.2, 5: 0.3}
    with Checkpointer(tmp_path, max_to_keep=2, async_save=False) as ckpt:
        for step, ap in aps.items():
            ckpt.save(step, state, metrics=None if ap is None else {"eval/AP": ap, "eval/AP50": 0.9})
        assert ckpt.all_steps() == [2, 4, 5]
        assert ckpt.best_step() == 2
        assert not ckpt.save(5, state)  # an existing step is never overwritten


def test_other_model_raises_naming_key_and_shapes(tmp_path):
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(4, _state(mesh, num_classes=3))
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(CheckpointMismatchError, match=r"params/head/cls_logits/bias.*\(27,\).*\(45,\)"):
        ckpt.restore(_state(mesh, num_classes=5))

    other = _variables()
    other["params"]["head"]["extra"] = {"kernel": jnp.zeros((2,))}
    template = _state(mesh, variables=other)
    with pytest.raises(CheckpointMismatchError, match="params/head/extra/kernel"):
        ckpt.restore(template)
    # The failed restores damaged nothing.
    assert ckpt.restore(_state(mesh, seed=2)).step == 4
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 9"):
        ckpt.restore(_state(mesh), step=9)
    ckpt.close()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        Checkpointer(tmp_path / "empty").restore(_state(mesh))


def test_non_json_metadata_is_refused_before_writing(tmp_path):
    state = _state(parallel.make_mesh(devices=jax.devices()[:1]))
    with Checkpointer(tmp_path / "ckpt", async_save=False) as ckpt:
        with pytest.raises(TypeError, match="JSON"):
            ckpt.save(1, state, extra={"note": b"\x00"})
        assert ckpt.all_steps() == []
