"""Helpers shared by tests (not a test module): the tiny training config with overrides."""

import os
import runpy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
    """configs/tiny.py's ``get_config()`` with dotted-key overrides, e.g.
    ``tiny_config(**{"eval.enabled": False})``."""
    c = runpy.run_path(os.path.join(ROOT, "configs", "tiny.py"))["get_config"]()
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c
