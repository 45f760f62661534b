"""``load_model(path)``: a whole model from any checkpoint the command line accepts.

- a ``.pth`` / ``.pt`` file: torchvision RetinaNet or ImageNet ResNet (``interop.model_dir.load_pth``);
- a model directory with ``model.json`` (``interop.model_dir.load_model_dir``);
- a ``train.py`` workdir, its ``checkpoints/`` directory or one step directory in it
  (``training.checkpoint.load_trained``): the best step by ``eval/AP`` by default (the latest if
  none was evaluated), or ``step=``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from retinanet_jax.data.categories import default_category_ids
from retinanet_jax.interop.model_dir import MODEL_JSON, LoadedModel, is_model_dir, load_model_dir, load_pth


def _load_training(path: str, step: int | None) -> LoadedModel:
    from retinanet_jax.training import checkpoint

    if checkpoint.find_checkpoints(path, step) is None:
        raise ValueError(
            f"{path}: not a checkpoint. Expected a torchvision .pth file, a model directory with "
            f"{MODEL_JSON} (retinanet-jax convert), a train.py workdir (with checkpoints/), its "
            "checkpoints/ directory or one step directory in it"
        )
    t = checkpoint.load_trained(path, step)
    return LoadedModel(
        t.model,
        t.variables,
        t.class_names,
        t.category_ids or default_category_ids(t.model.num_classes),
        f"train.py checkpoint {t.where}",
        step=t.step,
        config=t.config,
        preprocess=t.preprocess,
    )


def load_model(
    path: str,
    *,
    variant: str | None = None,
    backbone: str | None = None,
    num_classes: int | None = None,
    step: int | None = None,
    class_names: Sequence[str] | None = None,
) -> LoadedModel:
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
        loaded = load_pth(
            path, variant=variant, backbone=backbone, num_classes=num_classes, class_names=class_names
        )
    else:
        given = [
            n
            for n, v in (("variant", variant), ("backbone", backbone), ("num_classes", num_classes))
            if v is not None
        ]
        if given:
            raise ValueError(
                f"{path}: {', '.join(given)} only apply to torchvision .pth files; a "
                "directory stores its architecture"
            )
        loaded = load_model_dir(path) if is_model_dir(path) else _load_training(path, step)
        if class_names is not None:
            loaded.class_names = list(class_names)
    if loaded.class_names is not None and len(loaded.class_names) != loaded.model.num_classes:
        raise ValueError(
            f"{path}: {len(loaded.class_names)} class names for a model with "
            f"{loaded.model.num_classes} outputs (give one name per output; torchvision models "
            "count the background label 0 too)"
        )
    return loaded
