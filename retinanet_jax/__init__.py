"""retinanet_jax: RetinaNet in JAX/Flax, exact to torchvision's retinanet_resnet50_fpn(_v2).

Public API (see DESIGN.md): `from_torchvision`, `to_torchvision`, `predict`, `compute_losses`,
plus the jit-compatible core `RetinaNet`, `anchors_for_image` and `postprocess`.
torch is imported only inside the porting functions, so the package works without it.
"""

from retinanet_jax.inference.postprocess import postprocess
from retinanet_jax.inference.predict import Predictor, predict
from retinanet_jax.interop.torchvision import backbone_from_torchvision, from_torchvision, to_torchvision
from retinanet_jax.models.retinanet import RetinaNet, frozen_param_mask
from retinanet_jax.objective.retinanet_loss import compute_losses, retinanet_losses
from retinanet_jax.ops.anchors import anchors_for_image, num_anchors_per_level

__all__ = [
    "RetinaNet",
    "Predictor",
    "anchors_for_image",
    "backbone_from_torchvision",
    "compute_losses",
    "from_torchvision",
    "frozen_param_mask",
    "num_anchors_per_level",
    "postprocess",
    "predict",
    "retinanet_losses",
    "to_torchvision",
]
