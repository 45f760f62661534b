"""Checks at the start of ``train_and_evaluate``: config traps and anchor coverage.

A config can be valid key by key and still waste a run. ``train_and_evaluate`` calls
:func:`check_batch_size` before it builds the input pipeline, :func:`check_run` once the steps
per epoch are known, and :func:`log_anchor_coverage` after the model exists. Errors are
``ValueError`` naming the config keys; warnings (``logging``, shown by ``train.py``'s absl
handler) name the keys and the consequence.

The semantics checked are those of ``training/optim.py`` and ``training/loop.py``:
- the lr schedule spans ``optim.epochs * steps_per_epoch`` updates; ``num_steps`` (None = that
  many) only says when the loop stops. Past the schedule, cosine stays at 0 and multistep at
  its last factor. ``optim.epochs=None``: the schedule spans ``num_steps`` (nothing to check);
- warmup lasts ``min(optim.warmup_steps, steps_per_epoch - 1)`` steps (torchvision engine.py),
  ``optim.warmup_steps`` with ``optim.epochs=None``;
- the loop evaluates when ``step % eval_every == 0`` *or at the final step*, and checkpoints
  when ``step % ckpt_every == 0``, *at the final step* or on preemption.
"""

from __future__ import annotations

import logging
from typing import Any

from retinanet_jax.data.box_stats import training_boxes
from retinanet_jax.ops import anchor_fit
from retinanet_jax.ops.anchors import model_anchor_config
from retinanet_jax.training.optim import OptimConfig, make_schedule

log = logging.getLogger(__name__)

COVERAGE_WARN = 0.8  # warn when fewer boxes than this have an anchor at IoU >= fg_iou
COVERAGE_IMAGES = 500  # training examples sampled for the coverage


def check_batch_size(config: Any, dataset_size: int) -> None:
    """ValueError if ``config.batch_size`` (global) exceeds the training set."""
    if config.batch_size > dataset_size:
        raise ValueError(
            f"config.batch_size={config.batch_size} is larger than the training set "
            f"({dataset_size} examples in config.dataset.train"
            f"{' after drop_empty_train' if config.dataset.get('drop_empty_train') else ''}): "
            "no full batch can be formed; lower config.batch_size or use more data"
        )


def check_run(
    config: Any, *, dataset_size: int, steps_per_epoch: int, num_steps: int, eval_every: int, ckpt_every: int
) -> list[str]:
    """Raises ValueError for runs that cannot do what the config says; logs and returns the
    warnings for runs that can but probably should not."""
    check_batch_size(config, dataset_size)
    warnings: list[str] = []
    opt = OptimConfig.from_mapping(config.optim)
    by_run = opt.epochs is None  # the schedule follows num_steps
    schedule_steps = num_steps if by_run else int(opt.epochs) * steps_per_epoch
    decays = opt.schedule == "cosine" or (opt.schedule == "multistep" and opt.milestones)
    if config.num_steps and num_steps > schedule_steps and decays:
        final_lr = float(make_schedule(opt, steps_per_epoch, config.batch_size)(schedule_steps))
        raise ValueError(
            f"config.num_steps={num_steps} is longer than the lr schedule: config.optim.epochs="
            f"{opt.epochs} x {steps_per_epoch} steps per epoch = {schedule_steps} steps "
            f"(config.optim.schedule={opt.schedule!r}); the last {num_steps - schedule_steps} steps "
            f"would train at the schedule's final lr {final_lr:g}. Set config.optim.epochs to "
            f"cover the run (>= {-(-num_steps // steps_per_epoch)}) or drop config.num_steps "
            f"(None = optim.epochs x steps per epoch)"
        )
    if opt.schedule == "multistep" and not by_run:
        late = [m for m in opt.milestones if m >= opt.epochs]
        if late:
            warnings.append(
                f"config.optim.milestones={tuple(opt.milestones)}: {late} are not before "
                f"config.optim.epochs={opt.epochs}, so those lr drops never happen"
            )
    warmup = int(opt.warmup_steps) if by_run else min(int(opt.warmup_steps), steps_per_epoch - 1)
    if int(opt.warmup_steps) > warmup and warmup >= 0:
        warnings.append(
            f"config.optim.warmup_steps={opt.warmup_steps} is longer than an epoch: the warmup "
            f"lasts min(warmup_steps, steps_per_epoch - 1) = {max(warmup, 0)} steps "
            "(torchvision's rule)"
        )
    if warmup > 0 and warmup >= num_steps:
        warnings.append(
            f"config.optim.warmup_steps={opt.warmup_steps} (effective {warmup}) >= the run's "
            f"{num_steps} steps: the whole run is warmup and the lr never reaches its peak (the "
            f"last step trains at "
            f"{opt.warmup_factor + (1 - opt.warmup_factor) * (num_steps - 1) / warmup:.3g}"
            " x peak); lower config.optim.warmup_steps"
        )
    if config.eval.enabled and eval_every > num_steps:
        key = (
            "config.eval.every_steps"
            if config.eval.every_steps
            else "config.eval.every_steps=None (once per epoch)"
        )
        warnings.append(
            f"{key} = {eval_every} steps > the run's {num_steps} steps: no evaluation runs "
            f"during training, only the final one at step {num_steps}"
        )
    if ckpt_every > num_steps:
        key = (
            "config.checkpoint.every_steps"
            if config.checkpoint.every_steps
            else "config.checkpoint.every_steps=None (once per epoch)"
        )
        warnings.append(
            f"{key} = {ckpt_every} steps > the run's {num_steps} steps: only the final "
            f"checkpoint (step {num_steps}) is written (plus one on preemption); an interrupted "
            "run restarts from the beginning"
        )
    init = getattr(config, "init", None)
    from_scratch = init is not None and not (init.retinanet_checkpoint or init.backbone_checkpoint)
    layers = int(config.model.trainable_backbone_layers)
    if from_scratch and layers < 5:
        # torchvision's _validate_trainable_layers: without weights it trains all 5 whatever is asked.
        frozen = ["conv1", "layer1", "layer2", "layer3", "layer4"][: 5 - layers]
        warnings.append(
            f"config.model.trainable_backbone_layers={layers} while training from scratch (no "
            f"config.init checkpoint): {', '.join(frozen)} stay at their random initialisation. "
            "torchvision's builders fall back to 5 (everything trains) without pretrained "
            "weights; set config.model.trainable_backbone_layers=5 to train like it"
        )
    if from_scratch and config.model.frozen_bn:
        warnings.append(
            "config.model.frozen_bn=True while training from scratch: every BatchNorm stays the "
            "identity (mean 0, var 1, scale 1, bias 0). torchvision's builders use trainable "
            "BatchNorm2d without pretrained weights; set config.model.frozen_bn=False"
        )
    for w in warnings:
        log.warning("%s", w)
    return warnings


def log_anchor_coverage(
    config: Any,
    source: Any,
    model: Any,
    *,
    max_images: int | None = COVERAGE_IMAGES,
    enabled: bool = True,
    buckets: Any = None,
) -> anchor_fit.Coverage | None:
    """Logs the share of training boxes with an anchor at IoU >= fg_iou / bg_iou (the model's
    anchors, boxes resized as in training, up to ``max_images`` examples); warns below 0.8.
    ``buckets``: the training canvases (``TrainBatchIterator.canvases``; None: the config's)."""
    if not enabled:
        return None
    inp = config.input
    gt = training_boxes(
        source,
        tuple(inp.min_sizes),
        inp.max_size,
        buckets=buckets if buckets is not None else inp.get("buckets"),
        max_images=max_images,
        seed=config.seed,
    )
    if not len(gt.boxes):
        log.info("anchor coverage: no ground-truth boxes in %d training images", gt.num_images)
        return None
    fg, bg = float(config.loss.get("fg_iou", 0.5)), float(config.loss.get("bg_iou", 0.4))
    sizes, ratios = model_anchor_config(model)
    cov = anchor_fit.anchor_coverage(gt.boxes, sizes, ratios, gt.canvas_hw, (fg, bg))
    log.info(
        "anchor coverage: share of %d boxes (%d training images, resized as in training) "
        "whose best anchor has IoU >= %g / >= %g: %.3f / %.3f\n%s",
        cov.count["all"],
        gt.num_images,
        fg,
        bg,
        cov.at(fg),
        cov.at(bg),
        anchor_fit.format_coverage(cov),
    )
    if cov.at(fg) < COVERAGE_WARN:
        log.warning(
            "anchor coverage %.3f < %.1f: only %.1f%% of training boxes have an anchor at IoU >= "
            "%g (config.loss.fg_iou); the rest are matched only by the low-quality rule (their "
            "single best anchor) and are often missed. Fit config.model.anchor_sizes / "
            "aspect_ratios with `retinanet-jax anchors --config CONFIG --split train`",
            cov.at(fg),
            COVERAGE_WARN,
            100 * cov.at(fg),
            fg,
        )
    return cov
