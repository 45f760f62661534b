"""Whole models (architecture + variables + class names) from any kind of checkpoint, and back.

``load_model(path)`` recognises:

- a ``.pth`` / ``.pt`` file: a torchvision RetinaNet state_dict (v1 or v2, variant and backbone
  read from the keys) or an ImageNet ResNet classifier (gives a detector whose ResNet body
  comes from it; FPN and heads freshly initialised). Read with ``torch.load(weights_only=True)``.
- a *model directory* written by ``save_model`` / ``retinanet-jax convert``:
  ``model.json`` (``{"format": "retinanet_jax.model", "version": 1, "model": {RetinaNet
  fields}, "class_names": [...] | null, "category_ids": [...], "preprocess": {"min_size",
  "max_size"} | null, "converted_from": str, "step": int | null}``) and ``variables.msgpack``
  (``flax.serialization.msgpack_serialize`` of ``{"params", "batch_stats"}``).
- a training workdir of ``train.py`` (holding ``checkpoints/``), that ``checkpoints/``
  directory or one of its step directories: the best step by ``eval/AP`` by default (the
  latest if none was evaluated), or ``step=``. Only ``params`` / ``frozen_params`` /
  ``batch_stats`` are read (no optimizer needed), merged as ``TrainState.variables`` does.

Labels map to COCO category ids with ``category_ids[label]``: torchvision models use the
category id as the label (identity); models trained here store their dataset's ids (``label + 1`` when the dataset has none).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any, Optional

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from retinanet_jax.models.retinanet import RetinaNet

MODEL_JSON = "model.json"
VARIABLES_FILE = "variables.msgpack"
FORMAT = "retinanet_jax.model"
VERSION = 1
_NOT_SPEC = ("parent", "name", "dtype")  # flax bookkeeping and the compute dtype (not a weight property)

# torchvision's RetinaNet_ResNet50_FPN_Weights.COCO_V1.meta["categories"]: index = label = COCO id.
COCO_V1_CATEGORIES = (
    "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck",
    "boat", "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird",
    "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A",
    "backpack", "umbrella", "N/A", "N/A", "handbag", "tie", "suitcase", "frisbee", "skis",
    "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard",
    "surfboard", "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza",
    "donut", "cake", "chair", "couch", "potted plant", "bed", "N/A", "dining table", "N/A", "N/A",
    "toilet", "N/A", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave",
    "oven", "toaster", "sink", "refrigerator", "N/A", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush")


@dataclasses.dataclass
class LoadedModel:
    """What :func:`load_model` returns. ``variables``: ``{"params", "batch_stats"}`` arrays."""

    model: RetinaNet
    variables: dict
    class_names: Optional[list[str]]
    category_ids: list[int]  # label -> COCO category id
    source: str  # what was loaded, for messages (and "converted_from" in model.json)
    step: Optional[int] = None  # training step (training checkpoints)
    config: Optional[dict] = None  # training config (training checkpoints)
    preprocess: Optional[dict] = None  # {"min_size", "max_size"} the model was evaluated with

    def label_name(self, label: int) -> str:
        """Class name of ``label`` (or the label number when the names are unknown)."""
        if self.class_names is not None and 0 <= label < len(self.class_names):
            return self.class_names[label]
        return str(label)


# ------------------------------------------------------------------------------ model spec


def model_spec(model: RetinaNet) -> dict[str, Any]:
    """Every constructor field of ``model`` except the compute dtype, JSON-able."""
    return {f.name: getattr(model, f.name) for f in dataclasses.fields(RetinaNet)
            if f.init and f.name not in _NOT_SPEC}


def _tuples(value: Any) -> Any:
    # JSON gives lists; module fields must be hashable (the model is a static jit argument).
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def build_model(spec: dict[str, Any], where: str = "checkpoint") -> RetinaNet:
    """``RetinaNet(**spec)`` with JSON lists turned back into tuples; unknown fields are an error."""
    known = {f.name for f in dataclasses.fields(RetinaNet) if f.init and f.name not in _NOT_SPEC}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ValueError(f"{where}: unknown model fields {unknown} (written by a newer retinanet_jax?)")
    return RetinaNet(**{k: _tuples(v) for k, v in spec.items()})


def _abstract_variables(model: RetinaNet) -> Any:
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.float32))


def _check_variables(model: RetinaNet, variables: Any, where: str) -> None:
    from retinanet_jax.training.checkpoint import check_compatible

    check_compatible(variables, _abstract_variables(model), where)


# ------------------------------------------------------------------------------ model directory


def save_model(directory: str, loaded: LoadedModel) -> None:
    """Write ``loaded`` as a model directory (``model.json`` + ``variables.msgpack``)."""
    os.makedirs(directory, exist_ok=True)
    variables = jax.tree.map(np.asarray, jax.device_get(loaded.variables))
    meta = {"format": FORMAT, "version": VERSION, "model": model_spec(loaded.model),
            "class_names": loaded.class_names, "category_ids": list(loaded.category_ids),
            "preprocess": loaded.preprocess, "converted_from": loaded.source, "step": loaded.step}
    # Variables first, JSON last: a directory with model.json is complete.
    with open(os.path.join(directory, VARIABLES_FILE), "wb") as f:
        f.write(flax.serialization.msgpack_serialize(variables))
    with open(os.path.join(directory, MODEL_JSON), "w") as f:
        json.dump(meta, f, indent=1)


def _load_model_dir(directory: str) -> LoadedModel:
    json_path = os.path.join(directory, MODEL_JSON)
    try:
        with open(json_path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_path}: not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{json_path}: not a retinanet_jax model file (format != {FORMAT!r})")
    if int(meta.get("version", 0)) > VERSION:
        raise ValueError(f"{json_path}: format version {meta['version']} is newer than this "
                         f"retinanet_jax reads ({VERSION}); upgrade retinanet_jax")
    model = build_model(meta.get("model") or {}, json_path)
    var_path = os.path.join(directory, VARIABLES_FILE)
    if not os.path.isfile(var_path):
        raise FileNotFoundError(f"{var_path}: missing (the model directory is incomplete)")
    with open(var_path, "rb") as f:
        try:
            variables = flax.serialization.msgpack_restore(f.read())
        except Exception as e:  # msgpack raises several unrelated types on corrupt data
            raise ValueError(f"{var_path}: cannot decode ({type(e).__name__}: {e})") from e
    _check_variables(model, variables, var_path)
    names = meta.get("class_names")
    ids = meta.get("category_ids") or _default_category_ids(model.num_classes)
    return LoadedModel(model, variables, list(names) if names is not None else None,
                       [int(i) for i in ids], f"model directory {directory}",
                       step=meta.get("step"), preprocess=meta.get("preprocess"))


def _default_category_ids(num_classes: int) -> list[int]:
    from retinanet_jax.evaluation.loop import default_category_ids

    return default_category_ids(num_classes)


# ------------------------------------------------------------------------------ torchvision .pth


def _guess_variant(sd: dict) -> str:
    # v2 heads have GroupNorm after each conv: conv.0.1 exists only there.
    return "v2" if "head.classification_head.conv.0.1.weight" in sd else "v1"


def _load_pth(path: str, *, variant: Optional[str], backbone: Optional[str],
              num_classes: Optional[int], class_names: Optional[Sequence[str]]) -> LoadedModel:
    from retinanet_jax.interop import torchvision as port

    try:
        sd = port._read_state_dict(path)  # torch.load(weights_only=True); code is refused
        classifier = not any(k.startswith(("head.", "backbone.")) for k in sd) and "conv1.weight" in sd
        if classifier:  # an ImageNet ResNet: start a detector from its body
            k = num_classes or (len(class_names) if class_names else len(COCO_V1_CATEGORIES))
            model, variables = port.backbone_from_torchvision(
                sd, num_classes=k, variant=variant or "v1", backbone=backbone)
            ids, what = _default_category_ids(k), f"ImageNet backbone {path}"
        else:
            variant = variant or _guess_variant(sd)
            backbone = backbone or port.guess_backbone(sd) or "resnet50"
            model, variables = port.from_torchvision(sd, variant, num_classes=num_classes,
                                                     backbone=backbone)
            # torchvision's labels are the dataset's category ids (0 = background).
            ids, what = list(range(model.num_classes)), f"torchvision RetinaNet {variant} {path}"
    except (ValueError, KeyError) as e:
        raise ValueError(f"{path}: {e}") from e
    if class_names is None and not classifier and model.num_classes == len(COCO_V1_CATEGORIES):
        class_names = list(COCO_V1_CATEGORIES)  # torchvision's COCO numbering
    return LoadedModel(model, variables, list(class_names) if class_names else None, ids, what)


# ------------------------------------------------------------------------------ training checkpoints


def _find_checkpoints(path: str, step: Optional[int]) -> tuple[str, Optional[int]]:
    """(orbax checkpoints directory, step or None) for a workdir / checkpoints dir / step dir."""
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return os.path.join(path, "checkpoints"), step
    name = os.path.basename(os.path.normpath(path))
    if name.isdigit() and os.path.isdir(os.path.join(path, "state")):
        if step is not None and step != int(name):
            raise ValueError(f"{path} is the checkpoint of step {name}, but step {step} was asked for")
        return os.path.dirname(os.path.normpath(path)), int(name)
    if any(n.isdigit() and os.path.isdir(os.path.join(path, n, "state")) for n in os.listdir(path)):
        return path, step
    raise ValueError(
        f"{path}: not a checkpoint. Expected a torchvision .pth file, a model directory with "
        f"{MODEL_JSON} (retinanet-jax convert), a train.py workdir (with checkpoints/), its "
        "checkpoints/ directory or one step directory in it")


def _restore_training(directory: str, step: Optional[int]) -> tuple[int, dict, dict, dict]:
    """(step, {"params", "frozen_params", "batch_stats"} arrays, config, meta) read-only."""
    import orbax.checkpoint as ocp

    from retinanet_jax.training.checkpoint import _CONFIG, _META, _STATE

    options = ocp.CheckpointManagerOptions(
        read_only=True, create=False, best_mode="max",
        best_fn=lambda metrics: float(metrics["eval/AP"]))  # as Checkpointer's best_metric
    manager = ocp.CheckpointManager(os.path.abspath(directory), options=options, item_handlers={
        _STATE: ocp.PyTreeCheckpointHandler(), _CONFIG: ocp.JsonCheckpointHandler(),
        _META: ocp.JsonCheckpointHandler()})
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
    restored = manager.restore(step, args=ocp.args.Composite(**{
        _STATE: ocp.args.PyTreeRestore(abstract, partial_restore=True,
                                       restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)),
        _CONFIG: ocp.args.JsonRestore(), _META: ocp.args.JsonRestore()}))
    manager.close()
    return int(step), dict(restored[_STATE]), restored[_CONFIG] or {}, restored[_META] or {}


def _spec_from_config(config: dict, class_names: Optional[list]) -> dict:
    # Checkpoints store the spec in meta.extra.model; older ones only have the config.
    m = dict(config.get("model") or {})
    spec = {k: m[k] for k in ("variant", "backbone", "bn_eps", "frozen_bn", "fpn_channels") if k in m}
    spec["num_classes"] = m.get("num_classes") or len(class_names or [])
    return spec


def _load_training(path: str, step: Optional[int]) -> LoadedModel:
    from retinanet_jax.training.step import merge_params

    directory, step = _find_checkpoints(path, step)
    step, state, config, meta = _restore_training(directory, step)
    names = meta.get("class_names")
    spec = (meta.get("extra") or {}).get("model") or _spec_from_config(config, names)
    where = f"{directory}/{step}"
    model = build_model(spec, where)
    variables = {"params": merge_params(state.get("params") or {}, state.get("frozen_params") or {}),
                 "batch_stats": state.get("batch_stats") or {}}
    _check_variables(model, variables, where)
    ev = config.get("eval") or {}
    pre = {k: ev[k] for k in ("min_size", "max_size") if k in ev} or None
    ids = (meta.get("extra") or {}).get("category_ids") or _default_category_ids(model.num_classes)
    return LoadedModel(model, variables, list(names) if names else None,
                       list(ids), f"train.py checkpoint {where}",
                       step=step, config=config, preprocess=pre)


# ------------------------------------------------------------------------------ entry point


def load_model(path: str, *, variant: Optional[str] = None, backbone: Optional[str] = None,
               num_classes: Optional[int] = None, step: Optional[int] = None,
               class_names: Optional[Sequence[str]] = None) -> LoadedModel:
    """Model, variables and class names from ``path`` (any kind in the module doc).

    ``variant`` / ``backbone`` / ``num_classes`` apply to ``.pth`` files (None = read from the
    keys; ``num_classes`` different from the checkpoint's re-initialises the class conv).
    ``step`` selects a training checkpoint step. ``class_names`` replaces stored names (one
    per classifier output). Errors name ``path`` and what is wrong.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    if os.path.isfile(path):
        loaded = _load_pth(path, variant=variant, backbone=backbone, num_classes=num_classes,
                           class_names=class_names)
    else:
        given = [n for n, v in (("variant", variant), ("backbone", backbone), ("num_classes", num_classes))
                 if v is not None]
        if given:
            raise ValueError(f"{path}: {', '.join(given)} only apply to torchvision .pth files; a "
                             "directory stores its architecture")
        if os.path.isfile(os.path.join(path, MODEL_JSON)):
            loaded = _load_model_dir(path)
        else:
            loaded = _load_training(path, step)
        if class_names is not None:
            loaded.class_names = list(class_names)
    if loaded.class_names is not None and len(loaded.class_names) != loaded.model.num_classes:
        raise ValueError(
            f"{path}: {len(loaded.class_names)} class names for a model with "
            f"{loaded.model.num_classes} outputs (give one name per output; torchvision models "
            "count the background label 0 too)")
    return loaded
