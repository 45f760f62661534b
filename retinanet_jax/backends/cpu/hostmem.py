"""Back XLA:CPU's large per-step buffers with transparent huge pages (glibc malloc tunable).

Why: XLA's CPU runtime takes every execution's temporaries and outputs from ``malloc``, and
glibc serves blocks of that size with a fresh ``mmap`` that ``free`` hands back to the kernel.
Each step therefore touches gigabytes of new 4 KiB pages: about 900,000 page faults per
ResNet-50-FPN training step at 512x512, batch 4 (``resource.getrusage`` minor faults), 1.5 s of
a 9.6 s step. glibc >= 2.35's ``glibc.malloc.hugetlb=1`` tunable makes those mappings
transparent-huge-page backed (2 MiB pages: 512x fewer faults): measured 9.63 s -> 8.02 s per
step (``benchmarks/train_step_vs_torchvision.py`` prints the faults per step). Tunables are
read once at process start, so ``train.py``, the CLI and the benchmarks re-execute themselves
with it set (same PID, same arguments) before importing jax; ``RETINANET_JAX_HUGEPAGES=0``
turns that off. From your own Python program, start it with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` instead.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "RETINANET_JAX_HUGEPAGES"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_version() -> tuple[int, int] | None:
    name, version = platform.libc_ver()
    if name != "glibc" or not version:
        return None
    try:
        major, minor = (int(p) for p in version.split(".")[:2])
    except ValueError:
        return None
    return major, minor


def _thp_available(path: str = _THP_MODE) -> bool:
    try:
        with open(path) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def hugepage_env(
    environ: Mapping[str, str], glibc: tuple[int, int] | None, thp_available: bool
) -> dict[str, str] | None:
    """The environment to re-execute with, or None when there is nothing to do: tunable
    already set (also after our own re-exec), opted out, not glibc >= 2.35, or THP off."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if (
        "glibc.malloc.hugetlb" in tunables
        or environ.get(OPT_OUT, "1") == "0"
        or glibc is None
        or glibc < (2, 35)
        or not thp_available
    ):
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
    return env


def reexec_with_hugepages() -> None:
    """Replace this process by the same command with ``GLIBC_TUNABLES`` extended; returns
    only when that is not needed or not possible. Call first thing in ``main``, before
    jax (or torch) allocates anything. Linux only; elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    env = hugepage_env(os.environ, _glibc_version(), _thp_available())
    argv = getattr(sys, "orig_argv", None)  # the command as typed: interpreter flags, -m
    if env is None or not argv:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *argv[1:]], env)
    except OSError:
        return  # e.g. an embedded interpreter: run on without huge pages
