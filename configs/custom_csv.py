"""Fine-tune torchvision's COCO RetinaNet on a CSV dataset (one box per row).

Rows: ``path,x1,y1,x2,y2,class_name`` (an image without objects: ``path,,,,,``); paths are
relative to the CSV's folder. ``classes.csv`` fixes the label order (``name`` or ``name,id``
per line) and is shared by both splits. See custom_coco_json.py for the initialisation and
schedule, and for ``:scratch`` (a from-scratch recipe: ``--config configs/custom_csv.py:scratch``).

  python train.py --config configs/custom_csv.py --workdir runs/csv \\
      --config.dataset.train.csv_file=data/train.csv --config.dataset.val.csv_file=data/val.csv
"""

import os
import runpy


def get_config(arg: str = ""):
    """``arg``: "" = fine-tune from COCO weights; "scratch" = custom_coco_json.py's from-scratch recipe."""
    c = runpy.run_path(os.path.join(os.path.dirname(__file__), "custom_coco_json.py"))["get_config"](arg)
    c.dataset.source = "csv"
    c.dataset.train = {"csv_file": "data/train.csv", "classes_file": "data/classes.csv"}
    c.dataset.val = {"csv_file": "data/val.csv", "classes_file": "data/classes.csv"}
    return c
