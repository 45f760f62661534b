"""Every setting ``train_and_evaluate`` reads, with defaults = torchvision's RetinaNet v1 recipe.

Sources cited below:
  [README]  pytorch/vision references/detection/README.md, section "RetinaNet":
            ``train.py --dataset coco --model retinanet_resnet50_fpn --epochs 26
            --lr-steps 16 22 --aspect-ratio-group-factor 3 --lr 0.01
            --weights-backbone ResNet50_Weights.IMAGENET1K_V1`` on 8 GPUs.
  [train]   references/detection/train.py argument defaults (--batch-size 2 per GPU,
            --momentum 0.9, --wd 1e-4, --lr-gamma 0.1, --opt sgd, --workers 4, ...).
  [engine]  references/detection/engine.py (warmup: LinearLR 1/1000 over min(1000, iters-1)).
  [model]   torchvision/models/detection/retinanet.py (RetinaNet / retinanet_resnet50_fpn
            defaults: min_size 800, max_size 1333, score_thresh 0.05, nms 0.5, 300 dets,
            topk_candidates 1000, fg/bg IoU 0.5/0.4, trainable_backbone_layers 3).
  [coco]    references/detection/coco_utils.py / coco_eval.py (bbox COCOeval).
Other config files load this one and override what differs.
"""

from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
    c = config_dict.ConfigDict()
    c.seed = 0  # our choice: data order, augmentation and init all derive from it

    # ---------------------------------------------------------------- data
    c.dataset = config_dict.ConfigDict()
    c.dataset.source = "tfds"  # shapes | coco_json | voc_xml | csv | tfds ([README] --dataset coco)
    # Keyword arguments of the source class (retinanet_jax.data.*Source) for each split.
    c.dataset.train = config_dict.ConfigDict({"name": "coco/2017", "split": "train"})
    c.dataset.val = config_dict.ConfigDict({"name": "coco/2017", "split": "validation"})
    # [coco] get_coco(image_set="train") drops training images without annotations.
    c.dataset.drop_empty_train = True

    c.input = config_dict.ConfigDict()
    c.input.min_sizes = (800,)  # [model] min_size=800 (GeneralizedRCNNTransform, train and eval)
    c.input.max_size = 1333  # [model] max_size=1333
    c.input.buckets = config_dict.placeholder(tuple)  # fixed canvases (h, w); None = input.canvases
    # "fit": canvases fitted to the image sizes, batches grouped by aspect ratio as torchvision's
    # [README] --aspect-ratio-group-factor 3 does; "fixed": make_buckets' (S,S), (S,L), (L,S).
    c.input.canvases = "fit"  # our choice: 97% of canvas pixels are image (COCO-like, vs 84%)
    c.input.max_canvases = 8  # our choice: at most 8 train_step compilations (and eval canvases)
    c.input.max_boxes = 128  # our choice: >= the most objects in a COCO image (no cap in torchvision)
    c.input.box_overflow = "error"  # our choice: never drop ground truth silently
    c.input.hflip_prob = 0.5  # [train] --data-augmentation hflip -> RandomHorizontalFlip(0.5)
    c.input.worker_count = 4  # [train] --workers 4 (decode/augment processes per host)

    # ---------------------------------------------------------------- model
    c.model = config_dict.ConfigDict()
    c.model.backbone = "resnet50"  # [README] retinanet_resnet50_fpn
    c.model.variant = "v1"  # [README] retinanet_resnet50_fpn (v1)
    c.model.num_classes = config_dict.placeholder(int)  # None = len(dataset class_names)
    c.model.frozen_bn = True  # [model] FrozenBatchNorm2d when weights_backbone is given
    c.model.bn_eps = 1e-5  # [model] FrozenBatchNorm2d / BatchNorm2d default eps
    c.model.fpn_channels = 256  # [model] out_channels=256
    # None = torchvision's _default_anchorgen: sizes 32..512 x 2^(0,1/3,2/3), ratios 0.5/1/2 [model]
    c.model.anchor_sizes = config_dict.placeholder(tuple)  # one tuple of sizes (px) per level P3..P7
    c.model.aspect_ratios = config_dict.placeholder(tuple)  # one tuple of h/w ratios per level
    c.model.trainable_backbone_layers = 3  # [model] _validate_trainable_layers(..., 5, 3)
    c.model.compute_dtype = "float32"  # torchvision trains in float32 (--amp off by default)

    # Initial weights ("" = none). retinanet: a torchvision RetinaNet state_dict (.pth), any
    # number of classes (the class conv is re-initialised if it differs); backbone: a
    # torchvision ImageNet ResNet state_dict ([README] --weights-backbone
    # ResNet50_Weights.IMAGENET1K_V1 = resnet50-0676ba61.pth).
    c.init = config_dict.ConfigDict()
    c.init.retinanet_checkpoint = ""
    c.init.backbone_checkpoint = ""

    # ---------------------------------------------------------------- loss
    c.loss = config_dict.ConfigDict()  # keyword arguments of objective.retinanet_losses
    c.loss.box_loss = "l1"  # [model] RetinaNetRegressionHead._loss_type = "l1" (v1)
    c.loss.focal_alpha = 0.25  # [model] sigmoid_focal_loss defaults
    c.loss.focal_gamma = 2.0
    c.loss.fg_iou = 0.5  # [model] fg_iou_thresh
    c.loss.bg_iou = 0.4  # [model] bg_iou_thresh

    # ---------------------------------------------------------------- optimization
    c.batch_size = 16  # global: [README] 8 GPUs x [train] --batch-size 2
    c.num_steps = config_dict.placeholder(int)  # None = optim.epochs * steps_per_epoch
    c.optim = config_dict.ConfigDict()  # fields of retinanet_jax.training.optim.OptimConfig
    c.optim.optimizer = "sgd"  # [train] --opt sgd
    c.optim.base_lr = 0.01  # [README] --lr 0.01 (at 16 images per step)
    c.optim.reference_batch_size = 16  # [README] 8 x 2 images per step
    c.optim.lr_scaling = "linear"  # [train] docstring: lr scales with the number of GPUs
    c.optim.momentum = 0.9  # [train] --momentum 0.9
    c.optim.weight_decay = 1e-4  # [train] --wd 1e-4
    c.optim.norm_weight_decay = config_dict.placeholder(float)  # [train] --norm-weight-decay None
    c.optim.schedule = "multistep"  # [train] --lr-scheduler multisteplr
    c.optim.schedule_unit = "epoch"  # [train] lr_scheduler.step() once per epoch
    c.optim.epochs = 26  # [README] --epochs 26
    c.optim.milestones = (16, 22)  # [README] --lr-steps 16 22
    c.optim.gamma = 0.1  # [train] --lr-gamma 0.1
    c.optim.warmup_steps = 1000  # [engine] warmup_iters = min(1000, len(data_loader) - 1)
    c.optim.warmup_factor = 1e-3  # [engine] warmup_factor = 1.0 / 1000
    c.optim.clip_grad_norm = config_dict.placeholder(float)  # [train] no gradient clipping
    c.skip_nonfinite = False  # our choice: a non-finite loss stops the run (error names the step)

    # ---------------------------------------------------------------- evaluation
    c.eval = config_dict.ConfigDict()
    c.eval.enabled = True  # False: no evaluation at all (quick experiments, tests)
    c.eval.every_steps = config_dict.placeholder(int)  # None = once per epoch ([train] evaluates every epoch)
    c.eval.batch_size = 8  # our choice (torchvision evaluates with batch 1; padding differs slightly)
    c.eval.min_size = 800  # [model] min_size
    c.eval.max_size = 1333  # [model] max_size
    c.eval.buckets = config_dict.placeholder(tuple)  # None = input.canvases' rule on the val sizes
    c.eval.max_images = config_dict.placeholder(int)  # None = the whole validation split
    c.eval.score_thresh = 0.05  # [model] score_thresh
    c.eval.topk_candidates = 1000  # [model] topk_candidates
    c.eval.nms_thresh = 0.5  # [model] nms_thresh
    c.eval.detections_per_img = 300  # [model] detections_per_img (COCOeval itself uses 100)

    # ---------------------------------------------------------------- bookkeeping
    c.log_every_steps = 50  # our choice ([train] --print-freq 20)
    c.checkpoint = config_dict.ConfigDict()
    c.checkpoint.every_steps = config_dict.placeholder(
        int
    )  # None = once per epoch ([train] saves every epoch)
    c.checkpoint.keep = 3  # our choice: last 3, plus the best by eval/AP
    c.checkpoint.async_save = True  # our choice: write in the background
    c.mesh = config_dict.ConfigDict()
    c.mesh.num_devices = config_dict.placeholder(int)  # None = every device (all hosts)
    c.mesh.model = 1  # size of the "model" mesh axis (1 = pure data parallelism, as torchvision DDP)
    return c
