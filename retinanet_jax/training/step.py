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

Two ways to step: ``step_fn(state, batch)`` checks every step (one host read of a flag per
step, the error raised at once); ``step_fn.run(state, carry, batch)`` (what the training loop
uses) reads nothing: metrics accumulate in a small on-device ``carry``, the first non-finite
step is recorded there and freezes the state, and ``step_fn.read(carry, state)`` -- at log
and checkpoint steps -- raises ``NonFiniteError`` naming that step, with the state before it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct, traverse_util
from jax.sharding import Mesh

from retinanet_jax import backends
from retinanet_jax.imageprep.normalize import normalize_images
from retinanet_jax.models.retinanet import frozen_param_mask
from retinanet_jax.objective.retinanet_loss import retinanet_losses
from retinanet_jax.ops.anchors import anchors_for_model
from retinanet_jax.parallel import mesh as parallel

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
    schedule: Callable[[jax.Array], jax.Array] | None = struct.field(pytree_node=False, default=None)

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
    mesh: Mesh | None = None,
    schedule: Callable[[jax.Array], jax.Array] | None = None,
    param_dtype: Any = None,
) -> TrainState:
    """Splits ``variables["params"]`` by ``frozen_param_mask`` and initialises ``tx`` on the
    trainable part. With ``mesh`` the state is placed on it (``parallel.tree_shardings``) as
    fresh buffers, so donating the state never invalidates the caller's ``variables``.
    ``schedule`` (the one ``tx`` uses) only feeds the ``lr`` metric. ``param_dtype`` (None:
    as given): the float leaves of params and batch_stats cast to it, e.g. float64 (with
    ``jax_enable_x64``) for a float64 train step, whose optimizer state then is float64 too.
    """
    params = variables["params"]
    batch_stats = _to_dict(variables.get("batch_stats", {}))
    if param_dtype is not None:

        def cast(x):
            return (
                x.astype(param_dtype)  # noqa: E731
                if jnp.issubdtype(x.dtype, jnp.floating)
                else x
            )

        params, batch_stats = jax.tree.map(cast, (_to_dict(params), batch_stats))
    mask = frozen_param_mask(params, trainable_backbone_layers, frozen_bn=getattr(model, "frozen_bn", True))
    trainable, frozen = split_params(params, mask)
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
    loss_cfg: Mapping[str, Any] | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update (traceable; ``make_train_step`` jits it).

    ``batch``: images uint8 [B,H,W,3], image_sizes int32 [B,2], boxes f32 [B,G,4],
    labels int32 [B,G] (-1 = padding). Returns the new state and scalar metrics: loss,
    classification, bbox_regression, grad_norm (before clipping), lr, is_finite.
    """
    # float32, or float64 in a float64 run (bf16 models still get float32 pixels, as before).
    pixel_dtype = jnp.promote_types(getattr(model, "dtype", jnp.float32), jnp.float32)
    images = normalize_images(batch["images"], batch["image_sizes"], dtype=pixel_dtype)
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
            out["cls_logits"],
            out["bbox_regression"],
            anchors,
            batch["boxes"],
            batch["labels"],
            **dict(loss_cfg or {}),
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

    ``compute_dtype=jnp.bfloat16`` for bf16 compute (params and optimizer state stay float32;
    losses and box math stay float32).

    ``batch`` may be host-local numpy (placed with ``parallel.shard_batch``) or global
    arrays already sharded over ``data``. One compilation per canvas shape (per state
    structure); ``trace_count`` counts them for tests and logs.
    """

    def __init__(
        self,
        model: nn.Module,
        mesh: Mesh,
        loss_cfg: Mapping[str, Any] | None = None,
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

    def _traced(self, state: TrainState, batch: Mapping[str, jax.Array], target: str | None = None):
        self.trace_count += 1  # Python side effect: runs once per trace, i.e. per compile
        with backends.target(target):
            return train_step(state, batch, model=self.model, loss_cfg=self.loss_cfg)

    def jitted(self, state: TrainState) -> Any:
        """The ``jax.jit`` function for this state structure and target platform (built on first
        use). The target is ``backends.current()`` when this is called: the default backend, or
        an enclosing ``with backends.target("cuda"):`` (to lower the accelerator program here)."""
        target = backends.current()
        key = (jax.tree.structure(state), target)
        if key not in self._jitted:
            state_sh = parallel.tree_shardings(state, self.mesh)
            self._jitted[key] = jax.jit(
                functools.partial(self._traced, target=target),
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
                n,
                new_state,
            )
        return new_state, metrics

    # -------------------------------------------------------------- asynchronous stepping

    def jitted_run(self, state: TrainState) -> Any:
        """The ``jax.jit`` function behind ``run`` for this state structure and target."""
        target = backends.current()
        halt = not self.skip_nonfinite
        key = ("run", jax.tree.structure(state), target, halt)
        if key not in self._jitted:
            state_sh = parallel.tree_shardings(state, self.mesh)
            self._jitted[key] = jax.jit(
                functools.partial(self._traced_run, target=target, halt=halt),
                in_shardings=(state_sh, parallel.replicated(self.mesh), parallel.batch_sharding(self.mesh)),
                out_shardings=(state_sh, parallel.replicated(self.mesh)),
                donate_argnums=(0,) if self.donate else (),
            )
        return self._jitted[key]

    def _traced_run(
        self,
        state: TrainState,
        carry: dict,
        batch: Mapping[str, jax.Array],
        target: str | None = None,
        halt: bool = True,
    ):
        new_state, metrics = self._traced(state, batch, target)
        return accumulate(carry, state, new_state, metrics, halt=halt)

    def new_carry(self) -> dict[str, jax.Array]:
        """A fresh ``run`` accumulator on the mesh (replicated). ``run`` never donates it, so
        one fresh carry can restart the sums after every ``read``."""
        return jax.device_put(new_carry(), parallel.replicated(self.mesh))

    def run(
        self, state: TrainState, carry: dict, batch: Mapping[str, Any]
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One step with no host read: ``state, carry = step_fn.run(state, carry, batch)``.

        Returns once the step is dispatched. The step's metrics are added to ``carry`` on the
        device; a non-finite step is recorded there and, unless ``skip_nonfinite``, freezes the
        state (``accumulate``) until ``read`` raises it.
        """
        batch = self.place_batch(batch)
        return self.jitted_run(state)(state, carry, batch)

    def read(self, carry: dict, state: TrainState) -> dict[str, float]:
        """One host read of ``carry`` (it waits for the steps before it).

        Returns the mean of each of ``SUMMED_METRICS`` over the steps ``carry`` has seen, the
        latest ``lr`` and ``steps`` (their number). Raises ``NonFiniteError`` naming the first
        non-finite step, unless ``skip_nonfinite``; its ``state`` is ``state`` (from ``run``),
        which is then the state before that step.
        """
        host = jax.device_get(carry)
        bad = int(host["first_nonfinite"])
        if bad >= 0 and not self.skip_nonfinite:
            raise NonFiniteError(
                f"non-finite loss at step {bad} (loss={float(host['nonfinite_loss'])}, "
                f"grad_norm={float(host['nonfinite_grad_norm'])}); neither its update nor a "
                f"later one was applied",
                bad,
                state,
            )
        count = int(host["count"])
        out = {k: float(v) / max(count, 1) for k, v in host["sums"].items()}
        return {**out, "lr": float(host["lr"]), "steps": count}


SUMMED_METRICS = ("loss", "classification", "bbox_regression", "grad_norm")


def new_carry() -> dict[str, np.ndarray]:
    """The accumulator ``TrainStep.run`` threads through the steps between two host reads
    (host numpy; ``TrainStep.new_carry`` places it): metric sums and step count, the latest
    ``lr``, and the first non-finite step (-1: none) with its loss and gradient norm. Floats
    are float64 under ``jax_enable_x64``, else float32."""
    zero = np.zeros((), jax.dtypes.canonicalize_dtype(np.float64))
    return {
        "count": np.zeros((), np.int32),
        "sums": {k: zero.copy() for k in SUMMED_METRICS},
        "lr": zero.copy(),
        "first_nonfinite": np.full((), -1, np.int32),
        "nonfinite_loss": zero.copy(),
        "nonfinite_grad_norm": zero.copy(),
    }


def accumulate(
    carry: dict, old_state: TrainState, new_state: TrainState, metrics: Mapping[str, jax.Array], *, halt: bool
) -> tuple[TrainState, dict[str, jax.Array]]:
    """(state, carry) after one ``train_step`` from ``old_state`` to ``new_state`` (traceable).

    With ``halt``, the first non-finite step and every step after it keep ``old_state``
    whole (step counters included): the state stays the one before the first bad step, which
    the host learns of only when it reads the carry, and a checkpoint of it is a good one.
    """
    first = carry["first_nonfinite"]
    bad_now = (first < 0) & ~metrics["is_finite"]
    if halt:
        keep = (first < 0) & metrics["is_finite"]
        new_state = jax.tree.map(lambda n, o: jnp.where(keep, n, o), new_state, old_state)

    def cast(x: jax.Array) -> jax.Array:
        return jnp.asarray(x, carry["lr"].dtype)

    carry = {
        "count": carry["count"] + 1,
        "sums": {k: carry["sums"][k] + cast(metrics[k]) for k in SUMMED_METRICS},
        "lr": cast(metrics["lr"]),
        "first_nonfinite": jnp.where(bad_now, old_state.step + 1, first).astype(jnp.int32),
        "nonfinite_loss": jnp.where(bad_now, cast(metrics["loss"]), carry["nonfinite_loss"]),
        "nonfinite_grad_norm": jnp.where(bad_now, cast(metrics["grad_norm"]), carry["nonfinite_grad_norm"]),
    }
    return new_state, carry


# The factory name the rest of the package and the docs use; the class is the implementation.
make_train_step = TrainStep
