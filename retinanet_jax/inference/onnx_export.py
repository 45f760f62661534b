"""The whole detector as one ONNX graph, for onnxruntime where JAX is not installed.

The same function as ``export.py``'s ``jax.export`` artifact, for one fixed input shape::

    images      uint8 [B, H, W, 3] RGB pixels (or float32 normalized, input_dtype="float32")
    image_sizes int32 [B, 2]       (h, w) of each image at the top-left of the canvas
      -> boxes float32 [B, D, 4] xyxy canvas pixels, scores float32 [B, D],
         labels int32 [B, D], num_valid int32 [B]

Normalization, the forward pass, per-level top-k, box decoding and class-aware NMS are all
inside the graph (standard ONNX operators only: Conv, MaxPool, TopK, GatherND, a Loop for the
NMS, ...); weights are initializers. Like the ``jax.export`` file it does not resize (see
``export.py``). The graph is float32 whatever the model's compute dtype.

How (``jax2onnx``): the detector is traced to a jaxpr here, with the plain ``lax`` convolutions
of the accelerator target (``backends.target(TRACE_TARGET)``; the CPU forms of
``backends/cpu``, Winograd and GEMM rewrites, would convert too but only slower), and jax2onnx
converts that jaxpr's primitives, the ones ``jax.jit`` compiles. Converting the traced jaxpr
instead of the Python function keeps jax2onnx's framework patches (it replaces
``flax.linen.max_pool`` with a version that rejects our positional / explicit-padding call) out
of the model code. Two fixes to the converted graph make onnxruntime run it:

- ``Where`` on bool tensors (NMS loop state) has no onnxruntime kernel: rewritten as
  ``Or(And(c, x), And(Not(c), y))``, the same values.
- ``reduce_window_max`` on NHWC becomes a ``MaxPool`` over 4 "spatial" dims (window 1x3x3x1),
  which onnxruntime does not support (at most 3): rewritten as a 2-D MaxPool on the NCHW
  transpose (same window, strides, padding; padding ignored like lax's -inf).

Equal weight initializers are then stored once (the heads' weights are captured once per
pyramid level).

Faithfulness (tests/test_onnx_export.py): onnxruntime gives ``rj.predict``'s detections on the
same canvas. The NMS keeps its formulation (``ops/nms.py``: sorted tiles, greedy fixed point,
torchvision's suppression rule and IoU arithmetic); its append step is a gather
(``ops/nms.py``'s ``_appender``) because ONNX has no scatter that drops out-of-range updates.
Sort and top-k ties break by lower index in both (ONNX TopK's rule; jax2onnx lowers
multi-key stable sorts to successive TopKs). Differences are float rounding only: onnxruntime's
convolutions sum in another order (logits differ by ~1e-5), which can reorder near-equal
scores or move a box across a threshold.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from retinanet_jax import backends
from retinanet_jax.imageprep.normalize import IMAGENET_MEAN, IMAGENET_STD
from retinanet_jax.inference.export import INPUT_DTYPES, detector_fn

FORMAT = "retinanet_jax.onnx"
DEFAULT_OPSET = 21
# Traced with the accelerator forms: plain lax.conv_general_dilated, no CPU rewrites.
TRACE_TARGET = "cuda"
INPUT_NAMES = ("images", "image_sizes")
OUTPUT_NAMES = ("boxes", "scores", "labels", "num_valid")
EXTRA_HINT = "pip install 'retinanet_jax[onnx]' (jax2onnx, onnx, onnxruntime)"


def _onnx_modules():
    try:
        import onnx
        from jax2onnx import to_onnx
    except ImportError as e:
        raise ImportError(f"ONNX export needs jax2onnx and onnx: {EXTRA_HINT} ({e})") from e
    return onnx, to_onnx


def detector_jaxpr(
    model: Any,
    variables: Any,
    *,
    batch_size: int,
    canvas: tuple[int, int],
    input_dtype: str = "uint8",
    **options: Any,
):
    """The float32 detector for ``[batch_size, *canvas, 3]`` inputs traced to a ClosedJaxpr
    (weights as constants), with the forms of :data:`TRACE_TARGET`."""
    h, w = int(canvas[0]), int(canvas[1])
    if h % 32 or w % 32 or h <= 0 or w <= 0 or batch_size < 1:
        raise ValueError(
            f"canvas must be positive multiples of 32 and batch >= 1, got {canvas}, {batch_size}"
        )
    if input_dtype not in INPUT_DTYPES:
        raise ValueError(f"input_dtype must be one of {INPUT_DTYPES}, got {input_dtype!r}")
    fn = detector_fn(
        model.clone(dtype=jnp.float32), jax.device_get(variables), (h, w), input_dtype=input_dtype, **options
    )
    args = (
        jax.ShapeDtypeStruct((batch_size, h, w, 3), jnp.dtype(input_dtype)),
        jax.ShapeDtypeStruct((batch_size, 2), jnp.int32),
    )
    with backends.target(TRACE_TARGET):
        return jax.make_jaxpr(fn)(*args), args


def export_onnx(
    model: Any,
    variables: Any,
    *,
    batch_size: int,
    canvas: tuple[int, int],
    input_dtype: str = "uint8",
    opset: int = DEFAULT_OPSET,
    **options: Any,
):
    """The detector (module doc) as an ``onnx.ModelProto`` for inputs ``[batch_size, *canvas, 3]``.

    ``options``: score_thresh, topk_candidates, nms_thresh, detections_per_img, class_agnostic
    (torchvision's defaults). Needs the ``onnx`` extra (jax2onnx, onnx)."""
    onnx, to_onnx = _onnx_modules()
    from jax.extend.core import jaxpr_as_fun

    closed, args = detector_jaxpr(
        model, variables, batch_size=batch_size, canvas=canvas, input_dtype=input_dtype, **options
    )
    proto = to_onnx(
        jaxpr_as_fun(closed),
        list(args),
        model_name="retinanet_jax_detector",
        opset=int(opset),
        input_names=list(INPUT_NAMES),
        output_names=list(OUTPUT_NAMES),
    )
    bool_where_to_logic(proto)
    maxpool_to_2d(proto)
    dedupe_initializers(proto)
    onnx.checker.check_model(proto)
    return proto


# ------------------------------------------------------------------------------ graph fixes


def _subgraphs(node):
    import onnx

    return [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]


def bool_where_to_logic(proto) -> int:
    """Rewrite every ``Where`` whose branches are bool (also inside Loop / If bodies) as
    ``Or(And(c, x), And(Not(c), y))``; returns how many. onnxruntime has no bool Where kernel."""
    import onnx
    from onnx import helper

    inferred = onnx.shape_inference.infer_shapes(proto)
    types: dict[str, int] = {}

    def collect(g):
        for v in list(g.value_info) + list(g.input) + list(g.output):
            types[v.name] = v.type.tensor_type.elem_type
        for t in g.initializer:
            types[t.name] = t.data_type
        for n in g.node:
            for sub in _subgraphs(n):
                collect(sub)

    collect(inferred.graph)
    count = 0

    def rewrite(g):
        nonlocal count
        nodes = []
        for n in g.node:
            for sub in _subgraphs(n):
                rewrite(sub)
            if n.op_type == "Where" and (
                types.get(n.input[1]) == onnx.TensorProto.BOOL
                or types.get(n.input[2]) == onnx.TensorProto.BOOL
            ):
                c, x, y = n.input
                p = f"{n.name or 'where'}_bool{count}"
                count += 1
                nodes += [
                    helper.make_node("And", [c, x], [p + "_cx"], name=p + "_and_cx"),
                    helper.make_node("Not", [c], [p + "_nc"], name=p + "_not"),
                    helper.make_node("And", [p + "_nc", y], [p + "_ncy"], name=p + "_and_ncy"),
                    helper.make_node("Or", [p + "_cx", p + "_ncy"], list(n.output), name=p + "_or"),
                ]
            else:
                nodes.append(n)
        del g.node[:]
        g.node.extend(nodes)

    rewrite(proto.graph)
    return count


def maxpool_to_2d(proto) -> int:
    """Rewrite jax2onnx's MaxPool over an NHWC tensor (input [1, 1, B, H, W, C], window
    (1, kh, kw, 1)) as Squeeze -> Transpose to NCHW -> 2-D MaxPool -> Transpose -> Unsqueeze;
    returns how many. onnxruntime's MaxPool supports at most 3 spatial dims."""
    from onnx import helper, numpy_helper

    g = proto.graph
    nodes, count, axes = [], 0, "maxpool_nhwc_axes01"
    for n in g.node:
        ints = {a.name: list(a.ints) for a in n.attribute if a.ints}
        k = ints.get("kernel_shape", [])
        if n.op_type != "MaxPool" or len(k) != 4:
            nodes.append(n)
            continue
        s, d = ints.get("strides", [1] * 4), ints.get("dilations", [1] * 4)
        p = ints.get("pads", [0] * 8)
        if not (k[0] == k[3] == s[0] == s[3] == d[0] == d[3] == 1 and p[0] == p[3] == p[4] == p[7] == 0):
            raise NotImplementedError(f"MaxPool over batch or channels: {n}")
        if count == 0:
            g.initializer.append(numpy_helper.from_array(np.asarray([0, 1], np.int64), axes))
        q = f"maxpool_nhwc{count}"
        count += 1
        nodes += [
            helper.make_node("Squeeze", [n.input[0], axes], [q + "_nhwc"]),
            helper.make_node("Transpose", [q + "_nhwc"], [q + "_nchw"], perm=[0, 3, 1, 2]),
            helper.make_node(
                "MaxPool",
                [q + "_nchw"],
                [q + "_pool"],
                kernel_shape=k[1:3],
                strides=s[1:3],
                dilations=d[1:3],
                pads=[p[1], p[2], p[5], p[6]],
            ),
            helper.make_node("Transpose", [q + "_pool"], [q + "_out"], perm=[0, 2, 3, 1]),
            helper.make_node("Unsqueeze", [q + "_out", axes], [n.output[0]]),
        ]
    del g.node[:]
    g.node.extend(nodes)
    return count


def dedupe_initializers(proto) -> int:
    """Keep one copy of equal top-level initializers (the heads' weights are captured once per
    pyramid level: 245 -> ~140 MB for ResNet-50); returns how many were dropped."""
    import hashlib

    g = proto.graph
    first: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    keep = []
    for t in g.initializer:
        if not t.raw_data:  # small constants stored as typed fields: kept as they are
            keep.append(t)
            continue
        key = (t.data_type, tuple(t.dims), hashlib.sha256(t.raw_data).hexdigest())
        if key in first:
            rename[t.name] = first[key]
        else:
            first[key] = t.name
            keep.append(t)
    if not rename:
        return 0

    def walk(graph):
        for n in graph.node:
            for i, name in enumerate(n.input):
                if name in rename:
                    n.input[i] = rename[name]
            for sub in _subgraphs(n):
                walk(sub)

    walk(g)
    del g.initializer[:]
    g.initializer.extend(keep)
    return len(rename)


# ------------------------------------------------------------------------------ files


def save_onnx(path: str, proto: Any, meta: dict[str, Any]) -> None:
    """Write ``path`` (the ONNX model) and ``path + ".json"`` (``meta`` plus the signature)."""
    import onnx

    def sig(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            out.append(
                {
                    "name": v.name,
                    "shape": [d.dim_value for d in t.shape.dim],
                    "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                }
            )
        return out

    info = {
        "format": FORMAT,
        "version": 1,
        "opset": max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        "inputs": sig(proto.graph.input),
        "outputs": sig(proto.graph.output),
        "boxes": "xyxy in canvas pixels",
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
        **meta,
    }
    info["inputs"][1]["meaning"] = "(h, w)"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    onnx.save_model(proto, path)
    with open(path + ".json", "w") as f:
        json.dump(info, f, indent=1)
