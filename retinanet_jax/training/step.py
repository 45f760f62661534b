"""Training core: ``TrainState``, the jitted ``train_step`` and its sharded factory.

One step = normalize the uint8 batch on device -> forward (``train=True``) -> anchor matching
and losses (``objective.retinanet_losses``) -> gradients w.r.t. the *trainable* parameters
only -> optax update. Frozen parameters (``models.retinanet.frozen_param_mask``) live in a
separate partition that is never differentiated (XLA drops that backward work), never given
to the optimizer (no optimizer state) and returned bitwise unchanged.

The step is jitted once per canvas shape over a ``("data", "model")`` mesh with the state
donated; a trainable BatchNorm normalizes over the *global* batch because jit over a sharded
batch computes the same reductions as one device would.

Failure behaviour: a non-finite loss or gradient never reaches the state (the update is
selected away inside the step) and ``TrainStep`` raises ``NonFiniteError`` naming the step,
or, with ``skip_nonfinite=True``, counts it in ``state.skipped`` and goes on.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct, traverse_util
from jax.sharding import Mesh

from retinanet_jax.parallel import mesh as parallel
from retinanet_jax.ops.anchors import anchors_for_model
from retinanet_jax.models.retinanet import frozen_param_mask
from retinanet_jax.objective.retinanet_loss import retinanet_losses
from retinanet_jax.imageprep.normalize import normalize_images

PyTree = Any


class TrainState(struct.PyTreeNode):
    """Everything a training step reads and writes.

    ``step``: batches consumed (int32 scalar); ``skipped``: of those, updates skipped because
    the loss or gradient was non-finite. ``params``: trainable partition (what ``tx`` sees);
    ``frozen_params``: the rest, never updated. ``tx`` / ``schedule`` are static (not arrays).
    """

    step: jax.Array
    skipped: jax.Array
    params: PyTree
    frozen_params: PyTree
    batch_stats: PyTree
    opt_state: optax.OptState
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    schedule: Optional[Callable[[jax.Array], jax.Array]] = struct.field(
        pytree_node=False, default=None
    )

    @property
    def variables(self) -> dict[str, PyTree]:
        """Full ``{"params", "batch_stats"}`` for ``model.apply`` / checkpoints / export."""
        return {
            "params": merge_params(self.params, self.frozen_params),
            "batch_stats": self.batch_stats,
        }


# ----------------------------------------------------------------------------- partitions


def split_params(params: PyTree, frozen_mask: PyTree) -> tuple[dict, dict]:
    """(trainable, frozen) nested dicts holding the leaves where the mask is False / True."""
    flat = traverse_util.flatten_dict(_to_dict(params))
    flat_mask = traverse_util.flatten_dict(_to_dict(frozen_mask))
    if flat.keys() != flat_mask.keys():
        raise ValueError("frozen mask and params have different structures")
    trainable = {k: v for k, v in flat.items() if not flat_mask[k]}
    frozen = {k: v for k, v in flat.items() if flat_mask[k]}
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge_params(trainable: PyTree, frozen: PyTree) -> dict:
    """Inverse of ``split_params``."""
    flat = traverse_util.flatten_dict(_to_dict(trainable))
    flat.update(traverse_util.flatten_dict(_to_dict(frozen)))
    return traverse_util.unflatten_dict(flat)


def _to_dict(tree: PyTree) -> dict:
    if hasattr(tree, "items") and not hasattr(tree, "shape"):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree


def create_train_state(
    model: nn.Module,
    variables: Mapping[str, PyTree],
    tx: optax.GradientTransformation,
    trainable_backbone_layers: int,
    *,
    mesh: Optional[Mesh] = None,
    schedule: Optional[Callable[[jax.Array], jax.Array]] = None,
) -> TrainState:
    """Splits ``variables["params"]`` by ``frozen_param_mask`` and initialises ``tx`` on the
    trainable part. With ``mesh`` the state is placed on it (``parallel.tree_shardings``) as
    fresh buffers, so donating the state never invalidates the caller's ``variables``.
    ``schedule`` (the one ``tx`` uses) only feeds the ``lr`` metric.
    """
    params = variables["params"]
    mask = frozen_param_mask(
        params, trainable_backbone_layers, frozen_bn=getattr(model, "frozen_bn", True)
    )
    trainable, frozen = split_params(params, mask)
    batch_stats = _to_dict(variables.get("batch_stats", {}))
    host = TrainState(
        step=np.zeros((), np.int32),
        skipped=np.zeros((), np.int32),
        params=trainable,
        frozen_params=frozen,
        batch_stats=batch_stats,
        opt_state=tx.init(trainable),
        tx=tx,
        schedule=schedule,
    )
    if mesh is None:
        placed = host
    else:
        placed = jax.tree.map(lambda x, s: jax.device_put(x, s), host, parallel.tree_shardings(host, mesh))
    # One copy per leaf: equal leaves may share a buffer (optax's zero Adam moments mu / nu do,
    # and device_put keeps that even with may_alias=False), and so may the caller's variables;
    # the train step donates the state, which needs every leaf in its own buffer.
    return jax.tree.map(jnp.copy, placed)


# ------------------------------------------------------------------------------- the step


def train_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    *,
    model: nn.Module,
    loss_cfg: Optional[Mapping[str, Any]] = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update (traceable; ``make_train_step`` jits it).

    ``batch``: images uint8 [B,H,W,3], image_sizes int32 [B,2], boxes f32 [B,G,4],
    labels int32 [B,G] (-1 = padding). Returns the new state and scalar metrics: loss,
    classification, bbox_regression, grad_norm (before clipping), lr, is_finite.
    """
    images = normalize_images(batch["images"], batch["image_sizes"])
    anchors = jnp.asarray(anchors_for_model(model, tuple(images.shape[1:3])))  # static per canvas
    # Trainable BN (frozen_bn=False) normalizes with batch statistics and updates its running
    # ones, in frozen stages too -- torchvision's requires_grad_(False) leaves BN in train mode.
    update_stats = not getattr(model, "frozen_bn", True) and bool(state.batch_stats)

    def loss_fn(params: PyTree) -> tuple[jax.Array, tuple[dict, PyTree]]:
        variables = {"params": merge_params(params, state.frozen_params)}
        if state.batch_stats:
            variables["batch_stats"] = state.batch_stats
        if update_stats:
            out, mutated = model.apply(variables, images, train=True, mutable=["batch_stats"])
            new_stats = mutated["batch_stats"]
        else:
            out, new_stats = model.apply(variables, images, train=True), state.batch_stats
        losses = retinanet_losses(
            out["cls_logits"], out["bbox_regression"], anchors,
            batch["boxes"], batch["labels"], **dict(loss_cfg or {}),
        )
        total = losses["classification"] + losses["bbox_regression"]
        return total, (losses, new_stats)

    (loss, (losses, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    is_finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = state.tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)

    def keep_if_finite(new: PyTree, old: PyTree) -> PyTree:
        # A select, not lax.cond: both branches are already computed and a select shards
        # trivially. Non-finite -> params, moments, stats and optax's count stay as they were.
        return jax.tree.map(lambda n, o: jnp.where(is_finite, n, o), new, old)

    applied = state.step - state.skipped  # optax's count: updates applied so far
    lr = state.schedule(applied) if state.schedule is not None else jnp.float32(jnp.nan)
    new_state = state.replace(
        step=state.step + 1,
        skipped=state.skipped + (~is_finite).astype(jnp.int32),
        params=keep_if_finite(new_params, state.params),
        opt_state=keep_if_finite(new_opt_state, state.opt_state),
        batch_stats=keep_if_finite(new_stats, state.batch_stats),
    )
    metrics = {
        "loss": loss,
        "classification": losses["classification"],
        "bbox_regression": losses["bbox_regression"],
        "grad_norm": grad_norm,
        "lr": jnp.asarray(lr, jnp.float32),
        "is_finite": is_finite,
    }
    return new_state, metrics


# ---------------------------------------------------------------------------- the factory


class NonFiniteError(FloatingPointError):
    """Non-finite loss or gradient at ``step``; ``state`` is the last good state (the bad
    update was not applied), so a caller can still checkpoint it."""

    def __init__(self, message: str, step: int, state: TrainState):
        super().__init__(message)
        self.step = step
        self.state = state


class TrainStep:
    """Jitted, sharded ``train_step``: ``state, metrics = step_fn(state, batch)``.

    ``batch`` may be host-local numpy (placed with ``parallel.shard_batch``) or global
    arrays already sharded over ``data``. One compilation per canvas shape (per state
    structure); ``trace_count`` counts them for tests and logs.
    """

    def __init__(
        self,
        model: nn.Module,
        mesh: Mesh,
        loss_cfg: Optional[Mapping[str, Any]] = None,
        *,
        compute_dtype: Any = None,
        skip_nonfinite: bool = False,
        donate: bool = True,
    ):
        self.model = model if compute_dtype is None else model.clone(dtype=compute_dtype)
        self.mesh = mesh
        self.loss_cfg = dict(loss_cfg or {})
        self.skip_nonfinite = skip_nonfinite
        self.donate = donate
        self.trace_count = 0
        self._jitted: dict[Any, Any] = {}

    def _traced(self, state: TrainState, batch: Mapping[str, jax.Array]):
        self.trace_count += 1  # Python side effect: runs once per trace, i.e. per compile
        return train_step(state, batch, model=self.model, loss_cfg=self.loss_cfg)

    def jitted(self, state: TrainState) -> Any:
        """The ``jax.jit`` function for this state structure (built on first use)."""
        key = jax.tree.structure(state)
        if key not in self._jitted:
            state_sh = parallel.tree_shardings(state, self.mesh)
            self._jitted[key] = jax.jit(
                self._traced,
                in_shardings=(state_sh, parallel.batch_sharding(self.mesh)),
                out_shardings=(state_sh, parallel.replicated(self.mesh)),
                donate_argnums=(0,) if self.donate else (),
            )
        return self._jitted[key]

    def cache_size(self) -> int:
        """Compiled executables held by jit (one per canvas shape)."""
        return sum(f._cache_size() for f in self._jitted.values())

    def place_batch(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """Host numpy rows -> global sharded arrays; device arrays pass through."""
        if all(isinstance(v, jax.Array) for v in batch.values()):
            return dict(batch)
        return parallel.shard_batch({k: np.asarray(v) for k, v in batch.items()}, self.mesh)

    def __call__(
        self, state: TrainState, batch: Mapping[str, Any]
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        batch = self.place_batch(batch)
        new_state, metrics = self.jitted(state)(state, batch)
        if not self.skip_nonfinite and not bool(metrics["is_finite"]):
            # Reading the flag waits for this step; with skip_nonfinite the loop stays async.
            n = int(new_state.step)
            raise NonFiniteError(
                f"non-finite loss at step {n} (loss={float(metrics['loss'])}, "
                f"grad_norm={float(metrics['grad_norm'])}); the update was not applied",
                n, new_state,
            )
        return new_state, metrics


def make_train_step(
    model: nn.Module,
    mesh: Mesh,
    loss_cfg: Optional[Mapping[str, Any]] = None,
    *,
    compute_dtype: Any = None,
    skip_nonfinite: bool = False,
    donate: bool = True,
) -> TrainStep:
    """Factory for the jitted sharded step; ``compute_dtype=jnp.bfloat16`` for bf16 compute
    (params and optimizer state stay float32; losses and box math stay float32)."""
    return TrainStep(
        model, mesh, loss_cfg,
        compute_dtype=compute_dtype, skip_nonfinite=skip_nonfinite, donate=donate,
    )

# The training program around this core (data, evaluation, checkpoints, logging) is
# retinanet_jax.training.loop.train_and_evaluate.
