"""Does host input preparation overlap the training step? (the asynchronous step loop)

The training loop (``training/loop.py``) dispatches ``TrainStep.run`` without reading anything
back and takes its batches from ``training.prefetch.DevicePrefetch``, which decodes and places
batch k+1 in a thread while step k runs. If that works, the loop's time per step is about
max(step, input), not step + input.

Setup: ``configs/tiny.py`` (ResNet-18, 32-channel FPN, 64 px shapes, batch 8) on one device; the
input is the real ``TrainBatchIterator`` plus an artificial per-batch delay (``--input-ms``;
default: the measured step time, where overlap matters most: ideal loop/sum = 0.5). A sleep
needs no CPU, so it shows the overlap itself; ``--input-ms 0`` times the real decode alone,
which competes with XLA for the same cores.

Timed, interleaved over ``--rounds`` (medians per step, over ``--steps`` steps each):
  step   the step alone on batches already on the device (async dispatch, one wait at the end)
  input  the input alone: next batch + delay + placement, waited for
  loop   DevicePrefetch(input) feeding ``run``: what ``train_and_evaluate`` does between logs
         (timed from its first batch on: the one-time fill at the start of a run is left out)
  sync   the previous loop: next batch, then ``step_fn(state, batch)`` reading a flag per step

    PYTHONPATH=. python benchmarks/input_overlap.py [--rounds 5] [--steps 8] [--input-ms -1]
"""

from __future__ import annotations

import argparse
import os
import runpy
import statistics
import time

import jax

from retinanet_jax.data import TrainBatchIterator
from retinanet_jax.parallel import mesh as parallel
from retinanet_jax.training import loop as train_loop
from retinanet_jax.training.optim import OptimConfig, make_optimizer
from retinanet_jax.training.prefetch import DevicePrefetch
from retinanet_jax.training.step import create_train_state, make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SlowInput:
    """A pipeline whose every batch takes ``delay_s`` longer (a slow disk / decoder)."""

    def __init__(self, pipeline: TrainBatchIterator, delay_s: float):
        self.pipeline, self.delay_s = pipeline, delay_s

    def get_state(self) -> dict:
        return self.pipeline.get_state()

    def __next__(self) -> dict:
        batch = next(self.pipeline)
        time.sleep(self.delay_s)
        return batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument(
        "--input-ms", type=float, default=-1.0, help="extra per-batch input time; -1: the measured step time"
    )
    args = ap.parse_args()

    cfg = runpy.run_path(os.path.join(ROOT, "configs", "tiny.py"))["get_config"]()
    train_src, _ = train_loop.build_sources(cfg)
    model, variables = train_loop.build_model(cfg, len(train_src.class_names), pretrained=True)
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    inp = cfg.input
    pipeline = TrainBatchIterator(
        train_src,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        min_sizes=tuple(inp.min_sizes),
        max_size=inp.max_size,
        buckets=inp.buckets,
        max_boxes=inp.max_boxes,
        hflip_prob=inp.hflip_prob,
    )
    tx, schedule = make_optimizer(
        OptimConfig.from_mapping(cfg.optim), pipeline.steps_per_epoch, cfg.batch_size
    )
    state = create_train_state(
        model, variables, tx, cfg.model.trainable_backbone_layers, mesh=mesh, schedule=schedule
    )
    step_fn = make_train_step(model, mesh, dict(cfg.loss))
    fresh = step_fn.new_carry()
    n = args.steps

    placed = [step_fn.place_batch(next(pipeline)) for _ in range(n)]
    # Warm up both compiled forms (run for the async loop, __call__ for the old one).
    state, carry = step_fn.run(state, fresh, placed[0])
    step_fn.read(carry, state)
    state, _ = step_fn(state, placed[0])

    def time_step() -> float:
        nonlocal state
        carry = fresh
        t = time.perf_counter()
        for b in placed:
            state, carry = step_fn.run(state, carry, b)
        step_fn.read(carry, state)  # waits for the last step
        return (time.perf_counter() - t) / n

    def time_input(source) -> float:
        t = time.perf_counter()
        for _ in range(n):
            jax.block_until_ready(step_fn.place_batch(next(source)))
        return (time.perf_counter() - t) / n

    def time_loop(source) -> float:
        nonlocal state
        carry = fresh
        with DevicePrefetch(source, step_fn.place_batch) as batches:
            batch = next(batches)  # the one-time fill of a run is not timed: steady state
            t = time.perf_counter()
            for i in range(n):
                state, carry = step_fn.run(state, carry, batch)
                if i < n - 1:
                    batch = next(batches)
            step_fn.read(carry, state)
            return (time.perf_counter() - t) / n  # before close() waits for the thread

    def time_sync(source) -> float:
        nonlocal state
        t = time.perf_counter()
        for _ in range(n):
            state, _ = step_fn(state, next(source))
        return (time.perf_counter() - t) / n

    step_s = statistics.median(time_step() for _ in range(2))
    delay = step_s if args.input_ms < 0 else args.input_ms / 1e3
    source = SlowInput(pipeline, delay)
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs; "
        f"batch {cfg.batch_size} of 64x64; {n} steps per timing, {args.rounds} rounds; "
        f"input delay {delay * 1e3:.0f} ms per batch on top of the real decode"
    )
    times: dict[str, list[float]] = {"step": [], "input": [], "loop": [], "sync": []}
    for _ in range(args.rounds):  # interleaved, so load changes hit every variant alike
        times["step"].append(time_step())
        times["input"].append(time_input(source))
        times["loop"].append(time_loop(source))
        times["sync"].append(time_sync(source))
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(
            f"{k:>6}: median {med[k] * 1e3:7.1f} ms/step   (rounds: {', '.join(f'{x * 1e3:.0f}' for x in v)})"
        )
    s, i, lp, sy = med["step"], med["input"], med["loop"], med["sync"]
    print(f"loop / max(step, input) = {lp / max(s, i):.2f}   (1.0 = full overlap)")
    print(
        f"loop / (step + input)   = {lp / (s + i):.2f}   (1.0 = no overlap; ideal here "
        f"{max(s, i) / (s + i):.2f})"
    )
    print(f"sync / (step + input)   = {sy / (s + i):.2f}   (the previous loop, for reference)")
    pipeline.close()


if __name__ == "__main__":
    main()
