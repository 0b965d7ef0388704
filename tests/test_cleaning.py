"""Mislabeled-pretraining-data debugging (precompute/cleaning.py) on a small real digits task with real label noise."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from precompute.cleaning import (SIGNALS, CleaningConfig, audit_split, auc, detection_metrics, finetune_test_metrics,
                                 recall_at, removal_plan, run_cleaning, self_influence, top_fraction)
from precompute.config import InfluenceConfig, SolverConfig, TrainConfig
from precompute.data import flip_labels
from precompute.influence import multi_stage_scores, pretrain_solver
from precompute.task import TwoStageTask
from precompute.training import train_stages

EXACT = SolverConfig("exact")
CONFIG = InfluenceConfig(pretrain_solver=EXACT, finetune_solver=EXACT)
NOISE = 0.2


def noisy_digits_task(seed: int = 1, n_pretrain: int = 150, n_finetune: int = 60, n_test: int = 60,
                      hidden: int = 6, noise: float = NOISE):
    """Pretrain on digits 0-2 (4x4 pooled, float64) with ``noise`` of the labels flipped, finetune on 3-5.

    Returns (task, flipped bool [m], original labels int [m]).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float64).reshape(-1, 1, 8, 8) / 16.0
    x = nn.functional.avg_pool2d(x, 2).reshape(-1, 16)
    rng = np.random.default_rng(seed)

    def pick(classes: list[int], count: int):
        idx = rng.permutation(np.flatnonzero(np.isin(digits.target, classes)))[:count]
        return x[idx], np.array([classes.index(int(v)) for v in digits.target[idx]])

    px, original = pick([0, 1, 2], n_pretrain)
    noisy, flipped = flip_labels(original, noise, 3, seed)
    fx, fy = pick([3, 4, 5], n_finetune + n_test)
    fy = torch.from_numpy(fy)
    torch.manual_seed(seed)
    task = TwoStageTask(nn.Sequential(nn.Linear(16, hidden), nn.Tanh()), nn.Linear(hidden, 3), nn.Linear(hidden, 3),
                        px, torch.from_numpy(noisy), fx[:n_finetune], fy[:n_finetune], fx[n_finetune:],
                        fy[n_finetune:], pretrain_l2=1e-2, finetune_l2=1e-2)
    return task.to("cpu", torch.float64), flipped, original


@pytest.fixture(scope="module")
def cleaned():
    task, flipped, original = noisy_digits_task()
    trained = train_stages(task, TrainConfig(max_iter=300, alpha=1.0), progress=False)
    assert trained.pretrain.converged
    cleaning = CleaningConfig(folds=3, percents=(5.0, 10.0), retrain_tol=1e-6, retrain_max_iter=200)
    result = run_cleaning(task, trained, flipped, CONFIG, cleaning)
    return task, trained, flipped, original, cleaning, result


def test_signals_have_one_finite_value_per_example(cleaned):
    task, _, flipped, original, _, result = cleaned
    sig = result.signals
    assert list(sig.columns) == ["id", *SIGNALS, "suggested_label", "flipped"]
    assert len(sig) == task.m and np.array_equal(sig["id"], np.arange(task.m))
    for s in SIGNALS:
        assert sig[s].dtype == np.float64 and np.isfinite(sig[s]).all(), s
    assert (sig["self_influence"] > 0).all() and (sig["multi_stage_total_harm"] >= 0).all()
    assert sig["cleanlab"].between(0, 2).all()
    assert np.array_equal(sig["flipped"], flipped)
    # out-of-sample predictions recover most true labels, including most flipped ones
    suggested = sig["suggested_label"].to_numpy()
    assert set(suggested) <= {0, 1, 2}
    assert (suggested == original).mean() > 0.85
    assert (suggested[flipped] == original[flipped]).mean() > 0.7


def test_auc_and_recall_against_brute_force():
    rng = np.random.default_rng(0)
    scores = np.round(rng.standard_normal(300), 1)          # many ties
    positives = rng.random(300) < 0.2
    p, n = scores[positives], scores[~positives]
    brute = ((p[:, None] > n[None, :]).sum() + 0.5 * (p[:, None] == n[None, :]).sum()) / (len(p) * len(n))
    assert auc(scores, positives) == pytest.approx(brute, abs=1e-12)
    assert auc(-scores, positives) == pytest.approx(1 - brute, abs=1e-12)
    assert np.isnan(auc(scores, np.zeros(300, bool)))
    # recall of the top x %: 10 examples, positives at ranks 1 and 4 of the order
    s = np.array([9, 1, 2, 8, 3, 4, 5, 6, 7, 0], float)
    pos = np.zeros(10, bool)
    pos[[0, 8]] = True
    assert list(top_fraction(s, 20)) == [0, 3]
    assert recall_at(s, pos, 20) == 0.5 and recall_at(s, pos, 30) == 1.0 and recall_at(s, pos, 5) == 0.5
    metrics = detection_metrics(pd.DataFrame({"id": np.arange(10), "a": s, "suggested_label": 0}), pos)
    assert set(metrics) == {"a"} and set(metrics["a"]) == {"auc", "recall_top_2", "recall_top_5", "recall_top_10",
                                                            "recall_top_20"}


def test_top20_harmful_statistic():
    flipped = np.zeros(100, bool)
    flipped[:10] = True
    scores = np.zeros((2, 100))
    scores[0, :10] = -1.0            # test point 0: the 10 flipped are its most harmful
    scores[1, 50:70] = -1.0          # test point 1: 20 clean ones
    out = detection_metrics(pd.DataFrame({"id": np.arange(100), "a": flipped * 1.0}), flipped, scores)
    stat = out["top20_harmful_of_misclassified"]
    assert stat == {"flipped_in_top20_harmful": 0.25, "base_rate": 0.1, "n_test_points": 2}


def test_simple_signals_find_the_flipped_labels(cleaned):
    *_, flipped, _, _, result = cleaned
    det = result.detection
    assert set(SIGNALS) <= set(det)
    for s in ("self_influence", "pretrain_loss", "margin", "cleanlab"):
        assert det[s]["auc"] > 0.85, (s, det[s])
        assert det[s]["recall_top_20"] > 0.6, (s, det[s])
    recomputed = detection_metrics(result.signals, flipped)
    assert recomputed["self_influence"] == det["self_influence"]
    stat = det.get("top20_harmful_of_misclassified")
    if stat is not None:
        assert stat["base_rate"] == pytest.approx(flipped.mean())
        assert stat["n_test_points"] == len(result.suspect_test_ids)


def test_self_influence_equals_brute_force(cleaned):
    task, trained, flipped, *_, result = cleaned
    p = trained.p
    hessian = torch.func.hessian(task.pretrain_objective)(p)
    for z in [0, 7, *np.flatnonzero(flipped)[:3].tolist()]:
        x, y = task.pretrain_x[z:z + 1], task.pretrain_y[z:z + 1]
        g = torch.func.grad(lambda pp: task.pretrain_losses(pp, x, y)[0])(p)
        brute = float(g @ torch.linalg.solve(hessian, g))
        assert result.signals["self_influence"][z] == pytest.approx(brute, rel=1e-8), z
    # the solver-agnostic path (one batched solve per chunk) agrees with the eigendecomposition
    cg = self_influence(task, p, pretrain_solver(task, p, SolverConfig("cg", tol=1e-12, max_iter=2000)), chunk_size=64)
    assert np.allclose(cg, result.signals["self_influence"], rtol=1e-5)


def test_one_pass_harmfulness_equals_the_sum_of_per_test_scores(cleaned):
    task, trained, *_, result = cleaned
    config = replace(CONFIG, scenarios=(result.scenario,))
    scores, _ = multi_stage_scores(task, trained, result.suspect_test_ids, config, progress=False)
    per_test = scores[result.scenario].astype(np.float64)           # [T, m], one column per suspect
    harm = result.signals["multi_stage_harmfulness"].to_numpy()
    scale = np.abs(per_test).sum(0).max()
    assert np.allclose(harm, -per_test.sum(0), atol=1e-5 * scale, rtol=0)
    assert np.allclose(result.signals["multi_stage_total_harm"], np.clip(-per_test, 0, None).sum(0), atol=1e-5 * scale)
    assert np.abs(harm).max() > 0


def test_suspects_are_misclassified_audit_points(cleaned):
    task, trained, *_, cleaning, result = cleaned
    audit, heldout = audit_split(len(task.test_x), cleaning.audit_fraction, cleaning.seed)
    assert sorted(result.heldout_test_ids) == heldout.tolist() and set(result.suspect_test_ids) <= set(audit.tolist())
    with torch.no_grad():
        pred = task.finetune_outputs(trained.q(result.scenario), task.test_x).argmax(1)
    wrong = set((pred != task.test_y).nonzero()[:, 0].tolist()) & set(audit.tolist())
    assert set(result.suspect_test_ids) == (wrong or set(audit.tolist()))


def test_clean_and_retrain_table_and_oracle(cleaned):
    task, trained, flipped, _, cleaning, result = cleaned
    r = result.retrain
    assert list(r.columns) == ["signal", "percent", "scenario", "n_removed", "test_accuracy", "test_loss",
                               "heldout_accuracy", "heldout_loss", "converged"]
    per_scenario = 1 + (len(SIGNALS) + 1) * len(cleaning.percents) + 1
    assert len(r) == per_scenario * len(trained.finetune)
    assert set(r["signal"]) == {*SIGNALS, "random", "oracle", "none"}
    for pct in cleaning.percents:
        assert (r.loc[r["percent"] == pct, "n_removed"] == round(task.m * pct / 100)).all()
    assert (r.loc[r["signal"] == "oracle", "n_removed"] == flipped.sum()).all()
    assert r["converged"].mean() > 0.5
    for scenario in trained.finetune:
        rows = r[r["scenario"] == scenario].set_index("signal")
        # nothing removed: retraining stays at the trained optimum
        acc, loss = finetune_test_metrics(task, trained.q(scenario))
        assert rows.loc["none", "test_accuracy"] == acc
        assert rows.loc["none", "test_loss"] == pytest.approx(loss, rel=1e-6)
        # removing exactly the flipped labels lowers the finetune test loss
        assert rows.loc["oracle", "test_loss"] < rows.loc["none", "test_loss"], scenario
        assert np.isfinite(rows["heldout_accuracy"]).all()


def test_best_cleaning_and_the_run_summary_lines(cleaned, tmp_path):
    """The manifest's best_cleaning is the argmax over the signals' rows at the smallest size (brute force over
    the table), and the run summary prints it with the recall at 2% / 5%."""
    from precompute.pipeline import RunSummary

    *_, result = cleaned
    info = result.manifest_info()
    r = result.retrain
    smallest = r.percent[r.percent > 0].min()
    for scenario in r.scenario.unique():
        rows = r[(r.scenario == scenario) & (r.percent == smallest) & r.signal.isin(SIGNALS)]
        top = max(rows.itertuples(), key=lambda row: row.heldout_accuracy)
        best = info["best_cleaning"][scenario]
        assert best["on"] == "held-out" and best["percent"] == smallest
        assert best["accuracy"] == top.heldout_accuracy and best["signal"] in set(
            rows.signal[rows.heldout_accuracy == top.heldout_accuracy])
        assert best["none"] == r[(r.scenario == scenario) & (r.signal == "none")].heldout_accuracy.iloc[0]
    lines = RunSummary(tmp_path, {"cleaning": info, "mislabel_detection": result.detection}).cleaning_lines()
    assert "6 per pretraining example" in lines[0]
    recall = result.detection["pretrain_loss"]
    assert f"pretrain_loss {recall['recall_top_2']:.2f} / {recall['recall_top_5']:.2f}" in lines[1]
    assert sum(f"cleaning {smallest:g}%" in line for line in lines) == len(info["best_cleaning"]) == 2
    assert RunSummary(tmp_path, {}).cleaning_lines() == []


def test_random_removal_does_not_reuse_the_label_noise_stream():
    labels = np.repeat(np.arange(3), 100)
    _, flipped = flip_labels(labels, 0.1, 3, seed=0)
    sig = pd.DataFrame({"id": np.arange(300), "a": np.zeros(300)})
    plan = {(name, pct): ids for name, pct, ids in removal_plan(sig, flipped, (10.0,), seed=0)}
    assert flipped[plan[("random", 10.0)]].mean() < 0.5
    assert np.array_equal(np.sort(plan[("oracle", 10.0)]), np.flatnonzero(flipped))
    assert len(plan[("none", 0.0)]) == 0 and len(plan[("a", 10.0)]) == 30
