"""torchvision state_dict <-> flax variables for RetinaNet (the only module that may import torch).

Naming: a flax path maps to a torchvision key by writing ``_N`` as ``.N`` in module names
(``backbone/body/layer1_0/downsample_1`` -> ``backbone.body.layer1.0.downsample.1``) and renaming
leaves (kernel/scale -> weight, mean/var -> running_mean/running_var). Conv kernels are HWIO here,
OIHW in torch. Values are copied bit for bit; torch is imported lazily and only to read ``.pth``
files or convert torch tensors, so numpy state_dicts work without torch.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Callable, Mapping
from typing import Any, Union

import flax
import jax
import jax.numpy as jnp
import numpy as np

from retinanet_jax.models.heads import CLS_PRIOR_BIAS, PRIOR_PROBABILITY
from retinanet_jax.models.resnet import RESNET_SPECS
from retinanet_jax.models.retinanet import RetinaNet

log = logging.getLogger(__name__)

StateDictSource = Union[str, "os.PathLike[str]", Mapping[str, Any]]

_LEAF_TO_TORCH = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
    "num_batches_tracked": "num_batches_tracked",
}
_CLS_KEYS = ("head.classification_head.cls_logits.weight", "head.classification_head.cls_logits.bias")
_NBT = "num_batches_tracked"
_BODY = "backbone.body."


def torch_key(path: tuple[str, ...]) -> str:
    """Flax variable path (without the collection) -> torchvision state_dict key."""
    modules = [re.sub(r"_(\d+)(?=_|$)", r".\1", p) for p in path[:-1]]
    return ".".join(modules + [_LEAF_TO_TORCH[path[-1]]])


def _layout(model: RetinaNet) -> dict[str, tuple[str, tuple[str, ...], tuple[int, ...], Any]]:
    """torch key -> (collection, flax path, torch shape, flax dtype) for every variable of model."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.float32)))
    out = {}
    for (collection, *path), s in flax.traverse_util.flatten_dict(shapes).items():
        shape = s.shape
        if path[-1] == "kernel":
            shape = (shape[3], shape[2], shape[0], shape[1])
        out[torch_key(tuple(path))] = (collection, tuple(path), tuple(shape), s.dtype)
    return out


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # a torch tensor; numpy has no bfloat16, so widen it
        t = value.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy()
    return np.asarray(value)


def read_state_dict(src: StateDictSource) -> dict[str, np.ndarray]:
    """``src`` (a ``.pth`` path or a mapping) -> ``{key: numpy array}``; files are read with
    ``torch.load(weights_only=True)``, so a pickle that would run code is refused."""
    if isinstance(src, Mapping):
        obj: Any = src
    else:
        path = os.fspath(src)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint not found: {path}")
        try:
            import torch
        except ImportError as e:
            raise ImportError(f"reading {path} needs torch; or pass a state_dict of numpy arrays") from e
        try:
            # weights_only: a pickle that would construct arbitrary objects (run code) is refused.
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:  # torch's weights-only unpickler refused the content
            detail = str(e).strip().splitlines()
            raise ValueError(
                f"refusing to load {path}: not a plain tensor checkpoint readable with "
                f"torch.load(weights_only=True) ({type(e).__name__}: {detail[0] if detail else ''})"
            ) from e
        except RuntimeError as e:  # torch's own report of a file it cannot read (corrupt zip, ...)
            raise ValueError(f"{path}: cannot read this torch file: {e}") from e
        # Training checkpoints of torchvision's references wrap the weights as {"model": sd, ...}.
        for wrapper in ("model", "state_dict"):
            if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise ValueError(f"expected a state_dict (str -> tensor mapping), got {type(obj).__name__}")
    sd = {k: _to_numpy(v) for k, v in obj.items()}
    if sd and all(k.startswith("module.") for k in sd):  # saved from DistributedDataParallel
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _rename_legacy_keys(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Version-1 names -> current ones, as torchvision's _load_from_state_dict hooks do.

    RetinaNetClassification/RegressionHead (_v1_to_v2_weights): ``conv.{2i}.w`` -> ``conv.{i}.0.w``;
    FeaturePyramidNetwork: ``inner_blocks.{i}.w`` / ``layer_blocks.{i}.w`` -> ``...{i}.0.w``.
    """
    sd = dict(sd)
    renames = {}
    for head in ("classification_head", "regression_head"):
        for i in range(4):
            for t in ("weight", "bias"):
                renames[f"head.{head}.conv.{2 * i}.{t}"] = f"head.{head}.conv.{i}.0.{t}"
    for block in ("inner_blocks", "layer_blocks"):
        for i in range(3):
            for t in ("weight", "bias"):
                renames[f"backbone.fpn.{block}.{i}.{t}"] = f"backbone.fpn.{block}.{i}.0.{t}"
    for old, new in renames.items():
        if old in sd and new not in sd:
            sd[new] = sd.pop(old)
    return sd


def guess_backbone(sd: Mapping[str, Any], prefix: str = _BODY) -> str | None:
    """Name in RESNET_SPECS whose layout matches the ResNet keys under ``prefix``, else None."""
    depths = []
    for stage in range(1, 5):
        blocks = {
            int(m.group(1)) for k in sd if (m := re.match(rf"{re.escape(prefix)}layer{stage}\.(\d+)\.", k))
        }
        depths.append(max(blocks) + 1 if blocks else 0)
    conv2 = sd.get(f"{prefix}layer1.0.conv2.weight")
    if conv2 is None:
        return None
    bottleneck = f"{prefix}layer1.0.conv3.weight" in sd
    groups = int(conv2.shape[0]) // int(conv2.shape[1])
    width = int(conv2.shape[0]) // groups if bottleneck else 64
    for name, (kind, spec_depths, g, w) in RESNET_SPECS.items():
        if (
            (kind == "bottleneck") == bottleneck
            and tuple(depths) == spec_depths
            and (g, w) == (groups, width)
        ):
            return name
    return None


def _hint(sd: Mapping[str, Any], variant: str, backbone: str) -> str:
    hints = []
    if any(k.startswith(("rpn.", "roi_heads.")) for k in sd):
        hints.append("this looks like a Faster/Mask R-CNN checkpoint, not a RetinaNet")
    elif "fc.weight" in sd and not any(k.startswith("head.") for k in sd):
        hints.append("this looks like an ImageNet classifier; use backbone_from_torchvision")
    else:
        found = "v2" if "head.classification_head.conv.0.1.weight" in sd else "v1"
        if any(k.startswith("head.") for k in sd) and found != variant:
            hints.append(f"the head looks like variant={found!r}")
        guess = guess_backbone(sd)
        if guess is not None and guess != backbone:
            hints.append(f"the backbone looks like {guess!r}")
    return f" ({'; '.join(hints)})" if hints else ""


def _check_keys(
    layout: Mapping[str, tuple],
    sd: Mapping[str, np.ndarray],
    optional: set[str],
    what: str,
    hint: Callable[[], str],
) -> None:
    """ValueError on any missing/unexpected key or shape mismatch (``optional`` may be absent).

    ``hint()`` (a guess at what the checkpoint really is) is only computed for the error message.
    """
    missing = [k for k in layout if k not in sd and k not in optional]
    unexpected = [k for k in sd if k not in layout]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)})")
        if unexpected:
            parts.append(
                f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)})"
            )
        raise ValueError(f"state_dict does not fit {what}: {'; '.join(parts)}{hint()}")
    for k, v in sd.items():
        if tuple(v.shape) != layout[k][2]:
            raise ValueError(
                f"{k}: checkpoint shape {tuple(v.shape)} != model shape {layout[k][2]} for {what}{hint()}"
            )


def _to_flax_value(key: str, value: np.ndarray, flax_dtype: Any) -> jax.Array:
    if key.endswith(_NBT):
        if not 0 <= int(value) <= np.iinfo(np.int32).max:
            raise ValueError(f"{key}: {int(value)} does not fit int32")
        return jnp.array(value, jnp.int32, copy=True)
    if value.ndim == 4:
        value = np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO
    # copy=True: on CPU jnp.asarray may alias the numpy buffer, which may be a live torch tensor's
    # memory that torch later updates in place. float32 -> float32 is bit exact.
    return jnp.array(np.ascontiguousarray(value), flax_dtype, copy=True)


def _assemble(layout: Mapping[str, tuple], values: Mapping[str, jax.Array]) -> dict[str, Any]:
    flat = {(layout[k][0],) + layout[k][1]: v for k, v in values.items()}
    return flax.traverse_util.unflatten_dict(flat)


def _report_skipped(skipped: list[str], report: list | None, why: str) -> None:
    if skipped:
        log.warning("torchvision checkpoint: skipped %s (%s)", skipped, why)
        if report is not None:
            report.extend(skipped)


def from_torchvision(
    src: StateDictSource,
    variant: str = "v1",
    *,
    num_classes: int | None = None,
    bn_eps: float | None = None,
    backbone: str = "resnet50",
    frozen_bn: bool | None = None,
    dtype: Any = jnp.float32,
    report: list | None = None,
    seed: int = 0,
) -> tuple[RetinaNet, dict[str, Any]]:
    """Build a RetinaNet and its variables from a torchvision retinanet_resnet50_fpn(_v2) state_dict.

    src: a ``.pth`` path (read with ``torch.load(weights_only=True)``; a file that would run code
    is refused with ValueError) or a mapping of torch tensors / numpy arrays. Old (version 1) key
    names are accepted. ``num_classes``: None = the checkpoint's (cls_logits rows / 9); another K
    keeps everything but ``head.classification_head.cls_logits.{weight,bias}``, which are
    re-initialised as torchvision does (normal std 0.01, prior bias, PRNG ``seed``); those keys
    are logged as a warning and appended to ``report`` (a list) if given.
    bn_eps: None = 1e-5 if the checkpoint has BatchNorm2d buffers (num_batches_tracked) or is v2,
    else 0.0 (v1 COCO_V1 weights run FrozenBatchNorm2d with overwrite_eps(0.0)).
    frozen_bn: None = True iff the checkpoint has no num_batches_tracked (FrozenBatchNorm2d).
    With frozen_bn=False the counters are kept in batch_stats so to_torchvision restores them.
    Any other mismatch (missing/unexpected key, shape, architecture) raises ValueError.
    Returns (model, {"params", "batch_stats"}).
    """
    sd = _rename_legacy_keys(read_state_dict(src))
    has_nbt = any(k.endswith("." + _NBT) for k in sd)
    if _CLS_KEYS[0] not in sd:
        raise ValueError(f"not a RetinaNet state_dict: no {_CLS_KEYS[0]!r}{_hint(sd, variant, backbone)}")
    num_anchors = 9
    rows = int(sd[_CLS_KEYS[0]].shape[0])
    if rows % num_anchors:
        raise ValueError(f"{_CLS_KEYS[0]}: {rows} output channels is not a multiple of {num_anchors} anchors")
    ckpt_classes = rows // num_anchors
    num_classes = ckpt_classes if num_classes is None else int(num_classes)
    if bn_eps is None:
        bn_eps = 1e-5 if (has_nbt or variant == "v2") else 0.0
    if frozen_bn is None:
        frozen_bn = not has_nbt
    model = RetinaNet(
        num_classes=num_classes,
        variant=variant,
        backbone=backbone,
        bn_eps=float(bn_eps),
        frozen_bn=frozen_bn,
        num_anchors=num_anchors,
        dtype=dtype,
    )
    layout = _layout(model)
    what = f"RetinaNet(variant={variant!r}, backbone={backbone!r}, num_classes={num_classes})"

    skipped = []
    if num_classes != ckpt_classes:
        skipped = [k for k in _CLS_KEYS if k in sd]
        sd = {k: v for k, v in sd.items() if k not in _CLS_KEYS}
    if frozen_bn:  # FrozenBatchNorm2d drops the counters too (its _load_from_state_dict)
        sd = {k: v for k, v in sd.items() if not (k.endswith("." + _NBT) and k not in layout)}
    optional = {k for k in layout if k.endswith("." + _NBT)} | (set(_CLS_KEYS) if skipped else set())
    _check_keys(layout, sd, optional, what, lambda: _hint(sd, variant, backbone))

    values = {k: _to_flax_value(k, sd[k], layout[k][3]) for k in layout if k in sd}
    for k in layout:
        if k not in values and k.endswith("." + _NBT):
            values[k] = jnp.zeros((), jnp.int32)  # torch BatchNorm loading a version-1 dict does the same
    if skipped:
        w_shape = layout[_CLS_KEYS[0]][2]
        hwio = (w_shape[2], w_shape[3], w_shape[1], w_shape[0])
        values[_CLS_KEYS[0]] = 0.01 * jax.random.normal(jax.random.key(seed), hwio, jnp.float32)
        values[_CLS_KEYS[1]] = jnp.full(layout[_CLS_KEYS[1]][2], CLS_PRIOR_BIAS, jnp.float32)
        why = (
            f"checkpoint has {ckpt_classes} classes, model {num_classes}; "
            f"re-initialised, prior {PRIOR_PROBABILITY}"
        )
        _report_skipped(skipped, report, why)
    return model, _assemble(layout, values)


def backbone_from_torchvision(
    src: StateDictSource,
    *,
    num_classes: int = 91,
    variant: str = "v1",
    backbone: str | None = None,
    bn_eps: float = 1e-5,
    frozen_bn: bool | None = None,
    dtype: Any = jnp.float32,
    report: list | None = None,
    seed: int = 0,
) -> tuple[RetinaNet, dict[str, Any]]:
    """RetinaNet whose ResNet body comes from an ImageNet classifier state_dict (torchvision.models.resnet*).

    Keys ``conv1``/``bn1``/``layer*`` fill ``backbone.body``; ``fc.*`` is skipped (logged, appended to
    ``report``); FPN and heads get torchvision's random init from PRNG ``seed``. backbone: None =
    inferred from the keys. frozen_bn: None = True for v1 (FrozenBatchNorm2d, as
    retinanet_resnet50_fpn with weights_backbone) and False for v2 (BatchNorm2d). bn_eps 1e-5 is
    torchvision's for both. Any other mismatch raises ValueError.
    """
    sd = read_state_dict(src)
    if any(k.startswith(("backbone.", "head.")) for k in sd):
        raise ValueError("this is a detection state_dict, not an ImageNet classifier; use from_torchvision")
    if backbone is None:
        backbone = guess_backbone(sd, prefix="")
        if backbone is None:
            raise ValueError(
                "state_dict does not look like a supported torchvision ResNet/ResNeXt classifier"
            )
    if frozen_bn is None:
        frozen_bn = variant == "v1"
    model = RetinaNet(
        num_classes=num_classes,
        variant=variant,
        backbone=backbone,
        bn_eps=bn_eps,
        frozen_bn=frozen_bn,
        dtype=dtype,
    )
    layout = _layout(model)
    body_layout = {k[len(_BODY) :]: v for k, v in layout.items() if k.startswith(_BODY)}
    skipped = [k for k in sd if k.startswith("fc.")]
    sd = {k: v for k, v in sd.items() if k not in skipped}
    if frozen_bn:
        sd = {k: v for k, v in sd.items() if not (k.endswith("." + _NBT) and k not in body_layout)}
    optional = {k for k in body_layout if k.endswith("." + _NBT)}
    _check_keys(body_layout, sd, optional, f"torchvision {backbone}", lambda: "")

    # "rbg" keys: same distributions, but XLA compiles RngBitGenerator much faster than threefry
    # for the ~150 parameter tensors (tens of seconds on a small CPU).
    key = jax.random.key(seed, impl="rbg")
    variables = jax.jit(model.init)(key, jnp.zeros((1, 64, 64, 3), jnp.float32))
    flat = flax.traverse_util.flatten_dict(variables)
    for k, (collection, path, _, flax_dtype) in body_layout.items():
        if k in sd:
            flat[(collection,) + path] = _to_flax_value(k, sd[k], flax_dtype)
    _report_skipped(skipped, report, "classifier layer, not part of the detector")
    return model, flax.traverse_util.unflatten_dict(flat)


def to_torchvision(model: RetinaNet, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """variables of ``model`` -> torchvision state_dict (numpy, float32; num_batches_tracked int64).

    torchvision's retinanet_resnet50_fpn(_v2)(num_classes=model.num_classes) loads it with
    ``load_state_dict(strict=True)``; ``to_torchvision(*from_torchvision(sd)) == sd`` bit for bit.
    """
    layout = _layout(model)
    flat = flax.traverse_util.flatten_dict(dict(variables))
    by_path = {(c,) + p: k for k, (c, p, _, _) in layout.items()}
    out = {}
    for fpath, value in flat.items():
        if fpath not in by_path:
            raise ValueError(f"variable {'/'.join(fpath)} is not part of {model}")
        key = by_path[fpath]
        arr = np.array(jax.device_get(value), copy=True)  # writable, owned: torch.from_numpy-safe
        if key.endswith("." + _NBT):
            arr = np.asarray(arr, np.int64)
        elif arr.ndim == 4:
            arr = np.ascontiguousarray(np.transpose(arr, (3, 2, 0, 1)))  # HWIO -> OIHW
        else:
            arr = np.asarray(arr, np.float32)
        if tuple(arr.shape) != layout[key][2]:
            raise ValueError(f"{'/'.join(fpath)}: shape {arr.shape} != {layout[key][2]} expected by {key}")
        out[key] = arr
    missing = [k for k in layout if k not in out]
    if missing:
        raise ValueError(f"variables lack {missing[:5]} ({len(missing)} missing)")
    return out


def save_pth(sd: Mapping[str, np.ndarray], path: str) -> None:
    """Write a state_dict of numpy arrays as a torch ``.pth`` (atomically: tmp file, rename)."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"writing {path} needs torch (pip install torch)") from e
    tmp = path + ".tmp"
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, tmp)
    os.replace(tmp, path)


def verify_pth(path: str, model: RetinaNet) -> str:
    """Reload ``path`` into torchvision's RetinaNet with strict=True when that model exists.

    Returns what was checked, as a sentence; ``ValueError`` if torchvision refuses the file."""
    from retinanet_jax.ops.anchors import DEFAULT_ASPECT_RATIOS, DEFAULT_SIZES, model_anchor_config

    if (
        model.backbone != "resnet50"
        or model.fpn_channels != 256
        or model_anchor_config(model) != (DEFAULT_SIZES, DEFAULT_ASPECT_RATIOS)
    ):
        return "not verified: torchvision has no builder for this backbone / FPN width / anchors"
    try:
        import torch
        import torchvision.models.detection as tvd
    except ImportError:
        return "not verified: torchvision is not installed"
    build = tvd.retinanet_resnet50_fpn if model.variant == "v1" else tvd.retinanet_resnet50_fpn_v2
    tv = build(weights=None, weights_backbone=None, num_classes=model.num_classes)
    try:
        tv.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    except RuntimeError as e:  # torch's missing / unexpected keys or shape report
        raise ValueError(f"{path}: torchvision {build.__name__} refuses it: {e}") from e
    return (
        f"verified: torchvision {build.__name__}(num_classes={model.num_classes}) loads it with strict=True"
    )
