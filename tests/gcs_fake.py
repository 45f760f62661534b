"""A local Google Cloud Storage for tests (not a test module): the gcp-storage-emulator server
(pure Python, in memory) behind the real clients, with appends refused.

- ``gs://`` paths of ``etils.epath`` (metrics, TensorBoard, config, detections, orbax's
  metadata) go through gcsfs, pointed at the emulator by ``STORAGE_EMULATOR_HOST``;
- orbax's arrays go through tensorstore's ``gcs`` driver, pointed at it by
  ``TENSORSTORE_GCS_HTTP_URL`` (``GOOGLE_AUTH_TOKEN_FOR_TESTING`` skips its credentials). The
  emulator's object reads are taught the ``x-goog-generation`` header that GCS sends and
  tensorstore needs (OCDBT manifests are read and rewritten by generation).

gcsfs itself turns an append (mode ``"a"``) into an overwrite with a warning, which would keep
only the last line written. :class:`NoAppendGCS` raises instead and records the attempt (a
library that swallows the error still leaves the record).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import struct
from collections.abc import Iterator
from http import HTTPStatus

import fsspec
import gcsfs
from etils.epath import backend as epath_backend

BUCKET = "bkt"


class NoAppendGCS(gcsfs.core.GCSFileSystem):
    """gcsfs that refuses appends (as an object store must) and counts whole-object writes.

    Based on gcsfs's plain filesystem: the default ``gcsfs.GCSFileSystem`` first asks the
    storage-control API (which the emulator lacks) whether a bucket is zonal, and falls back
    to the plain one for other buckets.
    """

    appends: list[str] = []  # paths someone tried to append to
    writes: dict[str, int] = {}  # path -> number of whole-object uploads through gcsfs

    def _open(self, path, mode="rb", **kwargs):
        if "a" in mode:
            NoAppendGCS.appends.append(path)
            raise io.UnsupportedOperation(f"append (mode {mode!r}) to {path}: object stores have no append")
        if "w" in mode:
            NoAppendGCS.writes[path] = NoAppendGCS.writes.get(path, 0) + 1
        return super()._open(path, mode, **kwargs)


def environment(url: str) -> dict[str, str]:
    """Variables that point every client at the emulator at ``url`` (``http://host:port``)."""
    return {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake",
        "EPATH_USE_TF": "false",  # epath's gs:// through gcsfs even where TensorFlow is installed
    }


def _reset_clients() -> None:
    # etils caches the filesystem per protocol, fsspec its instances: new ones see the class.
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    gcsfs.GCSFileSystem.clear_instance_cache()
    NoAppendGCS.clear_instance_cache()


def install_no_append(url: str) -> None:
    """Point this process's clients at the emulator (``os.environ``) and refuse appends."""
    os.environ.update(environment(url))
    for protocol in ("gs", "gcs"):
        fsspec.register_implementation(protocol, NoAppendGCS, clobber=True)
    _reset_clients()


def uninstall() -> None:
    for protocol in ("gs", "gcs"):
        fsspec.register_implementation(protocol, gcsfs.GCSFileSystem, clobber=True)
    _reset_clients()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _with_generation_headers(read):
    """GCS answers an object read with the object's generation in ``x-goog-generation``;
    tensorstore (orbax's arrays, OCDBT manifests) needs it, the emulator leaves it out."""

    def handler(request, response, store, *args, **kwargs):
        read(request, response, store, *args, **kwargs)
        if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            obj = store.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = obj["generation"]
            response["x-goog-metageneration"] = obj["metageneration"]

    handler.patched = True
    return handler


def _patch_emulator() -> None:
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    for _, methods in server.HANDLERS:
        for method, fn in list(methods.items()):
            if fn in (objects.get, objects.download):  # media reads: ?alt=media and /download/
                methods[method] = _with_generation_headers(fn)


@contextlib.contextmanager
def emulator() -> Iterator[str]:
    """An in-memory GCS emulator with bucket ``BUCKET``, in a thread; yields its URL."""
    from gcp_storage_emulator.server import create_server

    _patch_emulator()
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)  # "not found" is an answer
    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    # Clients that hang up early (tensorstore after a Range read) are no error worth a traceback.
    httpd = getattr(getattr(server, "_api", None), "_httpd", None)
    if httpd is not None:
        httpd.handle_error = lambda request, client_address: None
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def objects(prefix: str) -> list[str]:
    """Every object under ``prefix`` (``gs://...``), as ``gs://`` paths, listed afresh."""
    fs = fsspec.filesystem("gs")
    fs.invalidate_cache()
    return sorted(f"gs://{p}" for p in fs.find(prefix))


def children(prefix: str) -> list[str]:
    """Names directly under ``prefix`` (``gs://...``), listed afresh (gcsfs caches listings,
    and other processes and tensorstore write behind its back)."""
    fs = fsspec.filesystem("gs")
    fs.invalidate_cache()
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(prefix, detail=False))


def read_events(data: bytes) -> list:
    """The ``Event`` protos of a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    events, pos = [], 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        body = data[pos + 12 : pos + 12 + length]
        if len(body) < length:
            break  # a torn last record
        events.append(Event.FromString(body))
        pos += 12 + length + 4
    return events


def scalars(data: bytes) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` of an event file's scalar summaries."""
    out: dict[str, dict[int, float]] = {}
    for event in read_events(data):
        for value in event.summary.value:
            out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out
