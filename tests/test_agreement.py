"""Solver agreement (``precompute.agreement``): the statistics against brute force, and two solvers on
a real trained chain."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from precompute.agreement import agreement_summary, solver_agreement, top_overlap


def brute_overlap(a, b, k):
    """Shares of a's k largest / k smallest among b's, by sorting (value, index) pairs by hand."""
    def top(v, sign):
        return {i for _, i in sorted(((sign * x, i) for i, x in enumerate(v)), reverse=True)[:k]}
    return len(top(a, 1) & top(b, 1)) / k, len(top(a, -1) & top(b, -1)) / k


def test_top_overlap_matches_brute_force():
    rng = np.random.default_rng(0)
    for m, k in itertools.product((7, 50, 300), (1, 5, 40)):
        a = rng.normal(size=m)
        b = a + rng.normal(scale=0.5, size=m)
        assert top_overlap(a, b, k) == pytest.approx(brute_overlap(a, b, min(k, m)))
    a = np.arange(10.0)
    assert top_overlap(a, a, 3) == (1.0, 1.0)
    assert top_overlap(a, -a, 3) == (0.0, 0.0)          # b's most helpful are a's most harmful


def test_agreement_summary_on_known_cases():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(3, 400))
    same = agreement_summary(a, 2.0 * a + 1.0)             # an affine copy: rank and correlation perfect
    assert same["pearson"] == pytest.approx(1.0) and same["spearman"] == pytest.approx(1.0)
    assert same["top_helpful_overlap"] == 1.0 and same["top_harmful_overlap"] == 1.0
    assert same["top_k"] == 100 and same["n_test_points"] == 3
    b = a + rng.normal(size=a.shape)                      # unit noise on unit signal: Pearson about 0.71
    noisy = agreement_summary(a, b)
    assert noisy["pearson"] == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1])
    assert 0.6 < noisy["pearson"] < 0.8 and noisy["top_helpful_overlap"] < 1.0
    assert noisy["pearson_per_point_min"] <= noisy["pearson_per_point_median"] <= 1.0
    with pytest.raises(ValueError, match="one shape"):
        agreement_summary(a, a[:2])


@pytest.fixture(scope="module")
def digits_chain():
    """Quick-size real digits, both stages certified."""
    import torch

    from precompute.config import DataConfig, ModelConfig, TrainConfig
    from precompute.presets import build_task, load_task_data
    from precompute.training import train_stages

    model = ModelConfig(hidden=8)
    task = build_task(load_task_data(DataConfig(preset="digits", max_pretrain=60, max_finetune=40), model),
                      model).to("cpu", torch.float64)
    return task, train_stages(task, TrainConfig(), progress=False)


def test_two_exact_solvers_agree_and_ekfac_less_so(digits_chain):
    """exact (dense) as the run's solver and cg as the reference solve one system: they agree to CG's
    tolerance. ekfac approximates the Gauss-Newton curvature: it agrees less, and the record says so."""
    from precompute.config import InfluenceConfig, SolverConfig
    from precompute.multistage import MultiStageInfluence

    task, trained = digits_chain
    ids = [0, 1, 2, 3]
    exact = InfluenceConfig(pretrain_solver=SolverConfig("exact"), finetune_solver=SolverConfig("exact"),
                            agreement_solver="cg", agreement_points=3)
    scores = MultiStageInfluence(task, trained, exact).fit().scores(ids)
    record = solver_agreement(task, trained, scores, ids, exact)
    for s in ("fixed", "updated"):
        r = record[s]
        assert r["solver"] == "exact" and r["reference"] == "cg" and r["test_points"] == [0, 1, 2]
        assert r["pearson"] > 0.99999 and r["top_helpful_overlap"] == 1.0 and r["top_harmful_overlap"] == 1.0
        assert r["reference_relative_residual"] <= 1e-6 and r["seconds"] > 0
    damped = SolverConfig("exact", damping=1e-3, curvature="ggn")
    approx = InfluenceConfig(pretrain_solver=SolverConfig("ekfac", damping=1e-3), finetune_solver=damped,
                             agreement_solver="exact", agreement_points=4)
    ekfac_scores = MultiStageInfluence(task, trained, approx).fit().scores(ids)
    versus = solver_agreement(task, trained, ekfac_scores, ids, approx)
    for s in ("fixed", "updated"):
        assert 0.0 < versus[s]["pearson"] < record[s]["pearson"]


def test_no_agreement_solver_records_nothing(digits_chain):
    from precompute.config import InfluenceConfig

    task, trained = digits_chain
    assert solver_agreement(task, trained, {}, [0], InfluenceConfig()) == {}


def test_a_failed_reference_is_recorded_and_does_not_fail_the_run(digits_chain):
    """cg capped at 2 iterations cannot reach its residual: the record says why, in one line, instead
    of statistics."""
    from precompute.config import InfluenceConfig, SolverConfig

    task, trained = digits_chain
    config = InfluenceConfig(pretrain_solver=SolverConfig("exact", max_iter=2), finetune_solver=SolverConfig("exact"),
                             agreement_solver="cg", agreement_points=1)
    record = solver_agreement(task, trained, {"fixed": None, "updated": None}, [0], config)
    for s in ("fixed", "updated"):
        assert "pearson" not in record[s] and "\n" not in record[s]["error"] and "cg" in record[s]["error"]
