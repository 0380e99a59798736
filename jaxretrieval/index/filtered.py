"""Filtered search: the best k of the items that a metadata filter passes.

The base rows' inverted index (`metadata.Postings`) gives the passing rows, and so the
share of the gallery that passes, before anything is scored. Two strategies:

- Exact: when at most FILTER_EXACT_MAX_ROWS items pass, or when ScaNN would need to
  return more than OVERFETCH_MAX_FRACTION of the gallery to find k of them, the passing
  rows' embeddings are scored with numpy (brute force). Cost: the passing rows times the
  dimension, per query; the result is the exact top k.
- Over-fetch: otherwise ScaNN is asked for k * OVERFETCH_SAFETY / share candidates (plus
  the tombstones), searching 1 / share times as many leaves and reordering 1 / share
  times as many candidates (at most MAX_EFFORT times), since the best k passing items lie
  as deep in the whole gallery's ranking as its best k / share do. The candidates are
  filtered; a query left with fewer than k passing candidates
  asks again for OVERFETCH_GROWTH times as many, and once ScaNN runs out of candidates (or
  has returned every row) the query falls back to the exact strategy. The result is what
  an unfiltered search of the passing items alone would find: exact on an index that
  searches exactly, and on an approximate one of about the recall of an unfiltered search
  (measured in BENCHMARKS.md), at up to MAX_EFFORT times its cost.

The delta (rows upserted since the searcher was built) is always filtered and scored
exactly, as unfiltered searches score it. Each state version keeps what its
FILTER_CACHE_SIZE most recent filters pass (and, for exact ones, the passing embeddings
gathered), so a filter asked again skips the inverted index and the gathering.
"""

import math

import numpy as np

from jaxretrieval.index.metadata import passes

FILTER_EXACT_MAX_ROWS = 20_000
OVERFETCH_SAFETY = 2.0
OVERFETCH_GROWTH = 4
OVERFETCH_MAX_FRACTION = 0.25
MAX_EFFORT = 8.0
# Filters remembered per index version; the passing embeddings are kept with one only up
# to FILTER_EXACT_MAX_ROWS of them (10 MiB at 128 dimensions), so that a large k, which
# also searches exactly, cannot make the cache hold a copy of most of the gallery.
FILTER_CACHE_SIZE = 4


def _cached(state, conditions):
    """{"base_mask", "delta_slots", "n_base_passing"} of `conditions` in `state`, and
    "exact" ((ids, vectors) of the passing items) once an exact search made it. Kept
    per state version for the FILTER_CACHE_SIZE most recent filters, as a service tends
    to ask the same few filters again and again."""
    key = frozenset(conditions.items())
    entry = state.filter_cache.get(key)
    if entry is None:
        base_mask, delta_slots = passing(state, conditions)
        entry = {"base_mask": base_mask, "delta_slots": delta_slots,
                 "n_base_passing": int(np.count_nonzero(base_mask))}
        try:
            while len(state.filter_cache) >= FILTER_CACHE_SIZE:
                state.filter_cache.pop(next(iter(state.filter_cache)), None)
        except RuntimeError:  # another thread changed the cache meanwhile: no harm
            pass
        state.filter_cache[key] = entry
    return entry


def passing(state, conditions):
    """(bool mask over the base rows: live and passing, passing delta slots)."""
    postings = state.base_postings()
    if postings is None:
        base = np.zeros(state.n_base, bool)
    else:
        base = postings.mask(conditions)
        if state.n_dead:
            base &= ~state.dead
    delta = np.asarray([slot for slot, item in enumerate(state.delta_metadata)
                        if passes(item, conditions)], np.int64)
    return base, delta


def _top_k(queries, vectors, ids, k):
    """Exact best k of `vectors` (whose ids are `ids`) per query, best first."""
    scores = queries @ vectors.T
    if k < len(ids):
        best = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        best = np.broadcast_to(np.arange(len(ids)), scores.shape)
    best_scores = np.take_along_axis(scores, best, axis=1)
    order = np.argsort(-best_scores, axis=1, kind="stable")
    best = np.take_along_axis(best, order, axis=1)
    return ids[best], np.take_along_axis(best_scores, order, axis=1).astype(np.float32)


def _exact(state, queries, k, entry):
    passing = entry.get("exact")
    if passing is None:
        rows = np.flatnonzero(entry["base_mask"])
        delta_slots = entry["delta_slots"]
        if len(delta_slots):
            passing = (np.concatenate([rows, state.n_base + delta_slots]),
                       np.concatenate([state.base_vectors[rows],
                                       state.delta_vectors[delta_slots]]))
        else:
            passing = rows, state.base_vectors[rows]
        if len(passing[0]) <= FILTER_EXACT_MAX_ROWS:
            entry["exact"] = passing
    ids, vectors = passing
    return _top_k(queries, vectors, ids, k)


def uses_exact(state, n_base_passing, k):
    """Whether a filter that passes `n_base_passing` base rows is searched by brute force."""
    if state.searcher is None or n_base_passing <= FILTER_EXACT_MAX_ROWS:
        return True
    return _first_fetch(state, n_base_passing, k) > OVERFETCH_MAX_FRACTION * state.n_base


def _first_fetch(state, n_base_passing, k):
    share = n_base_passing / max(1, state.n_base - state.n_dead)
    return math.ceil(k * OVERFETCH_SAFETY / share) + state.n_dead


def _overfetched(state, queries, k, base_mask, n_base_passing):
    """The best k passing base rows per query from ScaNN's candidates (see the module)."""
    m = len(queries)
    out_ids = np.full((m, k), -1, np.int64)
    out_scores = np.full((m, k), -np.inf, np.float32)
    todo = np.arange(m)
    fetch = min(state.n_base, _first_fetch(state, n_base_passing, k))
    # The best k passing items lie as deep in the whole gallery's ranking as the best
    # k / share items do, so the tree is searched and reordered that much further.
    share = n_base_passing / max(1, state.n_base - state.n_dead)
    effort = min(MAX_EFFORT, 1 / share)
    while todo.size:
        ids, scores = state.base_candidates(queries[todo], fetch, effort)
        ok = (ids >= 0) & base_mask[np.maximum(ids, 0)]
        found = np.count_nonzero(ok, axis=1)
        # Stable: the passing candidates first, in ScaNN's order (best first).
        first = np.argsort(~ok, axis=1, kind="stable")[:, :k]
        done = found >= k
        out_ids[todo[done]] = np.take_along_axis(ids, first, axis=1)[done]
        out_scores[todo[done]] = np.take_along_axis(scores, first, axis=1)[done]
        exhausted = ~done & ((ids < 0).any(axis=1) | (fetch >= state.n_base))
        if exhausted.any():
            rows = np.flatnonzero(base_mask)  # rare: not worth caching
            exact_ids, exact_scores = _top_k(queries[todo[exhausted]], state.base_vectors[rows],
                                             rows, k)
            out_ids[todo[exhausted]] = exact_ids
            out_scores[todo[exhausted]] = exact_scores
        todo = todo[~done & ~exhausted]
        fetch = min(state.n_base, fetch * OVERFETCH_GROWTH)
    return out_ids, out_scores


def plan(state, k, conditions):
    """How a search for k items passing `conditions` (checked, not empty) would run:
    {"passing", "share", "strategy": "exact" or "over-fetch"}."""
    entry = _cached(state, conditions)
    n_base_passing = entry["n_base_passing"]
    n_passing = n_base_passing + len(entry["delta_slots"])
    k = min(k, n_passing)
    exact = k == 0 or uses_exact(state, n_base_passing, k)
    return {"passing": n_passing, "share": n_passing / max(1, state.count),
            "strategy": "exact" if exact else "over-fetch"}


def search_ids(state, queries, k, conditions):
    """Ids and scores of the best min(k, passing) live items passing `conditions` (checked,
    not empty) per query, best first; [m, 0] arrays when none passes."""
    entry = _cached(state, conditions)
    base_mask, delta_slots = entry["base_mask"], entry["delta_slots"]
    n_base_passing = entry["n_base_passing"]
    k = min(k, n_base_passing + len(delta_slots))
    if k == 0:
        return np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32)
    if uses_exact(state, n_base_passing, k):
        return _exact(state, queries, k, entry)
    ids, scores = _overfetched(state, queries, min(k, n_base_passing), base_mask,
                               n_base_passing)
    if not len(delta_slots):
        return ids, scores
    delta_ids, delta_scores = _top_k(queries, state.delta_vectors[delta_slots],
                                     state.n_base + delta_slots, min(k, len(delta_slots)))
    ids = np.concatenate([ids, delta_ids], axis=1)
    scores = np.concatenate([scores, delta_scores], axis=1)
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(ids, best, axis=1), np.take_along_axis(scores, best, axis=1)
