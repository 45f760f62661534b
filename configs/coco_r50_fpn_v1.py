"""torchvision ``retinanet_resnet50_fpn`` on COCO 2017: expected box AP 36.4.

AP 36.4 is ``RetinaNet_ResNet50_FPN_Weights.COCO_V1``'s documented ``box_map`` (torchvision
model docs), trained with references/detection/README.md "RetinaNet":
``--dataset coco --model retinanet_resnet50_fpn --epochs 26 --lr-steps 16 22
--aspect-ratio-group-factor 3 --lr 0.01 --weights-backbone ResNet50_Weights.IMAGENET1K_V1``.
Every default is in base.py, which is exactly this recipe (see the citations there).

  python train.py --config configs/coco_r50_fpn_v1.py --workdir gs://bucket/run \\
      --config.init.backbone_checkpoint=/path/resnet50-0676ba61.pth   # IMAGENET1K_V1
"""

import os
import runpy


def get_config():
    return runpy.run_path(os.path.join(os.path.dirname(__file__), "base.py"))["get_config"]()
