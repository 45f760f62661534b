"""README.md is a test: every command in its ```bash blocks runs here or in ``.ci/run``.

``README_COMMANDS`` maps each command (lines joined, ``# comments`` stripped) to how it is
checked, and ``test_every_readme_command_has_a_check`` fails when README.md gains a command the
table does not know (wire it in) or loses one the table still lists:

- ``ci``: the command appears verbatim in ``.ci/run``.
- ``run``: executed here literally (same argv; ``python`` = this interpreter, ``retinanet-jax``
  = the console script next to it) in a temporary directory that holds fixtures under the
  README's file names: a torchvision ``retinanet_resnet50_fpn(num_classes=91)`` ``.pth`` with
  random weights and a lively class bias, ``photos/`` + ``more/a/b.jpg``, a 3-image COCO-JSON
  set ``val.json`` + ``val2017/`` with the 80 COCO categories, and ``train.py`` / ``configs/``
  linked from the repository. The value names the test that asserts on the outputs.
  **Overrides appended**: the two ``train.py`` commands get ``TINY_SHAPES`` (2 steps of batch 2
  instead of 1350 of 16) and the localhost two-process recipe ``TINY_TWO`` plus a free port in
  place of 8476; nothing else is changed.
- ``external``: needs what a test machine cannot have (the reason is given). Its ``train.py``
  part is still parsed by train.py's own absl flags (``--config`` loaded, ``--config.*``
  overrides applied, the distributed flags turned into a start-up plan) in
  ``test_external_commands_parse``.
- ``covered``: run exactly so by another test, named as ``tests/FILE.py::TEST`` (checked to
  exist). tests/test_multihost.py runs two localhost processes through
  tests/multihost_worker.py with extra flags, not the README's lines, so the recipe is ``run``.
- ``extra``: needs an optional extra that the test command does not install; the named test
  (``tests/FILE.py::TEST``, checked to exist) runs the same command on a smaller canvas, and
  ``.ci/run`` installs that extra and runs the test's file (checked).

The ``run`` commands execute in two lanes (threads; each lane's commands in README order,
each command after the ones whose outputs it reads), so two processes compile at a time on
a 2-core machine; the two ``evaluate`` commands both write ``./eval`` and never overlap.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import importlib.metadata
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CI_RUN = REPO / ".ci" / "run"
BIN = Path(sys.executable).parent  # the virtual environment's bin/: python, retinanet-jax
TIMEOUT = 1500  # s per command; measured 1-5 min each on a loaded 2-core machine

# ------------------------------------------------------------------------------ the commands

QUICKSTART = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && "
    "python train.py --config configs/shapes.py --workdir runs/shapes"
)
TESTS = 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]" && python -m pytest'
CONVERT_PTH = "retinanet-jax convert retinanet_resnet50_fpn_coco-eeacb38b.pth models/coco_v1"
CONVERT_RUN = "retinanet-jax convert runs/shapes shapes.pth"
PREDICT = "retinanet-jax predict models/coco_v1 photos/ 'more/**/*.jpg' -o dets.json --draw overlays/"
EVALUATE_RUN = "retinanet-jax evaluate runs/shapes"
EVALUATE_COCO = (
    "retinanet-jax evaluate models/coco_v1 --data coco_json annotation_file=val.json image_dir=val2017"
)
EXPORT = "retinanet-jax export models/coco_v1 coco_v1.jaxexport --batch-size 1 --canvas 800 1344"
EXPORT_ONNX = "retinanet-jax export models/coco_v1 coco_v1.onnx --format onnx --canvas 800 1216"
TRAIN_LR = (
    "python train.py --config configs/shapes.py --workdir runs/shapes_lr002 --config.optim.base_lr=0.002"
)
TRAIN_COCO = "python train.py --config configs/coco_r50_fpn_v1.py --workdir gs://bucket/retinanet_v1"
TPU_POD = (
    "gcloud compute tpus tpu-vm ssh my-v4-32 --zone=us-central2-b --worker=all "
    '--command="cd retinanet_jax && python train.py --config configs/coco_r50_fpn_v1.py '
    '--workdir gs://bucket/retinanet_v1"'
)
SLURM = (
    "srun --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 python train.py "
    "--config configs/coco_r50_fpn_v1.py --workdir /shared/runs/retinanet_v1"
)
NODE_I = (
    "python train.py --config configs/coco_r50_fpn_v1.py --workdir /shared/runs/retinanet_v1 "
    "--coordinator_address=10.0.0.1:8476 --num_processes=N --process_id=i"
)
TWO_EXPORT = "export JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2"
TWO_LOOP = (
    "for i in 0 1; do python train.py --config configs/tiny.py --workdir runs/two_processes "
    "--coordinator_address=localhost:8476 --num_processes=2 --process_id=$i & done; wait"
)


@dataclasses.dataclass(frozen=True)
class Check:
    kind: str  # ci | run | external | covered | extra
    how: str  # run: the test asserting on it; external: the reason; covered, extra: FILE::TEST


README_COMMANDS: dict[str, Check] = {
    QUICKSTART: Check("run", "test_quickstart_training"),  # + test_installed_like_the_quickstart
    TESTS: Check("ci", ".ci/run"),
    CONVERT_PTH: Check("run", "test_convert_torchvision_pth"),
    CONVERT_RUN: Check("run", "test_convert_run_to_pth"),
    PREDICT: Check("run", "test_predict"),
    EVALUATE_RUN: Check("run", "test_evaluate_run"),
    EVALUATE_COCO: Check("run", "test_evaluate_coco_json"),
    EXPORT: Check("run", "test_export"),
    EXPORT_ONNX: Check("extra", "tests/test_onnx_export.py::test_v2_cli_export_onnx_matches_predict"),
    TRAIN_LR: Check("run", "test_train_again_with_another_lr"),
    TRAIN_COCO: Check(
        "external",
        "a gs:// bucket and the tfds COCO 2017 download (~20 GB) and 26 epochs of ResNet-50 at 800 px",
    ),
    TPU_POD: Check("external", "gcloud ssh into a Cloud TPU v4-32 slice, workdir in a gs:// bucket"),
    SLURM: Check("external", "srun on a SLURM cluster of 2 nodes x 8 GPUs sharing /shared"),
    NODE_I: Check("external", "N nodes with process 0's coordinator at 10.0.0.1 and a shared /shared"),
    TWO_EXPORT: Check("run", "test_two_processes_on_localhost"),
    TWO_LOOP: Check("run", "test_two_processes_on_localhost"),
}

# Appended to the README's train.py commands (the quickstart trains 1350 steps of 16 images at
# 96 px and evaluates 500: ~10 min). Both commands get the same ones: a resumed run refuses
# another batch size or training set (training/resume.py).
TINY_SHAPES = [
    "--config.num_steps=2",
    "--config.batch_size=2",
    "--config.dataset.train.num_images=4",
    "--config.dataset.val.num_images=4",
    "--config.eval.batch_size=4",
    "--config.eval.every_steps=2",
    "--config.checkpoint.every_steps=2",
    "--config.log_every_steps=1",
    "--config.optim.warmup_steps=1",
]
# Appended to each process of the localhost recipe (configs/tiny.py: 6 steps and evaluation).
TINY_TWO = [
    "--config.num_steps=2",
    "--config.checkpoint.every_steps=2",
    "--config.log_every_steps=1",
    "--config.eval.enabled=false",
    "--config.model.trainable_backbone_layers=0",
]  # smaller backward: faster compile
# README placeholders in the external commands -> values the flags accept.
PLACEHOLDERS = {"--num_processes=N": "--num_processes=4", "--process_id=i": "--process_id=3"}


# ------------------------------------------------------------------------------ README parsing


def _strip_comment(line: str) -> str:
    """``line`` without a bash ``# comment`` (a ``#`` outside quotes, at the start or after a blank)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def readme_commands(text: str) -> list[str]:
    """The commands of every ```bash block: continuation lines joined, comments and blanks dropped."""
    commands: list[str] = []
    for block in re.findall(r"^```bash[ \t]*\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE):
        pending = ""
        for raw in block.splitlines():
            if raw.rstrip().endswith("\\"):
                pending += raw.rstrip()[:-1].strip() + " "
                continue
            line = _strip_comment(pending + raw.strip()).strip()
            pending = ""
            if line:
                commands.append(line)
    return commands


def test_readme_parser():
    text = (
        "x\n```bash\n# a comment\na --b 'c # d'  # note\n\nlong \\\n  --x=1\n```\n"
        "```python\nnot = 'a command'\n```\n```bash\nz\n```\n"
    )
    assert readme_commands(text) == ["a --b 'c # d'", "long --x=1", "z"]


# ------------------------------------------------------------------------------ the table


def test_every_readme_command_has_a_check():
    commands = readme_commands(README.read_text())
    unchecked = [c for c in commands if c not in README_COMMANDS]
    assert not unchecked, (
        "README.md commands that no test runs; add each to README_COMMANDS "
        f"in tests/test_readme.py (and run it there or in .ci/run): {unchecked}"
    )
    stale = [c for c in README_COMMANDS if c not in commands]
    assert not stale, f"README_COMMANDS lists commands README.md no longer has: {stale}"
    assert {c.kind for c in README_COMMANDS.values()} <= {"ci", "run", "external", "covered", "extra"}


def test_run_and_covered_entries_name_tests_that_exist():
    here = {n.name for n in ast.parse(Path(__file__).read_text()).body if isinstance(n, ast.FunctionDef)}
    for command, check in README_COMMANDS.items():
        if check.kind == "run":
            assert check.how in here, (command, check)
            assert command in LANE_COMMANDS, f"no lane runs {command!r}"
        elif check.kind in ("covered", "extra"):
            file, _, name = check.how.partition("::")
            tree = ast.parse((REPO / file).read_text())
            assert name in {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}, check
            if check.kind == "extra":  # .ci/run installs the extra and runs that file
                assert f"pytest {file}" in CI_RUN.read_text(), check


def test_ci_commands_appear_verbatim_in_ci_run():
    ci = CI_RUN.read_text()
    lines = [line for line in ci.splitlines() if "pytest" in line and not line.lstrip().startswith("#")]
    for command, check in README_COMMANDS.items():
        if check.kind == "ci":
            assert command in ci, (
                f"README says .ci/run runs exactly {command!r}; its pytest lines are {lines}"
            )


def test_installed_like_the_quickstart():
    """The quickstart's install part: this is a virtual environment with an editable install of
    this checkout (.ci/run makes it with ``pip install -e ".[test]"``) and the console script."""
    assert sys.prefix != sys.base_prefix  # python3 -m venv .venv && . .venv/bin/activate
    # The installed distribution (not the repository's own retinanet_jax.egg-info, which is
    # found first from the repository root): pip records an editable install of REPO.
    urls = [
        json.loads(d.read_text("direct_url.json"))
        for d in importlib.metadata.distributions(name="retinanet_jax")
        if d.read_text("direct_url.json")
    ]
    assert any(
        u.get("dir_info", {}).get("editable") and Path(u["url"].removeprefix("file://")).resolve() == REPO
        for u in urls
    ), urls
    assert (BIN / "retinanet-jax").is_file()


# ------------------------------------------------------------------------------ external commands

FLAG_CHECK = r"""
import json, runpy, sys
from absl import flags
runpy.run_path("train.py", run_name="readme_flag_check")  # defines train.py's flags, runs nothing
from retinanet_jax.parallel import distributed
out = []
for argv, env in json.loads(sys.argv[1]):
    flags.FLAGS.unparse_flags()
    sys.argv = list(argv)  # ml_collections reads --config.* overrides from sys.argv
    try:
        rest = flags.FLAGS(argv)
        mode, options = distributed.from_flags()
        out.append({"unparsed": rest[1:], "workdir": flags.FLAGS.workdir,
                    "batch_size": flags.FLAGS.config.batch_size,
                    "plan": distributed.plan(mode, options, env)})
    except Exception as e:
        out.append({"error": f"{type(e).__name__}: {e}"})
print("RESULT" + json.dumps(out))
"""
SLURM_ENV = {
    "SLURM_JOB_ID": "7",
    "SLURM_STEP_NODELIST": "node[1-2]",
    "SLURM_NTASKS": "16",
    "SLURM_STEP_NUM_TASKS": "16",
    "SLURM_PROCID": "9",
    "SLURM_LOCALID": "1",
}


def _train_argv(command: str) -> tuple[list[str], dict]:
    """The ``train.py`` argv inside an external command, and the launcher's environment."""
    argv = shlex.split(command)
    env: dict = {}
    if argv[0] == "gcloud":
        (inner,) = [a.split("=", 1)[1] for a in argv if a.startswith("--command=")]
        assert inner.startswith("cd retinanet_jax && "), inner
        argv = shlex.split(inner.split(" && ", 1)[1])
    elif argv[0] == "srun":
        argv, env = argv[argv.index("python") :], SLURM_ENV
    assert argv[:2] == ["python", "train.py"], argv
    return [PLACEHOLDERS.get(a, a) for a in argv[1:]], env


def test_external_commands_parse():
    """Each external command's train.py flags parse with train.py's own flag definitions."""
    external = [c for c, check in README_COMMANDS.items() if check.kind == "external"]
    assert all(README_COMMANDS[c].how for c in external)
    cases = [_train_argv(c) for c in external]
    bad = (["train.py", "--config", "configs/shapes.py", "--workdir", "w", "--no_such_flag=1"], {})
    proc = subprocess.run(
        [sys.executable, "-c", FLAG_CHECK, json.dumps([*cases, bad])],
        cwd=REPO,
        check=False,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    *results, refused = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert "no_such_flag" in refused.get("error", ""), refused  # the check can fail
    plans = {}
    for command, (argv, _), result in zip(external, cases, results):
        assert "error" not in result and result["unparsed"] == [], (command, result)
        assert result["workdir"] == argv[argv.index("--workdir") + 1]
        assert result["batch_size"] == 16  # configs/coco_r50_fpn_v1.py loaded
        plans[command] = result["plan"]
    # How each would start: a plain process, jax's SLURM detection, the explicit coordinator.
    assert plans == {TRAIN_COCO: None, TPU_POD: None, SLURM: "slurm", NODE_I: "explicit settings"}


# ------------------------------------------------------------------------------ fixtures


def _env() -> dict:
    """A user's shell: CPU jax, without the pytest process's 8 fake devices (conftest), with
    the virtual environment's bin/ first on PATH (``python`` in the bash recipe)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    return env


def _jpeg(path: Path, seed: int, hw=(48, 64)) -> None:
    """A small landscape JPEG (every one resizes to 800x1067: one canvas, one compilation)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = hw
    y, x = np.mgrid[0:h, 0:w]
    pixels = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w)], -1) + rng.normal(0, 20, (h, w, 3))
    pixels[h // 4 : h // 2, w // 4 : w // 2] = rng.integers(0, 255, 3)  # a block: something to find
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


def _coco_names() -> list[str]:
    """torchvision's 91 COCO_V1 label names (label = COCO category id; 0 and 10 ids unused)."""
    from torchvision.models.detection import RetinaNet_ResNet50_FPN_Weights

    return list(RetinaNet_ResNet50_FPN_Weights.COCO_V1.meta["categories"])


def coco_categories() -> list[dict]:
    """The 80 COCO categories with their real ids."""
    return [
        {"id": i, "name": n, "supercategory": "thing"}
        for i, n in enumerate(_coco_names())
        if n not in ("__background__", "N/A")
    ]


VAL_IMAGES = ["000000000139.jpg", "000000000285.jpg", "000000000632.jpg"]
# (image, category id, [x, y, w, h]) on 64x48 images
VAL_BOXES = [
    (0, 1, [16, 12, 16, 12]),
    (0, 3, [30, 20, 30, 25]),
    (1, 1, [4, 4, 40, 30]),
    (1, 18, [40, 10, 20, 30]),
    (2, 62, [10, 10, 20, 20]),
]


def make_workspace(root: Path) -> None:
    import torch
    import torchvision

    for name in ("train.py", "configs"):  # the README's train.py commands run in the repo root
        (root / name).symlink_to(REPO / name)
    torch.manual_seed(0)
    model = torchvision.models.detection.retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91
    )
    names = _coco_names()
    with torch.no_grad():
        bias = model.head.classification_head.cls_logits.bias
        bias.normal_(-1, 1)  # lively: every image fills its 300 detections
        # As in the real checkpoint, the unused outputs (background, 10 "N/A") never fire;
        # otherwise random weights give N/A the top scores and evaluate keeps no detection.
        unused = [k for k, n in enumerate(names) if n in ("__background__", "N/A")]
        bias.view(-1, len(names))[:, unused] = -10.0  # channel = anchor * 91 + class
    # The real retinanet_resnet50_fpn_coco-eeacb38b.pth has FrozenBatchNorm2d buffers (no
    # num_batches_tracked, which BatchNorm2d adds with weights=None): the same key set here.
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, root / "retinanet_resnet50_fpn_coco-eeacb38b.pth")
    for i, rel in enumerate(["photos/street.jpg", "photos/park.jpg", "more/a/b.jpg"]):
        _jpeg(root / rel, seed=i)
    for i, name in enumerate(VAL_IMAGES):
        _jpeg(root / "val2017" / name, seed=10 + i)
    coco = {
        "images": [{"id": int(n[:-4]), "file_name": n, "height": 48, "width": 64} for n in VAL_IMAGES],
        "annotations": [
            {
                "id": k + 1,
                "image_id": int(VAL_IMAGES[i][:-4]),
                "category_id": c,
                "bbox": b,
                "area": b[2] * b[3],
                "iscrowd": 0,
            }
            for k, (i, c, b) in enumerate(VAL_BOXES)
        ],
        "categories": coco_categories(),
    }
    (root / "val.json").write_text(json.dumps(coco))


# ------------------------------------------------------------------------------ running


@dataclasses.dataclass
class Result:
    command: str  # what ran (README command + appended overrides)
    returncode: int | None
    output: str  # stdout + stderr
    seconds: float
    captured: dict = dataclasses.field(default_factory=dict)  # files read right after it ran


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _exe(argv: list[str]) -> list[str]:
    return [
        sys.executable
        if argv[0] == "python"
        else str(BIN / argv[0])
        if argv[0] == "retinanet-jax"
        else argv[0],
        *argv[1:],
    ]


def _run(args, cwd: Path, shell: bool = False) -> tuple[int | None, str, float]:
    """Run to completion; on timeout kill the whole process group (the bash recipe's children)."""
    start = time.time()
    proc = subprocess.Popen(
        ["bash", "-c", args] if shell else args,
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        out += f"\n[test_readme: killed after {TIMEOUT} s]"
    return proc.returncode, out, round(time.time() - start, 1)


def two_process_script() -> str:
    """The localhost recipe as README.md has it: a free port, TINY_TWO appended to each process."""
    loop = TWO_LOOP.replace("localhost:8476", f"localhost:{_free_port()}")
    loop = loop.replace("--process_id=$i &", f"--process_id=$i {' '.join(TINY_TWO)} &")
    assert loop.count(TINY_TWO[0]) == 1 and "8476" not in loop
    return f"{TWO_EXPORT}\n{loop}\n"


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _capture_eval(root: Path) -> dict:
    return {
        "metrics": _read_json(root / "eval" / "metrics.json"),
        "detections": _read_json(root / "eval" / "detections.json"),
        "plots": sorted(p.name for p in (root / "eval").glob("pr_*.png")),
    }


def _capture_run(root: Path, name: str = "shapes") -> dict:
    run = root / "runs" / name
    return {
        "metrics.jsonl": (run / "metrics.jsonl").read_text() if (run / "metrics.jsonl").is_file() else "",
        "checkpoints": sorted(os.listdir(run / "checkpoints")) if (run / "checkpoints").is_dir() else [],
    }


@dataclasses.dataclass
class Step:
    readme: str  # the README command (a key of README_COMMANDS)
    extra: list = dataclasses.field(default_factory=list)  # appended arguments
    capture: Callable[[Path], dict] | None = None
    lock: str | None = None  # steps sharing a lock name never run at the same time
    needs: tuple = ()  # README commands whose outputs it reads (it is not run if one failed)

    def run(self, root: Path) -> Result:
        if self.readme == TWO_LOOP:
            script = two_process_script()
            code, out, seconds = _run(script, root, shell=True)
            return Result(script, code, out, seconds)
        segment = self.readme.split(" && ")[-1]  # the quickstart's install part: see above
        argv = shlex.split(segment) + self.extra
        code, out, seconds = _run(_exe(argv), root)
        return Result(shlex.join(argv), code, out, seconds)


# Lane 1 trains and uses runs/shapes, then the two-process recipe; lane 2 the COCO model.
LANES = [
    [
        Step(QUICKSTART, TINY_SHAPES, _capture_run),
        Step(TRAIN_LR, TINY_SHAPES, functools.partial(_capture_run, name="shapes_lr002")),
        Step(CONVERT_RUN, needs=(QUICKSTART,)),
        Step(EVALUATE_RUN, capture=_capture_eval, lock="eval", needs=(QUICKSTART,)),
        Step(TWO_LOOP),
    ],
    [
        Step(CONVERT_PTH),
        Step(PREDICT, needs=(CONVERT_PTH,)),
        Step(EXPORT, needs=(CONVERT_PTH,)),
        Step(EVALUATE_COCO, capture=_capture_eval, lock="eval", needs=(CONVERT_PTH,)),
    ],
]
LANE_COMMANDS = {s.readme for lane in LANES for s in lane} | {TWO_EXPORT}  # TWO_EXPORT: in TWO_LOOP's script


class Runs:
    """Runs LANES in background threads; ``get(command)`` waits for one command's result."""

    def __init__(self, root: Path):
        self.root = root
        self.results: dict[str, Result] = {}
        self.done = {s.readme: threading.Event() for lane in LANES for s in lane}
        self.locks = {s.lock: threading.Lock() for lane in LANES for s in lane if s.lock}
        self.threads = [threading.Thread(target=self._lane, args=(lane,), daemon=True) for lane in LANES]
        self.start = time.time()
        for t in self.threads:
            t.start()

    def _lane(self, lane: list[Step]) -> None:
        for step in lane:
            try:
                failed = [
                    c
                    for c in step.needs
                    if not self.done[c].wait(TIMEOUT * 3) or self.results[c].returncode != 0
                ]
                if failed:
                    self.results[step.readme] = Result(step.readme, None, f"not run: {failed} failed", 0.0)
                    continue
                with self.locks[step.lock] if step.lock else contextlib.nullcontext():
                    result = step.run(self.root)
                    if step.capture:
                        result.captured = step.capture(self.root)
                self.results[step.readme] = result
            except BaseException as e:  # noqa: BLE001 - reported by the test that waits for it
                self.results[step.readme] = Result(step.readme, None, f"{type(e).__name__}: {e}", 0.0)
            finally:
                self.done[step.readme].set()

    def get(self, command: str, ok: bool = True) -> Result:
        assert self.done[command].wait(TIMEOUT * 3), f"{command!r} still running"
        result = self.results[command]
        if ok:
            assert result.returncode == 0, (
                f"{result.command}\nexit {result.returncode} after "
                f"{result.seconds} s:\n{result.output[-6000:]}"
            )
        return result

    def close(self) -> None:
        for t in self.threads:
            t.join(TIMEOUT * 3)
        times = {c[:50]: r.seconds for c, r in self.results.items()}
        print(f"\nREADME commands: {round(time.time() - self.start)} s wall; each: {times}")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("readme")
    make_workspace(root)
    return root


@pytest.fixture(scope="module")
def runs(workspace):
    r = Runs(workspace)
    yield r
    r.close()


# ------------------------------------------------------------------------------ run: training


def _metric_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.slow
def test_quickstart_training(runs, workspace):
    result = runs.get(QUICKSTART)
    assert "Final metrics at step 2" in result.output
    lines = _metric_lines(result.captured["metrics.jsonl"])
    assert [r["step"] for r in lines if "train/loss" in r] == [1, 2]
    assert [r["step"] for r in lines if "eval/AP" in r] == [2]
    assert all(np.isfinite(r["train/loss"]) for r in lines if "train/loss" in r)
    assert result.captured["checkpoints"] == ["2"]
    config = json.loads((workspace / "runs" / "shapes" / "config.json").read_text())
    assert config["dataset"]["source"] == "shapes" and config["model"]["backbone"] == "resnet18"
    assert config["num_steps"] == 2 and config["optim"]["base_lr"] == 0.003  # configs/shapes.py's
    assert isinstance(json.loads((workspace / "runs" / "shapes" / "detections.json").read_text()), list)


@pytest.mark.slow
def test_train_again_with_another_lr(runs, workspace):
    """A new workdir with another base learning rate: a fresh run of the same recipe."""
    again = runs.get(TRAIN_LR)
    assert "Final metrics at step 2" in again.output, again.output[-3000:]
    lines = _metric_lines(again.captured["metrics.jsonl"])
    assert [r["step"] for r in lines if "train/loss" in r] == [1, 2]
    assert again.captured["checkpoints"] == ["2"]
    config = json.loads((workspace / "runs" / "shapes_lr002" / "config.json").read_text())
    assert config["optim"]["base_lr"] == 0.002


@pytest.mark.slow
def test_two_processes_on_localhost(runs, workspace):
    result = runs.get(TWO_LOOP)  # bash's `wait` returns 0 whatever the processes did: check outputs
    assert "Traceback" not in result.output, result.output[-6000:]
    assert "process 0 of 2, 4 devices (2 local)" in result.output, result.output[-6000:]
    assert "Final metrics at step 2" in result.output, result.output[-6000:]
    run = workspace / "runs" / "two_processes"
    assert [r["step"] for r in _metric_lines((run / "metrics.jsonl").read_text()) if "train/loss" in r] == [
        1,
        2,
    ]
    # Every process wrote its part of the checkpoint (orbax saves collectively).
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(run / "checkpoints" / "2" / "state"))


# ------------------------------------------------------------------------------ run: retinanet-jax


@pytest.mark.slow
def test_convert_torchvision_pth(runs, workspace):
    runs.get(CONVERT_PTH)
    meta = json.loads((workspace / "models" / "coco_v1" / "model.json").read_text())
    assert meta["model"]["backbone"] == "resnet50" and meta["model"]["variant"] == "v1"
    assert meta["model"]["num_classes"] == 91
    # The COCO_V1 checkpoint's convention (README): FrozenBatchNorm2d with eps 0.0.
    assert meta["model"]["frozen_bn"] is True and meta["model"]["bn_eps"] == 0.0
    assert meta["class_names"] == _coco_names() and meta["category_ids"] == list(range(91))
    assert (workspace / "models" / "coco_v1" / "variables.msgpack").stat().st_size > 100e6


@pytest.mark.slow
def test_predict(runs, workspace):
    result = runs.get(PREDICT)
    assert "3 images" in result.output
    dets = json.loads((workspace / "dets.json").read_text())
    names = _coco_names()
    assert "N/A" not in {d["category_name"] for d in dets}
    files = {"photos/park.jpg": 1, "photos/street.jpg": 2, "more/a/b.jpg": 3}  # directory sorted, then glob
    assert {d["file_name"]: d["image_id"] for d in dets} == files
    for d in dets:
        x, y, w, h = d["bbox"]
        assert 0 <= x <= x + w <= 64.01 and 0 <= y <= y + h <= 48.01 and w >= 0 and h >= 0, d
        assert 0.05 < d["score"] <= 1 and d["category_name"] == names[d["category_id"]], d
    assert len(dets) == 3 * 300  # the lively class bias fills torchvision's 300 detections each
    from PIL import Image

    overlays = sorted(p.name for p in (workspace / "overlays").iterdir())
    assert overlays == ["b.png", "park.png", "street.png"]
    for name in overlays:
        with Image.open(workspace / "overlays" / name) as im:
            assert im.format == "PNG" and im.size == (64, 48)


@pytest.mark.slow
def test_export(runs, workspace):
    import jax

    runs.get(EXPORT)
    info = json.loads((workspace / "coco_v1.jaxexport.json").read_text())
    assert info["inputs"][0] == {"name": "images", "shape": [1, 800, 1344, 3], "dtype": "uint8"}
    assert info["platforms"] == ["cpu", "cuda", "tpu"] and len(info["class_names"]) == 91
    exp = jax.export.deserialize(bytearray((workspace / "coco_v1.jaxexport").read_bytes()))
    assert [tuple(a.shape) for a in exp.in_avals] == [(1, 800, 1344, 3), (1, 2)]
    assert [tuple(a.shape) for a in exp.out_avals] == [(1, 300, 4), (1, 300), (1, 300), (1,)]


@pytest.mark.slow
def test_evaluate_coco_json(runs, workspace):
    result = runs.get(EVALUATE_COCO)
    metrics, dets = result.captured["metrics"], result.captured["detections"]
    names = [c["name"] for c in coco_categories()]
    assert list(metrics["per_class"]) == names  # the 80 classes, in category id order
    assert metrics["num_images"] == 3
    gt = {n: 0 for n in names}
    for _, cat, _ in VAL_BOXES:
        gt[_coco_names()[cat]] += 1
    assert {n: v["num_gt"] for n, v in metrics["per_class"].items()} == gt
    for name, v in metrics["per_class"].items():  # AP only where there is ground truth
        assert (v["AP"] is None) == (gt[name] == 0) and (v["AP"] is None or 0 <= v["AP"] <= 1), (name, v)
    assert 0 <= metrics["AP"] <= 1 and 0 <= metrics["AP50"] <= 1
    # torchvision's 91 outputs: the background and the 10 "N/A" slots are not dataset classes.
    assert sorted(a["name"] for a in metrics["absent_outputs"]) == ["N/A"] * 10 + ["__background__"]
    valid_ids = {c["id"] for c in coco_categories()}
    assert len(dets) > 100 and {d["category_id"] for d in dets} <= valid_ids
    assert {d["image_id"] for d in dets} <= {int(n[:-4]) for n in VAL_IMAGES}
    assert "pr_all.png" in result.captured["plots"] and "pr_000_person.png" in result.captured["plots"]


@pytest.mark.slow
def test_evaluate_run(runs):
    result = runs.get(EVALUATE_RUN)
    metrics = result.captured["metrics"]
    assert list(metrics["per_class"]) == ["circle", "square", "triangle", "hexagon", "star"]
    assert metrics["num_images"] == 4  # the stored config's validation split (TINY_SHAPES)
    assert metrics["step"] == 2 and "runs/shapes" in metrics["checkpoint"]


@pytest.mark.slow
def test_convert_run_to_pth(runs, workspace):
    """shapes.pth loads with strict=True into the torchvision RetinaNet of the same architecture
    (ResNet-18 body, 64-channel FPN with P6 from C5, GroupNorm heads, anchors 16..256 px); the
    CLI itself cannot check that: torchvision has no builder for it."""
    from functools import partial

    import torch
    import torchvision
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    result = runs.get(CONVERT_RUN)
    assert "wrote shapes.pth" in result.output
    state = torch.load(workspace / "shapes.pth", map_location="cpu", weights_only=True)
    config = json.loads((workspace / "runs" / "shapes" / "config.json").read_text())
    sizes = tuple(tuple(s) for s in config["model"]["anchor_sizes"])
    fpn = config["model"]["fpn_channels"]
    backbone = BackboneWithFPN(
        torchvision.models.resnet18(),
        {"layer2": "0", "layer3": "1", "layer4": "2"},
        [128, 256, 512],
        fpn,
        extra_blocks=LastLevelP6P7(512, fpn),
    )
    head = RetinaNetHead(fpn, 9, 5, norm_layer=partial(torch.nn.GroupNorm, 32))
    model = RetinaNet(backbone, 5, anchor_generator=AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5), head=head)
    model.load_state_dict(state, strict=True)
