"""A tiny run for tests and smoke checks: 64 px shapes, ResNet-18 with a narrow FPN, few steps."""

import os
import runpy


def get_config():
    c = runpy.run_path(os.path.join(os.path.dirname(__file__), "shapes.py"))["get_config"]()
    c.dataset.train = {
        "split": "train",
        "image_size": 64,
        "num_images": 64,
        "max_objects": 3,
        "object_size": (0.2, 0.6),
    }
    c.dataset.val = {
        "split": "validation",
        "image_size": 64,
        "num_images": 8,
        "max_objects": 3,
        "object_size": (0.2, 0.6),
    }
    c.input.min_sizes = (64,)
    c.input.max_size = 64
    c.input.max_boxes = 4
    c.eval.min_size = 64
    c.eval.max_size = 64
    c.eval.detections_per_img = 20
    c.model.fpn_channels = 32  # GroupNorm(32) in the v2 head needs a multiple of 32
    c.batch_size = 8  # divisible by the 8 fake CPU devices of the tests
    c.num_steps = 6
    c.optim.epochs = 1
    c.optim.warmup_steps = 2
    c.eval.every_steps = 6
    c.checkpoint.every_steps = 3
    c.log_every_steps = 2
    return c
