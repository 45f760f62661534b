"""Multi-process training on one CPU machine, the way a TPU pod slice or a GPU cluster runs it.

``train.py`` runs as 2 processes on localhost, 2 fake CPU devices each, collectives through
gloo, coordinated by ``jax.distributed`` (tests/multihost_worker.py adds a "die here" hook).
The references run in this pytest process on 4 of its 8 fake devices. One module fixture
runs, in order (the tiny config, 64 px images, global batch 8):

  A  2 processes, 4 steps, checkpoints every 2; process 1 SIGKILLs itself after step 3
     (once checkpoint 2 is complete): process 0 must stop on its own, with a clear error,
     within the heartbeat timeout instead of waiting in the next collective forever;
  B  the same command again: resumes from checkpoint 2, trains to 4, evaluates;
  C  1 process, 4 devices (data 4), from scratch to step 6: the reference;
  D  1 process continuing a copy of B's workdir (the 2-process checkpoint) from 4 to 6;
  E  1 process, 4 devices as (data 2, model 2), from scratch to step 4.

Every run computes in float64 (``JAX_ENABLE_X64=1``, ``model.compute_dtype="float64"``) with
the tiny config's own recipe (AdamW, per-step cosine), so that the comparisons can be tight on
every leaf whatever the order of the sums (see OVERRIDES).

Compilation dominates the cost, so B reuses A's compilations and D and E reuse C's through
persistent compilation caches.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import types

import config_utils
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from retinanet_jax.parallel import distributed
from retinanet_jax.parallel import mesh as parallel
from retinanet_jax.training import loop as train_loop


@pytest.fixture(scope="module", autouse=True)
def _cache(xla_compilation_cache):
    """The in-process runs D and E reuse C's compilations (init, train step)."""


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multihost_worker.py")
HEARTBEAT = 10  # seconds; the production default is 60 (DistributedOptions.heartbeat_timeout)
# The tiny config, lighter: frozen ResNet stages (its trainable BatchNorm still normalizes with
# global batch statistics), no evaluation unless asked; its recipe as shipped (AdamW, warmup,
# per-step cosine, clipping), in float64. Why float64: in float32 the 2-process and 1-process
# programs differ by rounding (the order of the sums over devices and processes), which on
# most leaves is ~1e-7 of their scale, but some gradients are cancellation noise (the FPN
# biases: a near-constant shift that the GroupNorm downstream nearly removes), so their float32
# values are mostly rounding error and differ between the programs by tens of percent; Adam
# divides by sqrt(v) and turns that into lr-sized updates (measured on another machine:
# inner_blocks_0_0 bias 28/32 elements beyond 1e-5, 14.6% of its scale after 6 steps). In
# float64 the same rounding is 2**29 times smaller: docs/performance.md, "Multi-device equality
# (float64)", and tests/test_training.py's float64 tests.
OVERRIDES = {
    "model.trainable_backbone_layers": 0,
    "checkpoint.every_steps": 2,
    "log_every_steps": 1,
    "input.worker_count": 0,
    "eval.enabled": False,
    "model.compute_dtype": "float64",
}
X64 = {"JAX_ENABLE_X64": "1"}  # float64 in the worker processes (train.py)
EVAL = {
    "eval.enabled": True,
    "eval.every_steps": 100,
    "eval.score_thresh": 0.0,
}  # untrained scores sit below 0.05: keep every box
FATAL = "Terminating process because the JAX distributed service detected fatal errors"


def tiny_config(**overrides):
    return config_utils.tiny_config(**{**OVERRIDES, **overrides})


@dataclasses.dataclass
class Run:
    returncodes: list[int]
    logs: list[str]
    exit_times: list[float]  # time.time() when each process ended
    seconds: float


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(
    workdir,
    logdir,
    *,
    steps: int,
    cache: str,
    overrides=None,
    env=None,
    processes: int = 2,
    devices: int = 2,
    timeout: float = 1200,
) -> Run:
    """Runs ``train.py`` as ``processes`` processes with ``devices`` fake CPU devices each."""
    port = _free_port()
    os.makedirs(logdir, exist_ok=True)
    config_flags = [f"--config.{k}={v}" for k, v in {**OVERRIDES, **(overrides or {})}.items()]
    procs, files = [], []
    for i in range(processes):
        # Override the pytest process's 8 devices (conftest) for the child.
        proc_env = {
            **os.environ,
            **X64,
            **(env or {}),
            "JAX_PLATFORMS": "cpu",
            "PYTHONUNBUFFERED": "1",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_COMPILATION_CACHE_DIR": cache,  # B reuses A's compilations
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
        }
        args = [
            sys.executable,
            WORKER,
            "--config=configs/tiny.py",
            *config_flags,
            f"--config.num_steps={steps}",
            f"--workdir={workdir}",
            f"--coordinator_address=localhost:{port}",
            f"--num_processes={processes}",
            f"--process_id={i}",
            f"--heartbeat_timeout={HEARTBEAT}",
            "--shutdown_timeout=30",
            "--initialization_timeout=120",
        ]
        files.append(open(os.path.join(logdir, f"process{i}.log"), "w"))
        procs.append(
            subprocess.Popen(args, env=proc_env, cwd=ROOT, stdout=files[-1], stderr=subprocess.STDOUT)
        )
    start = time.time()
    exit_times: list = [None] * processes
    try:
        while None in exit_times and time.time() - start < timeout:
            for i, p in enumerate(procs):
                if exit_times[i] is None and p.poll() is not None:
                    exit_times[i] = time.time()
            time.sleep(0.1)
    finally:
        for p in procs:  # SIGKILL: jax's preemption service catches SIGTERM
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in files:
            f.close()
    logs = [open(f.name).read() for f in files]
    if None in exit_times:
        pytest.fail(
            f"processes still running after {timeout} s (killed):\n"
            + "\n".join(f"--- process {i}\n{log[-3000:]}" for i, log in enumerate(logs))
        )
    return Run([p.returncode for p in procs], logs, exit_times, time.time() - start)


def check_ok(run: Run) -> None:
    for i, (rc, log) in enumerate(zip(run.returncodes, run.logs)):
        assert rc == 0, f"process {i} exited with {rc}:\n{log[-4000:]}"


def _timed(fn, *args):
    t = time.time()
    fn(*args)
    return round(time.time() - t, 1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("multihost")
    out = types.SimpleNamespace(
        two=str(base / "two_processes"),
        one=str(base / "one_process"),
        continued=str(base / "continued"),
        model=str(base / "model_axis"),
    )
    cache = str(base / "xla_cache_2_processes")
    out.killed = launch(
        out.two,
        base / "logs_a",
        steps=4,
        cache=cache,
        overrides=EVAL,
        env={
            "MULTIHOST_KILL_PROCESS": "1",
            "MULTIHOST_KILL_AT_STEP": "3",
            "MULTIHOST_KILL_AFTER": os.path.join(out.two, "checkpoints", "2"),
        },
    )
    out.checkpoints_after_kill = sorted(os.listdir(os.path.join(out.two, "checkpoints")))
    killed_at = re.search(r"MULTIHOST_KILL: .* at ([0-9.]+)", out.killed.logs[1])
    out.survivor_wait = out.killed.exit_times[0] - float(killed_at.group(1)) if killed_at else None
    out.resumed = launch(out.two, base / "logs_b", steps=4, cache=cache, overrides=EVAL)
    check_ok(out.resumed)
    seconds = {"A": round(out.killed.seconds, 1), "B": round(out.resumed.seconds, 1)}
    # 1 process: train.py would run train_and_evaluate just so; here it reuses compilations.
    # float64 as in the workers: jax_enable_x64 for this process (not a thread-local context:
    # orbax saves and restores in threads of its own), restored after.
    x64 = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        seconds["C"] = _timed(
            train_loop.train_and_evaluate, tiny_config(num_steps=6, **{"mesh.num_devices": 4}), out.one
        )
        shutil.copytree(out.two, out.continued)
        seconds["D"] = _timed(
            train_loop.train_and_evaluate, tiny_config(num_steps=6, **{"mesh.num_devices": 4}), out.continued
        )
        seconds["E"] = _timed(
            train_loop.train_and_evaluate,
            tiny_config(num_steps=4, **{"mesh.num_devices": 4, "mesh.model": 2}),
            out.model,
        )
    finally:
        jax.config.update("jax_enable_x64", x64)
    print(f"multihost runs, seconds: {seconds}; survivor stopped {out.survivor_wait} s after the kill")
    return out


def checkpoint_state(workdir: str, step: int) -> dict:
    """The train state saved at ``step`` as numpy (any writer's device count)."""
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    with ocp.PyTreeCheckpointer() as c:
        tree = c.metadata(path).item_metadata.tree
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return c.restore(path, restore_args=args)


def saved_partition_specs(workdir: str, step: int) -> dict[str, list]:
    """{"params.head....kernel": partition spec} as orbax recorded the arrays' shardings."""
    with open(os.path.join(workdir, "checkpoints", str(step), "state", "_sharding")) as f:
        raw = json.load(f)
    return {base64.b64decode(k).decode(): json.loads(v)["partition_spec"] for k, v in raw.items()}


def metric_lines(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(workdir: str) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in metric_lines(workdir) if "train/loss" in r}


# Tolerance of the float64 comparisons, relative to each tensor's scale; derived as in
# tests/test_training.py (F64_TOL): two orders of a sum of n terms differ by <= ~log2(n)
# roundings of the terms' magnitude (13 for 8192 pixels of a batch reduction), the
# cancellation ratio sum|terms| / |sum| reaches ~1e4 on the noise-only leaves, relative errors
# add over ~100 dependent operations per step and over 6 steps:
# 13 * 1.1e-16 * 1e4 * 100 * 6 = 9e-9. Measured: see the tests.
F64_TOL = 1e-8
# The logged losses are float32 (the loop's metric sums): equal up to a rounding or two.
LOSS_RTOL = 2**-22


def assert_states_close(a: dict, b: dict, tol: float = F64_TOL) -> None:
    """|a - b| <= tol * (|b| + max|leaf of b|) + tol**2 * max|b|, per leaf; float leaves are
    float64 (the runs computed in float64).

    Relative to each tensor's scale, since entries near zero have no meaningful elementwise
    relative error; the last term is a floor relative to the whole tree, for tensors that
    are float noise throughout (an optimizer moment of a parameter whose exact gradient is 0).
    """
    flat_a = jax.tree_util.tree_leaves_with_path(a)
    flat_b = jax.tree.leaves(b)
    assert len(flat_a) == len(flat_b)
    tree_max = max(float(np.max(np.abs(y), initial=0.0)) for y in flat_b)
    for (path, x), y in zip(flat_a, flat_b):
        if np.issubdtype(y.dtype, np.floating):
            assert x.dtype == y.dtype == np.float64, (jax.tree_util.keystr(path), x.dtype)
        atol = tol * float(np.max(np.abs(y), initial=0.0)) + tol**2 * tree_max
        np.testing.assert_allclose(x, y, rtol=tol, atol=atol, err_msg=jax.tree_util.keystr(path))


def assert_moved(start: dict, end: dict, more_than: float) -> None:
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(end), jax.tree.leaves(start)))
    assert moved > more_than, moved


# --------------------------------------------------------------------------- 2 processes


@pytest.mark.slow
def test_a_killed_process_stops_the_others_within_the_heartbeat_timeout(runs):
    run = runs.killed
    victim_log, survivor_log = run.logs[1], run.logs[0]
    assert run.returncodes[1] == -9, victim_log[-3000:]  # SIGKILL, as the hook did
    # The survivor is in (or enters) step 4's all-reduce. Either gloo sees the closed
    # connection and the step raises (train.py then exits at once, naming the process), or
    # the survivor waits until the coordination service misses the dead one's heartbeats
    # and aborts it with jax's message. Both within the heartbeat timeout; never a hang.
    assert run.returncodes[0] != 0, survivor_log[-3000:]
    assert (FATAL in survivor_log and "stopped sending heartbeats" in survivor_log) or (
        "process 0 of 2 failed" in survivor_log and "Gloo" in survivor_log
    ), survivor_log[-3000:]
    assert "MULTIHOST_KILL" in victim_log
    # Measured: < 1 s when gloo reports the error, ~9 s when the heartbeat timeout (10 s) does.
    assert runs.survivor_wait < HEARTBEAT + 20, runs.survivor_wait
    # Checkpoint 2 was complete before the kill; nothing later was.
    assert runs.checkpoints_after_kill == ["2"]


@pytest.mark.slow
def test_rerun_resumes_from_the_last_complete_checkpoint(runs):
    assert "resumed from step 2" in runs.resumed.logs[0]
    # The killed run logged steps 1-3; the rerun replaced 3 and added 4 (one line per step).
    assert [r["step"] for r in metric_lines(runs.two) if "train/loss" in r] == [1, 2, 3, 4]
    assert sorted(os.listdir(os.path.join(runs.two, "checkpoints"))) == ["2", "4"]


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_four_devices(runs):
    two, one = checkpoint_state(runs.two, 4), checkpoint_state(runs.one, 4)
    assert int(two["step"]) == int(one["step"]) == 4
    assert_moved(checkpoint_state(runs.one, 2)["params"], one["params"], 1e-3)  # real updates
    # Same global batches, same init; only the order of the float64 sums over devices and
    # processes differs (gloo all-reduce vs one process). Tolerance: F64_TOL of each tensor's
    # scale after 4 AdamW steps.
    for key in ("params", "frozen_params", "batch_stats", "opt_state"):
        assert_states_close(two[key], one[key])
    two_losses, one_losses = train_losses(runs.two), train_losses(runs.one)
    for step in (1, 2, 3, 4):
        np.testing.assert_allclose(two_losses[step], one_losses[step], rtol=LOSS_RTOL)


@pytest.mark.slow
def test_two_process_checkpoint_continues_in_one_process(runs):
    # D resumed at 4 (the 2-process lines 1-4 are untouched) and trained 5 and 6.
    lines = [r for r in metric_lines(runs.continued) if "train/loss" in r]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert lines[:4] == [r for r in metric_lines(runs.two) if "train/loss" in r]
    continued, reference = checkpoint_state(runs.continued, 6), checkpoint_state(runs.one, 6)
    assert int(continued["step"]) == 6
    for key in ("params", "batch_stats", "opt_state"):
        assert_states_close(continued[key], reference[key])


@pytest.mark.slow
def test_evaluation_gathers_every_process_and_only_process_0_writes(runs):
    lines = metric_lines(runs.two)
    assert [r["step"] for r in lines if "eval/AP" in r] == [4]  # pycocotools ran once
    with open(os.path.join(runs.two, "detections.json")) as f:
        dets = json.load(f)
    # 8 validation images, 4 per process, 20 detections each: all gathered on process 0.
    assert {d["image_id"] for d in dets} == set(range(8)) and len(dets) == 8 * 20
    log0, log1 = runs.resumed.logs
    assert "Final metrics at step 4" in log0 and "Final metrics" not in log1
    assert "step 4/4" in log0 and "step 4/4" not in log1  # progress lines: process 0 only
    # Both processes wrote their part of the (replicated) arrays: orbax saved collectively.
    state_dir = os.path.join(runs.two, "checkpoints", "4", "state")
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(state_dir))


PEER = """
import sys, time
from retinanet_jax.parallel import distributed
pid = int(sys.argv[1])
distributed.initialize("auto", distributed.DistributedOptions(
    coordinator_address=sys.argv[2], num_processes=2, process_id=pid, heartbeat_timeout=5))
print("connected", flush=True)
if pid == 1:  # fails alone, e.g. on a corrupt image in its shard
    try:
        raise OSError("image 17: truncated file")
    except OSError as e:
        distributed.exit_on_error(e, 5)
time.sleep(120)  # process 0: busy outside any collective (input pipeline, host code)
"""


@pytest.mark.slow
def test_error_in_one_process_stops_the_others_within_the_heartbeat_timeout():
    """Deterministic version of the heartbeat path: the survivor is in no collective that
    could report the failure, so only the coordination service's heartbeats can stop it."""
    address = f"localhost:{_free_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PEER, str(i), address],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        out1 = procs[1].communicate(timeout=120)[0]
        failed_at = time.time()
        out0 = procs[0].communicate(timeout=60)[0]
        waited = time.time() - failed_at
    finally:
        for p in procs:  # SIGKILL: jax's preemption service catches SIGTERM
            if p.poll() is None:
                p.kill()
                p.wait()
    assert procs[1].returncode == 1 and "connected" in out1
    assert "process 1 of 2 failed: OSError: image 17: truncated file" in out1
    assert "Exiting now without jax's shutdown barrier" in out1
    assert procs[0].returncode != 0 and FATAL in out0, out0[-3000:]
    assert waited < 5 + 15, waited  # heartbeat timeout 5 s (measured: ~5 s)


# ----------------------------------------------------------------------------- model axis


@pytest.mark.slow
def test_model_axis_gives_the_data_parallel_update(runs):
    """4 fake devices as (data 2, model 2) vs (data 4): the same train_step updates."""
    specs = saved_partition_specs(runs.model, 4)
    split = [k for k, spec in specs.items() if spec == [None, None, None, "model"]]
    assert any(k.startswith("params.") and k.endswith(".kernel") for k in split)  # rule applied
    assert all(spec == [] for spec in saved_partition_specs(runs.one, 4).values())
    sharded, data_only = checkpoint_state(runs.model, 4), checkpoint_state(runs.one, 4)
    # Splitting output channels over "model" leaves each output's arithmetic alone; batch
    # reductions run over 2 shards instead of 4. Same tolerances as above.
    for key in ("params", "frozen_params", "batch_stats", "opt_state"):
        assert_states_close(sharded[key], data_only[key])
    a, b = train_losses(runs.model), train_losses(runs.one)
    for step in (1, 2, 3, 4):
        np.testing.assert_allclose(a[step], b[step], rtol=LOSS_RTOL)


# ------------------------------------------------------------------- start-up decisions


SLURM = {
    "SLURM_JOB_ID": "7",
    "SLURM_STEP_NODELIST": "node[1-2]",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0",
}


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, None),
        (SLURM, "slurm"),
        ({**SLURM, "SLURM_NTASKS": "1"}, None),  # one task: a plain process
        ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1234", "OMPI_COMM_WORLD_SIZE": "4"}, "ompi"),
        ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1234", "OMPI_COMM_WORLD_SIZE": "1"}, None),
    ],
)
def test_launcher_detection(env, expected):
    assert distributed.detect_launcher(env) == expected


def test_initialize_plan():
    opts = distributed.DistributedOptions
    assert distributed.plan("auto", opts(), {}) is None  # plain process: nothing happens
    assert distributed.plan("off", opts(), SLURM) is None
    assert distributed.plan("auto", opts(), SLURM) == "slurm"
    assert distributed.plan("on", opts(), {}) == "--distributed=on"
    explicit = opts(coordinator_address="localhost:1234", num_processes=2, process_id=1)
    assert distributed.plan("auto", explicit, {}) == "explicit settings"
    assert (
        distributed.plan("auto", opts(num_processes=1, process_id=0, coordinator_address="h:1"), {}) is None
    )
    assert (
        distributed.plan("auto", opts(num_processes=2, process_id=0), {"JAX_COORDINATOR_ADDRESS": "h:1"})
        == "explicit settings"
    )
    with pytest.raises(ValueError, match="set --num_processes, --process_id"):
        distributed.plan("auto", opts(coordinator_address="h:1"), {})
    with pytest.raises(ValueError, match=r"--process_id=2 must be in 0..1"):
        distributed.plan("auto", opts(coordinator_address="h:1", num_processes=2, process_id=2), {})
    with pytest.raises(ValueError, match="--distributed must be one of"):
        distributed.plan("maybe", opts(), {})


def test_distributed_flags_map_to_options():
    from absl import flags

    fv = flags.FlagValues()
    distributed.define_flags(fv)
    fv(["train.py"])
    assert distributed.from_flags(fv) == ("auto", distributed.DistributedOptions())
    assert distributed.DistributedOptions().heartbeat_timeout == 60
    fv = flags.FlagValues()
    distributed.define_flags(fv)
    fv(
        [
            "train.py",
            "--coordinator_address=10.0.0.1:8476",
            "--num_processes=4",
            "--process_id=3",
            "--local_device_ids=0,1",
            "--heartbeat_timeout=30",
            "--distributed=on",
        ]
    )
    assert distributed.from_flags(fv) == (
        "on",
        distributed.DistributedOptions(
            coordinator_address="10.0.0.1:8476",
            num_processes=4,
            process_id=3,
            local_device_ids=(0, 1),
            heartbeat_timeout=30,
        ),
    )


OMPI = {
    "OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1234",
    "OMPI_COMM_WORLD_SIZE": "4",
    "OMPI_COMM_WORLD_RANK": "3",
}


def test_launcher_processes():
    assert distributed.launcher_processes(SLURM) == (1, 2)
    assert distributed.launcher_processes(OMPI) == (3, 4)
    assert distributed.launcher_processes({}) == (None, None)
    # Inside an srun step SLURM_STEP_NUM_TASKS is the step's size (an sbatch script's
    # SLURM_NTASKS is the allocation's).
    assert distributed.detect_launcher({**SLURM, "SLURM_STEP_NUM_TASKS": "1"}) is None
    assert distributed.launcher_processes({**SLURM, "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "8"}) == (
        1,
        8,
    )


@pytest.fixture
def tpu_vm(monkeypatch):
    """A Cloud TPU VM whose GCE metadata server serves ``tpu_vm`` (a dict; a missing key is
    HTTP 404, ``tpu_vm["unreachable"] = True`` makes every request fail)."""
    import urllib.error

    metadata: dict = {}

    def fake_metadata(key, environ):
        if metadata.get("unreachable"):
            raise urllib.error.URLError("no route to metadata.google.internal")
        return metadata.get(key)

    monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda environ: True)
    monkeypatch.setattr(distributed, "_gce_metadata", fake_metadata)
    return metadata


def test_cloud_tpu_detection(tpu_vm):
    detect = distributed.detect_launcher
    # GKE: the worker list is in the environment (one entry per host of the slice).
    assert detect({"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3", "TPU_WORKER_ID": "2"}) == "tpu"
    assert distributed.launcher_processes(
        {"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3", "TPU_WORKER_ID": "2"}
    ) == (2, 4)
    assert detect({"TPU_PROCESS_ADDRESSES": "10.0.0.1:8471"}) is None  # one host
    assert detect({"TPU_WORKER_HOSTNAMES": "w-0", "MEGASCALE_NUM_SLICES": "2"}) == "tpu"
    # GCE TPU VM: the worker list (and the multislice settings) come from the metadata server.
    assert detect({}) is None  # no worker-network-endpoints attribute: not a TPU VM slice
    tpu_vm["worker-network-endpoints"] = "10.0.0.1"
    assert detect({}) is None  # a single-host TPU VM: a plain process
    tpu_vm["tpu-env"] = "ACCELERATOR_TYPE: 'v4-8'\nMEGASCALE_NUM_SLICES: '2'\n"
    assert distributed.launcher_processes({}) == (None, 2)  # 1 host x 2 slices
    tpu_vm["worker-network-endpoints"] = "w-0:0:10.0.0.1,w-1:1:10.0.0.2"
    assert distributed.launcher_processes({"MEGASCALE_NUM_SLICES": "1"}) == (None, 2)
    assert detect({"TPU_SKIP_MDS_QUERY": "1"}) is None  # jax skips the metadata server too
    tpu_vm["unreachable"] = True
    assert detect({}) is None  # no metadata server: not on GCE
    assert detect({"TPU_WORKER_HOSTNAMES": "w-0,w-1"}) == "tpu"  # slices unknown: 1


def test_no_cloud_tpu_detection_off_a_tpu_vm(monkeypatch):
    def no_metadata(key, environ):
        raise AssertionError("queried the metadata server off a TPU VM")

    monkeypatch.setattr(distributed, "_gce_metadata", no_metadata)
    monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda environ: False)
    assert distributed.detect_launcher({"TPU_WORKER_HOSTNAMES": "w-0,w-1"}) is None
    monkeypatch.undo()
    monkeypatch.setattr(distributed, "_gce_metadata", no_metadata)
    # This machine (CPU tests): no libtpu or no TPU chips, unless JAX_FORCE_TPU_INIT says so.
    if not distributed._on_cloud_tpu_vm({}):
        assert distributed.detect_launcher({}) is None
    assert distributed._on_cloud_tpu_vm({"JAX_FORCE_TPU_INIT": "1"})


@pytest.mark.parametrize(
    "mode, env, options, expected_call, info",
    [
        ("auto", {}, {}, None, (0, 1)),  # plain process: jax.distributed is left alone
        ("off", SLURM, {}, None, (0, 1)),
        (
            "auto",
            SLURM,
            {},
            {"coordinator_address": None, "num_processes": None, "process_id": None},
            (1, 2),
        ),  # jax reads SLURM by itself
        ("auto", OMPI, {}, {"num_processes": None}, (3, 4)),
        (
            "auto",
            {"JAX_COORDINATOR_ADDRESS": "h:1"},
            {"num_processes": 2, "process_id": 1},
            {"coordinator_address": None, "num_processes": 2, "process_id": 1},
            (1, 2),
        ),
        (
            "on",
            {},
            {"coordinator_address": "h:1", "num_processes": 3, "process_id": 0, "local_device_ids": (0, 1)},
            {
                "coordinator_address": "h:1",
                "local_device_ids": [0, 1],
                "heartbeat_timeout_seconds": 60,
                "shutdown_timeout_seconds": 120,
                "initialization_timeout": 300,
            },
            (0, 3),
        ),
    ],
)
def test_initialize_calls_the_public_jax_api(monkeypatch, mode, env, options, expected_call, info):
    """``initialize`` calls ``jax.distributed.initialize`` (faked here) with the options, and
    records the process numbers that ``exit_on_error`` reports without touching the backend."""
    for key in [k for k in os.environ if k.startswith(("SLURM_", "OMPI_", "TPU_", "JAX_COORD"))]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda environ: False)
    monkeypatch.setattr(distributed, "_started", {})
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: bool(calls))
    monkeypatch.setattr(jax, "process_count", lambda: pytest.fail("created the backend"))
    collectives = jax.config.jax_cpu_collectives_implementation
    try:
        started = distributed.initialize(mode, distributed.DistributedOptions(**options))
    finally:
        jax.config.update("jax_cpu_collectives_implementation", collectives)
    assert started == (expected_call is not None)
    assert len(calls) == int(started)
    if started:
        assert expected_call.items() <= calls[0].items(), calls[0]
    assert distributed.is_initialized() == started
    assert distributed.process_info() == info
    if not started:
        assert distributed.exit_on_error(OSError("disk full"), 5) is None  # returns


def test_batch_and_mesh_errors_name_the_config_key():
    mesh = parallel.make_mesh(devices=jax.devices()[:4])
    with pytest.raises(ValueError, match=r"config.batch_size=6 is not divisible by the data ax"):
        parallel.local_batch_size(6, mesh, "config.batch_size")
    assert parallel.mesh_devices(None) is None
    assert parallel.mesh_devices(3) == jax.devices()[:3]  # one process: the first ones
    with pytest.raises(ValueError, match="config.mesh.num_devices=9"):
        parallel.mesh_devices(9)


def test_model_group_spanning_processes_is_refused():
    dev = lambda p: types.SimpleNamespace(process_index=p)  # noqa: E731
    fake = types.SimpleNamespace(
        devices=np.array([[dev(0), dev(0)], [dev(1), dev(1)]]), shape={"data": 2, "model": 2}
    )
    parallel.check_process_layout(fake)  # each model pair inside one process: fine
    fake.devices = np.array([[dev(0), dev(1)], [dev(0), dev(1)]])
    with pytest.raises(ValueError, match="config.mesh.model=2 spans several processes"):
        parallel.check_process_layout(fake)
