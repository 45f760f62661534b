"""Whole models (architecture + variables + class names) as model directories and ``.pth`` files.

- :func:`load_pth`: a ``.pth`` / ``.pt`` file: a torchvision RetinaNet state_dict (v1 or v2,
  variant and backbone read from the keys) or an ImageNet ResNet classifier (gives a detector
  whose ResNet body comes from it; FPN and heads freshly initialised). Read with
  ``torch.load(weights_only=True)``.
- :func:`save_model` / :func:`load_model_dir`: a *model directory* (``retinanet-jax convert``):
  ``model.json`` (``{"format": "retinanet_jax.model", "version": 1, "model": {RetinaNet
  fields: models.spec.model_spec}, "class_names": [...] | null, "category_ids": [...],
  "preprocess": {"min_size", "max_size"} | null, "converted_from": str, "step": int | null}``)
  and ``variables.msgpack`` (``flax.serialization.msgpack_serialize`` of ``{"params",
  "batch_stats"}``).

Training checkpoints of ``train.py`` are read by ``training.checkpoint.load_trained``; the
command line's ``cli.checkpoints.load_model`` recognises all three kinds.

Labels map to COCO category ids with ``category_ids[label]``: torchvision models use the
category id as the label (identity); models trained here store their dataset's ids (``label + 1``
when the dataset has none).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import flax.serialization
import jax
import numpy as np

from retinanet_jax.data.categories import COCO_V1_CATEGORIES, default_category_ids
from retinanet_jax.models.retinanet import RetinaNet
from retinanet_jax.models.spec import check_variables, model_from_spec, model_spec

MODEL_JSON = "model.json"
VARIABLES_FILE = "variables.msgpack"
FORMAT = "retinanet_jax.model"
VERSION = 1


@dataclasses.dataclass
class LoadedModel:
    """A whole model: what :func:`load_pth`, :func:`load_model_dir` and the command line's
    ``load_model`` return. ``variables``: ``{"params", "batch_stats"}`` arrays."""

    model: RetinaNet
    variables: dict
    class_names: list[str] | None
    category_ids: list[int]  # label -> COCO category id
    source: str  # what was loaded, for messages (and "converted_from" in model.json)
    step: int | None = None  # training step (training checkpoints)
    config: dict | None = None  # training config (training checkpoints)
    preprocess: dict | None = None  # {"min_size", "max_size"} the model was evaluated with

    def label_name(self, label: int) -> str:
        """Class name of ``label`` (or the label number when the names are unknown)."""
        if self.class_names is not None and 0 <= label < len(self.class_names):
            return self.class_names[label]
        return str(label)


# ------------------------------------------------------------------------------ model directory


def save_model(directory: str, loaded: LoadedModel) -> None:
    """Write ``loaded`` as a model directory (``model.json`` + ``variables.msgpack``)."""
    os.makedirs(directory, exist_ok=True)
    variables = jax.tree.map(np.asarray, jax.device_get(loaded.variables))
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": model_spec(loaded.model),
        "class_names": loaded.class_names,
        "category_ids": list(loaded.category_ids),
        "preprocess": loaded.preprocess,
        "converted_from": loaded.source,
        "step": loaded.step,
    }
    # Variables first, JSON last: a directory with model.json is complete.
    with open(os.path.join(directory, VARIABLES_FILE), "wb") as f:
        f.write(flax.serialization.msgpack_serialize(variables))
    with open(os.path.join(directory, MODEL_JSON), "w") as f:
        json.dump(meta, f, indent=1)


def is_model_dir(path: str) -> bool:
    """True if ``path`` is a directory holding ``model.json``."""
    return os.path.isfile(os.path.join(path, MODEL_JSON))


def load_model_dir(directory: str) -> LoadedModel:
    """A model directory written by :func:`save_model`; errors name the file and the problem."""
    json_path = os.path.join(directory, MODEL_JSON)
    try:
        with open(json_path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_path}: not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{json_path}: not a retinanet_jax model file (format != {FORMAT!r})")
    if int(meta.get("version", 0)) > VERSION:
        raise ValueError(
            f"{json_path}: format version {meta['version']} is newer than this "
            f"retinanet_jax reads ({VERSION}); upgrade retinanet_jax"
        )
    model = model_from_spec(meta.get("model") or {}, json_path)
    var_path = os.path.join(directory, VARIABLES_FILE)
    if not os.path.isfile(var_path):
        raise FileNotFoundError(f"{var_path}: missing (the model directory is incomplete)")
    with open(var_path, "rb") as f:
        try:
            variables = flax.serialization.msgpack_restore(f.read())
        except Exception as e:  # msgpack raises several unrelated types on corrupt data
            raise ValueError(f"{var_path}: cannot decode ({type(e).__name__}: {e})") from e
    check_variables(model, variables, var_path)
    names = meta.get("class_names")
    ids = meta.get("category_ids") or default_category_ids(model.num_classes)
    return LoadedModel(
        model,
        variables,
        list(names) if names is not None else None,
        [int(i) for i in ids],
        f"model directory {directory}",
        step=meta.get("step"),
        preprocess=meta.get("preprocess"),
    )


# ------------------------------------------------------------------------------ torchvision .pth


def _guess_variant(sd: dict) -> str:
    # v2 heads have GroupNorm after each conv: conv.0.1 exists only there.
    return "v2" if "head.classification_head.conv.0.1.weight" in sd else "v1"


def load_pth(
    path: str,
    *,
    variant: str | None = None,
    backbone: str | None = None,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
) -> LoadedModel:
    """A torchvision RetinaNet or ImageNet ResNet ``.pth`` (None = read from the keys;
    ``num_classes`` different from the checkpoint's re-initialises the class conv)."""
    from retinanet_jax.interop import torchvision as port

    try:
        sd = port.read_state_dict(path)  # torch.load(weights_only=True); code is refused
        classifier = not any(k.startswith(("head.", "backbone.")) for k in sd) and "conv1.weight" in sd
        if classifier:  # an ImageNet ResNet: start a detector from its body
            k = num_classes or (len(class_names) if class_names else len(COCO_V1_CATEGORIES))
            model, variables = port.backbone_from_torchvision(
                sd, num_classes=k, variant=variant or "v1", backbone=backbone
            )
            ids, what = default_category_ids(k), f"ImageNet backbone {path}"
        else:
            variant = variant or _guess_variant(sd)
            backbone = backbone or port.guess_backbone(sd) or "resnet50"
            model, variables = port.from_torchvision(sd, variant, num_classes=num_classes, backbone=backbone)
            # torchvision's labels are the dataset's category ids (0 = background).
            ids, what = list(range(model.num_classes)), f"torchvision RetinaNet {variant} {path}"
    except (ValueError, KeyError) as e:
        raise ValueError(f"{path}: {e}") from e
    if class_names is None and not classifier and model.num_classes == len(COCO_V1_CATEGORIES):
        class_names = list(COCO_V1_CATEGORIES)  # torchvision's COCO numbering
    return LoadedModel(model, variables, list(class_names) if class_names else None, ids, what)
