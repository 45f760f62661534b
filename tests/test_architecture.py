"""The folder tree is the architecture: imports run downward only (docs/architecture.md).

Reads every module of the package with ``ast`` (no import, so it also sees imports inside
functions) and checks each ``retinanet_jax.*`` import against the layer rule, that torch is
imported only in ``interop/``, and that no private name crosses a module boundary.
"""

from __future__ import annotations

import ast
import pathlib
import shutil

import pytest

import retinanet_jax

PACKAGE = pathlib.Path(retinanet_jax.__file__).parent

# Which top-level folders each folder may import (itself included). Layers, top to bottom:
# cli -> training -> evaluation -> inference / interop -> objective / models / data / parallel
# -> ops / imageprep / backends / storage. imageprep is at the bottom because data/ (training
# transforms) and inference/ both prepare images with it; storage (whole-object writes for
# local disk and object stores) because evaluation/, training/ and cli/ all write outputs.
ALLOWED = {
    "storage": {"storage"},
    "ops": {"ops"},
    "imageprep": {"imageprep"},
    "backends": {"backends"},
    "parallel": {"parallel"},
    "models": {"models", "ops", "backends"},
    "objective": {"objective", "ops"},
    "data": {"data", "imageprep", "ops"},
    "inference": {"inference", "imageprep", "ops", "models", "parallel", "backends"},
    "interop": {"interop", "models", "ops", "data", "imageprep"},
    "evaluation": {"evaluation", "inference", "imageprep", "ops", "models", "data", "parallel", "storage"},
    "training": {
        "training",
        "evaluation",
        "inference",
        "interop",
        "imageprep",
        "ops",
        "models",
        "objective",
        "data",
        "parallel",
        "backends",
        "storage",
    },
    "cli": None,  # the top: may import anything
}
TORCH = ("torch", "torchvision")


def _folder(path: pathlib.Path, root: pathlib.Path) -> str | None:
    rel = path.relative_to(root).parts
    return rel[0] if len(rel) > 1 else None  # None: retinanet_jax/__init__.py (the public API)


def _imports(path: pathlib.Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, imported names) for every import statement in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module, [a.name for a in node.names]))
    return found


def _target_folder(module: str, names: list[str], root: pathlib.Path) -> list[str]:
    """Top-level folders of retinanet_jax that an import reaches."""
    parts = module.split(".")
    if parts[0] != "retinanet_jax":
        return []
    if len(parts) > 1:
        return [parts[1]]
    return [n for n in names if (root / n).is_dir()]  # from retinanet_jax import data


def violations(root: pathlib.Path = PACKAGE) -> list[str]:
    """Every import in the package tree at ``root`` that breaks the rules, as 'file:line: why'."""
    found = []
    for path in sorted(root.rglob("*.py")):
        folder = _folder(path, root)
        rel = path.relative_to(root.parent)
        for line, module, names in _imports(path):
            where = f"{rel}:{line}"
            if module.split(".")[0] in TORCH and folder != "interop":
                found.append(f"{where}: imports {module} (torch only in interop/)")
            if module.startswith("retinanet_jax"):
                private = [n for n in names if n.startswith("_")]
                if private:
                    found.append(f"{where}: imports private {private} from {module}")
            if folder is None:
                continue
            allowed = ALLOWED.get(folder, set())
            for target in _target_folder(module, names, root):
                if allowed is not None and target not in allowed:
                    found.append(f"{where}: {folder}/ imports {module} ({target}/ is not below it)")
    return found


def test_imports_run_downward_only():
    assert violations() == []


def test_every_folder_has_a_layer():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(ALLOWED)


@pytest.mark.parametrize(
    "bad",
    [
        ("inference", "from retinanet_jax.training import step\n"),
        ("data", "import torch\n"),
        ("ops", "from retinanet_jax.cli import main\n"),
        ("models", "def f():\n    from retinanet_jax.ops.nms import _f\n"),
    ],
)
def test_a_planted_wrong_arrow_is_caught(bad, tmp_path):
    folder, source = bad
    copy = tmp_path / "retinanet_jax"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / folder / "planted.py").write_text(source)
    assert [v for v in violations(copy) if "planted.py" in v]
