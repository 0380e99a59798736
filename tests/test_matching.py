"""Match-threshold calibration, on similarities whose answer is known."""

import numpy as np
import pytest

from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.metrics import calibrate_match_thresholds, pair_similarities


def test_separable_pairs_give_a_threshold_between_the_classes():
    sims = np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1])
    same = np.array([1, 1, 1, 0, 0, 0], bool)
    t = calibrate_match_thresholds(sims, same, target_precision=0.99)
    # Accepting >= 0.7 takes all three positives and no negative: precision 1, recall 1.
    assert t["at_target_precision"] == 0.7 and t["recall_at_target"] == 1.0
    assert t["best_f1"] == 0.7 and t["f1"] == 1.0
    assert (t["positives"], t["negatives"]) == (3, 3)


def test_the_precision_target_trades_recall_as_computed_by_hand():
    # Sorted: + + - + - - ; cuts: >=0.9 (1/1), >=0.8 (2/2), >=0.7 (2/3), >=0.6 (3/4), ...
    sims = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    same = np.array([1, 1, 0, 1, 0, 0], bool)
    strict = calibrate_match_thresholds(sims, same, target_precision=0.99)
    assert strict["at_target_precision"] == 0.8
    assert strict["precision_at_target"] == 1.0 and strict["recall_at_target"] == 2 / 3
    loose = calibrate_match_thresholds(sims, same, target_precision=0.75)
    assert loose["at_target_precision"] == 0.6 and loose["recall_at_target"] == 1.0
    # F1 at >=0.8: P=1, R=2/3 -> 0.8; at >=0.6: P=3/4, R=1 -> 6/7 = 0.857: the best.
    assert loose["best_f1"] == 0.6 and loose["f1"] == pytest.approx(6 / 7)


def test_ties_are_never_split_and_an_unreachable_target_gives_none():
    sims = np.array([0.5, 0.5, 0.5, 0.5])
    same = np.array([1, 0, 1, 0], bool)
    t = calibrate_match_thresholds(sims, same, target_precision=0.9)
    assert t["at_target_precision"] is None
    assert t["best_f1"] == 0.5 and t["precision_at_best_f1"] == 0.5


def test_synthetic_scores_recover_the_known_threshold():
    rng = np.random.default_rng(0)
    positives = rng.uniform(0.6, 1.0, 5000)
    negatives = rng.uniform(-0.2, 0.65, 20000)  # overlap only in [0.6, 0.65]
    sims = np.concatenate([positives, negatives])
    same = np.concatenate([np.ones(5000, bool), np.zeros(20000, bool)])
    t = calibrate_match_thresholds(sims, same, target_precision=0.99)
    # Precision >= 0.99 needs few negatives above t: t is in the overlap's upper part.
    assert 0.6 < t["at_target_precision"] <= 0.65
    accepted = sims >= t["at_target_precision"]
    assert same[accepted].mean() >= 0.99
    assert t["precision_at_target"] == pytest.approx(same[accepted].mean())


def test_calibration_needs_both_kinds_of_pairs():
    with pytest.raises(JaxRetrievalError, match="both same and different"):
        calibrate_match_thresholds(np.array([0.1, 0.2]), np.array([True, True]))


def test_pair_similarities_leave_out_self_pairs():
    e = np.eye(3, dtype=np.float32)
    labels = np.array([0, 0, 1])
    sims, same = pair_similarities(e, labels, e, labels, query_gallery_rows=np.arange(3))
    assert len(sims) == 6 and not np.any(sims == 1.0)
    assert same.sum() == 2  # (0,1) and (1,0)
