"""``train_and_evaluate(config, workdir)``: the training program ``train.py`` runs.

Builds the data sources and the train pipeline, the model (from scratch, a torchvision
RetinaNet or an ImageNet ResNet), the sharded train state and step; then trains with periodic
COCO evaluation and checkpoints. Rerunning the same command resumes from the last complete
checkpoint (state + data position), so an interrupted run ends where an uninterrupted one does.

Outputs in ``workdir``: ``checkpoints/`` (orbax), ``metrics.jsonl`` (one JSON object per line:
``step`` plus named values; evaluation values are ``eval/AP`` ...), ``tensorboard/`` event
files, ``detections.json`` (latest COCO results) and ``config.json``.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from retinanet_jax import storage
from retinanet_jax.data import TrainBatchIterator
from retinanet_jax.data.categories import default_category_ids
from retinanet_jax.data.registry import make_source
from retinanet_jax.evaluation import loop as evaluation
from retinanet_jax.models.retinanet import RetinaNet
from retinanet_jax.models.spec import model_from_spec, model_spec
from retinanet_jax.ops.anchors import model_anchor_config
from retinanet_jax.parallel import mesh as parallel
from retinanet_jax.training import preflight, resume
from retinanet_jax.training.checkpoint import Checkpointer, config_to_dict
from retinanet_jax.training.optim import OptimConfig, make_optimizer
from retinanet_jax.training.prefetch import DevicePrefetch
from retinanet_jax.training.progress import MetricWriter, Progress, format_table
from retinanet_jax.training.step import NonFiniteError, create_train_state, make_train_step

log = logging.getLogger(__name__)

# "float64" (with jax_enable_x64): params, optimizer state, activations and losses in float64,
# for tests whose runs must agree whatever the order of their sums (tests/test_multihost.py).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}
EVAL_KEYS = evaluation.COCO_METRICS


# ------------------------------------------------------------------------------ data


class NonEmptySubset:
    """The examples of a record-based source that have at least one box (torchvision's
    ``_coco_remove_images_without_annotations`` for training)."""

    def __init__(self, source: Any):
        self.source = source
        self.indices = [i for i, r in enumerate(source.records) if len(r.labels) > 0]
        self.class_names = source.class_names
        if hasattr(source, "label_to_category_id"):
            self.label_to_category_id = source.label_to_category_id

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.source[self.indices[i]]

    def image_size(self, i: int) -> tuple[int, int] | None:
        return self.source.image_size(self.indices[i])


def build_sources(config: Any) -> tuple[Any, Any]:
    """(train, val) sources from ``config.dataset``; val uses train's class order."""
    name = config.dataset.source
    train_kw, val_kw = dict(config.dataset.train), dict(config.dataset.val)
    train = make_source(name, train_kw, where="config.dataset.train", what="config.dataset.source")
    if name == "voc_xml" and "class_names" not in val_kw:
        val_kw["class_names"] = list(train.class_names)  # the val XMLs may lack a class
    val = make_source(name, val_kw, where="config.dataset.val", what="config.dataset.source")
    if list(val.class_names) != list(train.class_names):
        raise ValueError(
            f"config.dataset.val has classes {list(val.class_names)} but "
            f"config.dataset.train has {list(train.class_names)}; they must be equal "
            "(same label order)"
        )
    if config.dataset.drop_empty_train:
        if hasattr(train, "records"):
            train = NonEmptySubset(train)
        else:
            log.warning(
                "config.dataset.drop_empty_train: %s cannot count boxes without decoding; "
                "empty images are kept",
                type(train).__name__,
            )
    return train, val


# ------------------------------------------------------------------------------ model


def _with_anchors(model: RetinaNet, sizes: tuple, ratios: tuple) -> RetinaNet:
    n = len(sizes[0]) * len(ratios[0])
    if n != model.num_anchors:
        raise ValueError(
            f"config.model.anchor_sizes / aspect_ratios give {n} anchors per location; "
            f"the initial torchvision weights have {model.num_anchors}"
        )
    return model.clone(anchor_sizes=sizes, aspect_ratios=ratios)


def build_model(
    config: Any, num_classes: int, *, pretrained: bool = True, spec: dict | None = None
) -> tuple[RetinaNet, dict]:
    """(model, variables): torchvision RetinaNet / ImageNet backbone weights or a fresh init.

    ``pretrained=False`` (resuming: the checkpoint overwrites every weight) reads no ``.pth``
    file and returns zeros of the right structure, which costs no init compilation. ``spec``
    (a checkpoint's ``models.spec.model_spec``, stored because a torchvision checkpoint may
    have chosen some fields) supplies what a torchvision checkpoint decided rather than the
    config (``bn_eps``); everything else comes from the config, so a changed architecture fails
    the checkpoint's shape check instead of being silently replaced.
    """
    m, init = config.model, config.init
    anchors = model_anchor_config(m)
    if init.retinanet_checkpoint and init.backbone_checkpoint:
        raise ValueError("set config.init.retinanet_checkpoint or config.init.backbone_checkpoint, not both")
    from_torchvision = bool(init.retinanet_checkpoint or init.backbone_checkpoint)
    if from_torchvision and m.fpn_channels != 256:
        raise ValueError(f"config.model.fpn_channels={m.fpn_channels}: torchvision weights have 256")
    if pretrained and from_torchvision:
        from retinanet_jax.interop import torchvision as port

        skipped: list = []
        if init.retinanet_checkpoint:
            model, variables = port.from_torchvision(
                init.retinanet_checkpoint,
                m.variant,
                num_classes=num_classes,
                backbone=m.backbone,
                frozen_bn=m.frozen_bn,
                report=skipped,
                seed=config.seed,
            )
        else:
            model, variables = port.backbone_from_torchvision(
                init.backbone_checkpoint,
                num_classes=num_classes,
                variant=m.variant,
                backbone=m.backbone,
                bn_eps=m.bn_eps,
                frozen_bn=m.frozen_bn,
                report=skipped,
                seed=config.seed,
            )
        if skipped:
            log.info("initial weights: not loaded (re-initialised): %s", skipped)
        if anchors != model_anchor_config(model):
            model = _with_anchors(model, *anchors)  # the torchvision head must fit them
        return model, variables
    fields = dict(
        num_classes=num_classes,
        variant=m.variant,
        backbone=m.backbone,
        bn_eps=m.bn_eps,
        frozen_bn=m.frozen_bn,
        fpn_channels=m.fpn_channels,
        anchor_sizes=anchors[0],
        aspect_ratios=anchors[1],
        num_anchors=len(anchors[0][0]) * len(anchors[1][0]),
    )
    fields.update({k: spec[k] for k in ("bn_eps",) if spec and k in spec})
    model = model_from_spec(fields, "config.model")
    init_fn = functools.partial(
        model.init, jax.random.key(config.seed), jnp.zeros((1, 64, 64, 3), jnp.float32)
    )
    if not pretrained:
        shapes = jax.eval_shape(init_fn)
        return model, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    return model, jax.jit(init_fn)()


# ------------------------------------------------------------------------------ the program


def _prefixed_eval(metrics: dict) -> dict[str, float]:
    out = {f"eval/{k}": float(metrics[k]) for k in EVAL_KEYS}
    names = metrics["class_names"]
    for label, (name, ap) in enumerate(zip(names, metrics["per_class_AP"])):
        if np.isfinite(ap):  # a repeated name (torchvision's "N/A") gets its label to stay apart
            out[f"eval/AP/{name}" if names.count(name) == 1 else f"eval/AP/{name} ({label})"] = ap
    return out


def train_and_evaluate(config: Any, workdir: str) -> dict[str, float]:
    """Train, evaluate and checkpoint in ``workdir``; resume there if a checkpoint exists.

    Returns the final metrics (``eval/AP`` ... and the last logged ``train/loss``). Raises
    ``FloatingPointError`` naming the step on a non-finite loss (no checkpoint is written for
    it; earlier ones are intact).
    """
    if not storage.is_object_store(workdir):  # orbax's async array writes need an absolute local path
        workdir = os.path.abspath(workdir)
    workdir = epath.Path(workdir)
    storage.makedirs(workdir)  # gs:// etc.: nothing to make (retinanet_jax.storage)
    is_main = jax.process_index() == 0
    train_src, val_src = build_sources(config)
    preflight.check_batch_size(config, len(train_src))  # before the pipeline's own error
    class_names = [str(c) for c in train_src.class_names]
    num_classes = config.model.num_classes or len(class_names)
    if num_classes < len(class_names):
        raise ValueError(f"config.model.num_classes={num_classes} < {len(class_names)} dataset classes")
    if config.model.compute_dtype not in DTYPES:
        raise ValueError(f"config.model.compute_dtype must be one of {sorted(DTYPES)}")
    float64 = config.model.compute_dtype == "float64"
    if float64 and not jax.config.jax_enable_x64:
        raise ValueError(
            "config.model.compute_dtype='float64' needs jax_enable_x64 (set "
            "JAX_ENABLE_X64=1 in the environment); without it jax computes in float32"
        )
    # One global mesh over every process's devices; each process feeds its own rows.
    mesh = parallel.make_mesh(model=config.mesh.model, devices=parallel.mesh_devices(config.mesh.num_devices))
    parallel.check_process_layout(mesh)
    local_batch = parallel.local_batch_size(config.batch_size, mesh, "config.batch_size")
    if config.eval.enabled:  # fail now, not at the first evaluation
        parallel.local_batch_size(config.eval.batch_size, mesh, "config.eval.batch_size")

    ckpt = Checkpointer(
        workdir / "checkpoints", max_to_keep=config.checkpoint.keep, async_save=config.checkpoint.async_save
    )
    resume_step = ckpt.latest_step()
    spec = ckpt.read_meta().extra.get("model") if resume_step is not None else None
    model, variables = build_model(config, num_classes, pretrained=resume_step is None, spec=spec)
    inp = config.input
    pipeline = TrainBatchIterator(
        train_src,
        batch_size=local_batch,
        seed=config.seed,
        min_sizes=tuple(inp.min_sizes),
        max_size=inp.max_size,
        buckets=inp.buckets,
        canvases=inp.get("canvases", "fit"),
        max_canvases=inp.get("max_canvases", 8),
        max_boxes=inp.max_boxes,
        hflip_prob=inp.hflip_prob,
        box_overflow=inp.box_overflow,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        worker_count=inp.worker_count,
    )
    steps_per_epoch = pipeline.steps_per_epoch
    if not config.num_steps and config.optim.epochs is None:
        raise ValueError(
            "config.optim.epochs=None (an lr schedule over the run's steps) needs config.num_steps: "
            "set the run's length in steps"
        )
    num_steps = config.num_steps or config.optim.epochs * steps_per_epoch
    eval_every = config.eval.every_steps or steps_per_epoch
    ckpt_every = config.checkpoint.every_steps or steps_per_epoch
    preflight.check_run(
        config,
        dataset_size=len(train_src),
        steps_per_epoch=steps_per_epoch,
        num_steps=num_steps,
        eval_every=eval_every,
        ckpt_every=ckpt_every,
    )
    if is_main:
        log.info("training canvases: %s", pipeline.canvas_usage.describe())
    preflight.log_anchor_coverage(config, train_src, model, enabled=is_main, buckets=pipeline.canvases)
    tx, schedule = make_optimizer(
        OptimConfig.from_mapping(config.optim), steps_per_epoch, config.batch_size, run_steps=num_steps
    )
    state = create_train_state(
        model,
        variables,
        tx,
        config.model.trainable_backbone_layers,
        mesh=mesh,
        schedule=schedule,
        param_dtype=jnp.float64 if float64 else None,
    )
    del variables
    config_dict = config_to_dict(config)
    last_eval: dict | None = None
    if resume_step is not None:
        restored = ckpt.restore(state)
        if restored.class_names is not None and list(restored.class_names) != class_names:
            raise ValueError(
                f"{workdir / 'checkpoints'} was trained on classes {restored.class_names}, "
                f"the dataset has {class_names}; use a new --workdir"
            )
        changed = resume.check_resume(restored.config, config_dict, str(workdir / "checkpoints"))
        if changed:
            log.warning("resuming with a config that differs from the checkpoint's in: %s", changed)
        state = restored.state
        pipeline.set_state(restored.data_state or {"epoch": 0, "position": 0})
        last_eval = restored.extra.get("eval")
        log.info("resumed from step %d (%s)", restored.step, workdir / "checkpoints")
    elif is_main:
        evaluation.write_json_atomic(config_dict, workdir / "config.json")

    dtype = DTYPES[config.model.compute_dtype]
    step_fn = make_train_step(
        model, mesh, dict(config.loss), compute_dtype=dtype, skip_nonfinite=config.skip_nonfinite
    )
    eval_kw = dict(
        mesh=mesh,
        batch_size=config.eval.batch_size,
        min_size=config.eval.min_size,
        max_size=config.eval.max_size,
        buckets=config.eval.buckets,
        max_images=config.eval.max_images,
        canvases=inp.get("canvases", "fit"),
        max_canvases=inp.get("max_canvases", 8),
        score_thresh=config.eval.score_thresh,
        topk_candidates=config.eval.topk_candidates,
        nms_thresh=config.eval.nms_thresh,
        detections_per_img=config.eval.detections_per_img,
        output_path=workdir / evaluation.DETECTIONS_FILE if is_main else None,
    )

    def run_eval(at_step: int) -> dict:
        metrics = evaluation.evaluate(step_fn.model, state.variables, val_src, **eval_kw)
        values = _prefixed_eval(metrics)
        writer.write(at_step, values)
        progress.message(f"step {at_step}: eval AP {metrics['AP']:.4f} AP50 {metrics['AP50']:.4f}")
        return {"step": at_step, **values}

    # Stored with each checkpoint so that predictions name the dataset's category ids.
    category_ids = [
        int(i) for i in getattr(val_src, "label_to_category_id", None) or default_category_ids(num_classes)
    ]
    step = int(state.step)
    writer = MetricWriter(workdir, start_step=step, enabled=is_main)
    progress = Progress(step, num_steps, config.batch_size, enabled=is_main)
    last_train: dict[str, float] = {}
    # Asynchronous: between log / eval / checkpoint steps nothing is read from the device. The
    # metrics accumulate on the device (``carry``); a non-finite step freezes the state there
    # and is raised at the next read, naming its step, before anything is saved or evaluated.
    fresh_carry = step_fn.new_carry()
    carry = fresh_carry
    batches = DevicePrefetch(pipeline, step_fn.place_batch)  # batch k+1 placed while k runs
    try:
        while step < num_steps:
            state, carry = step_fn.run(state, carry, next(batches))
            step += 1
            progress.advance(step)
            final = step == num_steps
            log_now = step % config.log_every_steps == 0 or final
            eval_now = config.eval.enabled and (step % eval_every == 0 or final)
            preempted = ckpt.reached_preemption(step)
            ckpt_now = step % ckpt_every == 0 or final or preempted
            if not (log_now or eval_now or ckpt_now):
                continue
            try:
                train = step_fn.read(carry, state)  # waits for this step
            except NonFiniteError as e:
                ckpt.wait()
                raise FloatingPointError(
                    f"{e} (found at step {step}). No checkpoint was written for it; the latest "
                    f"complete checkpoint (step {ckpt.latest_step()}) is intact in "
                    f"{workdir / 'checkpoints'}"
                ) from e
            if log_now:
                carry = fresh_carry
                last_train = {
                    f"train/{k}": train[k] for k in ("loss", "classification", "bbox_regression", "grad_norm")
                }
                last_train["train/lr"] = train["lr"]
                last_train["train/images_per_sec"] = progress.images_per_sec()
                writer.write(step, last_train)
                progress.report(step, last_train)
            if eval_now:
                last_eval = run_eval(step)
            if ckpt_now:
                writer.flush()  # the metrics a resume from this checkpoint keeps are stored first
                at_step_eval = last_eval if last_eval and last_eval["step"] == step else None
                ckpt.save(
                    step,
                    state,
                    config=config_dict,
                    class_names=class_names,
                    data_state=batches.get_state(),
                    metrics={k: v for k, v in at_step_eval.items() if k != "step"} if at_step_eval else None,
                    extra={"model": model_spec(model), "eval": last_eval, "category_ids": category_ids},
                )
            if preempted:
                log.warning("preemption at step %d: checkpoint saved, stopping", step)
                break
        if config.eval.enabled and step >= num_steps and (last_eval is None or last_eval["step"] != step):
            last_eval = run_eval(step)  # resumed after the final checkpoint but before its eval
    finally:
        progress.close()
        batches.close()
        pipeline.close()
        ckpt.close()  # waits for background saves
        writer.close()
    final_metrics = {**last_train, **{k: v for k, v in (last_eval or {}).items() if k != "step"}}
    if is_main:
        print(format_table(step, final_metrics, class_names), flush=True)
    return final_metrics
