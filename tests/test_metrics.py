"""Retrieval metrics checked against small cases worked out by hand."""

import numpy as np
import pytest

from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.metrics import (
    map_at_r,
    pixel_embeddings,
    precision_at_1,
    r_precision,
    ranked_relevance,
    recall_at_k,
    retrieval_metrics,
)

T, F = True, False


# Query A: ranks [rel, not, rel, not], R = 2.
#   recall@1 = 1, R-precision = 1/2 (one hit in the top 2),
#   MAP@R = (1/2) * (P@1 * 1 + P@2 * 0) = (1/2) * 1 = 1/2 (rank 3 is beyond R).
# Query B: ranks [not, rel, rel, not], R = 3.
#   recall@1 = 0, recall@2 = 1, R-precision = 2/3,
#   MAP@R = (1/3) * (0 + P@2 + P@3) = (1/3) * (1/2 + 2/3) = 7/18.
# Query C: nothing relevant, R = 0: skipped whenever num_relevant is given.
HAND_RELEVANCE = np.array([
    [T, F, T, F],
    [F, T, T, F],
    [F, F, F, F],
])
HAND_NUM_RELEVANT = np.array([2, 3, 0])


def test_map_at_r_counts_only_the_first_r_ranks():
    # Mean of 1/2 and 7/18 = 16/36 = 4/9.
    assert map_at_r(HAND_RELEVANCE, HAND_NUM_RELEVANT) == pytest.approx(4 / 9)


def test_r_precision_by_hand():
    # Mean of 1/2 and 2/3 = 7/12.
    assert r_precision(HAND_RELEVANCE, HAND_NUM_RELEVANT) == pytest.approx(7 / 12)


def test_recall_at_k_is_the_hit_rate():
    # Over A and B: top 1 hits A only; top 2 hits both.
    assert recall_at_k(HAND_RELEVANCE, 1, num_relevant=HAND_NUM_RELEVANT) == 0.5
    assert recall_at_k(HAND_RELEVANCE, 2, num_relevant=HAND_NUM_RELEVANT) == 1.0
    assert precision_at_1(HAND_RELEVANCE, num_relevant=HAND_NUM_RELEVANT) == 0.5
    # Without num_relevant every row counts, C included: 1/3 and 2/3.
    assert recall_at_k(HAND_RELEVANCE, 1) == pytest.approx(1 / 3)
    assert recall_at_k(HAND_RELEVANCE, 4) == pytest.approx(2 / 3)


def test_single_query_map_example_from_the_brief():
    # Ranks [rel, not, rel], R = 2: P@1 = 1, P@3 = 2/3 but rank 3 > R,
    # so MAP@R = (1/2) * (1 + 0) = 0.5; R-precision = 1/2; recall@1 = recall@3 = 1.
    relevance = np.array([[T, F, T]])
    num_relevant = np.array([2])
    assert map_at_r(relevance, num_relevant) == 0.5
    assert r_precision(relevance, num_relevant) == 0.5
    assert recall_at_k(relevance, 1) == 1.0
    assert recall_at_k(relevance, 3) == 1.0


# Four unit vectors in 2-D, used as both queries and gallery (leave-one-out).
# Dot products: x0.x1 = 0.8, x0.x2 = 0.6, x0.x3 = 0, x1.x2 = 0.96, x1.x3 = 0.6, x2.x3 = 0.8.
LOO_EMBEDDINGS = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]], dtype=np.float32)
LOO_LABELS = np.array([0, 0, 1, 1])
LOO_SELF_ROWS = np.arange(4)


def test_leave_one_out_excludes_the_query_itself():
    relevance, num_relevant = ranked_relevance(
        LOO_EMBEDDINGS, LOO_LABELS, LOO_EMBEDDINGS, LOO_LABELS,
        query_gallery_rows=LOO_SELF_ROWS)
    # Default depth max(10, 1) is capped at 4 gallery rows - 1 excluded = 3.
    # q0: x1 (0.8, same label), x2 (0.6), x3 (0)    -> [T, F, F]
    # q1: x2 (0.96), x0 (0.8, same label), x3 (0.6) -> [F, T, F]
    # q2: x1 (0.96), x3 (0.8, same label), x0 (0.6) -> [F, T, F]
    # q3: x2 (0.8, same label), x1 (0.6), x0 (0)    -> [T, F, F]
    np.testing.assert_array_equal(
        relevance, [[T, F, F], [F, T, F], [F, T, F], [T, F, F]])
    np.testing.assert_array_equal(num_relevant, [1, 1, 1, 1])

    metrics = retrieval_metrics(LOO_EMBEDDINGS, LOO_LABELS, LOO_EMBEDDINGS, LOO_LABELS,
                                query_gallery_rows=LOO_SELF_ROWS, ks=(1, 2, 10))
    # R = 1 for all, so MAP@R = R-precision = recall@1 = 2/4; recall@2 = 1.
    # Only 3 items can be ranked, so recall@10 is the hit rate over all of them.
    assert metrics == {"recall@1": 0.5, "recall@2": 1.0, "recall@10": 1.0,
                       "map@r": 0.5, "r_precision": 0.5, "num_queries": 4}


def test_without_exclusion_each_query_finds_itself_first():
    relevance, num_relevant = ranked_relevance(
        LOO_EMBEDDINGS, LOO_LABELS, LOO_EMBEDDINGS, LOO_LABELS)
    assert relevance.shape == (4, 4)
    assert relevance[:, 0].all()
    np.testing.assert_array_equal(num_relevant, [2, 2, 2, 2])


def test_only_self_match_means_no_relevant_items():
    # With the self row excluded, a singleton class has R = 0 and is skipped.
    labels = np.array([0, 0, 1, 2])
    metrics = retrieval_metrics(LOO_EMBEDDINGS, labels, LOO_EMBEDDINGS, labels,
                                query_gallery_rows=LOO_SELF_ROWS, ks=(1,))
    # Only q0 and q1 count; each finds the other at rank 1 (q0: x1; q1: x2 first, then x0).
    # q0 -> [T, ...] and q1 -> [F, T, ...]: recall@1 = 1/2, MAP@R = R-precision = 1/2.
    assert metrics == {"recall@1": 0.5, "map@r": 0.5, "r_precision": 0.5, "num_queries": 2}


# Gallery scores against query (1, 0): rows 1 and 3 score 1, rows 0, 2, 4 score 0.
TIE_GALLERY = np.array([[0, 1], [1, 0], [0, 1], [1, 0], [0, 1]], dtype=np.float32)
TIE_GALLERY_LABELS = np.array(["a", "b", "b", "a", "a"])
TIE_QUERY = np.array([[1, 0]], dtype=np.float32)


def test_ties_are_broken_by_lower_gallery_row():
    # Order must be rows 1, 3 (score 1) then 0, 2, 4 (score 0)
    # -> labels b, a, a, b, a -> relevance for label "a": [F, T, T, F, T].
    relevance, num_relevant = ranked_relevance(
        TIE_QUERY, np.array(["a"]), TIE_GALLERY, TIE_GALLERY_LABELS, max_rank=5)
    np.testing.assert_array_equal(relevance, [[F, T, T, F, T]])
    np.testing.assert_array_equal(num_relevant, [3])


def test_ties_at_the_cut_keep_the_lowest_rows():
    # max_rank = 3 cuts inside the score-0 tie (rows 0, 2, 4): only row 0 may enter.
    # Row 0 is "a" -> [F, T, T]. Taking row 2 ("b") would give [F, T, F].
    for chunk_size in (1, 2, 1024):
        relevance, _ = ranked_relevance(
            TIE_QUERY, np.array(["a"]), TIE_GALLERY, TIE_GALLERY_LABELS,
            max_rank=3, chunk_size=chunk_size)
        np.testing.assert_array_equal(relevance, [[F, T, T]])


def test_all_scores_equal_gives_gallery_order():
    gallery = np.ones((6, 3), dtype=np.float32) / np.sqrt(3)
    gallery_labels = np.array([1, 0, 0, 1, 0, 1])
    queries = gallery[:2]
    relevance, _ = ranked_relevance(queries, np.array([1, 0]), gallery, gallery_labels,
                                    max_rank=4)
    np.testing.assert_array_equal(relevance, [[T, F, F, T], [F, T, T, F]])


def test_query_without_relevant_items_is_skipped():
    gallery = np.array([[1, 0], [0.6, 0.8], [0, 1]], dtype=np.float32)
    gallery_labels = np.array([0, 0, 1])
    queries = np.array([[0, 1], [0, 1]], dtype=np.float32)
    # Query 0 (label 0): ranks rows 2 (1.0), 1 (0.8), 0 (0) -> [F, T, F], R = 2.
    #   recall@1 = 0, recall@2 = 1, R-precision = 1/2, MAP@R = (1/2)(0 + 1/2) = 1/4.
    # Query 1 (label 7) has no gallery match and must not drag averages down.
    metrics = retrieval_metrics(queries, np.array([0, 7]), gallery, gallery_labels,
                                ks=(1, 2))
    assert metrics == {"recall@1": 0.0, "recall@2": 1.0, "map@r": 0.25,
                       "r_precision": 0.5, "num_queries": 1}


def test_no_query_with_relevant_items_raises():
    with pytest.raises(JaxRetrievalError, match="same label"):
        retrieval_metrics(LOO_EMBEDDINGS, np.array([5, 6, 7, 8]),
                          LOO_EMBEDDINGS, LOO_LABELS)
    with pytest.raises(JaxRetrievalError):
        map_at_r(HAND_RELEVANCE, np.zeros(3, dtype=int))


@pytest.mark.parametrize("kwargs, message", [
    (dict(query_embeddings=np.zeros((2, 3))), "dimension"),
    (dict(query_embeddings=np.zeros(4)), "2-D"),
    (dict(query_labels=np.array([0, 1, 2])), "query_labels"),
    (dict(gallery_labels=np.array([0, 0, 1])), "gallery_labels"),
    (dict(query_gallery_rows=np.array([0, 1, 2, 4])), "query_gallery_rows"),
    (dict(query_gallery_rows=np.array([0, 1])), "query_gallery_rows"),
    (dict(query_gallery_rows=np.array([2, 1, 0, 3])), "own gallery"),
    (dict(query_labels=np.array(["0", "0", "1", "1"])), "same label type"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(max_rank=0), "max_rank"),
])
def test_bad_inputs_raise(kwargs, message):
    arguments = dict(query_embeddings=LOO_EMBEDDINGS, query_labels=LOO_LABELS,
                     gallery_embeddings=LOO_EMBEDDINGS, gallery_labels=LOO_LABELS)
    arguments.update(kwargs)
    with pytest.raises(JaxRetrievalError, match=message):
        ranked_relevance(**arguments)


def test_metric_depth_errors():
    with pytest.raises(JaxRetrievalError, match="max_rank"):
        recall_at_k(HAND_RELEVANCE, 5)
    # R = 5 needs five ranks but relevance has four.
    with pytest.raises(JaxRetrievalError, match="max_rank"):
        map_at_r(HAND_RELEVANCE, np.array([5, 1, 1]))
    with pytest.raises(JaxRetrievalError, match="one entry per row"):
        r_precision(HAND_RELEVANCE, np.array([1, 1]))


def _slow_relevance_and_map_at_r(queries, query_labels, gallery, gallery_labels, self_rows):
    """Plain per-query loop: full sort by (-score, row), then the MAP@R formula."""
    average_precisions, rankings = [], []
    for query, label, self_row in zip(queries, query_labels, self_rows):
        scores = gallery @ query
        rows = sorted((row for row in range(len(gallery)) if row != self_row),
                      key=lambda row: (-scores[row], row))
        ranked_relevant = [gallery_labels[row] == label for row in rows]
        rankings.append(ranked_relevant)
        r = sum(ranked_relevant)
        if r == 0:
            continue
        hits, total = 0, 0.0
        for rank, is_relevant in enumerate(ranked_relevant[:r], start=1):
            if is_relevant:
                hits += 1
                total += hits / rank
        average_precisions.append(total / r)
    return rankings, float(np.mean(average_precisions))


def test_map_at_r_matches_slow_loop_on_random_data():
    rng = np.random.default_rng(0)
    num_items, num_classes = 60, 7
    # Small integer embeddings keep every dot product exact and full of ties,
    # so the fast and slow rankings must agree row for row.
    embeddings = rng.integers(-1, 2, size=(num_items, 4)).astype(np.float32)
    labels = rng.integers(0, num_classes, size=num_items)
    self_rows = np.where(rng.random(num_items) < 0.7, np.arange(num_items), -1)

    rankings, expected_map = _slow_relevance_and_map_at_r(
        embeddings, labels, embeddings, labels, self_rows)
    relevance, num_relevant = ranked_relevance(
        embeddings, labels, embeddings, labels, query_gallery_rows=self_rows, chunk_size=7)

    depth = relevance.shape[1]
    assert depth == max(10, num_relevant.max())
    np.testing.assert_array_equal(relevance, [ranking[:depth] for ranking in rankings])
    np.testing.assert_array_equal(num_relevant, [sum(ranking) for ranking in rankings])
    assert map_at_r(relevance, num_relevant) == pytest.approx(expected_map)


def test_pixel_embeddings_by_hand():
    # One pixel, one channel: 0 and 255 scale to 0 and 1, mean 0.5,
    # centred -0.5 and 0.5, normalised -1 and 1.
    images = np.array([0, 255], dtype=np.uint8).reshape(2, 1, 1, 1)
    np.testing.assert_allclose(pixel_embeddings(images), [[-1.0], [1.0]])
    # 0, 51, 102 -> 0, 0.2, 0.4, mean 0.2: the middle image equals the mean and stays zero.
    images = np.array([0, 51, 102], dtype=np.uint8).reshape(3, 1, 1, 1)
    embeddings = pixel_embeddings(images)
    np.testing.assert_allclose(embeddings, [[-1.0], [0.0], [1.0]], atol=1e-7)
    assert not np.isnan(embeddings).any()


def test_pixel_embeddings_unit_norm_and_mean_centred():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(8, 4, 5, 3), dtype=np.uint8)
    embeddings = pixel_embeddings(images)
    assert embeddings.shape == (8, 60) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-6)

    pixels = images.reshape(8, -1) / 255.0
    centred = pixels - pixels.mean(axis=0)
    expected = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    np.testing.assert_allclose(embeddings, expected, atol=1e-6)
    # Float input already in [0, 1] gives the same embeddings.
    np.testing.assert_allclose(pixel_embeddings(images / 255.0), embeddings, atol=1e-6)


def test_pixel_embeddings_identical_images_give_zeros():
    images = np.full((3, 2, 2, 3), 17, dtype=np.uint8)
    embeddings = pixel_embeddings(images)
    np.testing.assert_array_equal(embeddings, np.zeros((3, 12), dtype=np.float32))


def test_pixel_embeddings_bad_input():
    with pytest.raises(JaxRetrievalError, match=r"\[n, H, W, C\]"):
        pixel_embeddings(np.zeros((2, 4, 4), dtype=np.uint8))
    with pytest.raises(JaxRetrievalError, match="dtype"):
        pixel_embeddings(np.zeros((2, 4, 4, 3), dtype=np.int32))
