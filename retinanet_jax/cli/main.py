"""``retinanet-jax``: convert | predict | evaluate | export (``python -m retinanet_jax.cli.main``).

Every sub-command takes a model CHECKPOINT of any kind ``cli.checkpoints.load_model`` reads: a
torchvision ``.pth``, a model directory written by ``convert``, or a ``train.py`` workdir (or
its ``checkpoints/`` directory; best step by eval/AP unless ``--step``). Heavy imports (jax,
torch) happen inside the commands so that ``--help`` is instant.

Exit status: 0 success; 1 ``predict`` finished but some inputs could not be read; 2 bad
arguments or an unusable checkpoint / dataset (one line on stderr naming the file).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

PROG = "retinanet-jax"
_FMT = argparse.RawDescriptionHelpFormatter

CONVERT_EPILOG = """\
The direction follows DST: a name ending in .pth / .pt gets a torchvision state_dict
(loadable with load_state_dict(strict=True); needs torch), anything else becomes a model
directory: model.json (architecture, class names, category ids) + variables.msgpack.

examples:
  # torchvision COCO weights -> retinanet_jax model directory (variant read from the keys)
  retinanet-jax convert retinanet_resnet50_fpn_coco-eeacb38b.pth models/coco_v1
  # a train.py run (best step by eval/AP) -> torchvision .pth
  retinanet-jax convert runs/shapes shapes.pth
  # ImageNet ResNet-50 -> 5-class detector to start training from
  retinanet-jax convert resnet50-0676ba61.pth models/r50_5cls --class-names a,b,c,d,e
"""

PREDICT_EPILOG = """\
Writes COCO results JSON: a list of {"image_id", "category_id", "bbox": [x, y, w, h],
"score", "file_name", "category_name"}; image ids number the inputs 1..N in order.
Unreadable inputs are reported on stderr by name and skipped; the exit status is 1 then.

examples:
  retinanet-jax predict models/coco_v1 photos/ -o dets.json --draw overlays/
  retinanet-jax predict runs/shapes 'data/**/*.png' --display-thresh 0.3 --batch-size 4
  retinanet-jax predict models/coco_v1 ortho.tif --tile 800 800 --overlap 0.2 --draw overlays/
"""

EVALUATE_EPILOG = """\
The dataset is one of: --data SOURCE KEY=VALUE ... (SOURCE = shapes | coco_json | voc_xml |
csv | tfds, KEY=VALUE = the source's arguments), --config FILE [--split val|train], or, for
a train.py checkpoint, the config stored with it. Prints COCO AP/AR and AP per class, and
writes OUT_DIR/detections.json, metrics.json, pr_all.png and pr_<class>.png (precision-recall
at IoU 0.50 and averaged over IoU 0.50:0.95).

examples:
  retinanet-jax evaluate runs/shapes
  retinanet-jax evaluate models/coco_v1 --data coco_json \\
      annotation_file=annotations/instances_val2017.json image_dir=val2017 --out-dir eval_coco
  retinanet-jax evaluate runs/mine --config configs/custom_csv.py --set dataset.val.csv_file=val.csv
"""

EXPORT_EPILOG = """\
The exported function (weights baked in) takes
  images      [B, H, W, 3] uint8 RGB pixels (or float32 already normalized, --input-dtype)
  image_sizes [B, 2] int32 (h, w) of each image at the top-left of the canvas
and returns boxes [B, D, 4] (xyxy, canvas pixels), scores [B, D], labels [B, D], num_valid [B].
It does not resize: resize like torchvision (short side --min-size) before calling it. A
sidecar OUT.json lists shapes, class names and options. Load it without retinanet_jax:
  exp = jax.export.deserialize(open("model.jaxexport", "rb").read()); exp.call(images, sizes)
--format onnx writes the same function (NMS included) as one ONNX graph for onnxruntime
(needs the onnx extra: pip install 'retinanet_jax[onnx]'):
  onnxruntime.InferenceSession("model.onnx").run(None, {"images": images, "image_sizes": sizes})

examples:
  retinanet-jax export models/coco_v1 coco_v1.jaxexport --batch-size 1 --canvas 800 1344
  retinanet-jax export models/coco_v1 coco_v1.onnx --format onnx --canvas 800 1216
  retinanet-jax export runs/shapes shapes.jaxexport --batch-size 8 --platforms cpu,cuda
"""


# ------------------------------------------------------------------------------ argument groups


def _model_args(p: argparse.ArgumentParser, *, positional: str = "checkpoint") -> None:
    p.add_argument(
        positional,
        metavar=positional.upper(),
        help="model: torchvision .pth, directory from `convert`, or a train.py "
        "workdir / its checkpoints directory",
    )
    g = p.add_argument_group("model loading")
    g.add_argument(
        "--variant",
        choices=("v1", "v2"),
        help=".pth only: torchvision retinanet_resnet50_fpn (v1) or _v2 (default: read from the keys)",
    )
    g.add_argument(
        "--backbone", help=".pth only: resnet18 ... resnext101_32x8d (default: read from the keys)"
    )
    g.add_argument(
        "--step",
        type=int,
        help="train.py checkpoints: step to load (default: best by eval/AP, else the latest)",
    )
    g.add_argument(
        "--class-names",
        metavar="NAMES",
        help="class names, one per model output: a file "
        "(one per line) or a comma-separated list (default: stored ones; COCO for 91-output .pth)",
    )


def _inference_args(p: argparse.ArgumentParser, batch_size: int) -> None:
    g = p.add_argument_group("inference (defaults: torchvision's, or the training config's sizes)")
    g.add_argument("--min-size", type=int, help="resize the short side to this (default 800)")
    g.add_argument("--max-size", type=int, help="... keeping the long side <= this (default 1333)")
    g.add_argument(
        "--batch-size", type=int, default=batch_size, help=f"images per step (default {batch_size})"
    )
    g.add_argument("--score-thresh", type=float, help="drop detections scoring <= this (default 0.05)")
    g.add_argument("--nms-thresh", type=float, help="class-aware NMS IoU threshold (default 0.5)")
    g.add_argument("--topk-candidates", type=int, help="candidates per FPN level before NMS (default 1000)")
    g.add_argument("--detections-per-img", type=int, help="keep at most this many per image (default 300)")
    g.add_argument("--class-agnostic", action="store_true", help="NMS across classes")


def _dataset_args(
    p: argparse.ArgumentParser, *, config_help: str, set_example: str, split: str, max_images_help: str
) -> argparse._ArgumentGroup:
    g = p.add_argument_group("dataset")
    g.add_argument(
        "--data",
        nargs="+",
        metavar="ARG",
        help="SOURCE KEY=VALUE ...: a data source (shapes, coco_json, voc_xml, csv, tfds) and its arguments",
    )
    g.add_argument("--config", help=config_help)
    g.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config value, e.g. {set_example} (repeatable)",
    )
    g.add_argument("--split", choices=("train", "val"), default=split, help=f"config split (default {split})")
    g.add_argument("--max-images", type=int, help=max_images_help)
    return g


def build_parser() -> argparse.ArgumentParser:
    """The ``retinanet-jax`` argument parser with its four sub-commands."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=_FMT,
        description=(
            "RetinaNet in JAX: convert torchvision weights, detect objects in images, evaluate on a "
            "dataset, export the detector."
        ),
        epilog="Run `retinanet-jax COMMAND --help` for each command's arguments.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "convert",
        help="torchvision .pth <-> retinanet_jax checkpoint",
        formatter_class=_FMT,
        description="Convert a model checkpoint between torchvision and retinanet_jax.",
        epilog=CONVERT_EPILOG,
    )
    _model_args(p, positional="src")
    p.add_argument("dst", metavar="DST", help="output: a .pth / .pt file or a model directory")
    p.add_argument(
        "--num-classes",
        type=int,
        help=".pth only: number of classifier outputs; a different "
        "number from the checkpoint's re-initialises the class conv",
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip reloading a written .pth into torchvision with strict=True",
    )
    p.add_argument("--force", action="store_true", help="overwrite DST if it exists")

    p = sub.add_parser(
        "predict",
        help="detect objects in images; COCO JSON and drawn overlays",
        formatter_class=_FMT,
        description="Detect objects in image files.",
        epilog=PREDICT_EPILOG,
    )
    _model_args(p)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, directories or glob patterns")
    p.add_argument(
        "-o",
        "--output",
        default="detections.json",
        help="COCO results JSON to write (default detections.json)",
    )
    p.add_argument("--draw", metavar="DIR", help="also write each image with its boxes as DIR/<name>.png")
    p.add_argument(
        "--display-thresh",
        type=float,
        default=0.5,
        help="draw detections scoring above this "
        "(default 0.5; the JSON keeps everything above --score-thresh)",
    )
    p.add_argument("--recursive", action="store_true", help="descend into subdirectories")
    p.add_argument(
        "--exact-padding",
        action="store_true",
        help="pad each batch to its own size like "
        "torchvision (one compilation per batch shape) instead of 3 fixed canvases",
    )
    p.add_argument(
        "--draw-max-size",
        type=int,
        default=2048,
        metavar="PX",
        help="overlays larger than "
        "this are downscaled to it, lines and labels scaled to stay visible (default 2048)",
    )
    g = p.add_argument_group("large images (sliced prediction, merged across tiles on the device)")
    g.add_argument(
        "--tile",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="cut each image into H x W "
        "tiles fed at native resolution (--min-size/--max-size then only size "
        "--full-image-pass); --batch-size counts tiles",
    )
    g.add_argument(
        "--overlap",
        type=float,
        default=0.2,
        metavar="F",
        help="tile overlap, fraction of the tile (default 0.2)",
    )
    g.add_argument("--tile-scale", type=float, default=1.0, help="resize tiles by this factor (default 1)")
    g.add_argument(
        "--full-image-pass",
        action="store_true",
        help="also detect on the whole image resized by --min-size/--max-size (objects larger than a tile)",
    )
    _inference_args(p, batch_size=8)

    p = sub.add_parser(
        "evaluate",
        help="COCO metrics, per-class AP and precision-recall plots",
        formatter_class=_FMT,
        description="Evaluate a model on a dataset with pycocotools.",
        epilog=EVALUATE_EPILOG,
    )
    _model_args(p)
    g = _dataset_args(
        p,
        config_help="a training config file (its dataset.<split>)",
        set_example="dataset.val.num_images=50",
        split="val",
        max_images_help="evaluate only the first N images",
    )
    g.add_argument(
        "--class-map",
        choices=("auto", "name", "index"),
        default="auto",
        help="pair model outputs with dataset classes by name (auto: if the model has names) or by position",
    )
    p.add_argument(
        "--out-dir",
        default="eval",
        help="where detections.json, metrics.json and the plots go (default ./eval)",
    )
    _inference_args(p, batch_size=8)

    p = sub.add_parser(
        "export",
        help="serialise the jitted detector (jax.export or ONNX)",
        formatter_class=_FMT,
        description="Export the detector for a fixed input shape with jax.export or to ONNX.",
        epilog=EXPORT_EPILOG,
    )
    _model_args(p)
    p.add_argument("output", metavar="OUTPUT", help="file to write (plus OUTPUT.json)")
    p.add_argument(
        "--canvas",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="input height and width, multiples of 32 (default: min-size x max-size rounded up to 32)",
    )
    p.add_argument(
        "--input-dtype",
        choices=("uint8", "float32"),
        default="uint8",
        help="uint8 pixels (normalized inside) or float32 already normalized (default uint8)",
    )
    p.add_argument(
        "--platforms",
        default="cpu,cuda,tpu",
        help="comma-separated jax.export platforms "
        "the file runs on (default cpu,cuda,tpu; --format jax only)",
    )
    p.add_argument(
        "--format",
        choices=("jax", "onnx"),
        default="jax",
        help="jax.export (default) or an "
        "ONNX graph for onnxruntime (float32, NMS included; needs the onnx extra)",
    )
    p.add_argument("--opset", type=int, default=21, help="ONNX opset (--format onnx; default 21)")
    _inference_args(p, batch_size=1)

    from retinanet_jax.cli import anchors  # argparse only: --help stays instant

    p = sub.add_parser(
        "anchors",
        help="anchor coverage of a dataset's boxes; anchors fitted to them",
        formatter_class=_FMT,
        epilog=anchors.EPILOG,
        description=(
            "Share of ground-truth boxes with an anchor at IoU >= 0.5 / 0.4, and a "
            "search for anchor sizes and ratios that raise it."
        ),
    )
    _dataset_args(
        p,
        config_help="a training config file (its dataset.<split>, input sizes, anchors and IoU thresholds)",
        set_example="model.anchor_sizes='((16,20,25),...)'",
        split="train",
        max_images_help="use a random sample of N images (default: all)",
    )
    anchors.add_arguments(p)
    return parser


# ------------------------------------------------------------------------------ helpers


def _class_names(arg: str | None) -> list[str] | None:
    if arg is None:
        return None
    if os.path.isfile(arg):
        with open(arg) as f:
            return [line.strip() for line in f if line.strip()]
    return [n.strip() for n in arg.split(",")]


def _load(args: argparse.Namespace, path: str) -> Any:
    from retinanet_jax.cli.checkpoints import load_model

    loaded = load_model(
        path,
        variant=args.variant,
        backbone=args.backbone,
        step=args.step,
        num_classes=getattr(args, "num_classes", None),
        class_names=_class_names(args.class_names),
    )
    print(
        f"loaded {loaded.source}: {loaded.model.backbone} {loaded.model.variant}, "
        f"{loaded.model.num_classes} outputs",
        file=sys.stderr,
        flush=True,
    )
    return loaded


def _eval_config(config: Any) -> dict[str, Any]:
    """``config.eval`` as a dict ({} without a config)."""
    return dict(config.eval) if config is not None and "eval" in config else {}


def _options(args: argparse.Namespace, loaded: Any, config: Any = None) -> dict[str, Any]:
    """Inference options: flags, else the training config's eval values, else torchvision's."""
    ev, pre = _eval_config(config), loaded.preprocess or {}
    defaults = {
        "min_size": 800,
        "max_size": 1333,
        "score_thresh": 0.05,
        "nms_thresh": 0.5,
        "topk_candidates": 1000,
        "detections_per_img": 300,
    }
    out = {}
    for key, default in defaults.items():
        flag = getattr(args, key)
        out[key] = flag if flag is not None else ev.get(key, pre.get(key, default))
    out["class_agnostic"] = bool(args.class_agnostic)
    return out


# ------------------------------------------------------------------------------ commands


def cmd_convert(args: argparse.Namespace) -> int:
    from retinanet_jax.interop.model_dir import save_model

    if os.path.exists(args.dst) and not args.force and (os.path.isfile(args.dst) or os.listdir(args.dst)):
        raise ValueError(f"{args.dst}: exists (use --force to overwrite)")
    loaded = _load(args, args.src)
    if args.dst.endswith((".pth", ".pt")):
        from retinanet_jax.interop.torchvision import save_pth, to_torchvision, verify_pth

        save_pth(to_torchvision(loaded.model, loaded.variables), args.dst)
        if not args.no_verify:
            print(verify_pth(args.dst, loaded.model), file=sys.stderr)
    else:
        save_model(args.dst, loaded)
    print(f"wrote {args.dst}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from retinanet_jax.cli.predict import run_predict
    from retinanet_jax.imageprep.geometry import make_buckets

    loaded = _load(args, args.checkpoint)
    opts = _options(args, loaded)
    buckets = None if args.exact_padding else make_buckets(opts["min_size"], opts["max_size"])
    if args.tile:
        opts.update(
            tile_size=tuple(args.tile),
            tile_overlap=args.overlap,
            tile_scale=args.tile_scale,
            full_image_pass=args.full_image_pass,
        )
    return run_predict(
        loaded,
        args.inputs,
        output=args.output,
        draw_dir=args.draw,
        display_thresh=args.display_thresh,
        recursive=args.recursive,
        batch_size=args.batch_size,
        buckets=buckets,
        draw_max_size=args.draw_max_size,
        **opts,
    )


def cmd_evaluate(args: argparse.Namespace) -> int:
    from retinanet_jax.cli import evaluate as ce

    loaded = _load(args, args.checkpoint)
    config = None
    if args.config or (loaded.config and not args.data):
        config = ce.load_config(args.config or loaded.config, ce.parse_assignments(args.set, "--set"))
    elif args.set:
        raise ValueError("--set needs --config (or a train.py checkpoint's stored config)")
    if config is None and not args.data:
        raise ValueError(
            f"{args.checkpoint} has no stored dataset: give --data SOURCE KEY=VALUE ... or --config FILE"
        )
    source = ce.build_source(args.data, config, args.split, loaded.class_names)
    ev = _eval_config(config)
    # The config's canvas buckets are for its own sizes: other sizes get the default buckets.
    buckets = None if args.min_size or args.max_size else ev.get("buckets")
    return ce.run_evaluate(
        loaded,
        source,
        out_dir=args.out_dir,
        class_map=args.class_map,
        batch_size=args.batch_size,
        buckets=buckets,
        max_images=args.max_images if args.max_images is not None else ev.get("max_images"),
        **_options(args, loaded, config),
    )


def cmd_export(args: argparse.Namespace) -> int:
    from retinanet_jax.inference import export
    from retinanet_jax.models.spec import model_spec

    loaded = _load(args, args.checkpoint)
    opts = _options(args, loaded)
    canvas = (
        tuple(args.canvas) if args.canvas else tuple(-(-opts[k] // 32) * 32 for k in ("min_size", "max_size"))
    )
    platforms = tuple(p.strip() for p in args.platforms.split(",") if p.strip())
    post = {
        k: opts[k]
        for k in ("score_thresh", "topk_candidates", "nms_thresh", "detections_per_img", "class_agnostic")
    }
    meta = {
        "class_names": loaded.class_names,
        "category_ids": loaded.category_ids,
        "resize": {"min_size": opts["min_size"], "max_size": opts["max_size"]},
        "postprocess": post,
        "model": model_spec(loaded.model),
        "source": loaded.source,
    }
    if args.format == "onnx":
        from retinanet_jax.inference import onnx_export

        proto = onnx_export.export_onnx(
            loaded.model,
            loaded.variables,
            batch_size=args.batch_size,
            canvas=canvas,
            input_dtype=args.input_dtype,
            opset=args.opset,
            **post,
        )
        onnx_export.save_onnx(args.output, proto, meta)
        print(
            f"wrote {args.output} ({os.path.getsize(args.output) / 1e6:.1f} MB, ONNX opset "
            f"{args.opset}) and {args.output}.json"
        )
        return 0
    exported = export.export_detector(
        loaded.model,
        loaded.variables,
        batch_size=args.batch_size,
        canvas=canvas,
        input_dtype=args.input_dtype,
        platforms=platforms,
        **post,
    )
    export.save_exported(args.output, exported, meta)
    print(
        f"wrote {args.output} ({os.path.getsize(args.output) / 1e6:.1f} MB, platforms "
        f"{','.join(exported.platforms)}) and {args.output}.json"
    )
    return 0


def cmd_anchors(args: argparse.Namespace) -> int:
    from retinanet_jax.cli import anchors

    return anchors.run(args)


COMMANDS = {
    "convert": cmd_convert,
    "predict": cmd_predict,
    "evaluate": cmd_evaluate,
    "export": cmd_export,
    "anchors": cmd_anchors,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(levelname)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's read-only / handler notices
    try:
        return COMMANDS[args.command](args)
    except (ValueError, ImportError, OSError) as e:  # DataError, CheckpointMismatchError are ValueErrors
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


def console_main() -> int:
    """The ``retinanet-jax`` command: huge-page malloc for XLA:CPU (see ``hostmem``), then main."""
    from retinanet_jax.backends.cpu import hostmem

    hostmem.reexec_with_hugepages()
    return main()


if __name__ == "__main__":
    sys.exit(console_main())
