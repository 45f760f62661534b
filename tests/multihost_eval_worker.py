"""One process of tests/test_multihost_evaluate.py: ``evaluate()`` on a dataset whose class
names repeat (torchvision's COCO has "N/A" ten times), over every process's devices.

Usage: ``python tests/multihost_eval_worker.py OUT.json [COORDINATOR PROCESSES PROCESS_ID]``
(no coordinator: a single process). Process 0 writes the metrics to OUT.json.
"""

import json
import math
import sys

import jax
import numpy as np
from detection_utils import lively_variables

NAMES = ["cat", "N/A", "dog", "N/A"]
SIZE = 64


class Source:
    """6 images; ground truth = the model's own "cat" and "dog" detections (AP 1 each), one
    first-"N/A" box nothing detects (AP 0), no box of the second "N/A" (no AP)."""

    class_names = NAMES
    label_to_category_id = [1, 2, 3, 4]

    def __init__(self, images, detections):
        self.examples = []
        for i, (image, det) in enumerate(zip(images, detections)):
            keep = det["scores"] > 0.3
            boxes = np.concatenate([det["boxes"][keep], [[4.0, 4.0, 30.0, 20.0]]]).astype(np.float32)
            labels = np.concatenate([det["labels"][keep], [1]]).astype(np.int32)
            self.examples.append({"image_id": 10 + i, "image": image, "boxes": boxes, "labels": labels})

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]

    def image_size(self, i):
        return (SIZE, SIZE)


def main(out, coordinator=None, processes="1", process_id="0"):
    if coordinator:
        jax.distributed.initialize(coordinator, int(processes), int(process_id))
    import retinanet_jax as rj
    from retinanet_jax.evaluation import loop as evaluation

    model = rj.RetinaNet(num_classes=4, backbone="resnet18", fpn_channels=32, variant="v1")
    variables = lively_variables(model, cls_bias=(1.0, -30.0, 0.0, -30.0))
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (SIZE, SIZE, 3), np.uint8) for _ in range(6)]
    detections = rj.predict(
        model, variables, images, min_size=SIZE, max_size=SIZE, batch_size=6, detections_per_img=100
    )
    metrics = evaluation.evaluate(
        model,
        variables,
        Source(images, detections),
        batch_size=4,
        min_size=SIZE,
        max_size=SIZE,
        buckets=[(SIZE, SIZE)],
        detections_per_img=100,
    )
    if jax.process_index() == 0:
        with open(out, "w") as f:
            json.dump(
                {**metrics, "per_class_AP": [None if math.isnan(v) else v for v in metrics["per_class_AP"]]},
                f,
            )


if __name__ == "__main__":
    main(*sys.argv[1:])
