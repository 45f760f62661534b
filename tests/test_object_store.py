"""A ``gs://`` workdir end to end, against a local GCS emulator that refuses appends.

tests/gcs_fake.py runs gcp-storage-emulator (in memory, in a thread) behind the real clients:
gcsfs for ``etils.epath`` (metrics, TensorBoard, config, detections, orbax's metadata) and
tensorstore's ``gcs`` driver (orbax's arrays). gcsfs silently turns an append into an overwrite,
so the fake raises on one and records it. ``train.py`` itself runs in a subprocess
(tests/object_store_worker.py), is killed like ``kill -9`` after a checkpoint and rerun.
"""

import io
import json
import os
import pathlib
import subprocess
import sys

import pytest
from config_utils import ROOT
from etils import epath
from gcs_fake import (
    BUCKET,
    NoAppendGCS,
    children,
    emulator,
    environment,
    install_no_append,
    objects,
    read_events,
    scalars,
    uninstall,
)

from retinanet_jax import storage
from retinanet_jax.evaluation import loop as evaluation
from retinanet_jax.training.progress import MetricWriter


@pytest.fixture(scope="module")
def gcs():
    """The emulator's URL; this process's gs:// clients point at it and refuse appends."""
    with emulator() as url:
        saved = {k: os.environ.get(k) for k in environment(url)}
        install_no_append(url)
        try:
            yield url
        finally:
            uninstall()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture(autouse=True)
def _no_appends(request):
    """Every test here ends with no append issued (even one whose error someone swallowed)."""
    NoAppendGCS.appends.clear()
    NoAppendGCS.writes.clear()
    yield
    if request.node.name != "test_the_fake_refuses_appends":
        assert NoAppendGCS.appends == []


def _steps(text: str | None) -> list[int]:
    return [json.loads(line)["step"] for line in (text or "").splitlines()]


def test_the_fake_refuses_appends(gcs):
    p = epath.Path(f"gs://{BUCKET}/probe/a.txt")
    p.write_text("one\n")
    with pytest.raises(io.UnsupportedOperation, match="append"):
        with p.open("a") as f:
            f.write("two\n")
    assert NoAppendGCS.appends == [f"{BUCKET}/probe/a.txt"]
    assert p.read_text() == "one\n"


def test_whole_object_writes_and_line_log(gcs):
    base = f"gs://{BUCKET}/primitives"
    storage.makedirs(base)  # nothing to make on a store
    assert storage.read_text(f"{base}/a.json") is None
    storage.write_text(f"{base}/a.json", '{"x": 1}')
    storage.write_text(f"{base}/a.json", '{"x": 2}')
    assert storage.read_text(f"{base}/a.json") == '{"x": 2}'
    assert objects(base) == [f"{base}/a.json"]  # no temporary object, no directory marker
    assert NoAppendGCS.writes == {f"{BUCKET}/primitives/a.json": 2}

    log = storage.LineLog(f"{base}/lines.txt")
    log.append("1")
    log.append("2")
    assert storage.read_text(f"{base}/lines.txt") is None  # held until flushed
    assert log.flush() and not log.flush()  # one upload, then nothing new to send
    log.append("3")
    log.flush()
    assert storage.read_text(f"{base}/lines.txt") == "1\n2\n3\n"
    assert storage.LineLog(f"{base}/lines.txt").read() == ["1", "2", "3"]
    assert NoAppendGCS.writes[f"{BUCKET}/primitives/lines.txt"] == 2

    # What evaluation writes (detections.json; config.json of train.py) goes the same way.
    evaluation.write_json_atomic([{"image_id": 1}], f"{base}/detections.json")
    assert json.loads(storage.read_text(f"{base}/detections.json")) == [{"image_id": 1}]
    assert NoAppendGCS.writes[f"{BUCKET}/primitives/detections.json"] == 1
    assert objects(base) == [f"{base}/{n}" for n in ("a.json", "detections.json", "lines.txt")]


def test_metric_writer_on_the_store_keeps_one_trajectory_across_a_resume(gcs, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # where the TensorBoard staging goes
    workdir = f"gs://{BUCKET}/writer"
    metrics = f"{workdir}/metrics.jsonl"
    w = MetricWriter(workdir)  # object store: uploads at most every OBJECT_STORE_FLUSH_S
    assert w.flush_interval_s == storage.OBJECT_STORE_FLUSH_S
    for step in (1, 2):
        w.write(step, {"train/loss": float(step), "train/nan": float("nan")})
    assert storage.read_text(metrics) is None
    w.flush()
    assert _steps(storage.read_text(metrics)) == [1, 2]
    (events,) = objects(f"{workdir}/tensorboard")
    assert scalars(storage.read_bytes(events))["train/loss"] == {1: 1.0, 2: 2.0}  # synced at flush
    w.write(3, {"train/loss": 3.0})
    w.close()
    assert storage.read_text(metrics).splitlines()[-1] == '{"step": 3, "train/loss": 3.0}'
    assert scalars(storage.read_bytes(events))["train/loss"] == {1: 1.0, 2: 2.0, 3: 3.0}
    assert os.listdir(tmp_path) == []  # the staging directory is gone

    # A killed run left a torn line; resuming from step 2 drops it and step 3.
    storage.write_text(metrics, storage.read_text(metrics) + '{"step": 4, "train/lo')
    w = MetricWriter(workdir, start_step=2)
    w.write(3, {"train/loss": 30.0})
    w.close()
    assert [json.loads(line) for line in storage.read_text(metrics).splitlines()] == [
        {"step": 1, "train/loss": 1.0},
        {"step": 2, "train/loss": 2.0},
        {"step": 3, "train/loss": 30.0},
    ]
    files = objects(f"{workdir}/tensorboard")
    assert len(files) == 2 and events in files  # the first run's file is kept, a new one added
    (resumed,) = set(files) - {events}
    assert scalars(storage.read_bytes(resumed))["train/loss"] == {3: 30.0}
    purge = [e.step for e in read_events(storage.read_bytes(resumed)) if e.HasField("session_log")]
    assert purge == [3]  # TensorBoard hides the first run's events from step 3 on


def _train_py(url: str, workdir: str, tmp: pathlib.Path, *, kill_after_step: int | None = None) -> str:
    """Run train.py on the tiny config with ``--workdir`` in the emulator; returns its output."""
    flags = [
        f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}",
        f"--workdir={workdir}",
        "--config.num_steps=4",
        "--config.batch_size=2",
        "--config.log_every_steps=1",
        "--config.mesh.num_devices=1",
        "--config.checkpoint.every_steps=2",
        "--config.checkpoint.async_save=False",  # a kill -9 right after must find it complete
        "--config.eval.enabled=False",  # detections.json: test_whole_object_writes_and_line_log
    ]
    own = [url]
    if kill_after_step:  # no time-driven flush: only those the loop must do (before checkpoints)
        own += ["--kill-after-step", str(kill_after_step), "--flush-interval", "3600"]
    env = {
        **os.environ,
        **environment(url),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        # The resumed run compiles the same train step: a persistent cache makes it ~free.
        "JAX_COMPILATION_CACHE_DIR": str(tmp / "xla_cache"),
        "TMPDIR": str(tmp),  # TensorBoard's staging directory, left behind by the killed run
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }
    worker = os.path.join(ROOT, "tests", "object_store_worker.py")
    proc = subprocess.run(
        [sys.executable, worker, *own, "--", *flags],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr

    expected = 137 if kill_after_step else 0
    assert proc.returncode == expected, out[-4000:]
    return out


@pytest.mark.slow
def test_train_py_on_gs_is_killed_and_resumes_from_the_stored_step(gcs, tmp_path):
    workdir = f"gs://{BUCKET}/run"

    # 1. Killed (no cleanup) right after step 3's metrics: the checkpoint of step 2 and the
    #    metrics up to it are in the store; step 3's line was only held in memory.
    killed = _train_py(gcs, workdir, tmp_path, kill_after_step=3)
    (lost,) = [
        json.loads(line.split(" ", 2)[2]) for line in killed.splitlines() if line.startswith("KILLED AFTER")
    ]
    assert storage.read_text(f"{workdir}/config.json") is not None
    assert _steps(storage.read_text(f"{workdir}/metrics.jsonl")) == [1, 2]
    assert children(f"{workdir}/checkpoints") == ["2"]
    (first_events,) = objects(f"{workdir}/tensorboard")
    assert sorted(scalars(storage.read_bytes(first_events))["train/loss"]) == [1, 2]

    # 2. The same command again: resumes from the stored step 2 and ends at 4.
    out = _train_py(gcs, workdir, tmp_path)
    assert "resumed from step 2" in out, out[-4000:]
    lines = [json.loads(line) for line in storage.read_text(f"{workdir}/metrics.jsonl").splitlines()]
    assert [r["step"] for r in lines if "train/loss" in r] == [1, 2, 3, 4]
    # The state and data position restored from the store recompute the lost step 3 exactly.
    del lost["train/images_per_sec"]
    assert lines[2] == {**lines[2], **lost}
    files = objects(f"{workdir}/tensorboard")
    (second_events,) = set(files) - {first_events}
    assert sorted(scalars(storage.read_bytes(second_events))["train/loss"]) == [3, 4]  # continued
    assert json.loads(storage.read_text(f"{workdir}/config.json"))["batch_size"] == 2
    assert children(f"{workdir}/checkpoints") == ["2", "4"]
    assert len(list(tmp_path.glob("retinanet_jax_staged_*"))) == 1  # the killed run's only
    for step in (2, 4):  # orbax on GCS marks a finished checkpoint (no atomic rename there)
        assert epath.Path(f"{workdir}/checkpoints/{step}/commit_success.txt").exists()
        arrays = objects(f"{workdir}/checkpoints/{step}/state")
        assert any("/d/" in a for a in arrays)  # tensorstore's chunks reached the emulator

    from retinanet_jax.training.checkpoint import Checkpointer

    with Checkpointer(f"{workdir}/checkpoints") as ckpt:
        meta = ckpt.read_meta()
    assert meta.step == 4 and meta.data_state == {"epoch": 0, "position": 4}
