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
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)


class _NoMissingMetricWarning(logging.Filter):
    # orbax warns on every save without metrics once best_fn is set; steps without an
    # evaluation are expected here, so the warning is noise.
    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_NoMissingMetricWarning())

_STATE, _CONFIG, _META = "state", "config", "meta"


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model/state it is restored into."""


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


def _encode(value: Any) -> Any:
    # JSON cannot hold bytes (e.g. a serialized iterator state): tag and base64 them.
    if isinstance(value, (bytes, bytearray)):
        return {"__bytes_b64__": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, Mapping):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__bytes_b64__"}:
            return base64.b64decode(value["__bytes_b64__"])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _flat_paths(tree: Any) -> dict[str, Any]:
    """Nested dict -> {"a/b/c": leaf}."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        flat["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)] = leaf
    return flat


def check_compatible(saved: Any, target: Any, where: str = "checkpoint") -> None:
    """Raise :class:`CheckpointMismatchError` naming the first differing key or shape.

    ``saved`` and ``target`` are nested dicts whose leaves have ``.shape`` (arrays, orbax
    metadata or ``ShapeDtypeStruct``).
    """
    saved_flat, target_flat = _flat_paths(saved), _flat_paths(target)
    missing = sorted(set(target_flat) - set(saved_flat))
    unexpected = sorted(set(saved_flat) - set(target_flat))
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"{where} holds a different model: keys missing from the checkpoint: {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}; keys not in this model: {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''} (was it written with another config?)")
    # Parameters first: they name the architecture difference; optimizer moments only echo it.
    order = sorted(target_flat, key=lambda k: (not k.startswith(("params", "frozen_params")), k))
    bad = [(k, tuple(np.shape(saved_flat[k])), tuple(np.shape(target_flat[k]))) for k in order
           if tuple(np.shape(saved_flat[k])) != tuple(np.shape(target_flat[k]))]
    if bad:
        key, s_shape, t_shape = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise CheckpointMismatchError(
            f"{where}: shape mismatch at {key!r}: checkpoint has {s_shape}, this model expects "
            f"{t_shape}{more} (another architecture or num_classes?)")


def _abstract(tree: Any) -> Any:
    """Arrays -> ShapeDtypeStruct carrying the current sharding (the restore target)."""
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def one(x):
        sharding = getattr(x, "sharding", None) if isinstance(x, jax.Array) else None
        return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype if sharding is None else x.dtype,
                                    sharding=sharding or default)

    return jax.tree.map(one, tree)


class Checkpointer:
    """orbax ``CheckpointManager`` for train states plus config, class names, data state.

    ``directory``: where step directories go (local path or ``gs://``).
    ``max_to_keep``: the latest checkpoints kept; ``best_metric``: also keep the best one by
    this metric (higher is better; ``None`` disables). ``async_save``: write in the background
    (call :meth:`wait` or :meth:`close` before reading the files or exiting).
    """

    def __init__(self, directory: str | epath.PathLike, *, max_to_keep: int = 3,
                 best_metric: str | None = "eval/AP", async_save: bool = True):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        self.directory = epath.Path(directory)
        self.best_metric = best_metric
        policies: list[Any] = [ocp.checkpoint_managers.LatestN(max_to_keep)]
        best_fn = None
        if best_metric is not None:
            best_fn = lambda metrics: float(metrics[best_metric])  # noqa: E731
            policies.append(ocp.checkpoint_managers.BestN(
                get_metric_fn=best_fn, n=1, keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            best_fn=best_fn, best_mode="max",
            enable_async_checkpointing=async_save,
            # Leftovers of a crashed save are never read; deleting them keeps the dir clean.
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={_STATE: ocp.StandardCheckpointHandler(),
                           _CONFIG: ocp.JsonCheckpointHandler(),
                           _META: ocp.JsonCheckpointHandler()})

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
    def save(self, step: int, state: Any, *, config: Any = None,
             class_names: Sequence[str] | None = None, data_state: Any = None,
             metrics: Mapping[str, float] | None = None, extra: Mapping[str, Any] | None = None,
             ) -> bool:
        """Save ``state`` at ``step`` (no-op if that step exists). Returns True if saved.

        ``metrics`` (e.g. ``{"eval/AP": 0.3}``) rank checkpoints for the best-one policy.
        """
        if step in self._manager.all_steps():
            return False
        meta = {"class_names": list(class_names) if class_names is not None else None,
                "data_state": _encode(data_state), "extra": _encode(dict(extra or {}))}
        # orbax JsonSave needs a dict; an absent config is stored as {}.
        args = ocp.args.Composite(**{
            _STATE: ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
            _CONFIG: ocp.args.JsonSave(config_to_dict(config) or {}),
            _META: ocp.args.JsonSave(meta),
        })
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
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory} "
                                    f"(have {self.all_steps()})")
        return int(step)

    def read_meta(self, step: int | None = None) -> Restored:
        """Everything but the arrays (``state`` is None): config, class names, data state,
        extras of ``step`` (default latest). Cheap; use it to rebuild the model first."""
        step = self._resolve(step)
        restored = self._manager.restore(step, args=ocp.args.Composite(**{
            _CONFIG: ocp.args.JsonRestore(), _META: ocp.args.JsonRestore()}))
        return self._restored(None, step, restored)

    @staticmethod
    def _restored(state: Any, step: int, restored: Any) -> Restored:
        meta = restored[_META] or {}
        return Restored(state=state, step=step, config=restored[_CONFIG] or None,
                        class_names=meta.get("class_names"),
                        data_state=_decode(meta.get("data_state")),
                        extra=_decode(meta.get("extra") or {}))

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
        restored = self._manager.restore(step, args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardRestore(_abstract(target_dict)),
            _CONFIG: ocp.args.JsonRestore(),
            _META: ocp.args.JsonRestore(),
        }))
        state = flax.serialization.from_state_dict(target, restored[_STATE])
        return self._restored(state, step, restored)

    def wait(self) -> None:
        """Block until background saves are complete."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
