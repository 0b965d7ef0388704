"""How well scores agree with ground truth: correlation of predicted and actual changes, and how well
a ranking finds flagged examples. Pure numpy (no torch, no pandas): the validation and cleaning
steps write these figures and the explorer recomputes them for the selection it shows.

Agreement (predicted x against actual y, e.g. score against loss change after retraining):
    pearson, spearman (average ranks for ties), slope of y on x (1: calibrated), fit_summary.
Detection (a score per example, higher = inspect first; positives: e.g. flipped labels):
    auc (Mann-Whitney: P(random positive ranks above random negative), ties ½),
    top_fraction / recall_at (fraction of positives among the top x %), detection_curve.
Undefined figures (fewer than two points, zero variance, no positives) are nan, never an error.
"""

from __future__ import annotations

import numpy as np


def pearson(x, y) -> float:
    """Pearson correlation of two 1-D arrays; nan with fewer than 2 points or zero variance."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    denom = np.sqrt((dx * dx).sum() * (dy * dy).sum())
    return float((dx * dy).sum() / denom) if denom > 0 else float("nan")


def average_ranks(x) -> np.ndarray:
    """Ranks 1..n of a 1-D array, ties sharing the average of their ranks (as scipy.stats.rankdata)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    # Boundaries of runs of equal values; each run gets the mean of its positions (1-based).
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], x.size]
    ranks = np.empty(x.size)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    return pearson(average_ranks(x), average_ranks(y))


def slope(predicted, actual) -> float:
    """Least-squares slope of actual on predicted (with intercept); 1 means calibrated scores."""
    x, y = np.asarray(predicted, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    if x.size < 2:
        return float("nan")
    dx = x - x.mean()
    var = (dx * dx).sum()
    return float((dx * (y - y.mean())).sum() / var) if var > 0 else float("nan")


def fit_summary(predicted, actual) -> dict:
    """{"pearson", "spearman", "slope", "n_pairs"} of actual against predicted, over the pairs where
    both are finite (``n_pairs`` counts those)."""
    x, y = np.asarray(predicted, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    return {"pearson": pearson(x, y), "spearman": spearman(x, y), "slope": slope(x, y), "n_pairs": int(x.size)}


def auc(scores, positives) -> float:
    """P(score of a random positive > score of a random negative), ties count ½ (Mann-Whitney U)."""
    s = np.asarray(scores, np.float64)
    pos = np.asarray(positives, bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = average_ranks(s)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def inspection_order(scores) -> np.ndarray:
    """Indices by descending score, ties by lower index; non-finite scores come last."""
    s = np.asarray(scores, np.float64)
    s = np.where(np.isfinite(s), s, -np.inf)
    return np.lexsort((np.arange(len(s)), -s))


def top_fraction(scores, percent: float) -> np.ndarray:
    """Indices of the top ``percent`` % by score (at least 1), highest first, ties by lower id."""
    k = max(1, int(round(len(scores) * percent / 100)))
    return inspection_order(scores)[:k]


def recall_at(scores, positives, percent: float) -> float:
    """Fraction of the positives found among the top ``percent`` % by score."""
    pos = np.asarray(positives, bool)
    return float(pos[top_fraction(scores, percent)].sum() / max(1, pos.sum()))


def detection_curve(scores, positives, points: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(fraction inspected, fraction of positives found), inspecting by descending score.

    ``points`` None: every step, both [m + 1] from 0 to 1. Else ``points`` evenly spaced fractions
    from 0 to 1, with the exact found fraction at each (a small curve for any m).
    """
    pos = np.asarray(positives, bool)
    found = np.concatenate([[0], np.cumsum(pos[inspection_order(scores)])]) / max(1, int(pos.sum()))
    if points is None:
        return np.arange(len(pos) + 1) / len(pos), found
    fractions = np.linspace(0.0, 1.0, points)
    return fractions, found[np.round(fractions * len(pos)).astype(int)]


__all__ = ["auc", "average_ranks", "detection_curve", "fit_summary", "inspection_order", "pearson", "recall_at",
           "slope", "spearman", "top_fraction"]
