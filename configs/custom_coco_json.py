"""Fine-tune torchvision's COCO RetinaNet on your own dataset in COCO JSON format.

Starts from ``retinanet_resnet50_fpn_coco-eeacb38b.pth`` (RetinaNet_ResNet50_FPN_Weights.COCO_V1):
everything but the class conv is kept; the class conv is re-initialised for your K classes.
Schedule and optimizer are the torchvision v1 recipe (base.py) shortened for a small dataset.

  python train.py --config configs/custom_coco_json.py --workdir runs/mine \\
      --config.dataset.train.annotation_file=data/train.json \\
      --config.dataset.train.image_dir=data/images \\
      --config.dataset.val.annotation_file=data/val.json --config.dataset.val.image_dir=data/images \\
      --config.init.retinanet_checkpoint=retinanet_resnet50_fpn_coco-eeacb38b.pth
"""

import os
import runpy


def get_config():
    c = runpy.run_path(os.path.join(os.path.dirname(__file__), "base.py"))["get_config"]()
    c.dataset.source = "coco_json"
    c.dataset.train = {"annotation_file": "data/train.json", "image_dir": "data/images"}
    c.dataset.val = {"annotation_file": "data/val.json", "image_dir": "data/images"}
    # Fine-tuning from COCO weights: torchvision's transfer-learning setting is the same
    # model, only shorter (our choice: 12 epochs, steps at 8 and 11 = "1x"-like, scaled).
    c.optim.epochs = 12
    c.optim.milestones = (8, 11)
    c.batch_size = 8  # our choice: one 8-device host or a single GPU with bf16
    c.input.worker_count = 2  # our choice for a workstation
    c.init.retinanet_checkpoint = "retinanet_resnet50_fpn_coco-eeacb38b.pth"
    return c
