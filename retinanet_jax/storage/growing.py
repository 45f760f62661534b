"""Outputs that grow during a run, written to an object store without appends.

:class:`LineLog` is a text file that grows by lines (``metrics.jsonl``): appended on local
disk, kept in memory and rewritten whole on an object store. :class:`StagedDir` is a directory
that a library fills by appending to its own files (TensorBoard's event writer): on an object
store the library writes into a local temporary directory whose changed files are uploaded
whole at each :meth:`StagedDir.sync`. A rewrite costs the whole object, so callers flush at
most every :data:`~retinanet_jax.storage.paths.OBJECT_STORE_FLUSH_S` seconds and at the points
they must (before a checkpoint, at the end); the objects stay small (a COCO run's metrics and
event files are a few MB at most).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable

from etils import epath

from retinanet_jax.storage.paths import is_object_store, makedirs, read_text, write_bytes, write_text


class LineLog:
    """A text file of ``\\n``-terminated lines that grows by :meth:`append`.

    Local disk: each line is appended to the file at once (``tail -f`` follows it), and
    :meth:`flush` has nothing to do. Object store: the whole content is held in memory (read
    once when opened) and :meth:`flush` uploads it when lines were added since the last upload.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = epath.Path(path)
        self.remote = is_object_store(path)
        self._lines: list[str] = self._read() if self.remote else []
        self._dirty = False

    def _read(self) -> list[str]:
        text = read_text(self.path)
        return [] if text is None else text.splitlines()

    def exists(self) -> bool:
        return self.path.exists()

    def read(self) -> list[str]:
        """The lines as stored when opened plus those appended since (a torn last line too)."""
        return list(self._lines) if self.remote else self._read()

    def rewrite(self, lines: Iterable[str]) -> None:
        """Replace the whole content with ``lines`` now (atomically: temporary file + rename on
        local disk, one upload on a store)."""
        lines = list(lines)
        write_text(self.path, "".join(line + "\n" for line in lines))
        if self.remote:
            self._lines, self._dirty = lines, False

    def append(self, line: str) -> None:
        """Add one line (without its ``\\n``): written now on local disk, at :meth:`flush` on a store."""
        if "\n" in line:
            raise ValueError(f"LineLog.append takes one line, got {line!r}")
        if self.remote:
            self._lines.append(line)
            self._dirty = True
            return
        makedirs(self.path.parent)
        with self.path.open("a") as f:  # local disk only: object stores have no append
            f.write(line + "\n")

    def flush(self) -> bool:
        """Upload the whole content if a line was added since the last upload; True if it did."""
        if not self._dirty:
            return False
        self.rewrite(self._lines)
        return True


class StagedDir:
    """A directory written by a library that appends to its files (TensorBoard events).

    ``local`` is where the library writes. Local disk: ``path`` itself, and :meth:`sync` does
    nothing. Object store: a fresh local temporary directory; :meth:`sync` uploads every file in
    it that changed (size or modification time) since the previous sync, whole, to the same
    relative name under ``path``; :meth:`close` syncs and removes the temporary directory. The
    library must have flushed its files before :meth:`sync`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = epath.Path(path)
        self.remote = is_object_store(path)
        self._sent: dict[str, tuple[int, int]] = {}
        if self.remote:
            self.local = tempfile.mkdtemp(prefix="retinanet_jax_staged_")
        else:
            makedirs(path)
            self.local = os.fspath(path)

    def sync(self) -> list[str]:
        """Upload the changed files; returns their relative names."""
        if not self.remote or not os.path.isdir(self.local):
            return []
        sent = []
        for root, _, files in os.walk(self.local):
            for name in sorted(files):
                full = os.path.join(root, name)
                rel = os.path.relpath(full, self.local)
                st = os.stat(full)
                signature = (st.st_size, st.st_mtime_ns)
                if self._sent.get(rel) == signature:
                    continue
                with open(full, "rb") as f:
                    write_bytes(self.path / rel, f.read())
                self._sent[rel] = signature
                sent.append(rel)
        return sent

    def close(self) -> None:
        """Final :meth:`sync`, then remove the local temporary directory (object store only)."""
        if self.remote and os.path.isdir(self.local):
            try:
                self.sync()
            finally:
                shutil.rmtree(self.local, ignore_errors=True)
