"""Deterministic, bucket-grouped, host-sharded batch plans.

An epoch's plan is a pure function of (seed, epoch): the example indices are shuffled, then
scanned in that order and dealt into per-bucket queues; a *global* batch (all hosts together)
is emitted whenever a queue fills, as torchvision's ``GroupedBatchSampler`` does, so the
buckets stay interleaved over the epoch. Every global batch holds images of one canvas bucket
only. Examples left in partly filled queues at the end of an epoch are dropped (a different
random subset each epoch).

Host ``p`` of ``P`` takes columns ``[p*b, (p+1)*b)`` of every global batch (b = per-host batch
size): all hosts run the same number of steps with the same canvas at every step (one jit
shape per step), and their examples partition the global batch, so each host reads and decodes
only its own share.
"""

from __future__ import annotations

import numpy as np


def steps_per_epoch(group_keys: np.ndarray, global_batch_size: int) -> int:
    """Number of full global batches per epoch: sum over groups of floor(size / batch)."""
    counts = np.bincount(np.asarray(group_keys, np.int64)) if len(group_keys) else np.zeros(0)
    return int(np.sum(counts // global_batch_size))


def epoch_plan(
    group_keys: np.ndarray, global_batch_size: int, seed: int, epoch: int, shuffle: bool = True
) -> np.ndarray:
    """Global batches of example indices, int64 [steps_per_epoch, global_batch_size].

    ``group_keys`` int [N]: the canvas bucket of each example; each row holds one key only.
    Rows are ordered by the position (in the shuffled order) at which they fill.
    """
    keys = np.asarray(group_keys, np.int64)
    n = len(keys)
    if shuffle:
        order = np.random.default_rng([int(seed), int(epoch)]).permutation(n)
    else:
        order = np.arange(n)
    keys_in_order = keys[order]
    rows, fill_positions = [], []
    for key in np.unique(keys_in_order):
        positions = np.flatnonzero(keys_in_order == key)
        full = len(positions) // global_batch_size * global_batch_size
        if full == 0:
            continue
        rows.append(order[positions[:full]].reshape(-1, global_batch_size))
        # A batch is complete when its last member is reached in the shuffled scan.
        fill_positions.append(positions[global_batch_size - 1 : full : global_batch_size])
    if not rows:
        return np.zeros((0, global_batch_size), np.int64)
    rows_all = np.concatenate(rows)
    return rows_all[np.argsort(np.concatenate(fill_positions), kind="stable")]


def host_slice(plan_row: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """This host's examples of one global batch row (contiguous block of the row)."""
    per_host = len(plan_row) // process_count
    return plan_row[process_index * per_host : (process_index + 1) * per_host]
