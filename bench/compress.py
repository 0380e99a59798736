"""The compression table: each source run compressed by each method at a few strengths,
with MAP@R, the stored model's bytes and embedding images/s at batch 1 and 32.

    python -m bench.compress --source digits=runs/compress/digits \
        --source faces_cnn=runs/compress/faces_cnn [--steps N] [--settings SET] \
        --output runs/compress/bench

`--settings resnet` is the ResNet-18 table: one or two strengths per method and int8
(which calibrates and does not fine-tune, so `--steps` does not apply to it).

A compressed workdir already in `--output` is reused (delete it to compress again). The
speeds of all the models of one source are measured side by side in one process on one CPU
device: ROUNDS rounds, each timing every model in turn, and the median per model, so that
the load of other processes on a shared machine falls on all of them alike (each round
starts at the next model). Prints a
markdown table (also written to OUTPUT/table.md, the raw numbers to OUTPUT/results.json),
each row with the command that reproduces it.
"""

import argparse
import json
import os
import statistics
import time

import numpy as np

# (method, options): the strengths of the table, weakest first. `--steps` sets the
# fine-tuning steps of those that do not set their own.
SETTINGS = {
    "full": [("prune", {"sparsity": 0.5}), ("prune", {"sparsity": 0.8}),
             ("channels", {"keep": 0.75}), ("channels", {"keep": 0.5}),
             ("channels", {"keep": 0.65, "steps": 300}),
             ("share", {"bits": 4}), ("share", {"bits": 2})],
    # yalefaces: 76 training images. No 300-step row, the slowest setting on 2 shared
    # cores; and fine-tuning at the default rate moves the model further than it recovers
    # on so few images, so one row fine-tunes at a lower rate.
    "faces": [("prune", {"sparsity": 0.5}), ("prune", {"sparsity": 0.8}),
              ("channels", {"keep": 0.75}), ("channels", {"keep": 0.5}),
              ("channels", {"keep": 0.75, "learning_rate": 1e-4}),
              ("share", {"bits": 4}), ("share", {"bits": 4, "steps": 0}),
              ("share", {"bits": 2})],
    # ResNet-18 (16 filters) on yalefaces: one row per method, int8 beside the others.
    "resnet": [("prune", {"sparsity": 0.5}), ("channels", {"keep": 0.75}),
               ("channels", {"keep": 0.5}), ("share", {"bits": 4}), ("int8", {})],
    "short": [("prune", {"sparsity": 0.8}), ("channels", {"keep": 0.5}),
              ("share", {"bits": 4})],
}
ROUNDS = 9
BATCH_SIZES = (1, 32)
# Each timing runs about this long.
SECONDS_PER_TIMING = 1.0


def setting_name(method, options) -> str:
    return method + "_" + "_".join(f"{k}{v}" for k, v in options.items())


def compress_all(name, source, settings, steps, output):
    from jaxretrieval.compress import compress_workdir
    from jaxretrieval.compress.methods import get_method

    rows = []
    for method, options in settings:
        # int8 calibrates and does not fine-tune: it takes no `steps`.
        if steps is not None and "steps" in get_method(method).options:
            options = {"steps": steps, **options}
        workdir = os.path.join(output, f"{name}_{setting_name(method, options)}")
        if not os.path.isdir(workdir):
            compress_workdir(source, workdir, method, options)
        with open(os.path.join(workdir, "compression.json")) as f:
            record = json.load(f)
        command = (f"jaxretrieval compress --workdir {source} --method {method} "
                   + " ".join(f"--{k} {v}" for k, v in options.items())
                   + f" --output {workdir}")
        rows.append({"workdir": workdir, "method": method, "options": record["options"],
                     "model_bytes": record["model_bytes"], "command": command})
    return rows


def images_per_second(embedder, images) -> float:
    embedder.embed_uint8(images)  # compiled and warm
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < SECONDS_PER_TIMING or calls < 3:
        embedder.embed_uint8(images)
        calls += 1
    return calls * len(images) / (time.perf_counter() - start)


def measure(rows):
    """Adds map@r and images/s at each batch size to every row (side by side, medians)."""
    import jax

    from jaxretrieval.embed import Embedder

    device = jax.local_devices()[:1]
    embedders = [Embedder.from_workdir(row["workdir"], devices=device) for row in rows]
    config = embedders[0].config
    rng = np.random.default_rng(0)
    batches = {b: rng.integers(0, 256, (b, config.image_size, config.image_size,
                                        config.channels), dtype=np.uint8) for b in BATCH_SIZES}
    timings = {(i, b): [] for i in range(len(rows)) for b in BATCH_SIZES}
    for r in range(ROUNDS):
        # Each round starts at another model, so no model is always timed just after the
        # same neighbour (the load of a shared machine comes and goes).
        for i in np.roll(np.arange(len(embedders)), -r):
            for b in BATCH_SIZES:
                timings[i, b].append(images_per_second(embedders[i], batches[b]))
    for i, row in enumerate(rows):
        with open(os.path.join(row["workdir"], "metrics.json")) as f:
            row["map@r"] = json.load(f)["map@r"]
        for b in BATCH_SIZES:
            row[f"images_per_sec_batch{b}"] = statistics.median(timings[i, b])
    return rows


def table(results) -> str:
    lines = ["| source | method | options | MAP@R | model bytes | x smaller | img/s b=1 | "
             "img/s b=32 | x faster b=32 | command |", "|" + "---|" * 10]
    for name, rows in results.items():
        base = rows[0]
        for row in rows:
            options = ", ".join(f"{k}={v}" for k, v in row["options"].items())
            lines.append(
                f"| {name} | {row['method']} | {options} | {row['map@r']:.4f} | "
                f"{row['model_bytes']} | {base['model_bytes'] / row['model_bytes']:.2f} | "
                f"{row['images_per_sec_batch1']:.0f} | {row['images_per_sec_batch32']:.0f} | "
                f"{row['images_per_sec_batch32'] / base['images_per_sec_batch32']:.2f} | "
                f"`{row['command']}` |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", action="append", required=True, metavar="NAME=WORKDIR")
    parser.add_argument("--settings", choices=list(SETTINGS), default="full")
    parser.add_argument("--steps", type=int, default=None,
                        help="fine-tuning steps of every method (default: each method's)")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    from jaxretrieval.compress.base import tree_bytes
    from jaxretrieval.embed import restore_model

    results = {}
    for spec in args.source:
        name, source = spec.split("=", 1)
        _, variables, _ = restore_model(source)
        float_row = {"workdir": source, "method": "float32", "options": {},
                     "model_bytes": tree_bytes(variables),
                     "command": f"(the source run: {source})"}
        rows = [float_row] + compress_all(name, source, SETTINGS[args.settings], args.steps,
                                          args.output)
        results[name] = measure(rows)
    text = table(results)
    load = os.getloadavg()
    text += f"\n\nload average at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}"
    print(text)
    with open(os.path.join(args.output, "table.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
