"""Is a bfloat16 training run's loss curve within noise of the float32 one?

Short runs of ``configs/shapes.py`` (ResNet-18-FPN on the synthetic shapes, every conv through
``retinanet_jax.backends.cpu.conv``) with the loss logged every step, in float32 and in bfloat16 for each of
``--seeds`` (a seed fixes the initialisation and the data order; the two dtypes of one seed see
the same batches). Runs of one configuration drift apart chaotically after ~100 steps whatever
perturbs them (a seed, or bf16 rounding), so one bf16 run against one float32 run says little:
per window of steps the script compares the mean over seeds of the bf16 window means with that
of the float32 ones, and calls the difference noise when it is within twice its standard error
(``2 * sqrt(var_f32 / n + var_bf16 / n)``, variances of the per-seed window means across the n
seeds). It also prints seed 0's same-seed difference. A run whose ``metrics.jsonl`` in
``--workdir`` already has every step is read, not re-run.

    PYTHONPATH=. python benchmarks/bf16_loss_curve.py [--steps 300] [--window 50]
        [--seeds 0,1,2] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import statistics
import tempfile
import time

from retinanet_jax.backends.cpu import hostmem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _losses(workdir: str) -> list[float]:
    losses = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "train/loss" in rec:
                losses[rec["step"]] = rec["train/loss"]
    return [losses[s] for s in sorted(losses)]


def run(steps: int, dtype: str, seed: int, workdir: str) -> list[float]:
    if os.path.exists(os.path.join(workdir, "metrics.jsonl")) and len(_losses(workdir)) >= steps:
        return _losses(workdir)[:steps]
    from retinanet_jax.training import loop as train_loop

    config = runpy.run_path(os.path.join(ROOT, "configs", "shapes.py"))["get_config"]()
    config.num_steps = steps
    config.model.compute_dtype = dtype
    config.seed = seed
    config.log_every_steps = 1
    config.eval.every_steps = steps  # one evaluation, at the end
    config.checkpoint.every_steps = steps
    train_loop.train_and_evaluate(config, workdir)
    return _losses(workdir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--seeds", default="0,1,2", help="at least 2; each runs f32 and bf16")
    parser.add_argument("--workdir", default=None, help="default: a fresh temporary directory")
    args = parser.parse_args()
    base = args.workdir or tempfile.mkdtemp(prefix="bf16_loss_curve_")
    seeds = [int(k) for k in args.seeds.split(",")]
    if len(seeds) < 2:
        parser.error("--seeds needs at least two seeds: the noise is their spread")
    curves: dict[tuple[str, int], list[float]] = {}
    seconds: dict[str, float] = {}
    for seed in seeds:
        for dtype, short in (("float32", "f32"), ("bfloat16", "bf16")):
            name = f"{short}_seed_{seed}"
            t = time.perf_counter()
            curves[dtype, seed] = run(args.steps, dtype, seed, os.path.join(base, name))
            seconds[name] = time.perf_counter() - t
    n = min(len(c) for c in curves.values())
    print(
        f"\n{args.steps} steps of configs/shapes.py, seeds {seeds}; wall s: "
        + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
    )
    print(
        "| steps | f32 mean | bf16 mean | f32 per seed | bf16 per seed | abs(bf16 - f32) "
        "| noise (2 SE) | within | seed 0: abs(bf16 - f32) |"
    )
    print("|---" * 9 + "|")
    all_within = True
    for lo in range(0, n, args.window):
        hi = min(n, lo + args.window)
        m32 = [statistics.fmean(curves["float32", k][lo:hi]) for k in seeds]
        m16 = [statistics.fmean(curves["bfloat16", k][lo:hi]) for k in seeds]
        mean32, mean16 = statistics.fmean(m32), statistics.fmean(m16)
        diff = abs(mean16 - mean32)
        noise = 2 * (statistics.variance(m32) / len(seeds) + statistics.variance(m16) / len(seeds)) ** 0.5
        within = diff <= noise
        all_within &= within
        print(
            f"| {lo + 1}-{hi} | {mean32:.4f} | {mean16:.4f} | "
            + " ".join(f"{m:.4f}" for m in m32)
            + " | "
            + " ".join(f"{m:.4f}" for m in m16)
            + f" | {diff:.4f} | {noise:.4f} | {'yes' if within else 'NO'} | "
            f"{abs(m16[0] - m32[0]):.4f} |"
        )
    print(
        f"bf16 loss curve within noise of float32 in every window: {'yes' if all_within else 'NO'}"
        f" (runs in {base})"
    )


if __name__ == "__main__":
    hostmem.reexec_with_hugepages()
    main()
