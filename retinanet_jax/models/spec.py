"""A RetinaNet's architecture as a JSON-able dict (its *spec*), and the check that variables fit.

The spec is every constructor field of :class:`RetinaNet` except flax's bookkeeping and the
compute dtype (a run-time choice, not a property of the weights). It is what training
checkpoints, model directories and ONNX sidecars store so the model can be rebuilt exactly:
``model_from_spec(model_spec(m), where) == m`` (up to ``dtype``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from retinanet_jax.models.retinanet import RetinaNet

_NOT_SPEC = ("parent", "name", "dtype")  # flax bookkeeping and the compute dtype
SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(RetinaNet) if f.init and f.name not in _NOT_SPEC)


class CheckpointMismatchError(ValueError):
    """Stored variables (or a train state) do not fit the model / state they are loaded into."""


def model_spec(model: RetinaNet) -> dict[str, Any]:
    """``{field: value}`` for every field in :data:`SPEC_FIELDS`."""
    return {name: getattr(model, name) for name in SPEC_FIELDS}


def _tuples(value: Any) -> Any:
    # JSON gives lists; module fields must be hashable (the model is a static jit argument).
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def model_from_spec(spec: dict[str, Any], where: str = "checkpoint") -> RetinaNet:
    """``RetinaNet(**spec)`` with JSON lists turned back into tuples.

    ``where`` (a file or checkpoint path) names the spec's origin in errors; a key that is not
    a RetinaNet field is a ``ValueError`` naming it. Missing keys take RetinaNet's defaults.
    """
    if not isinstance(spec, dict):
        raise ValueError(
            f"{where}: the model spec must be a mapping of RetinaNet fields, got {type(spec).__name__}"
        )
    unknown = sorted(set(spec) - set(SPEC_FIELDS))
    if unknown:
        raise ValueError(
            f"{where}: unknown model fields {unknown} (written by a newer "
            f"retinanet_jax?); known: {list(SPEC_FIELDS)}"
        )
    return RetinaNet(**{k: _tuples(v) for k, v in spec.items()})


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
            f"{' ...' if len(unexpected) > 5 else ''} (was it written with another config?)"
        )
    # Parameters first: they name the architecture difference; optimizer moments only echo it.
    order = sorted(target_flat, key=lambda k: (not k.startswith(("params", "frozen_params")), k))
    bad = [
        (k, tuple(np.shape(saved_flat[k])), tuple(np.shape(target_flat[k])))
        for k in order
        if tuple(np.shape(saved_flat[k])) != tuple(np.shape(target_flat[k]))
    ]
    if bad:
        key, s_shape, t_shape = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise CheckpointMismatchError(
            f"{where}: shape mismatch at {key!r}: checkpoint has {s_shape}, this model expects "
            f"{t_shape}{more} (another architecture or num_classes?)"
        )


def check_variables(model: RetinaNet, variables: Any, where: str = "checkpoint") -> None:
    """:func:`check_compatible` of ``{"params", "batch_stats"}`` against ``model``'s (no init
    compute: shapes only)."""
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.float32))
    check_compatible(variables, abstract, where)
