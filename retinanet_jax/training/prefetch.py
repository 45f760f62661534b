"""``DevicePrefetch``: host batches -> device batches, placed ahead of the step that uses them.

A background thread takes the next host batch (``next(pipeline)``: decoding and augmenting in
this process, or handing over what grain's worker processes prepared) and places it on the
device (``place``: ``TrainStep.place_batch``, i.e. ``parallel.shard_batch``; the transfer is
asynchronous), ``size`` batches ahead in a queue plus the one it is preparing. So batch k+1 is
decoded and copied while step k
runs, and the step loop's wall time approaches max(step, input) instead of their sum
(``benchmarks/input_overlap.py`` measures it).

Order and errors are kept: batches come out in the pipeline's order, and an exception raised
by the pipeline (or by ``place``) is raised by ``next()`` at the position it occurred, after the
batches before it. ``get_state()`` is the pipeline state of the next batch ``next()`` returns
(what a checkpoint stores), not the pipeline's own state, which runs ahead.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

_STOP_POLL_S = 0.1


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error


class DevicePrefetch:
    """Iterator of placed batches ``size`` ahead of the consumer; see module doc.

    ``pipeline``: an iterator with ``get_state()`` (``data.TrainBatchIterator``);
    ``place``: host batch -> device batch. ``close()`` stops the thread (the pipeline stays
    open: its owner closes it). ``size=0`` places in the caller's thread, nothing ahead.
    """

    def __init__(self, pipeline: Iterator, place: Callable[[Any], Any], size: int = 2):
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.pipeline = pipeline
        self.place = place
        self.size = int(size)
        self._state = pipeline.get_state()  # of the next batch next() returns
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=max(self.size, 1))
        if self.size:
            self._thread = threading.Thread(target=self._fill, name="device-prefetch", daemon=True)
            self._thread.start()

    def _fill(self) -> None:
        while not self._stop.is_set():
            try:
                item: Any = (self.place(next(self.pipeline)), self.pipeline.get_state())
            except BaseException as e:  # noqa: BLE001  (handed to the consumer, in order)
                item = _Raised(e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=_STOP_POLL_S)
                    break
                except queue.Full:
                    continue
            if isinstance(item, _Raised):
                return

    def __iter__(self) -> DevicePrefetch:
        return self

    def __next__(self) -> Any:
        if self._thread is None:
            if self._stop.is_set():
                raise StopIteration
            batch = self.place(next(self.pipeline))
            self._state = self.pipeline.get_state()
            return batch
        while True:
            try:
                item = self._queue.get(timeout=_STOP_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("DevicePrefetch: the prefetch thread has stopped") from None
        if isinstance(item, _Raised):
            self._queue.put(item)  # every later next() raises it again
            raise item.error
        batch, self._state = item
        return batch

    def get_state(self) -> dict:
        """The pipeline state of the next batch ``next()`` returns (JSON-serializable)."""
        return dict(self._state)

    def close(self, timeout: float = 60.0) -> None:
        """Stops the thread (after the batch it is preparing, if any) and drops what it placed."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is None:
            return
        thread.join(timeout)
        if thread.is_alive():
            log.warning("DevicePrefetch: the prefetch thread did not stop within %.0f s", timeout)
        while not self._queue.empty():
            self._queue.get_nowait()

    def __enter__(self) -> DevicePrefetch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
