"""Checkpoints: orbax save / restore / resume of the train state plus its run metadata.

One checkpoint = one step directory holding three items:
  ``state``  the train state pytree (arrays, saved sharded, restorable on any device count),
  ``config`` the run's config as JSON,
  ``meta``   class names, the data iterator state and free-form extras, as JSON.

orbax writes each step into a temporary directory and renames it when complete, so a crash
mid-save leaves a tmp directory that :meth:`Checkpointer.latest_step` ignores. Kept: the last
``max_to_keep`` checkpoints plus the best one by ``best_metric`` (e.g. ``"eval/AP"``).

The state is stored as flax's state dict (nested dicts with string keys), so every leaf has a
readable path like ``params/head/classification_head/cls_logits/kernel`` that errors can name.

:func:`load_trained` reads a checkpoint for inference (model, variables, class names, config)
without an optimizer: what ``retinanet-jax`` needs to predict from a ``train.py`` workdir.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from retinanet_jax.models.retinanet import RetinaNet
from retinanet_jax.models.spec import (
    CheckpointMismatchError,
    check_compatible,
    check_variables,
    model_from_spec,
)
from retinanet_jax.training.step import merge_params

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointMismatchError",
    "Checkpointer",
    "Restored",
    "TrainedModel",
    "check_compatible",
    "config_to_dict",
    "find_checkpoints",
    "load_trained",
]

_STATE, _CONFIG, _META = "state", "config", "meta"


@dataclasses.dataclass
class Restored:
    """What :meth:`Checkpointer.restore` returns."""

    state: Any
    step: int
    config: dict | None
    class_names: list[str] | None
    data_state: Any
    extra: dict


def config_to_dict(config: Any) -> dict | None:
    """ConfigDict / mapping -> JSON-able dict (non-JSON values become strings)."""
    if config is None:
        return None
    if hasattr(config, "to_json_best_effort"):  # ml_collections.ConfigDict
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(dict(config), default=str))


def _abstract(tree: Any) -> Any:
    """Arrays -> ShapeDtypeStruct carrying the current sharding (the restore target)."""
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def one(x):
        sharding = getattr(x, "sharding", None) if isinstance(x, jax.Array) else None
        return jax.ShapeDtypeStruct(
            np.shape(x), np.asarray(x).dtype if sharding is None else x.dtype, sharding=sharding or default
        )

    return jax.tree.map(one, tree)


class Checkpointer:
    """orbax ``CheckpointManager`` for train states plus config, class names, data state.

    ``directory``: where step directories go (local path or ``gs://``).
    ``max_to_keep``: the latest checkpoints kept; ``best_metric``: also keep the best one by
    this metric (higher is better; ``None`` disables). ``async_save``: write in the background
    (call :meth:`wait` or :meth:`close` before reading the files or exiting).
    """

    def __init__(
        self,
        directory: str | epath.PathLike,
        *,
        max_to_keep: int = 3,
        best_metric: str | None = "eval/AP",
        async_save: bool = True,
    ):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        self.directory = epath.Path(directory)
        self.best_metric = best_metric
        policies: list[Any] = [ocp.checkpoint_managers.LatestN(max_to_keep)]
        best_fn = None
        if best_metric is not None:
            best_fn = lambda metrics: float(metrics[best_metric])  # noqa: E731
            policies.append(
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=best_fn, n=1, keep_checkpoints_without_metrics=False
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            best_fn=best_fn,
            best_mode="max",
            enable_async_checkpointing=async_save,
            # Leftovers of a crashed save are never read; deleting them keeps the dir clean.
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                _STATE: ocp.StandardCheckpointHandler(),
                _CONFIG: ocp.JsonCheckpointHandler(),
                _META: ocp.JsonCheckpointHandler(),
            },
        )

    # ------------------------------------------------------------------ queries
    def latest_step(self) -> int | None:
        """Latest complete checkpoint's step (tmp dirs of interrupted saves are ignored)."""
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """Step of the best checkpoint by ``best_metric`` (latest if none has metrics)."""
        return self._manager.best_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def reached_preemption(self, step: int) -> bool:
        """True when the cluster announced a preemption (all processes agree on ``step``)."""
        return bool(self._manager.reached_preemption(step))

    # ------------------------------------------------------------------ save / restore
    def save(
        self,
        step: int,
        state: Any,
        *,
        config: Any = None,
        class_names: Sequence[str] | None = None,
        data_state: Any = None,
        metrics: Mapping[str, float] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> bool:
        """Save ``state`` at ``step`` (no-op if that step exists). Returns True if saved.

        ``metrics`` (e.g. ``{"eval/AP": 0.3}``) rank checkpoints for the best-one policy.
        """
        if step in self._manager.all_steps():
            return False
        meta = {
            "class_names": list(class_names) if class_names is not None else None,
            "data_state": data_state,
            "extra": dict(extra or {}),
        }
        try:  # fail here, not in orbax's background writer
            json.dumps(meta)
        except TypeError as e:
            raise TypeError(
                f"Checkpointer.save: class_names, data_state and extra must be JSON values ({e})"
            ) from e
        # orbax JsonSave needs a dict; an absent config is stored as {}.
        args = ocp.args.Composite(
            **{
                _STATE: ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
                _CONFIG: ocp.args.JsonSave(config_to_dict(config) or {}),
                _META: ocp.args.JsonSave(meta),
            }
        )
        best = None
        if metrics is not None:
            best = {k: float(v) for k, v in metrics.items()}
            if self.best_metric is not None and self.best_metric not in best:
                best = None  # a step without the ranking metric is "without metrics"
        return bool(self._manager.save(step, args=args, metrics=best, force=True))

    def _resolve(self, step: int | None) -> int:
        self.wait()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        elif step not in self.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory} (have {self.all_steps()})"
            )
        return int(step)

    def read_meta(self, step: int | None = None) -> Restored:
        """Everything but the arrays (``state`` is None): config, class names, data state,
        extras of ``step`` (default latest). Cheap; use it to rebuild the model first."""
        step = self._resolve(step)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{_CONFIG: ocp.args.JsonRestore(), _META: ocp.args.JsonRestore()})
        )
        return self._restored(None, step, restored)

    @staticmethod
    def _restored(state: Any, step: int, restored: Any) -> Restored:
        meta = restored[_META] or {}
        return Restored(
            state=state,
            step=step,
            config=restored[_CONFIG] or None,
            class_names=meta.get("class_names"),
            data_state=meta.get("data_state"),
            extra=meta.get("extra") or {},
        )

    def restore(self, target: Any, step: int | None = None) -> Restored:
        """Restore into the structure, shapes and shardings of ``target`` (a template state).

        ``step`` defaults to the latest complete checkpoint. The arrays land on ``target``'s
        shardings, so a checkpoint written on N devices restores on any device count. Raises
        ``FileNotFoundError`` if there is none and :class:`CheckpointMismatchError` naming
        the key and shapes if the checkpoint holds another model.
        """
        step = self._resolve(step)
        where = f"checkpoint {self.directory / str(step)}"
        target_dict = flax.serialization.to_state_dict(target)
        saved_meta = self._manager.item_metadata(step)[_STATE]
        saved_tree = getattr(saved_meta, "tree", saved_meta)
        check_compatible(saved_tree, target_dict, where)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    _STATE: ocp.args.StandardRestore(_abstract(target_dict)),
                    _CONFIG: ocp.args.JsonRestore(),
                    _META: ocp.args.JsonRestore(),
                }
            ),
        )
        state = flax.serialization.from_state_dict(target, restored[_STATE])
        return self._restored(state, step, restored)

    def wait(self) -> None:
        """Block until background saves are complete."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------ for inference


@dataclasses.dataclass
class TrainedModel:
    """What :func:`load_trained` reads from a ``train.py`` checkpoint."""

    model: RetinaNet
    variables: dict  # {"params" (trainable and frozen merged), "batch_stats"}
    step: int
    config: dict  # the run's config (``{}`` if none was stored)
    class_names: list[str] | None
    category_ids: list[int] | None  # label -> dataset category id (None: not stored)
    preprocess: dict | None  # {"min_size", "max_size"} of config.eval, if set
    where: str  # "<checkpoints dir>/<step>", for messages


def find_checkpoints(path: str, step: int | None = None) -> tuple[str, int | None] | None:
    """``(orbax checkpoints directory, step or None)`` for a ``train.py`` workdir, its
    ``checkpoints/`` directory or one step directory in it; None if ``path`` is none of them."""
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return os.path.join(path, "checkpoints"), step
    name = os.path.basename(os.path.normpath(path))
    if name.isdigit() and os.path.isdir(os.path.join(path, _STATE)):
        if step is not None and step != int(name):
            raise ValueError(f"{path} is the checkpoint of step {name}, but step {step} was asked for")
        return os.path.dirname(os.path.normpath(path)), int(name)
    if any(n.isdigit() and os.path.isdir(os.path.join(path, n, _STATE)) for n in os.listdir(path)):
        return path, step
    return None


def _restore_read_only(directory: str, step: int | None) -> tuple[int, dict, dict, dict]:
    """(step, {"params", "frozen_params", "batch_stats"} arrays, config, meta), read-only."""
    options = ocp.CheckpointManagerOptions(
        read_only=True, create=False, best_mode="max", best_fn=lambda metrics: float(metrics["eval/AP"])
    )  # as Checkpointer's best_metric
    manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=options,
        item_handlers={
            _STATE: ocp.PyTreeCheckpointHandler(),
            _CONFIG: ocp.JsonCheckpointHandler(),
            _META: ocp.JsonCheckpointHandler(),
        },
    )
    steps = list(manager.all_steps())
    if not steps:
        raise FileNotFoundError(f"{directory}: no complete checkpoint")
    if step is None:
        step = manager.best_step() or manager.latest_step()
    elif step not in steps:
        raise FileNotFoundError(f"{directory}: no checkpoint for step {step} (have {sorted(steps)})")
    tree = manager.item_metadata(step)[_STATE]
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, dict) or "params" not in tree:
        raise ValueError(f"{directory}/{step}: the state holds no 'params' (not a train.py checkpoint)")
    # Restore onto one local device whatever the saving mesh was, and skip the optimizer state.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    wanted = {k: tree[k] for k in ("params", "frozen_params", "batch_stats") if k in tree}
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), wanted)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            **{
                _STATE: ocp.args.PyTreeRestore(
                    abstract,
                    partial_restore=True,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                ),
                _CONFIG: ocp.args.JsonRestore(),
                _META: ocp.args.JsonRestore(),
            }
        ),
    )
    manager.close()
    return int(step), dict(restored[_STATE]), restored[_CONFIG] or {}, restored[_META] or {}


def _spec_from_config(config: dict, class_names: list | None) -> dict:
    # Checkpoints store the spec in meta.extra.model; older ones only have the config.
    m = dict(config.get("model") or {})
    spec = {k: m[k] for k in ("variant", "backbone", "bn_eps", "frozen_bn", "fpn_channels") if k in m}
    spec["num_classes"] = m.get("num_classes") or len(class_names or [])
    return spec


def load_trained(path: str, step: int | None = None) -> TrainedModel:
    """The model of a ``train.py`` checkpoint, for inference (no optimizer state is read).

    ``path``: a workdir, its ``checkpoints/`` directory or one step directory. ``step``: None =
    the best step by ``eval/AP`` (the latest if none was evaluated). Raises ``ValueError`` if
    ``path`` is not a training checkpoint, ``FileNotFoundError`` if the step is missing and
    :class:`CheckpointMismatchError` if the arrays do not fit the stored architecture.
    """
    found = find_checkpoints(path, step)
    if found is None:
        raise ValueError(f"{path}: not a train.py workdir, checkpoints/ directory or step directory")
    directory, step = found
    step, state, config, meta = _restore_read_only(directory, step)
    names = meta.get("class_names")
    extra = meta.get("extra") or {}
    where = f"{directory}/{step}"
    model = model_from_spec(extra.get("model") or _spec_from_config(config, names), where)
    variables = {
        "params": merge_params(state.get("params") or {}, state.get("frozen_params") or {}),
        "batch_stats": state.get("batch_stats") or {},
    }
    check_variables(model, variables, where)
    ev = config.get("eval") or {}
    pre = {k: ev[k] for k in ("min_size", "max_size") if k in ev} or None
    ids = extra.get("category_ids")
    return TrainedModel(
        model,
        variables,
        step,
        config,
        list(names) if names else None,
        [int(i) for i in ids] if ids else None,
        pre,
        where,
    )
