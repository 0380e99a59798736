"""Retrieval metrics as the deep metric-learning literature defines them.

Definitions follow Musgrave et al. 2020, "A Metric Learning Reality Check":
Recall@k is the hit rate (share of queries with at least one item of their
label among the top k), R-precision and MAP@R use R = the number of gallery
items that share the query's label.

Typical use::

    metrics = retrieval_metrics(query_emb, query_labels, gallery_emb, gallery_labels)
    metrics["recall@1"], metrics["map@r"]

Embeddings are expected to be L2-normalised already, so a dot product is the
cosine similarity.
"""

import dataclasses

import numpy as np

from jaxretrieval.errors import JaxRetrievalError

DEFAULT_MIN_RANK_DEPTH = 10
DEFAULT_QUERY_CHUNK_SIZE = 1024


def ranked_relevance(query_embeddings, query_labels, gallery_embeddings, gallery_labels,
                     *, query_gallery_rows=None, max_rank=None,
                     chunk_size=DEFAULT_QUERY_CHUNK_SIZE):
    """Rank the gallery for every query by dot product and mark which ranks are relevant.

    Args:
        query_embeddings: float array [num_queries, dim], L2-normalised.
        query_labels: array [num_queries] of class labels (ints or strings).
        gallery_embeddings: float array [num_gallery, dim], L2-normalised.
        gallery_labels: array [num_gallery] of class labels.
        query_gallery_rows: optional int array [num_queries]; for each query the
            gallery row that is the query itself (leave-one-out), or -1. That
            row is left out of the query's ranking and of its num_relevant.
        max_rank: how many ranks to return. Default max(10, max(num_relevant)).
            Either way it is capped at the gallery size (minus one when any
            query has its own row excluded), since no more can be ranked.
        chunk_size: queries scored at once; memory is about
            chunk_size * num_gallery * 4 bytes.

    Returns:
        (relevance, num_relevant): relevance is bool [num_queries, max_rank],
        True where the gallery item at that rank (best first) has the query's
        label; equal scores are ordered by lower gallery row first.
        num_relevant is int64 [num_queries], the number of gallery items with
        the query's label, not counting the query's own row.
    """
    relevance, num_relevant, _ = _ranked_relevance(
        query_embeddings, query_labels, gallery_embeddings, gallery_labels, query_gallery_rows,
        max_rank, chunk_size, min_default_depth=DEFAULT_MIN_RANK_DEPTH)
    return relevance, num_relevant


@dataclasses.dataclass(frozen=True)
class Neighbours:
    """Each query's nearest gallery items, best first, its own gallery row left out."""
    rows: np.ndarray  # int64 [num_queries, n]: positions in the gallery
    scores: np.ndarray  # float32 [num_queries, n]: their dot products with the query


def _ranked_relevance(query_embeddings, query_labels, gallery_embeddings, gallery_labels,
                      query_gallery_rows, max_rank, chunk_size, min_default_depth,
                      num_neighbours=0):
    queries = _as_embeddings(query_embeddings, "query_embeddings")
    gallery = _as_embeddings(gallery_embeddings, "gallery_embeddings")
    if queries.shape[1] != gallery.shape[1]:
        raise JaxRetrievalError(
            f"query_embeddings have dimension {queries.shape[1]} but gallery_embeddings "
            f"have {gallery.shape[1]}; embed queries and gallery with the same model.")
    num_queries, num_gallery = queries.shape[0], gallery.shape[0]
    query_labels = _as_labels(query_labels, num_queries, "query_labels", "query_embeddings")
    gallery_labels = _as_labels(gallery_labels, num_gallery, "gallery_labels",
                                "gallery_embeddings")
    self_rows = _as_self_rows(query_gallery_rows, num_queries, num_gallery)
    if not (isinstance(chunk_size, (int, np.integer)) and chunk_size >= 1):
        raise JaxRetrievalError(f"chunk_size must be a positive int, got {chunk_size!r}.")

    # Integer codes make the per-rank label comparison cheap whatever the label type.
    query_codes, gallery_codes = _shared_label_codes(query_labels, gallery_labels)
    has_self = self_rows >= 0
    query_ids = np.nonzero(has_self)[0]
    mismatched = query_ids[gallery_codes[self_rows[has_self]] != query_codes[has_self]]
    if mismatched.size:
        first = int(mismatched[0])
        raise JaxRetrievalError(
            f"query_gallery_rows[{first}] = {int(self_rows[first])} points at a gallery "
            f"item labelled {gallery_labels[self_rows[first]]}, but query {first} is "
            f"labelled {query_labels[first]}; each entry must be the query's own gallery "
            "row, or -1 when the query is not in the gallery.")

    label_counts = np.bincount(gallery_codes, minlength=int(query_codes.max(initial=-1)) + 1)
    num_relevant = label_counts[query_codes].astype(np.int64) - has_self

    rankable = num_gallery - (1 if has_self.any() else 0)
    if rankable < 1:
        raise JaxRetrievalError(
            f"The gallery has {num_gallery} item(s), leaving nothing to rank once each "
            "query's own row is excluded; use a larger gallery.")
    if max_rank is None:
        max_rank = max(min_default_depth, int(num_relevant.max(initial=0)))
    elif not (isinstance(max_rank, (int, np.integer)) and max_rank >= 1):
        raise JaxRetrievalError(f"max_rank must be a positive int or None, got {max_rank!r}.")
    max_rank = min(int(max_rank), rankable)

    relevance = np.zeros((num_queries, max_rank), dtype=bool)
    num_neighbours = min(num_neighbours, max_rank)
    neighbours = Neighbours(rows=np.zeros((num_queries, num_neighbours), np.int64),
                            scores=np.zeros((num_queries, num_neighbours), np.float32))
    for start in range(0, num_queries, chunk_size):
        stop = min(start + chunk_size, num_queries)
        scores = queries[start:stop] @ gallery.T
        chunk_self = self_rows[start:stop]
        chunk_has_self = chunk_self >= 0
        # -inf ranks below every finite score, and max_rank <= rankable keeps it out.
        scores[np.nonzero(chunk_has_self)[0], chunk_self[chunk_has_self]] = -np.inf
        top_rows = _top_rows_stable(scores, max_rank)
        relevance[start:stop] = gallery_codes[top_rows] == query_codes[start:stop, None]
        if num_neighbours:
            nearest = top_rows[:, :num_neighbours]
            neighbours.rows[start:stop] = nearest
            neighbours.scores[start:stop] = np.take_along_axis(scores, nearest, axis=1)
    return relevance, num_relevant, neighbours


def recall_at_k(relevance, k, *, num_relevant=None):
    """Share of queries with at least one relevant item in the top k (the hit rate).

    relevance: bool [num_queries, max_rank] from ranked_relevance; k <= max_rank.
    num_relevant: optional; when given, queries with none are left out.
    """
    relevance, counted = _counted_rows(relevance, num_relevant)
    if not (isinstance(k, (int, np.integer)) and 1 <= k <= relevance.shape[1]):
        raise JaxRetrievalError(
            f"k must be an int from 1 to {relevance.shape[1]} (the ranks in relevance), "
            f"got {k!r}; call ranked_relevance with a larger max_rank.")
    return float(relevance[counted, :k].any(axis=1).mean())


def precision_at_1(relevance, *, num_relevant=None):
    """Share of queries whose best match has their label (equals recall_at_k(relevance, 1))."""
    return recall_at_k(relevance, 1, num_relevant=num_relevant)


def r_precision(relevance, num_relevant):
    """Mean over queries of (relevant items in the top R) / R, R = num_relevant.

    Queries with R == 0 are left out.
    """
    relevance, counted = _counted_rows(relevance, num_relevant)
    in_top_r = _top_r_mask(relevance, num_relevant, counted)
    r = num_relevant[counted]
    hits = (relevance[counted] & in_top_r).sum(axis=1)
    return float(np.mean(hits / r))


def map_at_r(relevance, num_relevant):
    """Mean over queries of (1/R) * sum_{i<=R} P@i * rel_i, R = num_relevant.

    Queries with R == 0 are left out.
    """
    relevance, counted = _counted_rows(relevance, num_relevant)
    in_top_r = _top_r_mask(relevance, num_relevant, counted)
    r = num_relevant[counted]
    relevant_in_top_r = relevance[counted] & in_top_r
    ranks = np.arange(1, relevance.shape[1] + 1)
    precision_at_rank = np.cumsum(relevant_in_top_r, axis=1) / ranks
    average_precision = (precision_at_rank * relevant_in_top_r).sum(axis=1) / r
    return float(np.mean(average_precision))


def retrieval_metrics(query_embeddings, query_labels, gallery_embeddings, gallery_labels,
                      *, query_gallery_rows=None, ks=(1, 5, 10)):
    """Recall@k for each k in ks, MAP@R and R-precision of exact dot-product search.

    Returns a dict with keys "recall@{k}" per k, "map@r", "r_precision" (floats)
    and "num_queries" (int): the queries with at least one relevant gallery item,
    which are the only ones averaged. See ranked_relevance for the arguments.
    When the gallery has fewer than k rankable items, recall@k is the hit rate
    over the whole gallery.
    """
    metrics, _ = retrieval_metrics_and_neighbours(
        query_embeddings, query_labels, gallery_embeddings, gallery_labels,
        query_gallery_rows=query_gallery_rows, ks=ks, num_neighbours=0)
    return metrics


def retrieval_metrics_and_neighbours(query_embeddings, query_labels, gallery_embeddings,
                                     gallery_labels, *, query_gallery_rows=None, ks=(1, 5, 10),
                                     num_neighbours=10):
    """`retrieval_metrics`, and the `num_neighbours` nearest gallery items of every query
    (a `Neighbours`) from the same ranking; fewer when the gallery has fewer to rank."""
    ks = tuple(ks)
    for k in ks:
        if not (isinstance(k, (int, np.integer)) and k >= 1):
            raise JaxRetrievalError(f"Each k in ks must be a positive int, got {k!r}.")
    if not (isinstance(num_neighbours, (int, np.integer)) and num_neighbours >= 0):
        raise JaxRetrievalError(
            f"num_neighbours must be an int >= 0, got {num_neighbours!r}.")
    # Deep enough for every k and every R; capped at the gallery size inside.
    relevance, num_relevant, neighbours = _ranked_relevance(
        query_embeddings, query_labels, gallery_embeddings, gallery_labels,
        query_gallery_rows, None, DEFAULT_QUERY_CHUNK_SIZE,
        min_default_depth=max(ks, default=1), num_neighbours=int(num_neighbours))
    num_counted = int((num_relevant > 0).sum())
    if num_counted == 0:
        raise JaxRetrievalError(
            "No query has a gallery item with the same label, so no retrieval metric is "
            "defined; check that query and gallery labels come from the same label set.")
    metrics = {}
    for k in ks:
        # A k beyond the ranked depth means the whole gallery was ranked.
        metrics[f"recall@{k}"] = recall_at_k(relevance, min(k, relevance.shape[1]),
                                             num_relevant=num_relevant)
    metrics["map@r"] = map_at_r(relevance, num_relevant)
    metrics["r_precision"] = r_precision(relevance, num_relevant)
    metrics["num_queries"] = num_counted
    return metrics, neighbours


def pixel_embeddings(images):
    """Raw-pixel baseline embeddings: float32 [n, H*W*C], unit norm (or zero).

    images: uint8 [n, H, W, C] (scaled by 1/255) or float in [0, 1]. Each image
    is flattened, the mean image of this batch is subtracted, and the result is
    L2-normalised, so dot products are cosines of mean-centred pixels. An image
    equal to the mean image gives a zero vector.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] == 0:
        raise JaxRetrievalError(
            f"images must be a non-empty [n, H, W, C] array, got shape {images.shape}.")
    if images.dtype == np.uint8:
        flat = images.reshape(images.shape[0], -1).astype(np.float32) / 255.0
    elif np.issubdtype(images.dtype, np.floating):
        flat = images.reshape(images.shape[0], -1).astype(np.float32)  # copy, edited in place
        if not np.all(np.isfinite(flat)):
            raise JaxRetrievalError("images contain NaN or inf; fix the decoding step.")
    else:
        raise JaxRetrievalError(
            f"images must be uint8 or float, got dtype {images.dtype}; convert them first.")
    # float64 accumulation keeps the mean exact enough for large batches.
    flat -= np.mean(flat, axis=0, dtype=np.float64).astype(np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", flat, flat, dtype=np.float64))
    nonzero = norms > 0
    flat[nonzero] /= norms[nonzero, None].astype(np.float32)
    return flat


def _as_embeddings(embeddings, name):
    array = np.asarray(embeddings, dtype=np.float32)
    if array.ndim != 2:
        raise JaxRetrievalError(
            f"{name} must be a 2-D [num_items, dim] array, got shape {array.shape}.")
    if not np.all(np.isfinite(array)):
        raise JaxRetrievalError(f"{name} contain NaN or inf; check the model's outputs.")
    return array


def _as_labels(labels, expected_length, name, embeddings_name):
    array = np.asarray(labels)
    if array.ndim != 1 or array.shape[0] != expected_length:
        raise JaxRetrievalError(
            f"{name} must be a 1-D array with one label per row of {embeddings_name} "
            f"({expected_length}), got shape {array.shape}.")
    return array


def _as_self_rows(query_gallery_rows, num_queries, num_gallery):
    if query_gallery_rows is None:
        return np.full(num_queries, -1, dtype=np.int64)
    rows = np.asarray(query_gallery_rows)
    if rows.shape != (num_queries,) or not (
            np.issubdtype(rows.dtype, np.integer) or rows.size == 0):
        raise JaxRetrievalError(
            f"query_gallery_rows must be an int array with one entry per query "
            f"({num_queries}), got dtype {rows.dtype} and shape {rows.shape}.")
    rows = rows.astype(np.int64)
    if rows.size and (rows.min() < -1 or rows.max() >= num_gallery):
        raise JaxRetrievalError(
            f"query_gallery_rows entries must be -1 or a gallery row in [0, {num_gallery}), "
            f"got values from {rows.min()} to {rows.max()}.")
    return rows


def _shared_label_codes(query_labels, gallery_labels):
    # numpy would quietly turn ints into strings, so 3 and "3" would never match.
    if np.issubdtype(query_labels.dtype, np.number) != np.issubdtype(gallery_labels.dtype,
                                                                      np.number):
        raise JaxRetrievalError(
            f"query_labels ({query_labels.dtype}) and gallery_labels ({gallery_labels.dtype}) "
            "mix numbers and other types; give both the same label type.")
    try:
        _, codes = np.unique(np.concatenate([query_labels, gallery_labels]),
                             return_inverse=True)
    except TypeError as error:
        raise JaxRetrievalError(
            f"query_labels ({query_labels.dtype}) and gallery_labels ({gallery_labels.dtype}) "
            "cannot be compared; give both the same label type.") from error
    codes = codes.reshape(-1)
    return codes[:query_labels.shape[0]], codes[query_labels.shape[0]:]


def _top_rows_stable(scores, num_ranks):
    """Column indices of the num_ranks highest scores per row, best first, ties by lower column."""
    num_rows, num_columns = scores.shape
    if num_ranks < num_columns:
        # Partition finds the num_ranks-th best score per row without a full sort; items
        # tied with it are then taken lowest column first so the cut is deterministic.
        threshold = -np.partition(-scores, num_ranks - 1, axis=1)[:, num_ranks - 1]
        selected = scores > threshold[:, None]
        still_needed = num_ranks - selected.sum(axis=1)
        tie_rows, tie_columns = np.nonzero(scores == threshold[:, None])
        first_tie_of_row = np.searchsorted(tie_rows, np.arange(num_rows))
        position_among_ties = np.arange(tie_rows.size) - first_tie_of_row[tie_rows]
        keep = position_among_ties < still_needed[tie_rows]
        selected[tie_rows[keep], tie_columns[keep]] = True
        candidates = np.nonzero(selected)[1].reshape(num_rows, num_ranks)
    else:
        candidates = np.broadcast_to(np.arange(num_columns), (num_rows, num_columns))
    # Candidates are in ascending column order, so a stable sort keeps lower columns first.
    order = np.argsort(-np.take_along_axis(scores, candidates, axis=1), axis=1, kind="stable")
    return np.take_along_axis(candidates, order, axis=1)


def _counted_rows(relevance, num_relevant):
    relevance = np.asarray(relevance)
    if relevance.ndim != 2 or relevance.dtype != bool:
        raise JaxRetrievalError(
            f"relevance must be a bool [num_queries, max_rank] array from ranked_relevance, "
            f"got dtype {relevance.dtype} and shape {relevance.shape}.")
    if num_relevant is None:
        counted = np.ones(relevance.shape[0], dtype=bool)
    else:
        num_relevant = np.asarray(num_relevant)
        if num_relevant.shape != (relevance.shape[0],):
            raise JaxRetrievalError(
                f"num_relevant must have one entry per row of relevance "
                f"({relevance.shape[0]}), got shape {num_relevant.shape}.")
        counted = num_relevant > 0
    if not counted.any():
        raise JaxRetrievalError(
            "No query has a relevant gallery item, so the metric is undefined; check that "
            "query and gallery labels come from the same label set.")
    return relevance, counted


def _top_r_mask(relevance, num_relevant, counted):
    """Bool [counted queries, max_rank]: True for ranks 1..R of each counted query."""
    num_relevant = np.asarray(num_relevant)
    r = num_relevant[counted]
    if r.max() > relevance.shape[1]:
        raise JaxRetrievalError(
            f"A query has R = {int(r.max())} relevant items but relevance has only "
            f"{relevance.shape[1]} ranks; call ranked_relevance with max_rank=None or >= R.")
    return np.arange(relevance.shape[1]) < r[:, None]


# ---------------------------------------------------------------------------------------------
# Matching ("same or not"): similarity thresholds calibrated on labelled pairs.

MAX_CALIBRATION_PAIRS = 4_000_000


def pair_similarities(query_embeddings, query_labels, gallery_embeddings, gallery_labels,
                      *, query_gallery_rows=None, max_pairs=MAX_CALIBRATION_PAIRS, seed=0):
    """Similarities and same-label flags of every (query, gallery item) pair, self-pairs left
    out; a seeded subset of queries when there would be more than `max_pairs` pairs."""
    queries = _as_embeddings(query_embeddings, "query_embeddings")
    gallery = _as_embeddings(gallery_embeddings, "gallery_embeddings")
    query_labels = np.asarray(query_labels)
    gallery_labels = np.asarray(gallery_labels)
    self_rows = (np.full(len(queries), -1) if query_gallery_rows is None
                 else np.asarray(query_gallery_rows))
    chosen = np.arange(len(queries))
    if len(queries) * len(gallery) > max_pairs:
        keep = max(1, max_pairs // len(gallery))
        chosen = np.sort(np.random.default_rng(seed).choice(len(queries), keep, replace=False))
    similarities = queries[chosen] @ gallery.T
    same = query_labels[chosen, None] == gallery_labels[None, :]
    not_self = np.ones_like(same)
    has_self = self_rows[chosen] >= 0
    not_self[np.flatnonzero(has_self), self_rows[chosen][has_self]] = False
    return similarities[not_self].astype(np.float64), same[not_self]


def calibrate_match_thresholds(similarities, same, *, target_precision=0.99) -> dict:
    """Thresholds for "same if similarity >= t" from labelled pairs.

    `at_target_precision`: the lowest threshold whose precision is at least
    `target_precision` (the most matches at that precision), or None if no threshold reaches
    it. `best_f1`: the threshold with the highest F1. Each comes with its precision and recall
    on these pairs.
    """
    similarities = np.asarray(similarities, np.float64)
    same = np.asarray(same, bool)
    positives = int(same.sum())
    if positives == 0 or positives == len(same):
        raise JaxRetrievalError(
            "calibrating a match threshold needs both same and different pairs; evaluate on "
            "a split with at least two classes of two or more images")
    order = np.argsort(-similarities, kind="stable")
    sorted_sims = similarities[order]
    true_pos = np.cumsum(same[order])
    accepted = np.arange(1, len(order) + 1)
    # Only cut between distinct values: a threshold accepts every pair at or above it.
    cuts = np.flatnonzero(np.append(sorted_sims[1:] != sorted_sims[:-1], True))
    precision = true_pos[cuts] / accepted[cuts]
    recall = true_pos[cuts] / positives
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)

    def described(i):
        return float(sorted_sims[cuts[i]]), float(precision[i]), float(recall[i])

    result = {"target_precision": float(target_precision), "positives": positives,
              "negatives": int(len(same) - positives)}
    reaching = np.flatnonzero(precision >= target_precision)
    if len(reaching):
        t, p, r = described(reaching[-1])
        result.update(at_target_precision=t, precision_at_target=p, recall_at_target=r)
    else:
        result.update(at_target_precision=None, precision_at_target=None, recall_at_target=None)
    best = int(np.argmax(f1))
    t, p, r = described(best)
    result.update(best_f1=t, f1=float(f1[best]), precision_at_best_f1=p, recall_at_best_f1=r)
    return result
