"""``evaluate()`` with repeated class names ("N/A", as torchvision's 91 COCO outputs) gives
per-class AP by label, the same in one process and in two (tests/multihost_eval_worker.py)."""

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multihost_eval_worker.py")


def _env(devices: int) -> dict:
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": ROOT,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_repeated_class_names_evaluate_by_label_in_one_and_two_processes(tmp_path):
    one = tmp_path / "one.json"
    subprocess.run(
        [sys.executable, WORKER, str(one)],
        env=_env(2),
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=600,
    )
    address = f"localhost:{_free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, str(tmp_path / "two.json"), address, "2", str(i)],
            env=_env(1),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)

    for path in (one, tmp_path / "two.json"):
        m = json.loads(path.read_text())
        assert m["num_images"] == 6
        assert m["class_names"] == ["cat", "N/A", "dog", "N/A"]
        # Known answers by label: own detections found (1), the undetectable box missed (0),
        # the second "N/A" has no ground truth (None = NaN).
        assert m["per_class_AP"] == [pytest.approx(1.0), 0.0, pytest.approx(1.0), None], path
    two, single = json.loads((tmp_path / "two.json").read_text()), json.loads(one.read_text())
    assert two.keys() == single.keys()
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"):
        assert two[key] == pytest.approx(single[key], abs=1e-12), key
