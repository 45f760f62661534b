"""The package uses jax's public API only: no module imports ``jax._src`` (private, renamed
or removed without notice, so one jax upgrade could break every ``train.py`` start)."""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = [os.path.join(ROOT, "train.py")] + sorted(
    os.path.join(d, f)
    for d, _, files in os.walk(os.path.join(ROOT, "retinanet_jax"))
    for f in files
    if f.endswith(".py")
)


def private_jax_uses(source: str) -> list[str]:
    """``jax._src`` imports and attribute accesses in ``source``: "line: what"."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif (
            isinstance(node, ast.Attribute)
            and node.attr == "_src"
            and isinstance(node.value, ast.Name)
            and node.value.id == "jax"
        ):
            names = ["jax._src"]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "__import__"
            or (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "import_module"
            )
        ):
            names = [
                a.value for a in node.args[:1] if isinstance(a, ast.Constant) and isinstance(a.value, str)
            ]
        bad = [n for n in names if n == "jax._src" or n.startswith("jax._src.")]
        if bad:
            found.append(f"{node.lineno}: {bad[0]}")
    return found


def test_the_scan_finds_private_imports():
    for code in (
        "from jax._src import clusters",
        "import jax._src.distributed",
        "from jax._src.distributed import global_state",
        "from jax import _src",
        "import jax\nx = jax._src.xla_bridge",
        "importlib.import_module('jax._src.api')",
    ):
        assert private_jax_uses(code), code
    for code in (
        "import jax",
        "from jax import distributed",
        "import jax.distributed",
        "logging.getLogger('jax._src.xla_bridge')",  # a logger name is no import
        "from jax.experimental import io_callback",
    ):
        assert not private_jax_uses(code), code


def test_no_module_uses_private_jax():
    assert len(SOURCES) > 10
    offenders = {}
    for path in SOURCES:
        with open(path) as f:
            found = private_jax_uses(f.read())
        if found:
            offenders[os.path.relpath(path, ROOT)] = found
    assert not offenders, f"private jax (jax._src) used, use the public API instead: {offenders}"
