"""Optimizers and learning-rate schedules as torchvision's detection references use them.

torchvision ``references/detection`` recipes this module reproduces (global batch 16 = 8 GPUs x
``--batch-size 2``, the train.py default):

* v1, README "RetinaNet": ``--epochs 26 --lr-steps 16 22 --aspect-ratio-group-factor 3 --lr 0.01``
  with train.py's defaults ``--opt sgd --momentum 0.9 --weight-decay 1e-4
  --lr-scheduler multisteplr --lr-gamma 0.1``.
* v2, pytorch/vision PR #5756 ("Add RetinaNet improved weights"): ``--opt adamw --lr 0.0001
  --epochs 26 --lr-steps 16 22 --weight-decay 0.05 --norm-weight-decay 0.0
  --data-augmentation multiscale --sync-bn``.
* Both: engine.py's ``train_one_epoch`` warms up during epoch 0 with
  ``LinearLR(start_factor=1/1000, total_iters=min(1000, len(data_loader) - 1))``, and the main
  scheduler steps once per epoch.

Update rules are built from optax primitives so that they equal torch's step for step:
torch ``SGD`` adds weight decay to the gradient *before* momentum (coupled) and applies the lr
after the momentum buffer; torch ``AdamW`` decays ``p`` by ``lr * wd`` (decoupled).
``--norm-weight-decay`` gives the parameters of normalisation layers (BN / GN scale and bias)
their own decay; every other parameter, conv biases included, keeps ``weight_decay``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from retinanet_jax.models.retinanet import norm_param_mask

PyTree = Any


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer + schedule settings; defaults are torchvision's v1 RetinaNet recipe."""

    optimizer: str = "sgd"  # "sgd" | "adamw"
    base_lr: float = 0.01  # lr at reference_batch_size images per step
    reference_batch_size: int = 16
    lr_scaling: str = "linear"  # "linear" (lr * batch / reference) | "none"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    norm_weight_decay: float | None = None  # None = same as weight_decay (torchvision)
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    schedule: str = "multistep"  # "multistep" | "cosine" | "constant"
    # None: the schedule spans the run's steps (``run_steps``), not epochs: cosine over the
    # run, warmup not capped at one epoch (a run of fixed length on a dataset of any size).
    epochs: int | None = 26
    milestones: tuple[int, ...] = (16, 22)  # epochs
    gamma: float = 0.1
    # "epoch": the main factor changes once per epoch (torchvision's scheduler.step() per epoch);
    # "step": it follows the fractional epoch step / steps_per_epoch (a smooth cosine).
    schedule_unit: str = "epoch"
    warmup_steps: int = 1000
    warmup_factor: float = 1e-3
    clip_grad_norm: float | None = None  # global-norm clipping of the raw gradient

    @classmethod
    def from_mapping(cls, cfg: Any) -> OptimConfig:
        """Builds from a dict / ml_collections.ConfigDict, ignoring unknown keys is an error."""
        items = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(items) - names)
        if unknown:
            raise ValueError(f"unknown optimizer settings {unknown}; known: {sorted(names)}")
        if "milestones" in items:
            items["milestones"] = tuple(items["milestones"])
        return cls(**items)


# torchvision's two RetinaNet recipes (see the module docstring for the sources).
TORCHVISION_V1 = OptimConfig()
TORCHVISION_V2 = OptimConfig(
    optimizer="adamw",
    base_lr=1e-4,
    lr_scaling="none",  # the recipe gives no rule for other batch sizes; keep Adam's lr as is
    weight_decay=0.05,
    norm_weight_decay=0.0,
)


def scaled_lr(cfg: OptimConfig, global_batch_size: int) -> float:
    """Peak learning rate for ``global_batch_size`` images per step (linear scaling rule)."""
    if cfg.lr_scaling == "none":
        return float(cfg.base_lr)
    if cfg.lr_scaling == "linear":
        return float(cfg.base_lr) * global_batch_size / cfg.reference_batch_size
    raise ValueError(f"lr_scaling must be 'linear' or 'none', got {cfg.lr_scaling!r}")


def make_schedule(
    cfg: OptimConfig, steps_per_epoch: int, global_batch_size: int, run_steps: int | None = None
) -> optax.Schedule:
    """lr as a function of the number of applied updates, torchvision's composition.

    ``lr(step) = peak * warmup(step) * main(epoch)`` with ``epoch = step // steps_per_epoch``:
    the warmup is LinearLR from ``warmup_factor`` to 1 over
    ``min(warmup_steps, steps_per_epoch - 1)`` steps (engine.py), and the main factor is
    MultiStepLR / CosineAnnealingLR(T_max=epochs) stepped once per epoch (train.py), or at
    every step with ``schedule_unit="step"`` (cosine over fractional epochs; milestones unchanged).

    ``cfg.epochs=None`` (our from-scratch recipes): the run is ``run_steps`` updates long
    whatever the dataset's size; cosine follows ``step / run_steps``, and the warmup lasts
    ``warmup_steps`` (no epoch to cap it). Multistep milestones (epochs) are refused there.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    peak = scaled_lr(cfg, global_batch_size)
    by_run = cfg.epochs is None
    if by_run:
        if not run_steps or run_steps < 1:
            raise ValueError(
                "optim.epochs=None (a schedule over the run's steps) needs the run's length: set "
                f"config.num_steps (got {run_steps})"
            )
        if cfg.schedule == "multistep" and cfg.milestones:
            raise ValueError(
                f"optim.milestones={tuple(cfg.milestones)} are epochs, and optim.epochs=None has "
                "none: use optim.schedule='cosine' or 'constant', or set optim.epochs"
            )
        warmup = int(cfg.warmup_steps)
    else:
        warmup = min(int(cfg.warmup_steps), steps_per_epoch - 1)
    f0 = float(cfg.warmup_factor)
    milestones = jnp.asarray([m * steps_per_epoch for m in cfg.milestones] or [0], jnp.int32)
    num_milestones = len(cfg.milestones)
    if cfg.schedule not in ("multistep", "cosine", "constant"):
        raise ValueError(f"schedule must be multistep | cosine | constant, got {cfg.schedule!r}")
    if cfg.schedule_unit not in ("epoch", "step"):
        raise ValueError(f"schedule_unit must be epoch | step, got {cfg.schedule_unit!r}")

    def schedule(count: jax.Array) -> jax.Array:
        count = jnp.asarray(count, jnp.int32)
        if warmup > 0:
            frac = jnp.minimum(count, warmup).astype(jnp.float32) / warmup
            w = f0 + (1.0 - f0) * frac
        else:
            w = jnp.float32(1.0)
        if cfg.schedule == "multistep" and num_milestones:
            passed = jnp.sum(count >= milestones)
            main = jnp.float32(cfg.gamma) ** passed.astype(jnp.float32)
        elif cfg.schedule == "cosine" and by_run:
            frac = jnp.minimum(count, run_steps).astype(jnp.float32) / run_steps
            main = 0.5 * (1.0 + jnp.cos(jnp.float32(math.pi) * frac))
        elif cfg.schedule == "cosine":
            if cfg.schedule_unit == "step":
                epoch = jnp.minimum(count.astype(jnp.float32) / steps_per_epoch, cfg.epochs)
            else:
                epoch = jnp.minimum(count // steps_per_epoch, cfg.epochs).astype(jnp.float32)
            main = 0.5 * (1.0 + jnp.cos(jnp.float32(math.pi) * epoch / cfg.epochs))
        else:
            main = jnp.float32(1.0)
        return (jnp.float32(peak) * w * main).astype(jnp.float32)

    return schedule


def _not(mask_fn: Callable[[PyTree], PyTree]) -> Callable[[PyTree], PyTree]:
    return lambda p: jax.tree.map(lambda m: not m, mask_fn(p))


def _weight_decay(cfg: OptimConfig) -> optax.GradientTransformation:
    """``g + wd * p`` with the norm-layer override; skipped where the decay is 0."""
    wd = float(cfg.weight_decay)
    nwd = wd if cfg.norm_weight_decay is None else float(cfg.norm_weight_decay)
    parts = []
    if wd == nwd:
        if wd:
            parts.append(optax.add_decayed_weights(wd))
    else:
        if wd:
            parts.append(optax.add_decayed_weights(wd, mask=_not(norm_param_mask)))
        if nwd:
            parts.append(optax.add_decayed_weights(nwd, mask=norm_param_mask))
    return optax.chain(*parts) if parts else optax.identity()


def scale_by_adam_torch(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformation:
    """Adam's direction ``m_hat / (sqrt(v_hat) + eps)`` computed as torch.optim.Adam(W) does.

    ``optax.scale_by_adam`` forms the bias correction ``1 - b2**t`` in float32, which for
    b2 = 0.999 and small t loses ~1e-5 to cancellation (torch uses Python doubles). Here
    ``1 - b**t = -expm1(t * log(b))`` with ``log(b)`` taken in double: float32-exact.
    The state is optax's ``ScaleByAdamState`` (count, mu, nu), float32 (float64 for float64
    params: the float64 equality tests).
    """
    log_b1, log_b2 = math.log(b1), math.log(b2)

    def init_fn(params: PyTree) -> optax.ScaleByAdamState:
        zeros = jax.tree.map(lambda p: jnp.zeros_like(p, jnp.promote_types(p.dtype, jnp.float32)), params)
        return optax.ScaleByAdamState(count=jnp.zeros((), jnp.int32), mu=zeros, nu=zeros)

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1.0 - b2) * jnp.square(g), state.nu, updates)
        count = optax.safe_increment(state.count)
        corrections: dict = {}  # per moment dtype: (1 - b1**t, sqrt(1 - b2**t))

        def direction(m: jax.Array, v: jax.Array) -> jax.Array:
            if m.dtype not in corrections:
                t = count.astype(m.dtype)
                corrections[m.dtype] = (
                    -jnp.expm1(t * jnp.asarray(log_b1, m.dtype)),
                    jnp.sqrt(-jnp.expm1(t * jnp.asarray(log_b2, m.dtype))),
                )
            bc1, bc2_sqrt = corrections[m.dtype]
            return (m / bc1) / (jnp.sqrt(v) / bc2_sqrt + eps)

        return jax.tree.map(direction, mu, nu), optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(
    cfg: OptimConfig, steps_per_epoch: int, global_batch_size: int, run_steps: int | None = None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(tx, schedule) equal to torch's SGD / AdamW under torchvision's recipe.

    The schedule is evaluated on optax's own update count (applied updates), so skipped
    non-finite steps do not advance it. Give ``tx`` only the trainable parameters: frozen
    ones then have no optimizer state at all. ``run_steps``: the run's length, read only
    when ``cfg.epochs`` is None (``make_schedule``).
    """
    schedule = make_schedule(cfg, steps_per_epoch, global_batch_size, run_steps)
    clip = [optax.clip_by_global_norm(float(cfg.clip_grad_norm))] if cfg.clip_grad_norm is not None else []
    if cfg.optimizer == "sgd":
        # torch.optim.SGD: d = g + wd * p; buf = momentum * buf + d (buf_0 = d_0); p -= lr * buf.
        # optax.trace starts from zeros, so its first value is d_0 too.
        core = [
            _weight_decay(cfg),
            optax.trace(decay=float(cfg.momentum), nesterov=bool(cfg.nesterov)),
            optax.scale_by_learning_rate(schedule),
        ]
    elif cfg.optimizer == "adamw":
        # torch.optim.AdamW: p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p); both use p_t.
        core = [
            scale_by_adam_torch(b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps),
            _weight_decay(cfg),
            optax.scale_by_learning_rate(schedule),
        ]
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {cfg.optimizer!r}")
    return optax.chain(*clip, *core), schedule
