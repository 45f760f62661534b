import os

import pytest

# Tests run on the CPU; fake devices let sharding tests run without accelerators. Must be set
# before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="module")
def xla_compilation_cache(tmp_path_factory):
    """Persistent XLA cache for one test module: modules whose runs compile the same train
    step again (interrupted + resumed runs) use it, which turns ~70 s into ~1 s each."""
    import jax  # here, not at the top: XLA_FLAGS above must be set before jax is imported
    from jax.experimental.compilation_cache import compilation_cache as cc

    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    old = {n: getattr(jax.config, n) for n in names}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    cc.reset_cache()
    yield
    for n, v in old.items():
        jax.config.update(n, v)
    cc.reset_cache()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: slow test (CI still runs it)")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops jax's compiled-program caches after each test module: a module's programs are
    not reused by the next, and keeping them all grows one pytest process by gigabytes."""
    yield
    import gc
    import sys

    if "jax" in sys.modules:
        sys.modules["jax"].clear_caches()
    gc.collect()


_RSS_LOG = os.environ.get("RJ_TEST_RSS_LOG")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """With RJ_TEST_RSS_LOG=FILE: one line per test, its duration and the process's peak RSS."""
    if not _RSS_LOG:
        yield
        return
    import resource
    import time

    t0 = time.time()
    yield
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(_RSS_LOG, "a") as f:
        f.write(f"{time.time() - t0:8.1f}s {peak_mb:8.0f}MB {os.getpid()} {item.nodeid}\n")
