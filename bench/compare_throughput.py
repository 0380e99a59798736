"""Runs bench.throughput for jax, keras and torch alternately and reports medians and
ratios (jax/keras, jax/torch), one process per framework, model and mode.

    python -m bench.compare_throughput [--reps 3] [--models seed_cnn,default]
        [--markdown BENCHMARKS.md]

jax gets one XLA CPU device per core (as the command line gives training); the peers use
their own threading. `--batch 1` rows give the latency of embedding a single query.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from bench.report import emit
from jaxretrieval.runtime import available_cores, cpu_device_count

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMEWORKS = ("jax", "keras", "torch")


def run_once(framework, model, mode, batch, steps, warmup):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    if framework == "jax":
        devices = cpu_device_count(batch, available_cores())
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    out = subprocess.run(
        [sys.executable, "-m", "bench.throughput", "--framework", framework,
         "--model", model, "--mode", mode, "--batch", str(batch), "--steps", str(steps),
         "--warmup", str(warmup)], cwd=REPO, env=env, capture_output=True, text=True,
        check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["images_per_sec"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--models", default="seed_cnn,default")
    parser.add_argument("--markdown")
    args = parser.parse_args()
    cases = [(model, mode, 32) for model in args.models.split(",")
             for mode in ("train", "embed")]
    cases += [(model, "embed", 1) for model in args.models.split(",")]
    lines = [f"Throughput, {time.strftime('%Y-%m-%d')}, {platform.machine()} "
             f"{available_cores()} cores; medians of {args.reps} alternating runs "
             "(images/s; batch 1 rows: single-query embeddings/s):", "",
             f"`python -m bench.compare_throughput --reps {args.reps} --models {args.models}`",
             "", "| model | mode | batch | jax | keras | torch | jax/keras | jax/torch | "
             "jax runs |", "|---|---|---|---|---|---|---|---|---|"]
    for model, mode, batch in cases:
        slow = model == "seed_cnn" and mode == "train"
        # Single queries take milliseconds: more of them, or the timer sees mostly noise.
        steps, warmup = (5, 2) if slow else (100, 10) if batch == 1 else (20, 3)
        results = {framework: [] for framework in FRAMEWORKS}
        for _ in range(args.reps):
            for framework in FRAMEWORKS:
                results[framework].append(run_once(framework, model, mode, batch, steps,
                                                   warmup))
        median = {f: statistics.median(v) for f, v in results.items()}
        runs = ", ".join(f"{v:.1f}" for v in results["jax"])
        lines.append(f"| {model} | {mode} | {batch} | {median['jax']:.1f} | "
                     f"{median['keras']:.1f} | {median['torch']:.1f} | "
                     f"{median['jax'] / median['keras']:.2f} | "
                     f"{median['jax'] / median['torch']:.2f} | {runs} |")
        print(lines[-1], flush=True)
    emit(lines, args.markdown)


if __name__ == "__main__":
    main()
