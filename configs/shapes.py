"""Default config: the synthetic shapes dataset, a small model trained from scratch in minutes.

Shapes (retinanet_jax.data.ShapesSource): 5 classes of filled polygons / circles on a noisy
background, 128x128 images, 8000 train / 500 validation images generated on the fly.
Measured on a shared 2-core CPU (load ~8): 256 px with a 128-channel FPN ran 1.2 img/s,
128 px with a 64-channel FPN 6 img/s, so the default is the latter: 3000 steps of 8 images,
about an hour there, minutes on one GPU.
Settings differ from base.py (the torchvision COCO v1 recipe) where a tiny from-scratch run
needs it; each override says why.

  python train.py --config configs/shapes.py --workdir /tmp/shapes
  python train.py --config configs/shapes.py --workdir /tmp/shapes --config.batch_size=16
  # on a small CPU machine: --config.dataset.train.num_images=2000 for a 15-minute run
"""

import os
import runpy


def get_config():
    c = runpy.run_path(os.path.join(os.path.dirname(__file__), "base.py"))["get_config"]()
    c.dataset.source = "shapes"
    # Objects 19..77 px (0.15..0.6 of 128): the smallest anchors are 32 px, so much smaller
    # objects would only match through low-quality matches.
    shapes = {"image_size": 128, "object_size": (0.15, 0.6), "max_objects": 6, "empty_fraction": 0.05}
    c.dataset.train = {"split": "train", "num_images": 8000, **shapes}
    c.dataset.val = {"split": "validation", "num_images": 500, **shapes}
    c.dataset.drop_empty_train = False  # a few empty images are part of the task
    c.input.min_sizes = (128,)  # images are generated at the training size: no resize
    c.input.max_size = 128
    c.input.max_boxes = 16  # ShapesSource max_objects=6 by default; small G = cheap matching
    c.input.worker_count = 0  # generation is cheap; no extra processes on small machines
    c.eval.min_size = 128
    c.eval.max_size = 128
    c.eval.batch_size = 8
    c.eval.detections_per_img = 100  # COCOeval counts at most 100 per image

    c.model.backbone = "resnet18"  # small and fast; 128 px shapes need no ResNet-50
    c.model.variant = "v2"  # GroupNorm head trains well from scratch (torchvision v2 design)
    c.model.frozen_bn = False  # from scratch: BatchNorm must learn its statistics
    c.model.trainable_backbone_layers = 5  # from scratch: everything trains
    c.model.fpn_channels = 64  # a quarter of torchvision's 256: the head dominates the cost at 128 px
    c.loss.box_loss = "giou"  # v2's loss

    c.batch_size = 8
    c.optim.optimizer = "adamw"  # v2 recipe's optimizer; robust from scratch
    c.optim.base_lr = 1e-3  # 10x the v2 recipe's 1e-4: from scratch, small model, short run
    c.optim.lr_scaling = "none"
    c.optim.weight_decay = 0.05  # v2 recipe
    c.optim.norm_weight_decay = 0.0  # v2 recipe
    c.optim.schedule = "cosine"
    c.optim.epochs = 3  # 3 x 1000 steps at batch 8 (the cosine steps once per epoch, as torchvision's)
    c.optim.milestones = ()
    c.optim.warmup_steps = 200
    c.optim.clip_grad_norm = 10.0  # guards the first from-scratch steps against spikes

    c.eval.every_steps = 1000  # = once per epoch
    c.checkpoint.every_steps = 500
    c.log_every_steps = 50
    return c
