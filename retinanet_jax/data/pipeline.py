"""Training input pipeline: source -> transforms -> host batches for ``train_step``.

A batch is ``{"images": uint8 [B,Hc,Wc,3] zero padded, "image_sizes": int32 [B,2] (resized
h, w), "boxes": float32 [B,G,4] xyxy resized pixels, "labels": int32 [B,G] (-1 = padding)}``
with B the per-host batch size and (Hc, Wc) one canvas bucket for the whole batch (and, on
every host, for the same step: see ``sampler``).

Everything is a pure function of the global step ``k`` = epoch * steps_per_epoch + position:
the plan of epoch ``k // steps_per_epoch`` (from (seed, epoch)) gives the examples, and each
example's augmentation draws from ``np.random.default_rng([seed, epoch, example index])``.
So the iterator state is just ``{"epoch", "position"}``; restoring it replays the same
batches, whatever the number of workers.

``worker_count > 0`` decodes and augments in that many processes with grain's ``mp_prefetch``
(each worker builds whole batches for every worker_count-th step; grain keeps the order).
``worker_count = 0`` runs in the calling process.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from retinanet_jax.data import sampler, transforms
from retinanet_jax.data.canvas_stats import image_sizes
from retinanet_jax.imageprep import canvases as canvases_lib
from retinanet_jax.imageprep import geometry

log = logging.getLogger(__name__)

# Steps in an "infinite" run (num_epochs=None): far more than any training run.
_FOREVER_EPOCHS = 10**9


class _BatchLoader:
    """Picklable callable: global step -> this host's batch (runs inside grain workers)."""

    def __init__(
        self,
        source,
        group_keys: np.ndarray,
        canvases: list[tuple[int, int]],
        *,
        steps: int,
        global_batch_size: int,
        process_index: int,
        process_count: int,
        seed: int,
        shuffle: bool,
        transform_kwargs: dict[str, Any],
    ):
        self.source = source
        self.group_keys = group_keys
        self.canvases = canvases
        self.steps = steps
        self.global_batch_size = global_batch_size
        self.process_index = process_index
        self.process_count = process_count
        self.seed = seed
        self.shuffle = shuffle
        self.transform_kwargs = transform_kwargs
        self._plan_epoch: int | None = None
        self._plan: np.ndarray | None = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_plan_epoch"], state["_plan"] = None, None  # recomputed in the worker
        return state

    def indices(self, step: int) -> tuple[int, np.ndarray]:
        """(epoch, this host's example indices) of global step ``step``."""
        epoch, position = divmod(int(step), self.steps)
        if self._plan_epoch != epoch:
            self._plan = sampler.epoch_plan(
                self.group_keys, self.global_batch_size, self.seed, epoch, self.shuffle
            )
            self._plan_epoch = epoch
        row = self._plan[position]
        return epoch, sampler.host_slice(row, self.process_index, self.process_count)

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        epoch, indices = self.indices(step)
        canvas = self.canvases[self.group_keys[indices[0]]]
        images = np.zeros((len(indices), canvas[0], canvas[1], 3), np.uint8)
        outs = []
        for slot, index in enumerate(indices):
            rng = np.random.default_rng([self.seed, epoch, int(index)])
            outs.append(
                transforms.train_transform(
                    self.source[int(index)], rng, canvas_hw=canvas, out=images[slot], **self.transform_kwargs
                )
            )
        truncated = sum(o["num_truncated"] for o in outs)
        if truncated:
            log.warning(
                "step %d: %d boxes beyond max_boxes=%d were dropped",
                step,
                truncated,
                self.transform_kwargs["max_boxes"],
            )
        return {
            "images": images,
            "image_sizes": np.stack([o["image_size"] for o in outs]),
            "boxes": np.stack([o["boxes"] for o in outs]),
            "labels": np.stack([o["labels"] for o in outs]),
        }


def _let_grain_read_its_flags() -> None:
    """Lets grain read its own absl flags (their defaults) when the program parsed none.

    grain reads some of its options as absl flags directly (``mp_prefetch`` reads
    ``--grain_enable_multiprocess_worker_profiling`` on every iteration, from its threads), and
    absl refuses to read any flag before ``FLAGS`` are parsed, which outside ``absl.app`` they
    are not. Rather than marking the whole global ``FLAGS`` parsed (which would let every other
    library's unparsed flags be read as defaults and hide a program's missing parse), only
    grain's own flags that nothing set are marked present, as grain itself does in its worker
    processes; their values stay the defaults, and a later ``FLAGS(argv)`` still parses them.
    Nothing changes when the flags are parsed (``absl.app``: ``train.py``).
    """
    from absl import flags

    if flags.FLAGS.is_parsed():
        return
    for name in list(flags.FLAGS):
        flag = flags.FLAGS[name]
        if name.startswith("grain_") and not flag.present:
            flag.present = True


class TrainBatchIterator:
    """Endless (or ``num_epochs``-long) iterator of training batches; see module doc.

    Args:
      source: an example source (``__len__``, ``__getitem__``, optional ``image_size(i)``).
      batch_size: per-host batch size B; the global batch is B * process_count.
      seed: shuffling and augmentation seed.
      min_sizes: min_size candidates (one drawn per image; torchvision multi-scale training).
      max_size: long-side limit.
      buckets: canvas (h, w) list, used as given (plus the unknown-size canvas,
        ``geometry.with_unknown_size_canvas``, if some image size is unknown); None: chosen
        by ``canvases`` (``imageprep.canvases.select_canvases``).
      canvases: "fit" (default): at most ``max_canvases`` canvases fitted to the images' sizes
        (resized with ``max(min_sizes)``), each holding at least a global batch of images;
        "fixed": ``geometry.make_buckets(max(min_sizes), max_size)``'s three.
      max_canvases: bound on the fitted canvases (so on ``train_step`` compilations).
      max_boxes: G, boxes per image after padding; ``box_overflow`` "error" | "truncate".
      hflip_prob: probability of a left-right flip.
      process_index, process_count: this host's shard (``jax.process_index()`` / count).
      worker_count: decoding/augmenting processes (0 = in this process).
      worker_buffer_size: batches each worker prepares ahead.
      num_epochs: stop after this many epochs; None = endless.
      shuffle: shuffle each epoch (False: index order, still grouped by bucket).
      state: {"epoch", "position"} to start from (from ``get_state()``).
    """

    def __init__(
        self,
        source,
        *,
        batch_size: int,
        seed: int = 0,
        min_sizes: Sequence[int] = (800,),
        max_size: int = 1333,
        buckets: Sequence[tuple[int, int]] | None = None,
        canvases: str = "fit",
        max_canvases: int = canvases_lib.DEFAULT_MAX_CANVASES,
        max_boxes: int = 100,
        hflip_prob: float = 0.5,
        box_overflow: str = "error",
        process_index: int = 0,
        process_count: int = 1,
        worker_count: int = 0,
        worker_buffer_size: int = 2,
        num_epochs: int | None = None,
        shuffle: bool = True,
        state: dict[str, int] | None = None,
    ):
        if not 0 <= process_index < process_count:
            raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
        if batch_size < 1 or worker_count < 0:
            raise ValueError(f"need batch_size >= 1 and worker_count >= 0, got {batch_size}, {worker_count}")
        if box_overflow not in transforms.BOX_OVERFLOW:
            raise ValueError(f"box_overflow must be one of {transforms.BOX_OVERFLOW}, got {box_overflow!r}")
        min_sizes = tuple(int(s) for s in min_sizes)
        sizes = image_sizes(source)
        global_batch = batch_size * process_count
        # A pure function of the sizes: every host computes the same canvases.
        buckets = canvases_lib.select_canvases(
            sizes,
            max(min_sizes),
            max_size,
            mode=canvases,
            max_canvases=max_canvases,
            min_group=global_batch,
            buckets=buckets,
        )
        by_size = {
            s: geometry.image_bucket(s, buckets, max(min_sizes), max_size) for s in set(sizes)
        }  # few distinct sizes: COCO has ~1000 among 118k images
        per_image = [by_size[s] for s in sizes]
        self.canvases = sorted(set(per_image), key=lambda hw: (hw[0] * hw[1], hw))
        self.canvas_usage = canvases_lib.canvas_usage(sizes, self.canvases, max(min_sizes), max_size)
        key_of = {c: k for k, c in enumerate(self.canvases)}
        group_keys = np.array([key_of[c] for c in per_image], np.int64)
        self.steps_per_epoch = sampler.steps_per_epoch(group_keys, global_batch)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{type(source).__name__} with {len(source)} examples gives no full "
                f"global batch of {global_batch} in any canvas bucket "
                f"(examples per bucket: {np.bincount(group_keys).tolist()})"
            )
        starved = {c: int(n) for c, n in zip(self.canvases, np.bincount(group_keys)) if n < global_batch}
        if starved:
            log.warning(
                "canvases with fewer images than a global batch of %d never train (images per "
                "canvas: %s); pass other buckets or canvases='fit'",
                global_batch,
                starved,
            )
        self.num_epochs = num_epochs
        self.worker_count = int(worker_count)
        self.worker_buffer_size = int(worker_buffer_size)
        self._loader = _BatchLoader(
            source,
            group_keys,
            self.canvases,
            steps=self.steps_per_epoch,
            global_batch_size=global_batch,
            process_index=process_index,
            process_count=process_count,
            seed=seed,
            shuffle=shuffle,
            transform_kwargs=dict(
                min_sizes=min_sizes,
                max_size=int(max_size),
                max_boxes=int(max_boxes),
                hflip_prob=float(hflip_prob),
                box_overflow=box_overflow,
            ),
        )
        self._iterator: Iterator | None = None
        self.set_state(state or {"epoch": 0, "position": 0})

    @property
    def total_steps(self) -> int:
        epochs = _FOREVER_EPOCHS if self.num_epochs is None else self.num_epochs
        return epochs * self.steps_per_epoch

    def example_indices(self, state: dict[str, int]) -> np.ndarray:
        """This host's source indices in the batch at ``state`` (for tests and debugging)."""
        return self._loader.indices(state["epoch"] * self.steps_per_epoch + state["position"])[1]

    def get_state(self) -> dict[str, int]:
        """{"epoch", "position"} of the next batch ``next()`` returns (JSON-serializable)."""
        epoch, position = divmod(self._next_step, self.steps_per_epoch)
        return {"epoch": int(epoch), "position": int(position)}

    def set_state(self, state: dict[str, int]) -> None:
        """Continues from a ``get_state()`` result; restarts the workers if any."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.steps_per_epoch:
            raise ValueError(
                f"bad pipeline state {state}: need epoch >= 0 and 0 <= position < "
                f"steps_per_epoch={self.steps_per_epoch}"
            )
        self.close()
        self._next_step = epoch * self.steps_per_epoch + position
        steps = range(self._next_step, max(self.total_steps, self._next_step))
        if self.worker_count == 0:
            self._iterator = map(self._loader, steps)
        else:
            self._iterator = iter(self._grain_dataset(steps))

    def _grain_dataset(self, steps: range):
        try:
            import grain
        except ImportError as e:
            raise ImportError(
                "worker_count > 0 needs grain (pip install grain); or pass worker_count=0"
            ) from e
        _let_grain_read_its_flags()
        ds = grain.MapDataset.range(steps.start, steps.stop).map(self._loader)
        # One thread per worker: each element is a whole batch, parallelism is across workers.
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
        return ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=self.worker_count, per_worker_buffer_size=self.worker_buffer_size
            )
        )

    def __iter__(self) -> TrainBatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iterator)
        self._next_step += 1
        if self.worker_count:
            # grain hands over shared-memory arrays that unlink when garbage collected; plain
            # copies (~10 ms for a COCO batch) free the shared memory now and cannot leak it.
            batch = {key: np.array(value) for key, value in batch.items()}
        return batch

    def close(self) -> None:
        """Stops the worker processes (also done on ``set_state`` and garbage collection)."""
        iterator, self._iterator = self._iterator, None
        if iterator is not None and hasattr(iterator, "close"):
            iterator.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001  (interpreter shutdown: nothing left to clean)
            pass
