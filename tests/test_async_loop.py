"""The training loop is asynchronous: no host read of a device array between log steps, a
non-finite loss is still reported with its exact step (read with a lag), and batches are placed
on the device ahead of the step that uses them.

Counting host reads: ``jax.transfer_guard_device_to_host`` does not fire on the CPU backend
(device memory is host memory), so the test wraps the Python entry points through which a
``jax.Array`` reaches the host (``ArrayImpl._value``, ``__array__``, ``__bool__``, ``__float__``,
``item``, ... and ``jax.device_get``) with a counter. numpy can also read a *single-device* CPU
array through the C buffer protocol, invisible from Python; the runs below therefore use a
2-device mesh, whose arrays refuse the buffer protocol, so every read goes through the wrapped
entry points (``test_the_counter_sees_every_kind_of_read`` checks that).
"""

import os
import queue
import threading
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from config_utils import tiny_config
from jax._src import array as jax_array  # tests may use jax._src; the package may not
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from retinanet_jax.data import TrainBatchIterator
from retinanet_jax.training import loop as train_loop
from retinanet_jax.training import progress as progress_mod
from retinanet_jax.training import step as step_mod
from retinanet_jax.training.checkpoint import Checkpointer
from retinanet_jax.training.prefetch import DevicePrefetch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_READ_METHODS = (
    "__array__",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "__complex__",
    "__hex__",
    "__oct__",
    "item",
    "tolist",
    "tobytes",
    "copy_to_host_async",
    "__format__",
    "__repr__",
    "__str__",
    "__reduce__",
)


@pytest.fixture(scope="module", autouse=True)
def _cache(xla_compilation_cache):
    """Both runs compile the tiny train step (the second one with a planted NaN)."""


class HostReads:
    """Counts host reads of jax arrays; a read nested in another (``float`` -> ``_value``)
    counts once. ``log`` keeps (entry point, package line that asked, thread) per read."""

    def __init__(self):
        self.count = 0
        self.raw = 0  # every entry, nested ones too
        self.log: list[tuple[str, str, str]] = []
        self._local = threading.local()
        self._lock = threading.Lock()

    def _enter(self, name: str) -> bool:
        depth = getattr(self._local, "depth", 0)
        self._local.depth = depth + 1
        with self._lock:
            self.raw += 1
        if depth == 0:
            frames = [f for f in traceback.extract_stack()[:-2] if "retinanet_jax" in f.filename]
            where = (
                f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno} {frames[-1].line}"
                if frames
                else "?"
            )
            with self._lock:
                self.count += 1
                self.log.append((name, where, threading.current_thread().name))
        return True

    def _exit(self):
        self._local.depth -= 1

    def wrap(self, fn, name):
        def counted(*args, **kwargs):
            self._enter(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self._exit()

        return counted

    def install(self, monkeypatch):
        cls = jax_array.ArrayImpl
        value = cls.__dict__["_value"]
        monkeypatch.setattr(cls, "_value", property(self.wrap(value.fget, "_value")))
        for name in _READ_METHODS:
            monkeypatch.setattr(cls, name, self.wrap(cls.__dict__[name], name))
        monkeypatch.setattr(jax, "device_get", self.wrap(jax.device_get, "jax.device_get"))
        return self


@pytest.fixture
def host_reads(monkeypatch):
    return HostReads().install(monkeypatch)


def _two_device_scalar():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("d",))
    return jax.jit(lambda a: a * 2, out_shardings=NamedSharding(mesh, P()))(jnp.ones((), jnp.float32))


def test_the_counter_sees_every_kind_of_read(host_reads):
    reads = [
        lambda x: bool(x),
        lambda x: float(x),
        lambda x: int(x),
        lambda x: x.item(),
        lambda x: np.asarray(x),
        lambda x: np.array(x),
        lambda x: jax.device_get({"a": x}),
        lambda x: f"{x:.3f}",
        lambda x: np.mean([x, x]),
        lambda x: x.tolist(),
        lambda x: str(x),
    ]
    for i, read in enumerate(reads):
        x = _two_device_scalar()  # fresh: no host copy cached yet
        before = host_reads.count
        read(x)
        assert host_reads.count > before, i
    x = _two_device_scalar()
    before = host_reads.count
    y = jnp.sin(x) + x  # device work, no read
    _ = (y.shape, y.dtype, y.sharding, jax.block_until_ready(y))
    assert host_reads.count == before


# ----------------------------------------------------------------------------- the loop


def _reads_per_step(monkeypatch, host_reads):
    """{step s: host reads between ``Progress.advance(s - 1)`` and ``advance(s)``}: the tail
    of step s - 1 (its log / checkpoint) and the head of step s (batch, dispatch)."""
    at: dict[int, int] = {}
    advance = progress_mod.Progress.advance

    def counting_advance(self, step):
        at[step] = host_reads.count
        return advance(self, step)

    monkeypatch.setattr(progress_mod.Progress, "advance", counting_advance)
    return at


@pytest.mark.slow
def test_no_host_read_between_log_steps(tmp_path, monkeypatch, host_reads):
    log_every, num_steps = 5, 15
    cfg = tiny_config(
        num_steps=num_steps,
        batch_size=2,
        log_every_steps=log_every,
        **{"mesh.num_devices": 2, "eval.enabled": False, "checkpoint.every_steps": num_steps},
    )
    at = _reads_per_step(monkeypatch, host_reads)
    train_loop.train_and_evaluate(cfg, str(tmp_path / "run"))
    assert sorted(at) == list(range(1, num_steps + 1))
    # Windows (s-1 -> s) that contain no log step: s - 1 not a multiple of log_every.
    quiet = {s: at[s] - at[s - 1] for s in range(2, num_steps + 1) if (s - 1) % log_every}
    assert len(quiet) == 12
    print("host reads per quiet step:", quiet, "raw entry-point calls in all:", host_reads.raw)
    print("reads:", sorted({(name, where) for name, where, _ in host_reads.log}))
    print("at log steps:", {s: at[s + 1] - at[s] for s in range(log_every, num_steps, log_every)})
    assert all(n == 0 for n in quiet.values()), (quiet, host_reads.log)


POISON = 12345.0  # a padding box coordinate that makes the (patched) loss NaN


def _poisoned_losses(monkeypatch):
    """The step's loss gets a NaN when a batch carries a ``POISON`` box (in a padding slot,
    label -1, so it changes nothing else): a non-finite loss at a step of the test's choice."""
    losses = step_mod.retinanet_losses

    def poisoned(cls_logits, bbox_regression, anchors, boxes, labels, **kw):
        out = dict(losses(cls_logits, bbox_regression, anchors, boxes, labels, **kw))
        bad = jnp.any(boxes == POISON)
        out["classification"] = out["classification"] + jnp.where(bad, jnp.nan, 0.0)
        return out

    monkeypatch.setattr(step_mod, "retinanet_losses", poisoned)


def _poisoning_pipeline(monkeypatch, bad_step):
    class Poisoning(TrainBatchIterator):
        def __next__(self):
            state = self.get_state()
            step = state["epoch"] * self.steps_per_epoch + state["position"] + 1  # 1-based
            batch = super().__next__()
            if step == bad_step:
                assert (batch["labels"][:, -1] == -1).all()  # a padding slot
                batch["boxes"][:, -1] = POISON
            return batch

    monkeypatch.setattr(train_loop, "TrainBatchIterator", Poisoning)


def _restore_state(workdir, step):
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    item = ckpt._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    ckpt.close()
    return jax.tree.map(np.asarray, item)


@pytest.mark.slow
def test_nonfinite_step_is_named_exactly_and_the_state_before_it_is_kept(tmp_path, monkeypatch):
    """Step 4 is non-finite; the host learns it only at step 6 (the next log / checkpoint
    step). The error names step 4, the checkpoint at 3 stays the latest, and the state the
    error carries -- after steps 4, 5 and 6 ran -- is bitwise the state after step 3."""
    bad_step = 4
    cfg = tiny_config(
        num_steps=9,
        batch_size=2,
        log_every_steps=6,
        **{"mesh.num_devices": 2, "eval.enabled": False, "checkpoint.every_steps": 3},
    )
    _poisoned_losses(monkeypatch)
    _poisoning_pipeline(monkeypatch, bad_step)
    workdir = str(tmp_path / "run")
    with pytest.raises(
        FloatingPointError,
        match=r"non-finite loss at step 4 \(loss=nan.*found at "
        r"step 6.*latest complete checkpoint \(step 3\)",
    ) as err:
        train_loop.train_and_evaluate(cfg, workdir)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    assert ckpt.all_steps() == [3]
    assert ckpt.read_meta().data_state == {"epoch": 0, "position": 3}
    ckpt.close()
    cause = err.value.__cause__
    assert isinstance(cause, step_mod.NonFiniteError) and cause.step == bad_step
    kept = jax.tree.map(
        np.asarray,
        {
            "step": cause.state.step,
            "skipped": cause.state.skipped,
            "params": cause.state.params,
            "frozen_params": cause.state.frozen_params,
            "batch_stats": cause.state.batch_stats,
            "opt_state": cause.state.opt_state,
        },
    )
    saved = _restore_state(workdir, 3)
    assert int(kept["step"]) == 3 and int(kept["skipped"]) == 0
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(kept["params"]))
    for key in ("step", "skipped", "params", "frozen_params", "batch_stats"):
        jax.tree.map(np.testing.assert_array_equal, kept[key], saved[key])  # bitwise
    kept_opt, saved_opt = jax.tree.leaves(kept["opt_state"]), jax.tree.leaves(saved["opt_state"])
    assert len(kept_opt) == len(saved_opt) > 0
    for a, b in zip(kept_opt, saved_opt):
        np.testing.assert_array_equal(a, b)
    # Nothing about the bad interval was logged (the log at 6 found the error first).
    assert (
        not os.path.exists(os.path.join(workdir, "metrics.jsonl"))
        or "train/loss" not in open(os.path.join(workdir, "metrics.jsonl")).read()
    )


# ----------------------------------------------------------------------------- prefetch


class _Counting:
    """A pipeline of ints with ``get_state``; raises at ``fail_at`` (0-based)."""

    def __init__(self, n, fail_at=None, delay=0.0):
        self.position, self.n, self.fail_at, self.delay = 0, n, fail_at, delay

    def get_state(self):
        return {"epoch": 0, "position": self.position}

    def __next__(self):
        time.sleep(self.delay)
        if self.position == self.fail_at:
            raise RuntimeError(f"broken batch {self.position}")
        if self.position == self.n:
            raise StopIteration
        self.position += 1
        return self.position - 1


@pytest.mark.parametrize("size", [0, 1, 2])
def test_prefetch_keeps_order_state_and_errors_in_place(size):
    placed = []

    def place(x):
        placed.append(x)
        return ("placed", x)

    with DevicePrefetch(_Counting(10, fail_at=6), place, size=size) as batches:
        for i in range(6):
            assert batches.get_state() == {"epoch": 0, "position": i}  # of the next batch
            assert next(batches) == ("placed", i)
        time.sleep(0.2)
        assert batches.get_state() == {"epoch": 0, "position": 6}  # not the pipeline's
        with pytest.raises(RuntimeError, match="broken batch 6"):
            next(batches)
        with pytest.raises(RuntimeError, match="broken batch 6"):
            next(batches)
    assert placed == list(range(6))


def test_prefetch_places_ahead_and_stops():
    ahead = queue.Queue()
    pipeline = _Counting(1000)
    batches = DevicePrefetch(pipeline, lambda x: (ahead.put(x), x)[1], size=2)
    assert next(batches) == 0
    deadline = time.monotonic() + 5
    while ahead.qsize() < 4 and time.monotonic() < deadline:  # 0, and 1..3 placed ahead
        time.sleep(0.01)
    time.sleep(0.2)
    assert ahead.qsize() == 4  # two in the queue, one held by the thread: no more
    batches.close()
    assert not any(t.name == "device-prefetch" and t.is_alive() for t in threading.enumerate())
    assert pipeline.position == 4
