"""hostmem: when the huge-page malloc tunable is added, and that the re-exec keeps the command."""

import os
import subprocess
import sys
import textwrap

import pytest

from retinanet_jax.backends.cpu import hostmem


def test_env_adds_tunable_once_and_respects_opt_out():
    env = hostmem.hugepage_env({"PATH": "/bin"}, (2, 36), True)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": hostmem.TUNABLE}
    assert hostmem.hugepage_env(env, (2, 36), True) is None  # after the re-exec: no loop
    kept = hostmem.hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, (2, 36), True)
    assert kept["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + hostmem.TUNABLE
    assert hostmem.hugepage_env({hostmem.OPT_OUT: "0"}, (2, 36), True) is None
    assert hostmem.hugepage_env({}, (2, 31), True) is None  # tunable added in glibc 2.35
    assert hostmem.hugepage_env({}, None, True) is None  # musl, macOS
    assert hostmem.hugepage_env({}, (2, 36), False) is None  # THP "never"


@pytest.mark.skipif(
    hostmem.hugepage_env(os.environ, hostmem._glibc_version(), hostmem._thp_available()) is None
    and hostmem.OPT_OUT not in os.environ,
    reason="no glibc >= 2.35 with transparent huge pages here",
)
def test_reexec_keeps_interpreter_flags_and_arguments(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(
        textwrap.dedent("""
        import os, sys
        sys.path.insert(0, sys.argv[1])
        from retinanet_jax.backends.cpu import hostmem
        print("before", os.getpid(), flush=True)
        hostmem.reexec_with_hugepages()
        print("after", os.getpid(), os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], sys.flags.optimize)
    """)
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hostmem.OPT_OUT)}
    out = subprocess.run(
        [sys.executable, "-O", str(script), root, "x y"], env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    # One "before" per run of the script: the original process and its re-executed self.
    assert [line.split()[0] for line in out] == ["before", "before", "after"]
    pid = out[0].split()[1]
    assert out[1].split()[1] == pid and out[2].split()[1] == pid  # same process (exec)
    assert out[2].split(None, 3)[2:] == [hostmem.TUNABLE, f"['{root}', 'x y'] 1"]
