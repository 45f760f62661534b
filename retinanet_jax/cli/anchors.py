"""``retinanet-jax anchors``: how well the anchors fit a dataset, and anchors that fit better.

Reads the ground-truth boxes of a dataset (``--data SOURCE key=value ...`` or a config's
split, as ``evaluate`` does), resizes them by the training rule (``data.box_stats``), reports
the share of boxes whose best anchor IoU reaches 0.5 / 0.4 (``ops.anchor_fit``), overall and
for small / medium / large boxes, then searches torchvision-structured anchors (P3 base size
and 3 aspect ratios) for a higher share and prints them as config overrides.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

EPILOG = """\
Coverage = share of ground-truth boxes whose best anchor has IoU >= 0.5 (torchvision's fg_iou:
a regular positive) and >= 0.4 (bg_iou), boxes resized as in training (--min-size/--max-size,
else the config's input.min_sizes/max_size, else 800/1333). Boxes below 0.5 are matched only
by the low-quality rule; train.py warns when the share is below 0.8. Sizes: sqrt(box area) in
those pixels (small < 32, medium 32-96, large > 96). The search keeps 5 levels x 3 scales x 3
ratios (the head's 9 anchors per location) and prints config.model.anchor_sizes /
config.model.aspect_ratios for a config file or train.py flags.

examples:
  retinanet-jax anchors --config configs/custom_coco_json.py
  retinanet-jax anchors --data coco_json annotation_file=data/train.json image_dir=data/images \\
      --min-size 800 --max-size 1333
  retinanet-jax anchors --data csv csv_file=train.csv --max-images 2000 --json fit.json
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``anchors`` sub-command's own arguments (the dataset group is ``cli.main``'s)."""
    g = p.add_argument_group("training resize (default: the config's input.*, else 800 / 1333)")
    g.add_argument("--min-size", type=int, nargs="+", help="short side (several: multi-scale training)")
    g.add_argument("--max-size", type=int, help="long-side limit")
    g = p.add_argument_group("search")
    g.add_argument("--no-search", action="store_true", help="only report the current anchors' coverage")
    g.add_argument("--json", metavar="FILE", help="also write the results as JSON")


def _resize(args: argparse.Namespace, config: Any) -> tuple[tuple[int, ...], int, list | None]:
    inp = config.input if config is not None and "input" in config else None
    min_sizes = tuple(args.min_size) if args.min_size else (tuple(inp.min_sizes) if inp else (800,))
    max_size = args.max_size or (inp.max_size if inp else 1333)
    # The config's canvas buckets belong to its own sizes.
    buckets = inp.get("buckets") if inp is not None and not (args.min_size or args.max_size) else None
    return min_sizes, int(max_size), buckets


def _cov_json(cov: Any) -> dict:
    """JSON-safe: NaN (a size range without boxes) -> None."""

    def num(v: float) -> float | None:
        return None if v != v else v

    return {
        "count": cov.count,
        "mean_iou": num(cov.mean_iou),
        "share": {name: {str(t): num(v) for t, v in by_t.items()} for name, by_t in cov.share.items()},
    }


def run(args: argparse.Namespace) -> int:
    """Report coverage, search, print overrides; 0 on success."""
    from retinanet_jax.cli import evaluate as ce
    from retinanet_jax.data.box_stats import training_boxes
    from retinanet_jax.ops import anchor_fit
    from retinanet_jax.ops.anchors import model_anchor_config

    config = None
    if args.config:
        config = ce.load_config(args.config, ce.parse_assignments(args.set, "--set"))
    elif args.set:
        raise ValueError("--set needs --config")
    if config is None and not args.data:
        raise ValueError("give --data SOURCE KEY=VALUE ... or --config FILE")
    source = ce.build_source(args.data, config, args.split, None)
    min_sizes, max_size, buckets = _resize(args, config)
    loss = config.loss if config is not None and "loss" in config else {}
    thresholds = (float(loss.get("fg_iou", 0.5)), float(loss.get("bg_iou", 0.4)))
    sizes, ratios = model_anchor_config(config.model if config is not None and "model" in config else None)

    gt = training_boxes(source, min_sizes, max_size, buckets=buckets, max_images=args.max_images)
    if not len(gt.boxes):
        raise ValueError(f"no ground-truth boxes in {gt.num_images} images of the dataset")
    scales = f"min_size {min_sizes[0]}" if len(min_sizes) == 1 else f"min_sizes {list(min_sizes)}"
    print(
        f"{len(gt.boxes)} ground-truth boxes in {gt.num_images} images, resized as in training "
        f"({scales}, max_size {max_size})"
    )
    cov = anchor_fit.anchor_coverage(gt.boxes, sizes, ratios, gt.canvas_hw, thresholds)
    default = (sizes, ratios) == anchor_fit.structured_anchors(32, (0.5, 1.0, 2.0))
    print(
        f"\ncurrent anchors{' (torchvision default)' if default else ''}: sizes {list(sizes)}, "
        f"aspect ratios (h/w) {list(ratios[0]) if len(set(ratios)) == 1 else list(ratios)}"
    )
    print(anchor_fit.format_coverage(cov))
    result = {
        "num_boxes": len(gt.boxes),
        "num_images": gt.num_images,
        "min_sizes": list(min_sizes),
        "max_size": max_size,
        "current": {"anchor_sizes": sizes, "aspect_ratios": ratios, "coverage": _cov_json(cov)},
    }
    if not args.no_search:
        found = anchor_fit.search_anchors(gt.boxes, gt.canvas_hw, thresholds=thresholds)
        print(
            f"\nbest of {len(anchor_fit.SEARCH_BASES)} P3 base sizes "
            f"({anchor_fit.SEARCH_BASES[0]}..{anchor_fit.SEARCH_BASES[-1]} px, doubling per level, "
            f"scales 2^(0,1/3,2/3)) x 3 ratios of {list(anchor_fit.SEARCH_RATIOS)}: "
            f"base {found.base}, ratios {list(found.ratios)}"
        )
        print(anchor_fit.format_coverage(found.coverage))
        t = thresholds[0]
        gain = found.coverage.at(t) - cov.at(t)
        overrides = anchor_fit.config_overrides(found.sizes, found.aspect_ratios)
        if gain <= 0:
            print(f"\nno searched anchors beat the current ones at IoU >= {t:g}; keep them")
        else:
            print(
                f"\ncoverage at IoU >= {t:g}: {cov.at(t):.3f} -> {found.coverage.at(t):.3f}. "
                "Config overrides (in a config file's get_config()):"
            )
            for key, value in overrides.items():
                print(f"  c.{key} = {value!r}")
            print("or as train.py flags:")
            print("  " + " ".join(f"'--config.{k}={v!r}'" for k, v in overrides.items()))
            print(
                "(a torchvision-pretrained head was trained for the default anchors; fine-tuning "
                "adapts it to new ones)"
            )
        result["search"] = {
            "base": found.base,
            "ratios": list(found.ratios),
            **overrides,
            "coverage": _cov_json(found.coverage),
            "improves": gain > 0,
        }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nresults -> {args.json}", file=sys.stderr)
    return 0
