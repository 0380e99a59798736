"""Filtered search: latency and recall@10 with filters that pass 50%, 5% and 0.1% of the
gallery, beside the same search without a filter.

    python -m bench.filters [--n 100000] [--dim 64] [--queries 200] [--clusters 1000]
        [--repeats 3] [--out filters.json]

The gallery: `--n` L2-normalised vectors of `--dim` dimensions from `--clusters` overlapping
Gaussian clusters (as bench.search makes them), each item's metadata a `label` drawn so that
the filters {"label": "half"}, {"label": "twentieth"} and {"label": "thousandth"} pass 50%,
5% and 0.1% of the items, independently of the vectors. Queries are fresh draws.

Latency is per query: one query per `Index.search` call, as the service searches, on one
thread; the fastest of `--repeats` timed runs of all queries (after one untimed run), as
on a shared machine the slower runs measure the neighbours.
"Repeated" asks the same filter each time, as the index caches what a recent filter
passes; "new" cycles through more variants of it than the cache holds (`{"label": {"in":
[LABEL, "absent-j"]}}`, which pass the same items), so that every search looks its
passing items up afresh.
Recall@10 is against exact brute force over the items that pass (a result counts when its
exact score reaches the 10th best passing score, so ties count). The strategy column says
which of `jaxretrieval.index.filtered`'s strategies the filter took.
"""

import argparse
import json
import platform
import time

import numpy as np

from jaxretrieval.index import Index
from jaxretrieval.index.filtered import FILTER_CACHE_SIZE

K = 10
SHARES = {"half": 0.5, "twentieth": 0.05, "thousandth": 0.001}


def clustered(count, dim, clusters, spread, rng):
    centres = rng.normal(size=(clusters, dim))
    rows = centres[rng.integers(clusters, size=count)] + spread * rng.normal(size=(count, dim))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def labels_for(count, rng):
    labels = np.full(count, "other", object)
    order = rng.permutation(count)
    start = 0
    for label, share in SHARES.items():
        size = round(share * count)
        labels[order[start:start + size]] = label
        start += size
    return labels


def recall(found_keys, queries, vectors, keys, passing):
    rows = np.flatnonzero(passing)
    scores = queries @ vectors[rows].T
    kth = -np.sort(-scores, axis=1)[:, K - 1]
    row_of = {key: row for row, key in enumerate(keys)}
    hits = [sum(float(vectors[row_of[key]] @ query) >= kth[q] - 1e-6 for key in found)
            for q, (query, found) in enumerate(zip(queries, found_keys))]
    return float(np.mean(hits)) / K


def time_queries(index, queries, conditions, repeats, fresh=False):
    def run():
        return [index.search(query, K, filter=variant(conditions, number))[0][0]
                for number, query in enumerate(queries)]

    def variant(conditions, number):
        if conditions is None or not fresh:
            return conditions
        return {"label": {"in": [conditions["label"],
                                 f"absent-{number % (FILTER_CACHE_SIZE + 1)}"]}}
    found = run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) / len(queries))
    return found, min(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=0.6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    vectors = clustered(args.n, args.dim, args.clusters, args.spread, rng)
    queries = clustered(args.queries, args.dim, args.clusters, args.spread,
                        np.random.default_rng(args.seed + 1))
    labels = labels_for(args.n, rng)
    keys = [f"item-{row}" for row in range(args.n)]
    start = time.perf_counter()
    index = Index.build(vectors, keys, checkpoint_step=0, model_config_hash="bench",
                        metadata=[{"label": label} for label in labels])
    build_s = time.perf_counter() - start
    index.search(queries[:1], K, filter={"label": "half"})  # builds the inverted index

    rows = []
    for name, conditions in [("none", None)] + [(label, {"label": label}) for label in SHARES]:
        passing = np.ones(args.n, bool) if conditions is None else labels == name
        found, seconds = time_queries(index, queries, conditions, args.repeats)
        _, fresh_seconds = time_queries(index, queries, conditions, args.repeats,
                                        fresh=conditions is not None)
        strategy = index.filter_plan(conditions, K)["strategy"]
        rows.append({"filter": name, "share": float(passing.mean()), "strategy": strategy,
                     "ms_per_query": seconds * 1000, "ms_per_query_new": fresh_seconds * 1000,
                     "recall_at_10": recall(found, queries, vectors, keys, passing)})

    result = {"n": args.n, "dim": args.dim, "queries": args.queries, "build_s": build_s,
              "scann": index.manifest["scann"], "machine": platform.platform(),
              "processor": platform.processor(), "rows": rows}
    print("| filter | share passing | strategy | ms / query, repeated | ms / query, new | "
          "recall@10 |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['filter']} | {row['share']:.3%} | {row['strategy']} | "
              f"{row['ms_per_query']:.3f} | {row['ms_per_query_new']:.3f} | "
              f"{row['recall_at_10']:.3f} |")
    print(f"build {build_s:.1f} s, {args.n} x {args.dim}")
    if args.out:
        with open(args.out, "w") as file:
            json.dump(result, file, indent=2)


if __name__ == "__main__":
    main()
