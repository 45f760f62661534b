"""The GPU device kit (benchmarks/device_check.py) still runs: its --smoke mode on CPU.

The smoke run is every code path of the kit at toy sizes (ResNet-18 RetinaNet, 128x128, batch 2,
one timed step; our train step and Predictor, torchvision eager, torch.compile in its child
process); it also checks that the kit imports none of the packages a bare GPU machine lacks
(device_requirements.txt), so it cannot come to need them unnoticed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "device_check.py")
# Not on the lent GPU machines (benchmarks/device_requirements.txt): the kit must not import them.
# (tqdm is listed there too, but torch imports it whenever it is installed, optionally.)
ABSENT = ("ml_collections", "pycocotools", "grain", "tensorboardX", "tensorflow", "tensorflow_datasets")

# Runs the script in this interpreter and reports, at exit, which ABSENT packages it imported
# (torch probes some optional ones with find_spec, which imports nothing, so they are not blocked).
RUNNER = """
import atexit, runpy, sys
ABSENT = set(sys.argv[1].split(","))
atexit.register(lambda: print("IMPORTED_ABSENT " + ",".join(
    sorted({m.split(".")[0] for m in list(sys.modules)} & ABSENT)), flush=True))
script = sys.argv[2]
sys.argv = sys.argv[2:]
runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.slow
def test_device_check_smoke(tmp_path):
    out = tmp_path / "device_check.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # the kit runs with jax's defaults (conftest sets 8 CPU devices)
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, ",".join(ABSENT), SCRIPT, "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    assert "IMPORTED_ABSENT \n" in text, [ln for ln in text.splitlines() if "IMPORTED_ABSENT" in ln]
    assert "jax " in text and "torch " in text  # versions and devices at the top
    header = (
        "| task | framework | mode | batch | ms | device ms | images/s | MFU % | compile s "
        "| vs torch | match % |"
    )
    assert header in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and ln != header]
    kinds = {tuple(c.strip() for c in ln.split("|")[1:3]) for ln in rows}
    assert {
        ("train", "ours"),
        ("train", "torchvision"),
        ("predict", "ours"),
        ("predict", "torchvision"),
    } <= kinds, rows
    assert any("torch.compile(eager)" in ln for ln in rows), (rows, text[-2000:])

    doc = json.loads(out.read_text())
    assert doc["env"]["jax"] and doc["env"]["torch"] and not doc["skipped"]
    # The analytic FLOP count of our forward equals torch's flop counter on torchvision's.
    flops = doc["flops"]
    assert flops["torch_flop_counter_forward"] == pytest.approx(flops["forward_per_image"], rel=1e-3)
    by = {(r["task"], r["framework"]): r for r in doc["rows"] if "compile" not in r["mode"]}
    for r in doc["rows"]:
        assert r["ms"] > 0 and r["images_per_s"] > 0
    assert by[("train", "ours")]["compile_s"] is not None
    # Same weights, same images, f32 on both sides: the detections agree.
    pred = by[("predict", "ours")]
    assert pred["detections"] > 50 and pred["match"] >= 0.95
