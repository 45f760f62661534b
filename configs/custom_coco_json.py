"""Train RetinaNet on your own dataset in COCO JSON format: fine-tune (default) or from scratch.

Default (no argument): fine-tune torchvision's COCO RetinaNet. Starts from
``retinanet_resnet50_fpn_coco-eeacb38b.pth`` (RetinaNet_ResNet50_FPN_Weights.COCO_V1):
everything but the class conv is kept; the class conv is re-initialised for your K classes.
Schedule and optimizer are the torchvision v1 recipe (base.py) shortened for a small dataset.

  python train.py --config configs/custom_coco_json.py --workdir runs/mine \\
      --config.dataset.train.annotation_file=data/train.json \\
      --config.dataset.train.image_dir=data/images \\
      --config.dataset.val.annotation_file=data/val.json --config.dataset.val.image_dir=data/images \\
      --config.init.retinanet_checkpoint=retinanet_resnet50_fpn_coco-eeacb38b.pth

``:scratch`` (``--config configs/custom_coco_json.py:scratch``): no pretrained weights at all,
for ~100-1,000 images of a few classes at ~400 px (aerial tiles, microscopy, inspection).
A run of fixed length (``NUM_STEPS`` steps of ``BATCH`` images, whatever the dataset's size)
that finishes in <= 20 minutes on a 2-core CPU, training and evaluation; see ``scratch()``.
Run ``retinanet-jax anchors`` on your data first and pass the sizes it prints (the recipe's
anchors are torchvision's halved, for objects of ~10-200 px). Each setting's measurement:
docs/performance.md, "A from-scratch recipe for small datasets".
"""

import os
import runpy

# ---- :scratch (docs/performance.md, "A from-scratch recipe for small datasets")
SIZE = 400  # px, short side: the size of the tiles; compute grows with its square
BATCH = 4  # torchvision's batch in the runs; more updates in a short run
NUM_STEPS = 450  # 500 took 19-20.4 min here (AP50 0.963): 450 keeps ~10% of the 20 min budget
ANCHOR_SIZES = tuple((x, int(x * 2 ** (1 / 3)), int(x * 2 ** (2 / 3))) for x in (16, 32, 64, 128, 256))
#   torchvision's 32..512 halved: objects of 10-40 px get an anchor at IoU >= 0.5 (32..512 do not)


def scratch(c):
    """The from-scratch recipe on top of the fine-tuning config ``c``: a small model whose
    every layer trains, the v2 head and loss, AdamW over a fixed number of steps."""
    c.init.retinanet_checkpoint = ""  # from scratch: nothing to download
    c.model.backbone = "resnet18"  # the smallest backbone: the budget is compute
    c.model.variant = "v2"  # GroupNorm head: trains from scratch (torchvision's v2 design)
    c.model.frozen_bn = False  # from scratch: BatchNorm learns its statistics
    c.model.trainable_backbone_layers = 5  # from scratch: everything trains (torchvision's rule)
    c.model.fpn_channels = 128  # half of torchvision's 256: a few classes
    c.model.anchor_sizes = ANCHOR_SIZES
    c.loss.box_loss = "giou"  # v2's loss
    c.input.min_sizes = (SIZE,)
    c.input.max_size = SIZE * 5 // 3  # torchvision's 800:1333 ratio
    c.eval.min_size = SIZE
    c.eval.max_size = SIZE * 5 // 3
    c.eval.detections_per_img = 100  # COCOeval counts at most 100 per image
    c.batch_size = BATCH
    c.num_steps = NUM_STEPS  # the run's length in steps, whatever the dataset's size
    c.optim.optimizer = "adamw"  # v2 recipe's optimizer; robust from scratch
    c.optim.base_lr = 2e-3  # from scratch, short run, batch 4-8 (configs/shapes.py's trial C)
    c.optim.lr_scaling = "none"
    c.optim.weight_decay = 0.05  # v2 recipe
    c.optim.norm_weight_decay = 0.0  # v2 recipe
    c.optim.schedule = "cosine"
    c.optim.epochs = None  # the schedule spans num_steps (no epochs: the dataset size varies)
    c.optim.milestones = ()
    c.optim.warmup_steps = 100  # not capped at one epoch (epochs=None)
    c.optim.clip_grad_norm = 10.0  # guards the first from-scratch steps against spikes
    c.eval.every_steps = NUM_STEPS // 2  # halfway and at the end
    c.checkpoint.every_steps = NUM_STEPS // 4
    c.log_every_steps = 50
    return c


def get_config(arg: str = ""):
    """``arg``: "" = fine-tune from COCO weights; "scratch" = the from-scratch recipe."""
    if arg not in ("", "scratch"):
        raise ValueError(f"config argument {arg!r}: use none (fine-tune) or ':scratch'")
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
    return scratch(c) if arg == "scratch" else c
