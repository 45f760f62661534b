"""torchvision ``retinanet_resnet50_fpn_v2`` on COCO 2017: expected box AP 41.5.

AP 41.5 is ``RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1``'s documented ``box_map``; its recipe
(pytorch/vision PR #5756 "Add RetinaNet improved weights", linked from the weights' docs):
``--weights-backbone ResNet50_Weights.IMAGENET1K_V2 --dataset coco
--model retinanet_resnet50_fpn_v2 --opt adamw --lr 0.0001 --epochs 26 --lr-steps 16 22
--weight-decay 0.05 --norm-weight-decay 0.0 --data-augmentation multiscale --sync-bn``
on 8 GPUs x 2 images. Settings not listed here are base.py's (the v1 recipe, same train.py).

  python train.py --config configs/coco_r50_fpn_v2.py --workdir gs://bucket/run \\
      --config.init.backbone_checkpoint=/path/resnet50-11ad3fa6.pth   # IMAGENET1K_V2
"""

import os
import runpy


def get_config():
    c = runpy.run_path(os.path.join(os.path.dirname(__file__), "base.py"))["get_config"]()
    c.model.variant = "v2"  # --model retinanet_resnet50_fpn_v2 (GN head, P6 from C5)
    # retinanet_resnet50_fpn_v2 builds resnet50 with nn.BatchNorm2d (not frozen); --sync-bn makes
    # its statistics global, which is what a jit over the sharded batch computes.
    c.model.frozen_bn = False
    c.loss.box_loss = "giou"  # retinanet_resnet50_fpn_v2: regression_head._loss_type = "giou"
    c.optim.optimizer = "adamw"  # --opt adamw
    c.optim.base_lr = 1e-4  # --lr 0.0001
    c.optim.lr_scaling = "none"  # the recipe states no batch-size rule for AdamW; keep the lr
    c.optim.weight_decay = 0.05  # --weight-decay 0.05
    c.optim.norm_weight_decay = 0.0  # --norm-weight-decay 0.0
    # --data-augmentation multiscale draws the short side from (480, 512, ..., 800) (presets.py
    # RandomShortestSize, max 1333), but the model's GeneralizedRCNNTransform then resizes every
    # training image to min_size 800 again, so the effective training scale stays 800.
    # Set c.input.min_sizes = tuple(range(480, 801, 32)) for real multi-scale training.
    c.input.min_sizes = (800,)
    return c
