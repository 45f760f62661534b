"""Training-run output: ``metrics.jsonl``, TensorBoard events, progress bar / log lines, table.

``metrics.jsonl`` holds one JSON object per line, ``{"step": int, name: float, ...}``. When a run
resumes from step ``s``, lines after ``s`` (written by the interrupted run, whose later steps
are recomputed) are dropped, and TensorBoard is told to purge them too, so both show one
trajectory. Only process 0 writes.

Both go through :mod:`retinanet_jax.storage`, so a ``gs://`` workdir works without appends: on
local disk each line is appended at once and TensorBoard writes into ``workdir/tensorboard``;
on an object store ``metrics.jsonl`` is rewritten whole and the event files (written by
tensorboardX into a local temporary directory) are uploaded whole at each flush, which happens
at most every ``storage.OBJECT_STORE_FLUSH_S`` seconds, at :meth:`MetricWriter.flush` (the loop
calls it before each checkpoint, so what a resumed run keeps is stored) and at close.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
import uuid
from typing import Any

from etils import epath

from retinanet_jax import storage

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def _finite(values: dict[str, float]) -> dict[str, float]:
    # JSON has no NaN/inf; a NaN would make the line unreadable for strict parsers.
    return {k: float(v) for k, v in values.items() if math.isfinite(float(v))}


class MetricWriter:
    """``{"step", **values}`` lines in ``workdir/metrics.jsonl`` and TensorBoard scalars in
    ``workdir/tensorboard``, on local disk or an object store.

    ``flush_interval_s``: least seconds between two uploads on an object store (default
    ``storage.OBJECT_STORE_FLUSH_S``); local disk writes every line at once (default 0).
    """

    def __init__(
        self,
        workdir: str | epath.PathLike,
        *,
        start_step: int = 0,
        enabled: bool = True,
        flush_interval_s: float | None = None,
    ):
        self.enabled = enabled
        self.path = epath.Path(workdir) / METRICS_FILE
        remote = storage.is_object_store(workdir)
        if flush_interval_s is None:
            flush_interval_s = storage.OBJECT_STORE_FLUSH_S if remote else 0.0
        self.flush_interval_s = flush_interval_s
        self._last_flush = time.monotonic()
        self._tb = None
        self._tb_dir: storage.StagedDir | None = None
        if not enabled:
            return
        self._log = storage.LineLog(self.path)
        if self._log.exists():
            self._log.rewrite(_lines_up_to(self._log.read(), start_step))
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            log.warning("tensorboardX is not installed: no TensorBoard events (pip install tensorboardX)")
        else:
            # tensorboardX appends to its event file: on an object store it writes locally and
            # the files are uploaded whole (StagedDir). A unique suffix keeps a resumed run's
            # file from replacing one named in the same second.
            self._tb_dir = storage.StagedDir(epath.Path(workdir) / "tensorboard")
            suffix = f".{uuid.uuid4().hex[:8]}" if remote else ""
            # purge_step hides events >= it that an interrupted run wrote past its checkpoint.
            self._tb = SummaryWriter(
                self._tb_dir.local,
                purge_step=start_step + 1 if start_step else None,
                filename_suffix=suffix,
            )

    def write(self, step: int, values: dict[str, float]) -> None:
        """Record ``values`` at ``step`` (NaN / inf are left out of the JSON line)."""
        if not self.enabled:
            return
        self._log.append(json.dumps({"step": int(step), **_finite(values)}))
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, float(value), int(step))
        if time.monotonic() - self._last_flush >= self.flush_interval_s:
            self.flush()

    def flush(self) -> None:
        """Store everything written so far (uploads on an object store)."""
        if not self.enabled:
            return
        self._log.flush()
        if self._tb is not None:
            self._tb.flush()
            self._tb_dir.sync()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        if not self.enabled:
            return
        self._log.flush()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._tb_dir is not None:
            self._tb_dir.close()
            self._tb_dir = None


def _lines_up_to(lines: list[str], step: int) -> list[str]:
    """The parsable lines whose ``"step"`` is <= ``step`` (a killed run's torn last line is dropped)."""
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    return kept


class Progress:
    """A tqdm bar (images/s, ETA) on a terminal; plain log lines otherwise."""

    def __init__(
        self,
        start_step: int,
        total_steps: int,
        global_batch_size: int,
        *,
        enabled: bool = True,
        tty: bool | None = None,
    ):
        self.total, self.batch = total_steps, global_batch_size
        self.enabled = enabled
        self._t0, self._s0 = time.monotonic(), start_step
        self._step = start_step
        self._window = (time.monotonic(), start_step)
        self._bar = None
        if enabled and (sys.stderr.isatty() if tty is None else tty):
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(
                    total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, smoothing=0.1
                )

    def advance(self, step: int) -> None:
        """``step`` steps are done."""
        self._step = step
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def images_per_sec(self) -> float:
        """Images per second since the previous call (i.e. over the last log interval)."""
        now = time.monotonic()
        t_prev, s_prev = self._window
        self._window = (now, self._step)
        return (self._step - s_prev) * self.batch / max(now - t_prev, 1e-9)

    def report(self, step: int, values: dict[str, float]) -> None:
        """Show the latest training values (bar postfix or one log line with ETA)."""
        if not self.enabled:
            return
        short = {k.split("/")[-1]: v for k, v in values.items()}
        if self._bar is not None:
            self._bar.set_postfix(
                loss=f"{short.get('loss', float('nan')):.4f}",
                img_s=f"{short.get('images_per_sec', 0.0):.1f}",
                refresh=False,
            )
            return
        elapsed = time.monotonic() - self._t0
        done = step - self._s0
        eta = elapsed / done * (self.total - step) if done else float("nan")
        log.info(
            "step %d/%d  loss %.4f  cls %.4f  box %.4f  lr %.3g  %.1f img/s  ETA %s",
            step,
            self.total,
            short.get("loss", math.nan),
            short.get("classification", math.nan),
            short.get("bbox_regression", math.nan),
            short.get("lr", math.nan),
            short.get("images_per_sec", math.nan),
            _hms(eta),
        )

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            log.info("%s", text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_table(step: int, metrics: dict[str, Any], class_names: list[str]) -> str:
    """Final metrics as a plain-text table (COCO summary, then AP per class)."""
    lines = [f"Final metrics at step {step}", "-" * 40]
    for key in (
        "eval/AP",
        "eval/AP50",
        "eval/AP75",
        "eval/APs",
        "eval/APm",
        "eval/APl",
        "train/loss",
        "train/images_per_sec",
    ):
        if key in metrics:
            lines.append(f"{key:<24}{metrics[key]:>12.4f}")
    per_class = [(n, metrics[f"eval/AP/{n}"]) for n in class_names if f"eval/AP/{n}" in metrics]
    if per_class:
        lines += ["-" * 40, "AP per class"]
        lines += [f"  {name:<22}{ap:>12.4f}" for name, ap in per_class]
    return "\n".join(lines)
