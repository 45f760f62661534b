"""Is a bfloat16 training run's loss curve within noise of the float32 one?

Short runs of ``configs/shapes.py`` (ResNet-18-FPN on the synthetic shapes, every conv through
``retinanet_jax.conv``: the CPU GEMM paths) with the loss logged every step: float32 seed 0,
bfloat16 seed 0 (same init, same batches) and float32 with other seeds (another init and data
order: the run-to-run noise a change of dtype should stay inside). Per window of steps it prints
the mean losses, |bf16 - f32| and the noise scale max(|f32 seed k - f32 seed 0| over k,
2 x the standard error of the f32 window mean), and says whether every window is within it.
A run whose ``metrics.jsonl`` in ``--workdir`` already has every step is read, not re-run.

    PYTHONPATH=. python benchmarks/bf16_loss_curve.py [--steps 300] [--window 50]
        [--noise-seeds 1,2] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import statistics
import tempfile
import time

from retinanet_jax import hostmem

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
    from retinanet_jax import train_loop

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
    parser.add_argument("--noise-seeds", default="1,2", help="float32 seeds besides 0")
    parser.add_argument("--workdir", default=None, help="default: a fresh temporary directory")
    args = parser.parse_args()
    base = args.workdir or tempfile.mkdtemp(prefix="bf16_loss_curve_")
    noise_seeds = [int(k) for k in args.noise_seeds.split(",")]
    runs = [("f32 seed 0", "float32", 0), ("bf16 seed 0", "bfloat16", 0)]
    runs += [(f"f32 seed {k}", "float32", k) for k in noise_seeds]
    curves, seconds = {}, {}
    for name, dtype, seed in runs:
        t = time.perf_counter()
        curves[name] = run(args.steps, dtype, seed, os.path.join(base, name.replace(" ", "_")))
        seconds[name] = time.perf_counter() - t
    f32, bf16 = curves["f32 seed 0"], curves["bf16 seed 0"]
    others = [curves[f"f32 seed {k}"] for k in noise_seeds]
    n = min(len(c) for c in curves.values())
    print(f"\n{args.steps} steps of configs/shapes.py; wall s: "
          + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    seeds = " | ".join(f"f32 seed {k}" for k in noise_seeds)
    print(f"| steps | f32 seed 0 | bf16 seed 0 | {seeds} | abs(bf16 - f32) | noise | within |")
    print("|---" * (6 + len(noise_seeds)) + "|")
    all_within = True
    for lo in range(0, n, args.window):
        hi = min(n, lo + args.window)
        a, b = f32[lo:hi], bf16[lo:hi]
        ma, mb = statistics.fmean(a), statistics.fmean(b)
        mo = [statistics.fmean(c[lo:hi]) for c in others]
        se = statistics.stdev(a) / len(a) ** 0.5 if len(a) > 1 else 0.0
        noise = max([abs(m - ma) for m in mo] + [2 * se])
        within = abs(mb - ma) <= noise
        all_within &= within
        print(f"| {lo + 1}-{hi} | {ma:.4f} | {mb:.4f} | " + " | ".join(f"{m:.4f}" for m in mo)
              + f" | {abs(mb - ma):.4f} | {noise:.4f} | {'yes' if within else 'NO'} |")
    print(f"bf16 loss curve within noise of float32 in every window: {'yes' if all_within else 'NO'}"
          f" (runs in {base})")


if __name__ == "__main__":
    hostmem.reexec_with_hugepages()
    main()
