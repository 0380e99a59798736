"""int8 beside float32: embedding speed of compressed workdirs, and the recall and bytes of
float16 and int8 indexes.

    python -m bench.int8 --pair runs/digits runs/digits_int8 [--pair SOURCE INT8 ...] \
        [--repeats 5] [--markdown FILE]

For each pair (a float32 workdir and `jaxretrieval compress --method int8` of it):

- the stored model's bytes (compression.json), MAP@R (each workdir's metrics.json);
- embedding images/s of each workdir's Embedder (the float32 model on its oneDNN
  convolutions and, as a third peer, on XLA's; the int8 model on XLA's int8 ones) at
  batch 1 and batch 32, on the source's own images; the three alternate `--repeats`
  rounds after one untimed round (which compiles), and the table gives medians and the
  ratio int8 / float32 (oneDNN);
- the source's embedding export indexed in float32, float16 and int8: the index's bytes
  on disk (its rows and ScaNN's copy, without keys and sources) and recall@10 of the
  float16 and int8 indexes against the float32 one's results, every item a query.
"""

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time

import numpy as np

from bench.report import emit

ROUND_IMAGES = 256  # images embedded per round and batch size
K = 10


def images_of(workdir, count):
    from jaxretrieval.data.sources import load_dataset
    from jaxretrieval.workdir import Workdir

    config = Workdir(workdir).read_config()
    dataset = load_dataset(config)
    return dataset.images(np.arange(min(count, len(dataset.keys))))


def embedding_rates(embedders, images, repeats):
    """{name: {batch: median images/s}} with the embedders alternating each round;
    `embedders`: {name: (Embedder, the context it embeds in)}."""
    rates = {name: {1: [], 32: []} for name in embedders}
    for round_ in range(repeats + 1):
        for name, (embedder, context) in embedders.items():
            for batch in (1, 32):
                with context():
                    start = time.perf_counter()
                    for i in range(0, len(images), batch):
                        embedder.embed_uint8(images[i:i + batch])
                    seconds = time.perf_counter() - start
                if round_:  # the first round compiles
                    rates[name][batch].append(len(images) / seconds)
    return {name: {b: statistics.median(v) for b, v in by_batch.items()}
            for name, by_batch in rates.items()}


def index_rows(workdir):
    """[(dtype, index bytes, recall@10 vs float32)] for the workdir's embedding export."""
    from jaxretrieval.export import load_embedding_export
    from jaxretrieval.index import Index
    from jaxretrieval.index.storage import snapshot_directory
    from jaxretrieval.workdir import Workdir

    export = load_embedding_export(Workdir(workdir).embeddings)
    rows, reference = [], None
    for dtype in ("float32", "float16", "int8"):
        index = Index.build(export.embeddings, export.keys, checkpoint_step=0,
                            model_config_hash="bench", embedding_dtype=dtype)
        keys, _ = index.search(export.embeddings, K)
        if reference is None:
            reference = keys
        recall = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(keys, reference)]))
        with tempfile.TemporaryDirectory() as directory:
            index.save(directory)
            folder = snapshot_directory(directory)
            size = sum(os.path.getsize(os.path.join(root, name))
                       for root, _, names in os.walk(folder) for name in names
                       if name.endswith(".npy"))
        rows.append((dtype, size, recall))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", nargs=2, action="append", required=True,
                        metavar=("SOURCE", "INT8"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)

    from jaxretrieval.embed import Embedder
    from jaxretrieval.ops.conv import xla_convolutions

    lines = [f"load average before: {os.getloadavg()[0]:.1f}", "",
             "| workdir | model | MAP@R | model bytes | img/s batch 1 | img/s batch 32 |",
             "|---|---|---|---|---|---|"]
    index_lines = ["| workdir | index rows | bytes (rows + ScaNN) | recall@10 vs float32 |",
                   "|---|---|---|---|"]
    for source, int8 in args.pair:
        with open(os.path.join(int8, "compression.json")) as f:
            record = json.load(f)
        # The float32 model twice: on oneDNN's convolutions (as it embeds) and on XLA's
        # (what the int8 model's convolutions are compiled by).
        embedders = {"float32": (Embedder.from_workdir(source), contextlib.nullcontext),
                     "float32, XLA convolutions": (Embedder.from_workdir(source),
                                                   xla_convolutions),
                     "int8": (Embedder.from_workdir(int8), contextlib.nullcontext)}
        rates = embedding_rates(embedders, images_of(source, ROUND_IMAGES), args.repeats)
        for name, workdir, size in (
                ("float32", source, record["source_model_bytes"]),
                ("float32, XLA convolutions", source, record["source_model_bytes"]),
                ("int8", int8, record["model_bytes"])):
            with open(os.path.join(workdir, "metrics.json")) as f:
                map_r = json.load(f)["map@r"]
            lines.append(f"| {os.path.basename(source)} | {name} | {map_r:.4f} | {size} | "
                         f"{rates[name][1]:.0f} | {rates[name][32]:.0f} |")
        lines.append(f"| {os.path.basename(source)} | int8 / float32 | | "
                     f"{record['model_bytes'] / record['source_model_bytes']:.3f} | "
                     f"{rates['int8'][1] / rates['float32'][1]:.2f} | "
                     f"{rates['int8'][32] / rates['float32'][32]:.2f} |")
        for dtype, size, recall in index_rows(source):
            index_lines.append(f"| {os.path.basename(source)} | {dtype} | {size} | "
                               f"{recall:.4f} |")
    lines += ["", *index_lines, "", f"load average after: {os.getloadavg()[0]:.1f}"]
    emit(lines, args.markdown)


if __name__ == "__main__":
    main()
