"""Fine-tune torchvision's COCO RetinaNet on a Pascal VOC-style dataset (XML per image).

Layout: VOCdevkit/VOC2007/{Annotations/*.xml, JPEGImages/*.jpg, ImageSets/Main/{train,val}.txt}.
Class names default to the sorted names found in the XML files (train's order is reused for
val); pass ``class_names`` to fix the order. ``difficult`` objects are skipped like VOC's own
evaluation does. See custom_coco_json.py for the initialisation and schedule, and for
``:scratch`` (a from-scratch recipe: ``--config configs/custom_voc_xml.py:scratch``).

  python train.py --config configs/custom_voc_xml.py --workdir runs/voc \\
      --config.init.retinanet_checkpoint=retinanet_resnet50_fpn_coco-eeacb38b.pth
"""

import os
import runpy


def get_config(arg: str = ""):
    """``arg``: "" = fine-tune from COCO weights; "scratch" = custom_coco_json.py's from-scratch recipe."""
    c = runpy.run_path(os.path.join(os.path.dirname(__file__), "custom_coco_json.py"))["get_config"](arg)
    c.dataset.source = "voc_xml"
    root = "VOCdevkit/VOC2007"
    c.dataset.train = {
        "annotation_dir": f"{root}/Annotations",
        "image_dir": f"{root}/JPEGImages",
        "image_set": f"{root}/ImageSets/Main/train.txt",
    }
    c.dataset.val = {
        "annotation_dir": f"{root}/Annotations",
        "image_dir": f"{root}/JPEGImages",
        "image_set": f"{root}/ImageSets/Main/val.txt",
    }
    # VOC images are ~500 px; torchvision's VOC usage keeps the model's 800 px resize.
    return c
