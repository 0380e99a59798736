"""Recall@10 and single-threaded QPS of one ScaNN tree + AH configuration, over a grid of
leaves searched and reordering counts: for choosing the Index's settings, including
ScaNN options the Index does not expose.

    python -m bench.scann_sweep '{"leaves": 2000, "spherical": true}' \
        --leaves 80,100,120 --reorders 100 [--n 1000000] [--repeats 3]

The first argument is a JSON object of: leaves (num_leaves), soar (SOAR lambda, null for
none), min_partition_size (ScaNN's, in rows of the k-means sample), spherical,
quantize_centroids, dims_per_block, threshold (AH anisotropic threshold), reorder_dtype
(float32 | int8 | bfloat16). What it leaves out is the Index's own setting
(jaxretrieval/index/scann_adapter.py; spherical, quantize_centroids and int8 or bfloat16
reordering are ScaNN options the Index does not use). The set and the ground truth are
bench/search.py's synthetic ones with its defaults. QPS is the
median of `--repeats` runs of ScaNN's single-threaded `search_batched` over all queries,
after one untimed run.
"""

import argparse
import json
import os
import time

import numpy as np

from bench import search  # the synthetic set and its ground truth
from jaxretrieval.index import exact_kth_scores, scann_adapter  # its settings: the defaults

DEFAULTS = {"soar": scann_adapter.SOAR_LAMBDA,
            "min_partition_size": scann_adapter.MIN_PARTITION_SAMPLE,
            "spherical": False, "quantize_centroids": False,
            "dims_per_block": scann_adapter.AH_DIMENSIONS_PER_BLOCK,
            "threshold": scann_adapter.AH_ANISOTROPIC_THRESHOLD, "reorder_dtype": "float32"}


def build(gallery, settings):
    from scann.scann_ops.py import scann_ops_pybind
    from scann.scann_ops.py.scann_builder import ReorderType

    dtype = {"float32": ReorderType.FLOAT32, "int8": ReorderType.INT8,
             "bfloat16": ReorderType.BFLOAT16}[settings["reorder_dtype"]]
    builder = scann_ops_pybind.builder(gallery, 10, scann_adapter.DISTANCE).tree(
        num_leaves=settings["leaves"], num_leaves_to_search=10,
        training_sample_size=min(len(gallery), scann_adapter.MAX_TRAINING_SAMPLE_SIZE),
        soar_lambda=settings["soar"], min_partition_size=settings["min_partition_size"],
        spherical=settings["spherical"], quantize_centroids=settings["quantize_centroids"],
    ).score_ah(settings["dims_per_block"],
               anisotropic_quantization_threshold=settings["threshold"]
               ).reorder(100, quantize=dtype)
    return builder.build()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("settings", help="JSON object; see the module docstring")
    parser.add_argument("--leaves", default="60,80,100,120")
    parser.add_argument("--reorders", default="100")
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    given = json.loads(args.settings)
    unknown = sorted(set(given) - set(DEFAULTS) - {"leaves"})
    if unknown or "leaves" not in given:
        parser.error(f"settings need 'leaves' and may hold {', '.join(DEFAULTS)}; "
                     f"unknown: {', '.join(unknown) or '-'}")
    settings = {**DEFAULTS, **given}

    centres = search.cluster_centres(128, max(1, args.n // 100), 0)
    gallery = search.sample_points(centres, args.n, 1.0, 1)
    queries = search.sample_points(centres, args.queries, 1.0, 2)
    kth = exact_kth_scores(gallery, queries, search.K)
    start = time.perf_counter()
    searcher = build(gallery, settings)
    print(f"{json.dumps(settings)}: built in {time.perf_counter() - start:.1f} s", flush=True)
    for reorder in (int(r) for r in args.reorders.split(",")):
        for leaves in (int(n) for n in args.leaves.split(",")):
            def run(batch):
                return searcher.search_batched(batch, search.K,
                                               pre_reorder_num_neighbors=reorder,
                                               leaves_to_search=leaves)[0]
            rows, qps, _ = search.timed_qps(run, queries, args.repeats)
            recall = search.recall_at_k(gallery, queries, kth, np.asarray(rows))
            print(f"  leaves {leaves:4d}  reorder {reorder:4d}  recall {recall:.4f}  "
                  f"qps(1) {qps:8.0f}", flush=True)


if __name__ == "__main__":
    main()
