"""Run outputs on local disk or an object store (``gs://``, ``s3://``, ...) without appends.

Object stores write whole objects only: there is no append, and a rename is a copy plus a
delete. Everything ``train.py``, ``retinanet-jax predict`` and ``evaluate`` write goes through
here: whole-object writes (atomic on local disk by a temporary file and a rename, one upload on
a store), a line log that appends on local disk and is rewritten whole on a store
(``metrics.jsonl``), and a staged directory for libraries that append to their own files
(TensorBoard's event writer). orbax checkpoints reach stores by themselves (etils ``epath``
and tensorstore). Paths are ``str`` or ``etils.epath.Path``.
"""

from retinanet_jax.storage.growing import LineLog, StagedDir
from retinanet_jax.storage.paths import (
    OBJECT_STORE_FLUSH_S,
    is_object_store,
    makedirs,
    read_bytes,
    read_text,
    write_bytes,
    write_text,
)

__all__ = [
    "OBJECT_STORE_FLUSH_S",
    "LineLog",
    "StagedDir",
    "is_object_store",
    "makedirs",
    "read_bytes",
    "read_text",
    "write_bytes",
    "write_text",
]
