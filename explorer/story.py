"""The story of one run, as plain data: what the Overview page and the Test point scatter show.

Pure functions of a run's manifest, tables and score matrices (no Streamlit), so they can be
unit-tested and cached by the caller.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

SCENARIO_PLAIN = {
    "fixed": "embedding frozen: only the new head was finetuned",
    "updated": "embedding finetuned too (kept close to its pretrained value)",
}
FLIPPED_WORD = "flipped"
FLIPPED_EXPLAINED = ("⚑ flipped = this pretraining example's label was deliberately changed to a wrong class "
                     "(label noise injected to test cleaning); it can still help, because what the finetuned model "
                     "reuses is the features its image or text taught the embedding, not its label.")


def examples_per_class(labels: np.ndarray, per_class: int = 2, classes: int | None = None) -> list[int]:
    """The first ``per_class`` ids of every class, in class order (deterministic)."""
    labels = np.asarray(labels)
    out: list[int] = []
    for c in (range(classes) if classes is not None else np.unique(labels)):
        out.extend(int(i) for i in np.flatnonzero(labels == c)[:per_class])
    return out


def accuracy_sentence(manifest: Mapping) -> str:
    """'Finetune test accuracy: 71% with the embedding frozen (fixed), 94% ... (updated).'"""
    acc = manifest.get("finetune_accuracy") or {}
    parts = [f"{float(a):.0%} in '{s}' ({SCENARIO_PLAIN.get(s, s)})" for s, a in acc.items()
             if isinstance(a, (int, float))]
    return "Finetune test accuracy: " + "; ".join(parts) + "." if parts else "No accuracy recorded."


def evidence(manifest: Mapping, scenario: str) -> dict:
    """Which evidence backs one scenario's scores, in words: {"kind", "label", "sentence"}.

    kind: "retraining" (scores checked against actual removal and retraining), "agreement" (no
    retraining; the run's solver checked against a reference solver, ``solver_agreement``) or "none".
    """
    if headline(manifest, scenario) is not None:
        v = manifest["validation"][scenario]
        return {"kind": "retraining", "label": "Evidence: checked by retraining",
                "sentence": f"Scores checked against {int(v.get('n_pairs', 0)):,} actual removals and retrainings."}
    a = (manifest.get("solver_agreement") or {}).get(scenario)
    if isinstance(a, Mapping) and isinstance(a.get("pearson"), (int, float)) and math.isfinite(a["pearson"]):
        n, k = int(a.get("n_test_points", 0)), int(a.get("top_k", 100))
        return {"kind": "agreement", "label": "Evidence: solver agreement only (no retraining)",
                "sentence": (f"Nothing was retrained for this run (too large). Its {a.get('solver')} scores were "
                             f"re-computed with {a.get('reference')} on {n} test point{'s' if n != 1 else ''}: "
                             f"Pearson {float(a['pearson']):.2f}, Spearman {float(a.get('spearman', math.nan)):.2f}; "
                             f"of the {k} most helpful examples {float(a.get('top_helpful_overlap', math.nan)):.0%} "
                             f"are the same, of the {k} most harmful {float(a.get('top_harmful_overlap', math.nan)):.0%}. "
                             "This shows the fast solver is faithful to the (damped) influence, not that the "
                             "scores predict retraining.")}
    if isinstance(a, Mapping) and a.get("error"):
        return {"kind": "none", "label": "Evidence: none (the reference solver failed)",
                "sentence": f"Nothing was retrained for this run, and {a.get('reference')} could not re-compute its "
                            f"{a.get('solver')} scores: {a['error']}"}
    return {"kind": "none", "label": "Evidence: none (made with --no-validate)",
            "sentence": "This run was made without validation by retraining or a second solver, so nothing "
                        "checks its scores. Runs made with the default settings are checked by retraining."}


def headline(manifest: Mapping, scenario: str) -> dict | None:
    """The validation answer for one scenario: {pearson, spearman, slope, n_pairs, verdict, sentence}.

    None when the run was not validated by retraining.
    """
    v = (manifest.get("validation") or {}).get(scenario)
    if not v or not isinstance(v.get("pearson"), (int, float)) or not math.isfinite(v["pearson"]):
        return None
    r = float(v["pearson"])
    verdict = "Yes" if r >= 0.8 else "Mostly" if r >= 0.5 else "Only weakly" if r >= 0.2 else "No"
    n_val = len(manifest.get("validation_test_points") or [])
    sentence = (f"Over {int(v.get('n_pairs', 0)):,} pretraining examples actually removed and "
                f"retrained (for {n_val} test points), the predicted and the actual change of the test loss "
                f"correlate at Pearson {r:.2f} (Spearman {float(v.get('spearman', math.nan)):.2f}).")
    slope = v.get("slope")
    if isinstance(slope, (int, float)) and math.isfinite(slope):
        sentence += f" Actual changes are {float(slope):.1f}x the predicted ones on average."
    return {**v, "verdict": verdict, "sentence": sentence}


def most_influential(scores: np.ndarray, k: int = 6) -> pd.DataFrame:
    """Pretraining examples that matter most across all scored test points.

    scores: [T, m]. Ranked by the mean |score| over test points. Columns: pretrain_id,
    mean_abs, net (mean score: > 0 helps on average), n_helped, n_hurt (test points with score > 0 / < 0).
    """
    s = np.asarray(scores, dtype=np.float64)
    mean_abs = np.abs(s).mean(0)
    order = np.lexsort((np.arange(s.shape[1]), -mean_abs))[:k]
    return pd.DataFrame({
        "pretrain_id": order.astype(np.int64),
        "mean_abs": mean_abs[order],
        "net": s[:, order].mean(0),
        "n_helped": (s[:, order] > 0).sum(0).astype(int),
        "n_hurt": (s[:, order] < 0).sum(0).astype(int),
    })


def traced_mistake(test_table: pd.DataFrame, test_points: list[int], validated: list[int], scenario: str) -> int | None:
    """A misclassified scored test point to trace back: a validated one first, then the highest loss."""
    t = test_table.set_index("id").loc[list(test_points)]
    wrong = t[~t[f"correct_{scenario}"].astype(bool)]
    if wrong.empty:
        return None
    val = [i for i in wrong.index if int(i) in set(validated)]
    pool = wrong.loc[val] if val else wrong
    return int(pool[f"loss_{scenario}"].astype(float).idxmax())


def test_point_evidence(pairs: pd.DataFrame | None, test_id: int) -> pd.DataFrame:
    """Leave-one-out rows of one test point (pretrain_id, kind, predicted, actual, converged), or empty."""
    cols = ["pretrain_id", "kind", "predicted", "actual", "converged"]
    if pairs is None or pairs.empty:
        return pd.DataFrame(columns=cols)
    p = pairs[pairs["test_id"] == int(test_id)]
    return p[[c for c in cols if c in p]].reset_index(drop=True)


def converged_pairs(pairs: pd.DataFrame) -> pd.DataFrame:
    """The leave-one-out rows whose retraining reached the tolerance: the ones every figure counts
    (the manifest's too); the others are drawn hollow and not counted."""
    if "converged" not in pairs:
        return pairs
    return pairs[pairs["converged"].astype(bool)]


def hollow_reasons(pairs: pd.DataFrame) -> str:
    """Why the uncounted retrainings do not count, most common first: "2 iteration cap, 1 lost the
    minimum" ("" when every pair counts, or the run predates the ``reason`` column)."""
    if "converged" not in pairs or "reason" not in pairs:
        return ""
    hollow = pairs[~pairs["converged"].astype(bool)]
    counts = hollow["reason"].fillna("").replace("", "not converged").value_counts()
    return ", ".join(f"{int(n)} {reason}" for reason, n in counts.items())


def retrained_marks(ranking: pd.DataFrame, evidence: pd.DataFrame) -> dict[int, float]:
    """{pretrain_id: actual loss change} for the shown examples that were actually removed and retrained."""
    if evidence.empty or ranking.empty:
        return {}
    actual = evidence.drop_duplicates("pretrain_id").set_index("pretrain_id")["actual"]
    return {int(p): float(actual[p]) for p in ranking["pretrain_id"] if int(p) in actual.index}


def noisy_sibling(run_name: str, runs: list[str], manifest: Mapping) -> str | None:
    """The run with injected label noise that belongs with this one ('digits' -> 'digits-noisy'), if any."""
    if manifest.get("label_noise"):
        return None
    for cand in (f"{run_name}-noisy", f"{manifest.get('preset', run_name)}-noisy"):
        if cand in runs and cand != run_name:
            return cand
    return None


def cleaning_command(manifest: Mapping, run_name: str) -> str:
    """The command that makes a noisy sibling of this run's preset (custom runs: a digits example)."""
    preset = manifest.get("preset")
    preset = preset if isinstance(preset, str) and preset.isidentifier() and preset != "custom" else "digits"
    return f"python -m precompute --preset {preset} --label-noise 0.1 --out runs/{preset}-noisy"


__all__ = ["FLIPPED_EXPLAINED", "FLIPPED_WORD", "SCENARIO_PLAIN", "accuracy_sentence", "cleaning_command", "converged_pairs",
           "examples_per_class", "headline", "most_influential", "noisy_sibling", "retrained_marks",
           "test_point_evidence", "traced_mistake"]
