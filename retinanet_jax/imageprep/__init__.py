"""Image preparation, the one place for every caller (training data, predict, export, evaluation).

- ``convert``: any image (PIL mode, array layout) -> uint8 RGB ``[H, W, 3]``.
- ``geometry``: resized size (torchvision's rule), padding, canvas buckets, resize weights.
- ``normalize``: ImageNet mean / std and the normalize (+ resize + pad) forms on device and host.

Bottom layer: imports nothing else from ``retinanet_jax``.
"""
