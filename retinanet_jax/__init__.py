"""retinanet_jax: RetinaNet in JAX/Flax, exact to torchvision's retinanet_resnet50_fpn(_v2)."""
