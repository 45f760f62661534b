"""Which config changes a resumed run accepts.

A checkpoint stores the train state and the data iterator's position (``{epoch, position}`` in
batches of the run's global batch size, in the order drawn from its seed and dataset). A change
that reinterprets that state silently trains something else: another batch size or seed maps
the stored position to other images, another dataset or canvas set to other batches, another
model or optimizer to other (or unrestorable) arrays. Those are refused, naming the keys; any
other change (logging, evaluation, checkpoint cadence, run length, learning rate) is allowed
and listed in the log.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Keys (or key prefixes ending in ".") whose change reinterprets the stored state.
STATE_KEYS = (
    "batch_size",  # the stored position counts batches of this size
    "seed",  # data order and augmentation draws
    "dataset.source",
    "dataset.train.",
    "dataset.drop_empty_train",  # which images, in which order
    "input.min_sizes",
    "input.max_size",
    "input.buckets",  # canvases (and the batches they group)
    "input.canvases",
    "input.max_canvases",
    "input.max_boxes",
    "input.box_overflow",
    "input.hflip_prob",  # what each batch holds
    "model.",  # the arrays in the checkpoint
    "optim.optimizer",  # the optimizer state's structure
)


# What a key absent from an older checkpoint's config meant when that run was written.
ABSENT_MEANT = {"input.canvases": "fixed"}  # canvases fitted to the data came later


def flatten(config: Mapping[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in (config or {}).items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _normal(value: Any) -> Any:
    """Lists and tuples compare equal (JSON turns tuples into lists)."""
    return [_normal(v) for v in value] if isinstance(value, (list, tuple)) else value


def config_changes(saved: Mapping[str, Any] | None, current: Mapping[str, Any]) -> list[str]:
    """Sorted flat keys whose values differ between two config dicts (absent = None)."""
    a, b = flatten(saved), flatten(current)
    return sorted(k for k in a.keys() | b.keys() if _normal(a.get(k)) != _normal(b.get(k)))


def _is_state_key(key: str) -> bool:
    return any(key.startswith(k) if k.endswith(".") else key == k for k in STATE_KEYS)


def check_resume(saved: Mapping[str, Any] | None, current: Mapping[str, Any], where: str) -> list[str]:
    """Allowed changed keys of ``current`` against the checkpoint's ``saved`` config.

    Raises ``ValueError`` naming every changed key that would reinterpret the stored state,
    with both values, and ``where`` (the checkpoint directory). ``saved=None`` (a checkpoint
    without a config) allows everything.
    """
    if saved is None:
        return []
    saved, current = ({**ABSENT_MEANT, **flatten(c)} for c in (saved, current))
    changed = config_changes(saved, current)
    unread = (
        set() if "fit" in (saved["input.canvases"], current["input.canvases"]) else {"input.max_canvases"}
    )
    refused = [k for k in changed if _is_state_key(k) and k not in unread]  # only "fit" reads it
    if refused:
        a, b = flatten(saved), flatten(current)
        detail = "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in refused)
        raise ValueError(
            f"{where}: cannot resume with a config that changes what the stored state means ({detail}). "
            "Restore those values, or start a new --workdir."
        )
    return changed
