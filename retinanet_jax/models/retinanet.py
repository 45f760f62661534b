"""RetinaNet network (ResNet + FPN + heads) up to the raw per-anchor outputs.

Mirrors torchvision.models.detection.retinanet_resnet50_fpn ("v1") and _v2 ("v2") between the
GeneralizedRCNNTransform and the postprocessing: ``backbone`` (BackboneWithFPN) then ``head``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from retinanet_jax.models.fpn import FeaturePyramidNetwork
from retinanet_jax.models.heads import RetinaNetHead
from retinanet_jax.models.resnet import ResNet, stage_channels
from retinanet_jax.ops import anchors as anchors_lib

Array = jax.Array

VARIANTS = ("v1", "v2")


class BackboneWithFPN(nn.Module):
    """Mirrors torchvision BackboneWithFPN with returned_layers=[2, 3, 4] and LastLevelP6P7.

    ``__call__(images [B,H,W,3]) -> [P3, P4, P5, P6, P7]`` NHWC, strides 8..128, fpn_channels each.
    """

    backbone: str = "resnet50"
    variant: str = "v1"
    bn_eps: float = 1e-5
    frozen_bn: bool = True
    fpn_channels: int = 256
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: Array, train: bool = False) -> list[Array]:
        _, c3, c4, c5 = ResNet(self.backbone, self.bn_eps, self.frozen_bn, self.dtype, name="body")(
            images, train
        )
        # v2: LastLevelP6P7(2048, 256) has in != out so torchvision feeds it C5; v1's (256, 256) uses P5.
        p6_from_c5 = self.variant == "v2" and stage_channels(self.backbone)[-1] != self.fpn_channels
        fpn = FeaturePyramidNetwork(self.fpn_channels, p6_from_c5, self.dtype, name="fpn")
        return fpn([c3, c4, c5])


class RetinaNet(nn.Module):
    """RetinaNet raw outputs.

    ``__call__(images f32/bf16 [B,H,W,3] normalized, zero padded, H and W multiples of 32,
    train=False) -> {"cls_logits": f32 [B, A, K], "bbox_regression": f32 [B, A, 4]}`` with anchors
    in torchvision's order (level P3..P7, y, x, anchor). ``train`` only matters for
    ``frozen_bn=False`` (batch statistics, needs ``mutable=["batch_stats"]``).
    Variables: {"params", "batch_stats"}; params are float32 whatever ``dtype`` (compute dtype).
    """

    num_classes: int = 91
    variant: str = "v1"
    backbone: str = "resnet50"
    bn_eps: float = 1e-5
    frozen_bn: bool = True
    num_anchors: int = 9
    fpn_channels: int = 256
    dtype: Any = jnp.float32
    # Anchors are not computed by the model, but they define what its outputs mean, so they
    # travel with it (as torchvision's RetinaNet holds its AnchorGenerator). None = torchvision's
    # sizes 32..512 x 2^(0, 1/3, 2/3) and ratios (0.5, 1, 2) per level P3..P7.
    anchor_sizes: tuple[tuple[int, ...], ...] | None = None
    aspect_ratios: tuple[tuple[float, ...], ...] | None = None

    @nn.compact
    def __call__(self, images: Array, train: bool = False) -> dict[str, Array]:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        sizes, ratios = anchors_lib.model_anchor_config(self)
        per_location = {len(s) * len(r) for s, r in zip(sizes, ratios)}
        if per_location != {self.num_anchors} or len(sizes) != len(ratios):
            raise ValueError(
                f"num_anchors={self.num_anchors} but anchor_sizes x aspect_ratios give "
                f"{sorted(per_location)} anchors per location (sizes {sizes}, ratios {ratios})"
            )
        features = BackboneWithFPN(
            self.backbone,
            self.variant,
            self.bn_eps,
            self.frozen_bn,
            self.fpn_channels,
            self.dtype,
            name="backbone",
        )(images, train)
        head = RetinaNetHead(
            self.num_classes, self.num_anchors, group_norm=self.variant == "v2", dtype=self.dtype, name="head"
        )
        return head(features, train)


_BODY_TOP = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")


def frozen_param_mask(params: Any, trainable_backbone_layers: int, *, frozen_bn: bool = True) -> Any:
    """Pytree of bools like ``params``, True = frozen (no update, no optimizer state).

    Mirrors torchvision.models.detection.backbone_utils._resnet_fpn_extractor: the backbone body
    trains ``["layer4", "layer3", "layer2", "layer1", "conv1"][:n]`` (+ ``bn1`` when n == 5), every
    other body parameter is frozen; FPN and heads always train. ``frozen_bn=True`` (the model's
    ``frozen_bn``) also freezes every BatchNorm scale/bias of the body, since torchvision's
    FrozenBatchNorm2d holds them as buffers.
    """
    if not 0 <= trainable_backbone_layers <= 5:
        raise ValueError(f"trainable_backbone_layers must be in [0, 5], got {trainable_backbone_layers}")
    if "backbone" not in params or "body" not in params["backbone"]:
        raise ValueError("frozen_param_mask expects the 'params' collection of a RetinaNet")
    train_tops = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_backbone_layers]
    if trainable_backbone_layers == 5:
        train_tops.append("bn1")

    def frozen(path: tuple[Any, ...], _leaf: Any, is_norm: bool) -> bool:
        names = [str(getattr(k, "key", k)) for k in path]
        if names[:2] != ["backbone", "body"] or len(names) < 3:
            return False
        top = names[2].split("_")[0]  # "layer3_4" -> "layer3"
        if top not in _BODY_TOP:
            raise ValueError(f"unexpected backbone parameter {'/'.join(names)}")
        if frozen_bn and is_norm:  # the body's BatchNorms (bn1/bn2/bn3, downsample_1)
            return True
        return top not in train_tops

    return jax.tree_util.tree_map_with_path(frozen, params, norm_param_mask(params))


def norm_param_mask(params: Any) -> Any:
    """Pytree of bools like ``params``: True for parameters of normalisation layers
    (BatchNorm / GroupNorm / LayerNorm).

    Flax norm layers own a ``scale`` (and usually a ``bias``) and never a ``kernel``, so every
    leaf of a module dict holding ``scale`` but no ``kernel`` is a norm parameter (torchvision's
    ``set_weight_decay`` split by module type, found by structure).
    """

    def visit(node: Any) -> Any:
        if not _is_container(node):
            return False
        is_norm = "scale" in node and "kernel" not in node
        out = {k: visit(v) if _is_container(v) else is_norm for k, v in node.items()}
        # Keep the container type (dict / FrozenDict) so the mask's treedef matches params'.
        return out if type(node) is dict else type(node)(out)

    return visit(params)


def _is_container(v: Any) -> bool:
    return hasattr(v, "items") and not hasattr(v, "shape")
