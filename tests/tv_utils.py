"""torchvision reference models for parity tests (shared by every engineer's tests).

``make_tv_model`` builds torchvision's retinanet_resnet50_fpn(_v2) with random but "lively" weights:
BatchNorm statistics calibrated on random images so features stay O(1), non-trivial affine/bias
values everywhere (a swapped or dropped tensor changes the outputs), and class logits spread so
that random images give hundreds of detections above torchvision's 0.05 score threshold.
"""

from __future__ import annotations

import copy
import functools
import math
from typing import Any

import numpy as np
import torch
import torchvision
from torchvision.models.detection import retinanet as tv_retinanet
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import misc as tv_misc
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _builder(variant: str):
    return {
        "v1": torchvision.models.detection.retinanet_resnet50_fpn,
        "v2": torchvision.models.detection.retinanet_resnet50_fpn_v2,
    }[variant]


def random_images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Uniform [0, 1) images [B, 3, H, W] normalized with ImageNet mean/std (what the model sees)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, height, width, generator=g)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def _make_lively(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + 1)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    def unif(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    heads = (model.head.classification_head, model.head.regression_head)
    calib = random_images(2, 160, 192, seed=seed + 2)
    # Head towers: torchvision's std 0.01 shrinks features ~10x per conv; use variance-preserving
    # weights so the heads see (and pass on) O(1) signals.
    for head in heads:
        for m in head.conv.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_(randn(*m.weight.shape) * math.sqrt(2.0 / m.weight[0].numel()))
    # BatchNorm running stats = statistics of random images (one train-mode pass, cumulative
    # average), so activations stay bounded through the 50 layers.
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.backbone.train()
    model.backbone(calib)
    model.eval()
    for m in bns:
        m.momentum = 0.1
        m.running_mean.add_(0.1 * randn(*m.running_mean.shape))
        m.running_var.mul_(unif(0.8, 1.25, *m.running_var.shape))
    # Non-trivial affine parameters and biases everywhere, so a dropped or swapped tensor shows.
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
            # The residual branch's last BN small: the identity path dominates, C5 stays O(10).
            lo, hi = (0.2, 0.5) if name.endswith("bn3") else (0.6, 1.4)
            m.weight.copy_(unif(lo, hi, *m.weight.shape))
            m.bias.copy_(0.1 * randn(*m.bias.shape))
            if isinstance(m, torch.nn.BatchNorm2d):
                # Near-dead channels (running_var ~1e-5, as trained checkpoints have) make BN eps
                # matter: eps 0 vs 1e-5 changes them by ~20%, so an eps mix-up fails parity.
                dead = torch.rand(m.num_features, generator=g) < 0.03
                var = 1e-5 * unif(1.0, 4.0, m.num_features)
                m.running_var.copy_(torch.where(dead, var, m.running_var))
                m.weight.copy_(torch.where(dead, var.sqrt() * m.weight, m.weight))
        elif isinstance(m, torch.nn.Conv2d) and m.bias is not None:
            m.bias.add_(0.05 * randn(*m.bias.shape))
    feats = list(model.backbone(calib).values())
    if not isinstance(model.head.classification_head.conv[0][-1], torch.nn.GroupNorm):
        # v1 heads have no normalisation: bring the pyramid's scale to 1 at the first conv.
        rms = torch.cat([f.flatten() for f in feats]).pow(2).mean().sqrt()
        for head in heads:
            head.conv[0][0].weight.div_(rms)
    # Final convs: class logits with std 1.2 around a -4.5 +- 0.5 bias (scores up to ~0.95, ~10%
    # above 0.05), box deltas with std 0.5 (boxes differ visibly from their anchors).
    for head, final, target in ((heads[0], heads[0].cls_logits, 1.2), (heads[1], heads[1].bbox_reg, 0.5)):
        z = torch.cat([(final(head.conv(f)) - final.bias.view(1, -1, 1, 1)).flatten() for f in feats])
        final.weight.mul_(target / z.std())
    cls = model.head.classification_head.cls_logits
    cls.bias.copy_(-4.5 + 0.5 * randn(*cls.bias.shape))
    reg = model.head.regression_head.bbox_reg
    reg.bias.copy_(0.1 * randn(*reg.bias.shape))


@functools.lru_cache(maxsize=8)
def _cached_model(
    variant: str, num_classes: int, seed: int, lively: bool, frozen_bn: bool
) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = _builder(variant)(weights=None, weights_backbone=None, num_classes=num_classes)
    model.eval()
    if lively:
        _make_lively(model, seed)
    if frozen_bn:
        # The COCO_V1 checkpoint's layout: FrozenBatchNorm2d (no num_batches_tracked) with eps 0.0.
        if variant != "v1":
            raise ValueError("frozen_bn=True reproduces the v1 COCO_V1 checkpoint layout only")
        sd = model.state_dict()
        body = torchvision.models.resnet50(norm_layer=tv_misc.FrozenBatchNorm2d)
        backbone = _resnet_fpn_extractor(
            body, 5, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256)
        )
        model = tv_retinanet.RetinaNet(backbone, num_classes)
        model.load_state_dict(sd)
        torchvision.models.detection._utils.overwrite_eps(model, 0.0)
        model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def make_tv_model(
    variant: str, num_classes: int = 91, seed: int = 0, lively: bool = True, frozen_bn: bool = False
) -> torch.nn.Module:
    """torchvision RetinaNet ("v1" | "v2"), weights=None, eval mode, deterministic in ``seed``.

    Built as retinanet_resnet50_fpn(_v2)(weights=None, weights_backbone=None), i.e. BatchNorm2d with
    eps 1e-5. ``frozen_bn=True`` (v1 only) gives the COCO_V1 layout instead: FrozenBatchNorm2d, eps
    0.0, no num_batches_tracked. Returns a fresh copy (safe to modify); building is cached.
    """
    return copy.deepcopy(_cached_model(variant, num_classes, seed, lively, frozen_bn))


def tv_state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """model.state_dict() as numpy arrays (copies), keys and dtypes unchanged."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def make_jax_from_tv(
    variant: str,
    num_classes: int = 91,
    seed: int = 0,
    lively: bool = True,
    frozen_bn: bool = False,
    dtype: Any = None,
) -> tuple[torch.nn.Module, Any, dict]:
    """(tv_model, jax_model, variables): the same weights on both sides, matching BN eps."""
    import jax.numpy as jnp

    from retinanet_jax.interop.torchvision import from_torchvision

    tv = make_tv_model(variant, num_classes, seed, lively, frozen_bn)
    model, variables = from_torchvision(
        tv_state_dict_numpy(tv), variant, dtype=jnp.float32 if dtype is None else dtype
    )
    return tv, model, variables


@torch.no_grad()
def tv_head_outputs(tv_model: torch.nn.Module, images_nchw: torch.Tensor) -> dict[str, np.ndarray]:
    """torchvision backbone + head on an already normalized, padded batch [B,3,H,W] (no transform).

    Returns {"cls_logits" [B, A, K], "bbox_regression" [B, A, 4]} as float32 numpy.
    """
    feats = list(tv_model.backbone(images_nchw).values())
    out = tv_model.head(feats)
    return {k: v.numpy() for k, v in out.items()}


def nchw_to_nhwc(x: torch.Tensor) -> np.ndarray:
    """torch [B,C,H,W] -> numpy [B,H,W,C] float32."""
    return np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())
