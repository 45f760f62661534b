"""Whole-file reads and writes on local disk or an object store, never an append.

Local disk: a write goes to ``.NAME.tmp`` beside the target and is renamed over it, so a reader
(or a crash) never sees half a file. Object store (any ``scheme://`` path, through
``etils.epath``: gcsfs or ``tf.io.gfile`` for ``gs://``): one upload of the whole object, which
the store makes visible at once and completely; no temporary object (a rename there is a copy
and a delete).
"""

from __future__ import annotations

import os

from etils import epath

# Least seconds between two rewrites of a growing object (metrics.jsonl, TensorBoard events):
# GCS accepts about one write per second to one object name and answers faster ones with 429.
OBJECT_STORE_FLUSH_S = 10.0


def is_object_store(path: str | os.PathLike) -> bool:
    """True for ``scheme://...`` paths (``gs://``, ``s3://``, ``az://``, ...), False for local ones."""
    return "://" in os.fspath(path)


def makedirs(path: str | os.PathLike) -> None:
    """``mkdir -p`` on local disk; nothing on an object store (it has no directories, and
    gcsfs's ``makedirs`` would try to create the bucket)."""
    if not is_object_store(path):
        os.makedirs(path, exist_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace the file / object at ``path`` with ``data`` as a whole (parent dirs made locally)."""
    target = epath.Path(path)
    if is_object_store(path):
        target.write_bytes(data)
        return
    makedirs(target.parent)
    tmp = target.parent / f".{target.name}.tmp"
    tmp.write_bytes(data)
    tmp.replace(target)


def write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`write_bytes` of ``text`` in UTF-8."""
    write_bytes(path, text.encode("utf-8"))


def read_bytes(path: str | os.PathLike) -> bytes | None:
    """The whole file / object, or None if there is none."""
    source = epath.Path(path)
    try:
        return source.read_bytes()
    except FileNotFoundError:
        return None


def read_text(path: str | os.PathLike) -> str | None:
    """:func:`read_bytes` decoded as UTF-8 (undecodable bytes, e.g. a torn last character,
    replaced), or None."""
    data = read_bytes(path)
    return None if data is None else data.decode("utf-8", errors="replace")
