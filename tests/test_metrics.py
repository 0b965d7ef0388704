"""precompute.metrics (shared by validation, cleaning and the explorer) against independent references.

Correlations and slope are checked against scipy in tests/test_validation.py; here: AUC against
scikit-learn, recall and detection curves against a brute-force walk down the ranking, and the
handling of non-finite pairs and degenerate inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from precompute.metrics import auc, detection_curve, fit_summary, inspection_order, recall_at, top_fraction


@pytest.fixture
def ranked():
    rng = np.random.default_rng(3)
    scores = np.round(rng.standard_normal(400), 1)          # rounded: many ties
    positives = rng.random(400) < 0.15
    return scores, positives


def test_auc_matches_scikit_learn_with_ties(ranked):
    scores, positives = ranked
    assert auc(scores, positives) == pytest.approx(roc_auc_score(positives, scores), abs=1e-12)
    assert np.isnan(auc(scores, np.zeros(400, bool)))


def brute_force_found(scores, positives, k):
    """Positives among the first k when walking by descending score, ties by lower index."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sum(positives[i] for i in order[:k])


def test_recall_and_curves_walk_the_ranking(ranked):
    scores, positives = ranked
    n_pos = positives.sum()
    assert recall_at(scores, positives, 10) == pytest.approx(brute_force_found(scores, positives, 40) / n_pos)
    assert list(top_fraction(scores, 1)) == sorted(range(400), key=lambda i: (-scores[i], i))[:4]
    x, y = detection_curve(scores, positives)
    assert len(x) == len(y) == 401
    for k in (0, 1, 37, 200, 400):
        assert x[k] == k / 400 and y[k] == pytest.approx(brute_force_found(scores, positives, k) / n_pos)
    xs, ys = detection_curve(scores, positives, points=11)
    assert list(xs) == pytest.approx(np.linspace(0, 1, 11))
    assert list(ys) == pytest.approx([y[k] for k in range(0, 401, 40)])


def test_non_finite_scores_are_inspected_last_and_pairs_dropped():
    assert list(inspection_order([np.nan, 1.0, -np.inf, 2.0])) == [3, 1, 0, 2]
    summary = fit_summary([1.0, 2.0, np.nan, 3.0, 4.0], [2.0, 4.1, 5.0, 6.0, np.inf])
    assert summary["n_pairs"] == 3
    assert summary["slope"] == pytest.approx(2.0) and summary["pearson"] == pytest.approx(np.corrcoef([1, 2, 3], [2, 4.1, 6])[0, 1])
    assert np.isnan(fit_summary([1.0], [1.0])["pearson"]) and np.isnan(fit_summary([1, 1, 1], [1, 2, 3])["slope"])
