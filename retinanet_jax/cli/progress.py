"""Progress of a command over many images, on stderr."""

from __future__ import annotations

import sys
import time


class ImageProgress:
    """tqdm bar when stderr is a terminal, else a plain stderr line every ``every`` seconds
    and at the end."""

    def __init__(self, total: int, what: str = "images", every: float = 5.0):
        self.total, self.what, self.every, self.done, self.failed = total, what, every, 0, 0
        self._t0 = self._last = time.monotonic()
        self._bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="img", dynamic_ncols=True, file=sys.stderr)

    def update(self, done: int, failed: int = 0) -> None:
        self.done += done
        self.failed += failed
        if self._bar is not None:
            self._bar.update(done)
            self._bar.set_postfix(failed=self.failed, refresh=False)
            return
        now = time.monotonic()
        if now - self._last >= self.every or self.done >= self.total:
            self._last = now
            rate = self.done / max(now - self._t0, 1e-9)
            print(
                f"{self.done}/{self.total} {self.what} ({self.failed} failed, {rate:.1f}/s)",
                file=sys.stderr,
                flush=True,
            )

    def warn(self, message: str) -> None:
        """Print ``message`` on stderr without breaking the bar."""
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
