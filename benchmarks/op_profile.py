"""Per-layer profiles of one training step, ours (jax.profiler) and torchvision's (torch.profiler).

Used by ``train_step_vs_torchvision.py --profile N``: both frameworks run N more steps of the
cell under their profiler, and the time of every op is attributed to a layer of the model and
to forward or backward, so the two steps can be compared row by row:

  stem        conv1 + bn1 + relu + max pool (torchvision ``body.conv1 .. body.maxpool``)
  layer1..4   the ResNet stages
  fpn         the feature pyramid (P6/P7 included)
  class head / box head
  other       everything else: resize / normalize, anchors, matching, losses, the optimizer

Ours: the thunks XLA:CPU runs are named after HLO instructions; the compiled module's text maps
each instruction to the ``op_name`` of its source (``.../RetinaNet)/backbone/body/layer1_0/...``,
``transpose(...)`` for the backward). A fused instruction carries the ``op_name`` of its root, so
a fusion that spans two layers counts for one of them. XLA runs independent thunks on both
threads at once; where n overlap each is charged 1/n of that stretch (wall time, not thread
time).

torchvision: forward hooks open a ``record_function`` range per module; each forward op with an
autograd sequence number takes the label of the range it ran in, and the backward node with the
same number (``autograd::engine::evaluate_function: ...Backward0``) inherits it. Gradient
accumulation (no sequence number) goes with the backward node before it. Top-level op times
(self + children, the caller's thread; oneDNN's own threads are inside them).
"""

from __future__ import annotations

import collections
import glob
import re
import tempfile
from collections.abc import Callable

import jax
import torch

LABELS = ("stem", "layer1", "layer2", "layer3", "layer4", "fpn", "class head", "box head", "other")


def _label(op_name: str) -> str:
    """The LABELS entry for one of our HLO ``op_name`` scopes."""
    m = re.search(r"backbone/body/(layer\d)", op_name)
    if m:
        return m.group(1)
    if "backbone/body/" in op_name:
        return "stem"
    if "backbone/fpn" in op_name:
        return "fpn"
    if "head/classification_head" in op_name:
        return "class head"
    if "head/regression_head" in op_name:
        return "box head"
    return "other"


class _Instr:
    """One HLO instruction of a compiled module's text. (A plain class: the tests load this
    file by path, outside sys.modules, where a dataclass's annotations cannot be resolved.)"""

    __slots__ = ("shape", "op_name", "calls", "args")

    def __init__(self, shape: str, op_name: str | None, calls: str | None, args: list[str]):
        self.shape = shape
        self.op_name = op_name  # from its metadata; filled in below where XLA dropped it
        self.calls = calls  # the computation it calls (fusions, reduce-windows), if any
        self.args = args  # operand instruction names


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
    """Instruction name -> (result shape, source ``op_name``) from a compiled module's
    ``as_text()``. XLA drops the metadata of some instructions (kernel-gradient convolutions,
    iotas, pooling's reduce-windows); those take the ``op_name`` of the computation they call
    (its first backward one if it has any), else of their nearest operand that has one, else
    of a user; "" if none."""
    instr = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+)\s(.*)$")
    op_name = re.compile(r"op_name=\"([^\"]*)\"")
    calls = re.compile(r"calls=%?([\w.\-]+)")
    comp_op: dict[str, str] = {}
    rows = {}
    comp = None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            comp = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            continue
        m = instr.match(line)
        if not m:
            continue
        name, shape, rest = m.groups()
        o, c = op_name.search(rest), calls.search(rest)
        if o and comp is not None and "transpose(" not in comp_op.get(comp, ""):
            comp_op[comp] = o.group(1)  # the first op_name, or the first of the backward's
        args = re.findall(r"%([\w.\-]+)", rest.split(", calls=")[0].split(", metadata=")[0])
        rows[name] = _Instr(shape, o.group(1) if o else None, c.group(1) if c else None, args)
    for row in rows.values():
        if row.op_name is None and row.calls is not None:
            row.op_name = comp_op.get(row.calls)
    users = collections.defaultdict(list)
    for name, row in rows.items():
        for a in row.args:
            users[a].append(name)

    def rank(o: str) -> int:  # the model's scopes name the layer; prefer them
        return 0 if "RetinaNet" in o else 1

    def nearest(name: str, links) -> str | None:
        frontier, seen = [name], {name}
        for _ in range(4):  # a few hops through data movement (copies, transposes, pads)
            frontier = [a for n in frontier for a in links(n) if a in rows and a not in seen]
            seen.update(frontier)
            found = [rows[a].op_name for a in frontier if rows[a].op_name]
            if found:
                best = min(found, key=rank)
                # Reading a cotangent makes it part of the backward, whichever scope names it.
                bwd = any("transpose(" in o for o in found) and "transpose(" not in best
                return f"transpose(inherited)/{best}" if bwd else best
        return None

    resolved = {
        name: row.op_name or nearest(name, lambda n: rows[n].args) or nearest(name, lambda n: users[n])
        for name, row in rows.items()
    }
    return {name: (row.shape, resolved[name] or "") for name, row in rows.items()}


def direction(op_name: str) -> str:
    return "bwd" if "transpose(" in op_name else "fwd"


def profile_ours(
    step: Callable[[], object], steps: int, hlo_text: str, top: int = 25
) -> tuple[dict[tuple[str, str], float], list[tuple[float, str, str, str]]]:
    """``step()`` (it must wait for its result) run ``steps`` times under ``jax.profiler.trace``:
    seconds per step by (label, "fwd" | "bwd"), and the ``top`` instructions as
    (seconds per step, name, result shape, op_name)."""
    ops = hlo_ops(hlo_text)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(steps):
                step()
        (path,) = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
        data = jax.profiler.ProfileData.from_file(path)
        spans = [
            (ev.start_ns, ev.end_ns, ev.name)
            for plane in data.planes
            for line in plane.lines
            for ev in line.events
            if ev.name in ops
        ]
    per_op = {k: v * 1e-9 / steps for k, v in split_wall_time(spans).items()}
    by_label: dict[tuple[str, str], float] = collections.defaultdict(float)
    for name, sec in per_op.items():
        op_name = ops[name][1]
        by_label[(_label(op_name), direction(op_name))] += sec
    ranked = sorted(per_op.items(), key=lambda kv: -kv[1])[:top]
    return dict(by_label), [(sec, name, *ops[name]) for name, sec in ranked]


def split_wall_time(spans: list[tuple[float, float, object]]) -> dict[object, float]:
    """Wall time by key: where n spans overlap (XLA runs independent thunks on both threads at
    once), each gets 1/n of that stretch, so the values add up to the busy wall time."""
    edges = sorted({t for s, e, _ in spans for t in (s, e)})
    starts = collections.defaultdict(list)
    for s, e, key in spans:
        starts[s].append((e, key))
    active: list[tuple[float, object]] = []
    totals: dict[object, float] = collections.defaultdict(float)
    for a, b in zip(edges, edges[1:]):
        active = [(e, k) for e, k in active if e > a] + starts.get(a, [])
        for _, key in active:
            totals[key] += (b - a) / len(active)
    return dict(totals)


def torch_labels(model: torch.nn.Module) -> dict[torch.nn.Module, str]:
    """The modules of a torchvision RetinaNet whose time is reported, by LABELS entry."""
    body = model.backbone.body
    mods = {getattr(body, n): "stem" for n in ("conv1", "bn1", "relu", "maxpool")}
    mods.update({getattr(body, f"layer{i}"): f"layer{i}" for i in range(1, 5)})
    mods[model.backbone.fpn] = "fpn"
    mods[model.head.classification_head] = "class head"
    mods[model.head.regression_head] = "box head"
    return mods


def profile_torch(
    model: torch.nn.Module, step: Callable[[], object], steps: int
) -> dict[tuple[str, str], float]:
    """Seconds per step by (label, "fwd" | "bwd") of ``step()`` (forward, backward, optimizer
    step of ``model``) run ``steps`` times under ``torch.profiler``."""
    ranges = {}

    def pre(mod, _inputs):
        ranges[mod] = torch.profiler.record_function(f"L:{labels[mod]}")
        ranges[mod].__enter__()

    def post(mod, _inputs, _output):
        ranges.pop(mod).__exit__(None, None, None)

    labels = torch_labels(model)
    hooks = [m.register_forward_pre_hook(pre) for m in labels]
    hooks += [m.register_forward_hook(post) for m in labels]
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
    finally:
        for h in hooks:
            h.remove()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    spans = [(e.time_range.start, e.time_range.end, e.name[2:]) for e in events if e.name.startswith("L:")]
    totals: dict[tuple[str, str], float] = collections.defaultdict(float)
    seq_label: dict[tuple[int, int], str] = {}
    last_bwd = "other"
    for e in events:
        if e.name.startswith("L:"):
            continue
        if e.name.startswith("autograd::engine::evaluate_function"):
            label = seq_label.get((e.thread, e.sequence_nr), "other") if e.sequence_nr >= 0 else last_bwd
            last_bwd = label
            totals[(label, "bwd")] += e.cpu_time_total * 1e-6 / steps
            continue
        if e.cpu_parent is not None and not e.cpu_parent.name.startswith("L:"):
            continue  # counted in its top-level parent
        label = next(
            (lab for s, t, lab in spans if s <= e.time_range.start and e.time_range.end <= t), "other"
        )
        if e.sequence_nr >= 0:
            seq_label[(e.thread, e.sequence_nr)] = label
        totals[(label, "fwd")] += e.cpu_time_total * 1e-6 / steps
    return dict(totals)


def print_profiles(ours: tuple, theirs: dict, wall_ours: float, wall_theirs: float) -> None:
    """One markdown table: ms per step per label and direction, ours vs torchvision; then our
    slowest instructions."""
    ours, top = ours
    print("\n| layer | ours fwd ms | torchvision fwd ms | ours bwd ms | torchvision bwd ms | bwd ours / tv |")
    print("| --- | --- | --- | --- | --- | --- |")
    sums = [0.0] * 4
    for lab in LABELS:
        vals = [
            ours.get((lab, "fwd"), 0),
            theirs.get((lab, "fwd"), 0),
            ours.get((lab, "bwd"), 0),
            theirs.get((lab, "bwd"), 0),
        ]
        sums = [a + b for a, b in zip(sums, vals)]
        ratio = f"{vals[2] / vals[3]:.2f}" if vals[3] > 0 else "-"
        print(f"| {lab} | " + " | ".join(f"{1e3 * v:.0f}" for v in vals) + f" | {ratio} |")
    print("| sum of ops | " + " | ".join(f"{1e3 * v:.0f}" for v in sums) + " | |")
    ms = f"ours {1e3 * wall_ours:.0f} ms, torchvision {1e3 * wall_theirs:.0f} ms"
    print(f"timed step (median, unprofiled): {ms}")
    print("\nour slowest instructions (ms per step, wall share):")
    for sec, name, shape, op_name in top:
        where = f"{_label(op_name):10s} {direction(op_name)}"
        print(f"  {1e3 * sec:7.1f}  {name:26s} {where}  {shape:28s} {op_name[-80:]}")
