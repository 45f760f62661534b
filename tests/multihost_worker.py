"""``train.py`` for one process of a multi-process test run, plus a "die here" hook.

Usage: ``python tests/multihost_worker.py <train.py flags>`` with, in the environment,
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` and ``JAX_PLATFORMS=cpu`` (set by the
test: this process must not inherit the pytest process's 8 fake devices). Optional hook:
``MULTIHOST_KILL_PROCESS=P MULTIHOST_KILL_AT_STEP=S [MULTIHOST_KILL_AFTER=DIR]``: process P
SIGKILLs itself when it is about to load the batch of step S + 1 (S steps done), after DIR
exists (e.g. a checkpoint's step directory: orbax renames it into place when complete).

With ``JAX_COMPILATION_CACHE_DIR`` set, every process writes its compilations to the
persistent cache, not only process 0 as jax does (on a shared filesystem of a real cluster
that avoids write contention). On CPU the cache keys differ per process, so without this a
rerun would recompile everything in process 1 and take as long as the first run.
"""

import os
import runpy
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _install_kill_hook() -> None:
    victim = os.environ.get("MULTIHOST_KILL_PROCESS")
    if victim is None:
        return
    kill_at = int(os.environ["MULTIHOST_KILL_AT_STEP"])
    wait_for = os.environ.get("MULTIHOST_KILL_AFTER")
    import jax

    from retinanet_jax.data.pipeline import TrainBatchIterator

    original = TrainBatchIterator.__next__

    def next_or_die(self):
        state = self.get_state()
        if state["epoch"] * self.steps_per_epoch + state[
            "position"
        ] == kill_at and jax.process_index() == int(victim):
            # Checkpoint 2 is written in the background (float64 state: ~280 MB per run of
            # the tiny config); 60 s was too short on a loaded 2-core machine.
            deadline = time.monotonic() + 300
            while wait_for and not os.path.isdir(wait_for) and time.monotonic() < deadline:
                time.sleep(0.1)
            print(
                f"MULTIHOST_KILL: process {victim} killing itself after step {kill_at} at {time.time():.3f}",
                flush=True,
            )
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self)

    TrainBatchIterator.__next__ = next_or_die


def _cache_from_every_process() -> None:
    from jax._src import compilation_cache, compiler
    from jax._src import distributed as jax_distributed

    jax_write = compiler._cache_write

    def cache_write(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks):
        if jax_distributed.global_state.process_id == 0 or host_callbacks:
            return jax_write(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks)
        compilation_cache.put_executable_and_time(
            cache_key, module_name, executable, backend, int(compile_time_secs)
        )

    compiler._cache_write = cache_write


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    os.chdir(ROOT)
    _install_kill_hook()
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        _cache_from_every_process()
    sys.argv[0] = os.path.join(ROOT, "train.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
