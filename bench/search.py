"""Recall@10 against queries per second: the project's Index (its automatic settings, and
`Index.tune` at several targets) beside faiss HNSW, faiss IVF-PQ fast-scan with exact
refinement, and exact search (faiss IndexFlatIP).

    python -m bench.search [--n 1000000] [--dim 128] [--queries 2000] [--threads 2]
        [--repeats 3] [--out search.json] [--plot docs/search_recall_qps.png]
        [--workdir DIR] [--skip-synthetic] [--skip-faiss] [--skip-hnsw]
        [--ivf-lists N1,N2] [--index-settings JSON]

The synthetic set: `--n` L2-normalised vectors of `--dim` dimensions from `--clusters`
overlapping Gaussian clusters (centres N(0, I); each point its centre plus `--spread`
times N(0, I), then normalised). The spread is wide enough that the clusters overlap and
no index reaches recall 1 cheaply. Queries are fresh draws from the same distribution,
not rows of the gallery. With `--workdir DIR`, the embedding export of a trained workdir
is measured too: `--queries` of its rows (at most a tenth) are held out as queries and
the rest is the gallery.

Ground truth is exact brute force (numpy, in blocks). A result counts as a true
neighbour when its exact score reaches the query's 10th best exact score (so ties count):
the recall `Index.tune` measures (jaxretrieval.index.tuning).
Every method gets the whole query batch. Single-threaded: faiss with
omp_set_num_threads(1); the Index through `search_rows`, which calls ScaNN's
single-threaded `search_batched`. All threads (`--threads`): faiss with that many OpenMP
threads; the Index searched from that many Python threads, one slice of the queries
each (ScaNN releases the GIL). QPS is the median of `--repeats` timed runs, after one
untimed run. Build time is wall time with all threads; memory is the growth of the
process's resident set while the index is built (the gallery itself is made before).

`--index-settings` replaces some of the Index's automatic ScaNN settings
(`Index.build(..., scann_overrides=...)`, to compare settings; `--skip-faiss` then leaves
out the peers). IVF-PQ is built with sqrt(n) lists
unless `--ivf-lists` names others (one build each, trained like the Index's tree on at
most 250,000 rows); `--skip-hnsw` leaves out HNSW's 12-minute build.

Writes every point to `--out` (JSON), a recall-QPS plot to `--plot` (PNG), and prints
a Markdown table and the headline comparison. Needs `pip install -r
requirements-bench.txt` (faiss-cpu, matplotlib).
"""

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import threading
import time

import numpy as np

from jaxretrieval.index import Index, exact_kth_scores, recall_per_query, snapshot_directory

K = 10
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200  # --hnsw-ef-construction
HNSW_EF_SEARCH = (16, 18, 20, 24, 32, 48, 64, 128, 256)
IVF_NPROBE = (1, 2, 4, 8, 16, 32, 64, 128, 256)
IVF_MAX_TRAINING_SAMPLE = 250_000
IVF_K_FACTOR = (2, 4, 10)
TUNE_TARGETS = (0.8, 0.9, 0.95, 0.99)
HEADLINE_RECALL = 0.95


# ---------------------------------------------------------------------------------------
# Data and ground truth


def cluster_centres(dim, clusters, seed):
    """The centres of the synthetic set's clusters, N(0, I)."""
    return np.random.default_rng(seed).normal(size=(clusters, dim)).astype(np.float32)


def sample_points(centres, count, spread, seed, chunk=100_000):
    """`count` unit vectors: a random centre plus `spread` * N(0, I) each, normalised."""
    rng = np.random.default_rng(seed)
    out = np.empty((count, centres.shape[1]), np.float32)
    for start in range(0, count, chunk):
        size = min(chunk, count - start)
        points = centres[rng.integers(len(centres), size=size)]
        points = points + spread * rng.standard_normal(
            (size, centres.shape[1]), dtype=np.float32)
        out[start:start + size] = points / np.linalg.norm(points, axis=1, keepdims=True)
    return out


def recall_at_k(gallery, queries, kth_scores, rows, k=K):
    """Mean recall@k of result rows [m, >=k] (-1 for none) against the exact k-th scores
    (`exact_kth_scores`)."""
    return float(recall_per_query(gallery, queries, kth_scores, np.asarray(rows)[:, :k]).mean())


# ---------------------------------------------------------------------------------------
# Measurement


def rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def built(make):
    """(object, build seconds, resident-set growth in MiB) of make()."""
    gc.collect()
    before = rss_bytes()
    start = time.perf_counter()
    value = make()
    seconds = time.perf_counter() - start
    return value, seconds, (rss_bytes() - before) / 2**20


def timed_qps(search, queries, repeats):
    """(rows of the first run, median queries per second over `repeats` timed runs)."""
    rows = search(queries)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        search(queries)
        rates.append(len(queries) / (time.perf_counter() - start))
    return rows, statistics.median(rates), rates


def in_threads(search, threads):
    """`search` over `threads` Python threads, one contiguous slice of the queries each."""
    def run(queries):
        parts = np.array_split(np.arange(len(queries)), threads)
        results = [None] * threads

        def work(slot):
            results[slot] = search(queries[parts[slot]])

        workers = [threading.Thread(target=work, args=(slot,)) for slot in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return np.concatenate(results)
    return run


class Recorder:
    """Collects points (method, setting, recall, QPS single-threaded and all threads)."""

    def __init__(self, gallery, queries, kth_scores, threads, repeats):
        self.gallery, self.queries, self.kth = gallery, queries, kth_scores
        self.threads, self.repeats = threads, repeats
        self.points = []

    def measure(self, method, setting, single, parallel=None, set_threads=None,
                **extra):
        """`single(queries)` / `parallel(queries)` return result rows [m, >=K]."""
        if set_threads:
            set_threads(1)
        rows, qps_1, runs_1 = timed_qps(single, self.queries, self.repeats)
        recall = recall_at_k(self.gallery, self.queries, self.kth, rows)
        if set_threads:
            set_threads(self.threads)
        _, qps_n, runs_n = timed_qps(parallel or single, self.queries, self.repeats)
        point = {"method": method, "setting": setting, "recall": recall,
                 "qps_1": qps_1, f"qps_{self.threads}": qps_n, "qps_all": qps_n,
                 "qps_1_runs": runs_1, "qps_all_runs": runs_n, **extra}
        self.points.append(point)
        print(f"  {method:<18} {json.dumps(setting):<46} recall {recall:.4f}  "
              f"qps(1) {qps_1:9.0f}  qps({self.threads}) {qps_n:9.0f}", flush=True)
        return point


def measure_index(recorder, gallery, tune_targets, build_info, overrides=None):
    keys = [str(row) for row in range(len(gallery))]
    index, seconds, memory = built(lambda: Index.build(
        gallery, keys, checkpoint_step=0, model_config_hash="bench",
        scann_overrides=overrides or None))
    settings = index.manifest["scann"]
    build_info["index"] = {"seconds": seconds, "rss_mib": memory, "settings": settings}
    print(f"  Index built in {seconds:.1f} s (+{memory:.0f} MiB): {json.dumps(settings)}",
          flush=True)

    def single(queries):
        return index.search_rows(queries, K)[0]

    parallel = in_threads(single, recorder.threads)

    def effort(manifest):
        scann = manifest["scann"]
        if scann["mode"] == "exact":
            return {"mode": "exact"}
        return {"leaves": scann["num_leaves_to_search"], "of": scann["num_leaves"],
                "reorder": scann["reorder_num_neighbors"]}

    recorder.measure("index (auto)", effort(index.manifest), single, parallel)
    tuning = []
    for target in tune_targets:
        start = time.perf_counter()
        report = index.tune(target, k=K)
        tune_seconds = time.perf_counter() - start
        report.pop("candidates", None)
        if not report["tuned"]:
            print(f"  tune({target}): {report['message']}", flush=True)
            tuning.append({"target_recall": target, **report})
            continue
        point = recorder.measure(
            f"index tune({target})", effort(index.manifest), single, parallel,
            target_recall=target, tune_seconds=tune_seconds,
            tuning_recall=report["tuning_recall"],
            validation_recall=report["validation_recall"])
        reached = point["recall"] >= target
        tuning.append({**report, "tune_seconds": tune_seconds,
                       "query_recall": point["recall"], "reached_on_queries": reached})
        print(f"    tuned in {tune_seconds:.1f} s: recall {report['tuning_recall']:.4f} "
              f"(tuning, gallery rows), {report['validation_recall']:.4f} (validation, "
              f"gallery rows), {point['recall']:.4f} (the bench's own queries): "
              f"target {'reached' if reached else 'MISSED'}", flush=True)
    build_info["index"].update(index_size_mib(index))
    return tuning


def index_size_mib(index):
    """Sizes on disk of a saved Index: all of it, and ScaNN's part (tree, codes, floats)."""
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        index.save(os.path.join(directory, "index"))
        snapshot = snapshot_directory(os.path.join(directory, "index"))
        sizes = {}
        for folder, _, files in os.walk(snapshot):
            for name in files:
                path = os.path.join(folder, name)
                part = "scann" if os.path.relpath(path, snapshot).startswith("scann") else "rest"
                sizes[part] = sizes.get(part, 0) + os.path.getsize(path)
    return {"size_mib": sum(sizes.values()) / 2**20,
            "scann_size_mib": sizes.get("scann", 0) / 2**20}


def measure_faiss(recorder, gallery, threads, build_info, ef_construction, ivf_lists,
                  skip_hnsw):
    import faiss

    count, dim = gallery.shape
    faiss.omp_set_num_threads(threads)

    def faiss_search(index):
        def search(queries):
            return index.search(queries, K)[1]
        return search

    # Exact search: the brute-force baseline.
    flat, seconds, memory = built(lambda: _added(faiss.IndexFlatIP(dim), gallery))
    build_info["faiss flat"] = {"seconds": seconds, "rss_mib": memory,
                                "size_mib": faiss_size_mib(flat)}
    faiss.omp_set_num_threads(threads)
    recorder.measure("exact (faiss flat)", {}, faiss_search(flat),
                     set_threads=faiss.omp_set_num_threads)
    del flat

    if not skip_hnsw:
        measure_hnsw(recorder, gallery, threads, build_info, ef_construction, faiss_search)
    for nlist in ivf_lists or (max(1, round(math.sqrt(count))),):
        measure_ivfpq(recorder, gallery, threads, build_info, nlist, faiss_search)


def measure_hnsw(recorder, gallery, threads, build_info, ef_construction, faiss_search):
    import faiss

    faiss.omp_set_num_threads(threads)

    def make_hnsw():
        index = faiss.IndexHNSWFlat(gallery.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.add(gallery)
        return index

    hnsw, seconds, memory = built(make_hnsw)
    build_info["faiss hnsw"] = {"seconds": seconds, "rss_mib": memory, "M": HNSW_M,
                                "efConstruction": ef_construction,
                                "size_mib": faiss_size_mib(hnsw)}
    print(f"  HNSW built in {seconds:.1f} s (+{memory:.0f} MiB)", flush=True)
    for ef in HNSW_EF_SEARCH:
        hnsw.hnsw.efSearch = ef
        recorder.measure("faiss hnsw", {"M": HNSW_M, "efSearch": ef}, faiss_search(hnsw),
                         set_threads=faiss.omp_set_num_threads)
    del hnsw
    gc.collect()


def measure_ivfpq(recorder, gallery, threads, build_info, nlist, faiss_search):
    """IVF-PQ fast-scan (4-bit PQ, 2 dimensions per code), refined by exact scores."""
    import faiss

    faiss.omp_set_num_threads(threads)
    count, dim = gallery.shape
    pq_m = dim // 2
    # faiss trains on up to 256 rows a list by default; the Index's k-means sample is
    # at most 250,000 rows, and so is this one.
    sample = gallery[np.random.default_rng(0).permutation(count)[
        :min(count, 256 * nlist, IVF_MAX_TRAINING_SAMPLE)]]

    def make_ivfpq():
        quantizer = faiss.IndexFlatIP(dim)
        ivf = faiss.IndexIVFPQFastScan(quantizer, dim, nlist, pq_m, 4,
                                       faiss.METRIC_INNER_PRODUCT)
        ivf.cp.min_points_per_centroid = 1  # a small sample per list is intended
        refine = faiss.IndexRefineFlat(ivf)
        refine.train(sample)
        refine.add(gallery)
        return refine, ivf, quantizer

    (refine, ivf, _quantizer), seconds, memory = built(make_ivfpq)
    build_info[f"faiss ivfpq-fs+refine, nlist={nlist}"] = {
        "seconds": seconds, "rss_mib": memory, "nlist": nlist, "pq_m": pq_m, "nbits": 4,
        "size_mib": faiss_size_mib(refine)}
    print(f"  IVF-PQ fast-scan ({nlist} lists) built in {seconds:.1f} s (+{memory:.0f} MiB)",
          flush=True)
    for nprobe in IVF_NPROBE:
        if nprobe > nlist:
            continue
        for k_factor in IVF_K_FACTOR:
            ivf.nprobe = nprobe
            refine.k_factor = k_factor
            recorder.measure("faiss ivfpq-fs+refine",
                             {"nlist": nlist, "nprobe": nprobe, "k_factor": k_factor},
                             faiss_search(refine), set_threads=faiss.omp_set_num_threads)
    del refine, ivf
    gc.collect()


def faiss_size_mib(index):
    import faiss

    return faiss.serialize_index(index).nbytes / 2**20


def _added(index, vectors):
    index.add(vectors)
    return index


def workdir_embeddings(workdir):
    """The float32 [n, d] embeddings of a trained workdir's embedding export."""
    from jaxretrieval.export import load_embedding_export
    from jaxretrieval.workdir import Workdir

    export = load_embedding_export(Workdir(workdir).embeddings)
    return np.ascontiguousarray(export.embeddings, np.float32)


def run_dataset(name, gallery, queries, args, tune_targets):
    print(f"{name}: gallery {gallery.shape}, queries {queries.shape}", flush=True)
    start = time.perf_counter()
    kth = exact_kth_scores(gallery, queries, K)
    truth_seconds = time.perf_counter() - start
    print(f"  ground truth by brute force in {truth_seconds:.1f} s", flush=True)
    recorder = Recorder(gallery, queries, kth, args.threads, args.repeats)
    build_info = {}
    tuning = measure_index(recorder, gallery, tune_targets, build_info,
                           json.loads(args.index_settings or "{}"))
    if not args.skip_faiss:
        measure_faiss(recorder, gallery, args.threads, build_info,
                      args.hnsw_ef_construction, args.ivf_lists, args.skip_hnsw)
    result = {"gallery": list(gallery.shape), "queries": len(queries),
              "ground_truth_seconds": truth_seconds, "builds": build_info,
              "tuning": tuning, "points": recorder.points}
    result["summary"] = summarise(result, args.threads)
    return result


def best_at(points, method_prefix, key, recall):
    eligible = [p for p in points if p["method"].startswith(method_prefix)
                and p["recall"] >= recall]
    return max(eligible, key=lambda p: p[key], default=None)


def summarise(result, threads):
    points = result["points"]
    summary = {"recall": HEADLINE_RECALL}
    for key in ("qps_1", "qps_all"):
        hnsw = best_at(points, "faiss hnsw", key, HEADLINE_RECALL)
        ivf = best_at(points, "faiss ivfpq", key, HEADLINE_RECALL)
        tuned = next((p for p in points if p.get("target_recall") == HEADLINE_RECALL),
                     None)
        index_best = best_at(points, "index", key, HEADLINE_RECALL)
        entry = {
            "tuned_index": tuned and {"setting": tuned["setting"],
                                      "recall": tuned["recall"], "qps": tuned[key]},
            "best_index": index_best and {"method": index_best["method"],
                                          "setting": index_best["setting"],
                                          "recall": index_best["recall"],
                                          "qps": index_best[key]},
            "best_hnsw": hnsw and {"setting": hnsw["setting"], "recall": hnsw["recall"],
                                   "qps": hnsw[key]},
            "best_ivfpq": ivf and {"setting": ivf["setting"], "recall": ivf["recall"],
                                   "qps": ivf[key]},
        }
        if tuned and tuned["recall"] >= HEADLINE_RECALL:
            if hnsw:
                entry["tuned_over_hnsw"] = tuned[key] / hnsw[key]
            if ivf:
                entry["tuned_over_ivfpq"] = tuned[key] / ivf[key]
        summary["single_thread" if key == "qps_1" else f"{threads}_threads"] = entry
    return summary


# ---------------------------------------------------------------------------------------
# Reporting


def markdown(name, result, threads):
    lines = [f"{name}: gallery {result['gallery'][0]:,} x {result['gallery'][1]}, "
             f"{result['queries']:,} queries, recall@{K}; QPS medians",
             "", f"| method | setting | recall@{K} | QPS, 1 thread | QPS, {threads} threads |",
             "|---|---|---|---|---|"]
    for p in result["points"]:
        setting = ", ".join(f"{k}={v}" for k, v in p["setting"].items())
        lines.append(f"| {p['method']} | {setting} | {p['recall']:.4f} | {p['qps_1']:,.0f} "
                     f"| {p['qps_all']:,.0f} |")
    lines += ["", "| index | build s | RSS growth MiB | serialized MiB |", "|---|---|---|---|"]
    for method, info in result["builds"].items():
        lines.append(f"| {method} | {info['seconds']:.1f} | {info['rss_mib']:.0f} | "
                     f"{info.get('size_mib', float('nan')):.0f} |")
    return "\n".join(lines)


def plot(results, path, threads):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    figure, axes = plt.subplots(len(names), 2, figsize=(12, 4.8 * len(names)),
                                squeeze=False)
    styles = {"index": ("tab:blue", "o"), "faiss hnsw": ("tab:orange", "s"),
              "faiss ivfpq-fs+refine": ("tab:green", "^"),
              "exact (faiss flat)": ("black", "x")}
    for row, name in enumerate(names):
        points = results[name]["points"]
        for column, (key, label) in enumerate((("qps_1", "1 thread"),
                                               ("qps_all", f"{threads} threads"))):
            axis = axes[row][column]
            groups = {}
            for p in points:
                group = "index" if p["method"].startswith("index") else p["method"]
                groups.setdefault(group, []).append(p)
            for group, members in groups.items():
                color, marker = styles.get(group, ("gray", "."))
                if group == "faiss ivfpq-fs+refine":
                    # Only the Pareto frontier: the full grid is a cloud.
                    members = pareto(members, key)
                members = sorted(members, key=lambda p: p["recall"])
                label_text = "Index (auto, tune(target))" if group == "index" else group
                axis.plot([p["recall"] for p in members], [p[key] for p in members],
                          marker=marker, color=color, label=label_text,
                          linestyle="-" if group != "index" else ":")
                if group == "index":
                    for p in members:
                        text = ("auto" if p["method"] == "index (auto)"
                                else f"tune {p['target_recall']}")
                        axis.annotate(text, (p["recall"], p[key]), fontsize=7,
                                      textcoords="offset points", xytext=(4, 4))
            axis.axvline(HEADLINE_RECALL, color="gray", linewidth=0.8, linestyle="--")
            axis.set_yscale("log")
            axis.set_xlabel(f"recall@{K}")
            axis.set_ylabel("queries per second")
            gallery = results[name]["gallery"]
            axis.set_title(f"{name} ({gallery[0]:,} x {gallery[1]}), {label}")
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=8)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=110)


def pareto(points, key):
    frontier, best = [], -1.0
    for p in sorted(points, key=lambda p: (-p["recall"], -p[key])):
        if p[key] > best:
            frontier.append(p)
            best = p[key]
    return frontier


def machine():
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)),
            "machine": platform.machine(), "python": sys.version.split()[0]}


def library_versions():
    import importlib.metadata

    versions = {}
    for name in ("faiss-cpu", "scann", "numpy"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--clusters", type=int,
                        help="cluster centres (default: one per 100 gallery vectors)")
    parser.add_argument("--spread", type=float, default=1.0)
    parser.add_argument("--hnsw-ef-construction", type=int, default=HNSW_EF_CONSTRUCTION)
    parser.add_argument("--skip-hnsw", action="store_true")
    parser.add_argument("--ivf-lists", type=lambda text: [int(n) for n in text.split(",")],
                        help="comma-separated IVF list counts (default: sqrt(n))")
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--targets", default=",".join(map(str, TUNE_TARGETS)),
                        help="comma-separated target recalls for Index.tune")
    parser.add_argument("--workdir", help="also measure this trained workdir's embeddings")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--skip-faiss", action="store_true")
    parser.add_argument("--index-settings",
                        help='JSON replacing some of the Index\'s automatic ScaNN settings, '
                             'e.g. \'{"soar_lambda": null, "dimensions_per_block": 2}\'')
    parser.add_argument("--out", default="search.json")
    parser.add_argument("--plot", default="docs/search_recall_qps.png")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    targets = tuple(float(t) for t in args.targets.split(",") if t)

    results = {}
    if not args.skip_synthetic:
        start = time.perf_counter()
        args.clusters = args.clusters or max(1, args.n // 100)
        centres = cluster_centres(args.dim, args.clusters, args.seed)
        gallery = sample_points(centres, args.n, args.spread, args.seed + 1)
        queries = sample_points(centres, args.queries, args.spread, args.seed + 2)
        print(f"made the synthetic set in {time.perf_counter() - start:.1f} s", flush=True)
        results["synthetic"] = run_dataset("synthetic", gallery, queries, args, targets)
        del gallery, queries
        gc.collect()
    if args.workdir:
        embeddings = workdir_embeddings(args.workdir)
        embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
        order = np.random.default_rng(args.seed).permutation(len(embeddings))
        held_out = min(args.queries, len(embeddings) // 10)
        queries = np.ascontiguousarray(embeddings[order[:held_out]])
        gallery = np.ascontiguousarray(embeddings[np.sort(order[held_out:])])
        results["embeddings"] = run_dataset(
            f"embeddings ({args.workdir})", gallery, queries, args, targets)

    report = {"date": time.strftime("%Y-%m-%d"), "machine": machine(),
              "versions": library_versions(), "args": vars(args), "results": results}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    if results and args.plot:
        plot(results, args.plot, args.threads)
    for name, result in results.items():
        print()
        print(markdown(name, result, args.threads))
        print()
        print(json.dumps(result["summary"], indent=1))
        for entry in result["tuning"]:
            print(json.dumps(entry))


if __name__ == "__main__":
    main()
