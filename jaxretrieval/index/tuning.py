"""Index.tune's search for the cheapest effort that reaches a recall, and the recall it measures.

`exact_kth_scores` and `recall_per_query` define recall@k for the whole project: a
result is a true neighbour when its exact score reaches the query's k-th best exact
score (so ties and duplicates count). The benchmarks measure recall with them too.
"""

import math
import time

import numpy as np

from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.index.checks import checked_queries, json_normalised

# Index.tune tries reordering counts of k (k + 1 for gallery queries) and
# these, up to the gallery size; for each, the fewest leaves that reach the
# target; then times those pairs and keeps the fastest.
TUNE_REORDER_CANDIDATES = (20, 50, 100, 200, 400, 1000)
# A setting reaches the target when its recall on the tuning queries, less
# this many standard errors (over queries), does: choosing the cheapest of
# many noisy measurements otherwise lands just below the target on others.
TUNE_CONFIDENCE_Z = 3.0
TUNE_TIMING_REPEATS = 3
# Exact search: gallery rows scored per block.
EXACT_BLOCK_ROWS = 16384
# A result counts as a true neighbour when its exact score is at least the
# k-th best exact score less this (so ties and duplicates count).
RECALL_SCORE_TOLERANCE = 1e-5


def exact_kth_scores(vectors, queries, k, self_rows=None):
    """The k-th best exact score of each query over `vectors`.

    With `self_rows`, query i does not match row self_rows[i] (itself).
    """
    best = np.full((len(queries), k), -np.inf, np.float32)
    for start in range(0, len(vectors), EXACT_BLOCK_ROWS):
        scores = queries @ vectors[start:start + EXACT_BLOCK_ROWS].T
        if self_rows is not None:
            inside = (self_rows >= start) & (self_rows < start + len(scores[0]))
            scores[np.flatnonzero(inside), self_rows[inside] - start] = -np.inf
        scores = np.concatenate([best, scores], axis=1)
        best = -np.partition(-scores, k - 1, axis=1)[:, :k]
    return best.min(axis=1)


def recall_per_query(vectors, queries, kth_scores, rows):
    """Recall@k of each query's result `rows` [m, k] (-1 for none) in `vectors`.

    A result is a hit when its exact score reaches the query's k-th best exact score
    (`kth_scores`, from `exact_kth_scores`).
    """
    scores = np.einsum("ij,ikj->ik", queries, vectors[np.maximum(rows, 0)])
    hits = (rows >= 0) & (scores >= kth_scores[:, np.newaxis] - RECALL_SCORE_TOLERANCE)
    return hits.sum(axis=1) / rows.shape[1]


class TuningSet:
    """Queries, their exact k-th scores and (for gallery rows) their own rows."""

    def __init__(self, vectors, queries, k, self_rows):
        # The live gallery in live-row order: every trial state shares its rows.
        self.vectors = vectors
        self.queries = queries
        self.self_rows = self_rows
        self.k = k
        self.kth_scores = exact_kth_scores(vectors, queries, k, self_rows)

    def __len__(self):
        return len(self.queries)

    @property
    def searched_k(self):
        """How many results a search asks for: one more when a query finds itself."""
        return self.k if self.self_rows is None else self.k + 1

    def recall(self, state):
        """(mean recall, mean less TUNE_CONFIDENCE_Z standard errors)."""
        per_query = self.recall_per_query(state)
        mean = float(per_query.mean())
        if len(per_query) < 2:
            return mean, mean
        error = float(per_query.std(ddof=1)) / math.sqrt(len(per_query))
        return mean, mean - TUNE_CONFIDENCE_Z * error

    def recall_per_query(self, state):
        """Recall@k of each query searched in `state`.

        With `self_rows` (queries taken from the gallery), each query's own row
        is left out of its results, as it was of the truth.
        """
        ids, _ = state.search_ids(self.queries, self.searched_k)
        rows = state.live_rows(ids)
        if self.self_rows is not None:
            drop = rows == self.self_rows[:, np.newaxis]
            drop[~drop.any(axis=1), -1] = True
            rows = rows[~drop].reshape(len(self.queries), self.k)
        return recall_per_query(self.vectors, self.queries, self.kth_scores, rows)

    def seconds_per_query(self, state):
        """The fastest of TUNE_TIMING_REPEATS searches of these queries, per query."""
        best = math.inf
        for _ in range(TUNE_TIMING_REPEATS):
            start = time.perf_counter()
            state.search_ids(self.queries, self.searched_k)
            best = min(best, time.perf_counter() - start)
        return best / len(self.queries)


def fewest_leaves(reaches, num_leaves):
    """The smallest leaf count in 1..num_leaves for which `reaches` holds, or None.

    Recall grows with the leaves searched, so: doubling, then bisection.
    """
    low, high = 0, 1  # reaches(low) is false (or low is 0)
    while not reaches(high):
        if high == num_leaves:
            return None
        low, high = high, min(2 * high, num_leaves)
    while high - low > 1:
        middle = (low + high) // 2
        if reaches(middle):
            high = middle
        else:
            low = middle
    return high


def tuning_sets(state, queries, k, sample, seed):
    """(tuning set, validation set, "gallery" or "given") for `tune`."""
    rng = np.random.default_rng(seed)
    if queries is None:
        count = state.count
        # Each query leaves itself out, so k + 1 rows must be there.
        k = min(k, count - 1)
        each = min(sample, count // 2)
        if k < 1 or each < 1:
            raise JaxRetrievalError(
                f"tuning needs at least 2 gallery items, this index has {count}")
        rows = rng.choice(count, 2 * each, replace=False)
        vectors = state.live_vectors()
        chosen = vectors[rows]
        return (TuningSet(vectors, chosen[:each], k, rows[:each]),
                TuningSet(vectors, chosen[each:], k, rows[each:]), "gallery")
    queries = checked_queries(queries, state.dim)
    if len(queries) < 2:
        raise JaxRetrievalError(
            f"tuning needs at least 2 queries (half to tune on, half to check "
            f"the choice), got {len(queries)}")
    k = min(k, state.count)
    order = rng.permutation(len(queries))
    each = min(sample, len(queries) // 2)
    vectors = state.live_vectors()
    return (TuningSet(vectors, queries[order[:each]], k, None),
            TuningSet(vectors, queries[order[each:2 * each]], k, None), "given")


def cheapest_setting(state, tuning, target):
    """(settings, timed candidates): the fastest setting reaching `target`."""
    settings = state.settings
    num_leaves = settings["num_leaves"]
    want = tuning.searched_k
    reorders = sorted({reorder for reorder in (want, *TUNE_REORDER_CANDIDATES)
                       if want <= reorder <= state.count})
    measured = {}

    def trial(leaves, reorder):
        return state.with_settings({**settings, "num_leaves_to_search": leaves,
                                    "reorder_num_neighbors": reorder})

    def recall(leaves, reorder):
        if (leaves, reorder) not in measured:
            measured[leaves, reorder] = tuning.recall(trial(leaves, reorder))
        return measured[leaves, reorder]

    candidates = []
    for reorder in reorders:
        leaves = fewest_leaves(lambda n: recall(n, reorder)[1] >= target, num_leaves)
        if leaves is None:
            continue
        candidates.append({
            "num_leaves_to_search": leaves, "reorder_num_neighbors": reorder,
            "tuning_recall": recall(leaves, reorder)[0],
            "seconds_per_query": tuning.seconds_per_query(trial(leaves, reorder))})
        if leaves == 1:
            break  # more reordering would only cost more
    if not candidates:
        best_recall = max(mean for mean, _ in measured.values())
        raise JaxRetrievalError(
            f"no search setting reaches recall@{tuning.k} of {target} on "
            f"{len(tuning)} tuning queries: the best measured was "
            f"{best_recall:.4f} (all {num_leaves} leaves, reordering up to "
            f"{reorders[-1]}); ask for a lower target_recall")
    best = min(candidates, key=lambda candidate: candidate["seconds_per_query"])
    return ({**settings, "num_leaves_to_search": best["num_leaves_to_search"],
             "reorder_num_neighbors": best["reorder_num_neighbors"]}, candidates)


def tune(state, target, *, queries, k, sample, seed):
    """(settings, report): the cheapest tree settings for `state` reaching `target`.

    The arguments are `Index.tune`'s, checked; `state` searches approximately. The
    settings carry a `tuned` record; the report is what `Index.tune` returns.
    """
    tuning, validation, source = tuning_sets(state, queries, k, sample, seed)
    chosen, candidates = cheapest_setting(state, tuning, target)
    trial = state.with_settings(chosen)
    record = json_normalised({
        "target_recall": target, "k": tuning.k, "queries": source,
        "tuning_queries": len(tuning), "tuning_recall": tuning.recall(trial)[0],
        "validation_queries": len(validation),
        "validation_recall": validation.recall(trial)[0],
    }, "tuning record")
    report = {"mode": "tree_ah", "tuned": True, **record,
              "num_leaves": chosen["num_leaves"],
              "num_leaves_to_search": chosen["num_leaves_to_search"],
              "reorder_num_neighbors": chosen["reorder_num_neighbors"],
              "candidates": candidates}
    return {**chosen, "tuned": record}, report
