"""The multi-stage formula against finite differences and limits; task errors."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from precompute.config import InfluenceConfig, TrainConfig
from precompute.fd_check import TIGHT, TOLERANCE, build_check_task, run_check
from precompute.influence import multi_stage_scores
from precompute.task import TaskError, TwoStageTask
from precompute.training import train_stages

from tiny_task import EXACT, scores_with


def test_formula_matches_finite_differences_of_the_whole_pipeline():
    result = run_check(test_ids=(0, 3), per_test=2)
    assert {r["scenario"] for r in result.rows} == {"fixed", "updated"}
    for scenario in ("fixed", "updated"):
        assert result.max_error(scenario) < TOLERANCE, result.rows
    # Non-trivial derivatives: a check of zeros would pass vacuously.
    assert min(abs(r["finite_difference"]) for r in result.rows) > 1e-5


def test_fixed_scenario_g_matches_total_derivative_by_finite_differences(tiny):
    """g_t = d f / d θ* with U re-optimised: check one direction against re-finetuning at θ* ± h·e."""
    from precompute.fd_check import NEWTON
    from precompute.training import finetune_fixed

    task, trained = tiny
    config = InfluenceConfig(scenarios=("fixed",), pretrain_solver=EXACT, finetune_solver=EXACT)
    from precompute.influence import embedding_sensitivity_fixed
    side = embedding_sensitivity_fixed(task, trained.q("fixed"), torch.tensor([1]), config.finetune_solver)
    direction = torch.zeros(task.n_pretrain_params, dtype=torch.float64)
    direction[3] = 1.0
    values = []
    for sign in (1, -1):
        p = trained.p + sign * 1e-4 * direction
        q = finetune_fixed(task, p, NEWTON, u0=trained.q("fixed")[task.n_theta:], desc=None).params
        values.append(float(task.test_loss(q, torch.tensor([1]))[0]))
    fd = (values[0] - values[1]) / 2e-4
    assert fd == pytest.approx(float(side.g[3, 0]), rel=1e-5)


def test_updated_tends_to_fixed_as_alpha_grows():
    task = build_check_task(seed=2)
    gaps = []
    for alpha in (1.0, 1e2, 1e4):
        trained = train_stages(task, replace(TIGHT, alpha=alpha), progress=False)
        s, _ = scores_with(task, trained, EXACT)
        gaps.append(np.abs(s["updated"] - s["fixed"]).max() / np.abs(s["fixed"]).max())
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 1e-3, gaps


def test_float32_scores_track_float64(tiny):
    task64, trained64 = tiny
    ref, _ = scores_with(task64, trained64, EXACT)
    task32 = build_check_task(seed=1).to("cpu", torch.float32)
    from precompute.training import TrainedStages, TrainResult
    cast = lambda r: TrainResult(r.params.float(), r.objective, r.grad_norm, r.iterations, r.converged)
    trained32 = TrainedStages(cast(trained64.pretrain), {s: cast(r) for s, r in trained64.finetune.items()}, 1.0)
    low, _ = scores_with(task32, trained32, EXACT)
    for s in ref:
        assert np.corrcoef(ref[s].ravel(), low[s].ravel())[0, 1] > 0.9999


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(tiny):
    task, trained = tiny
    ref, _ = scores_with(task, trained, EXACT)
    from precompute.training import TrainedStages, TrainResult
    gpu_task = build_check_task(seed=1).to("cuda", torch.float64)
    move = lambda r: TrainResult(r.params.cuda(), r.objective, r.grad_norm, r.iterations, r.converged)
    gpu = TrainedStages(move(trained.pretrain), {s: move(r) for s, r in trained.finetune.items()}, 1.0)
    out, _ = scores_with(gpu_task, gpu, EXACT)
    for s in ref:
        np.testing.assert_allclose(out[s], ref[s], rtol=1e-4, atol=1e-8)


# ---- bad input ---------------------------------------------------------------------------------


def small_task(**kw) -> TwoStageTask:
    x = torch.randn(6, 4)
    return TwoStageTask(nn.Linear(4, 3), nn.Linear(3, 2), nn.Linear(3, 2), x, torch.tensor([0, 1] * 3),
                        x.clone(), torch.tensor([1, 0] * 3), x[:2].clone(), torch.tensor([0, 1]), **kw)


def test_mismatched_parameter_shapes_are_named():
    task = small_task()
    theta = {"weight": torch.zeros(3, 5), "bias": torch.zeros(3)}
    w = dict(task.pretrain_head.named_parameters())
    with pytest.raises(TaskError, match=r"weight has shape \(3, 5\).*expects \(3, 4\)"):
        task.pretrain_params_from(theta, w)
    with pytest.raises(TaskError, match="missing bias"):
        task.pretrain_params_from({"weight": torch.zeros(3, 4)}, w)


def test_test_id_out_of_range():
    task = small_task()
    with pytest.raises(TaskError, match=r"test id\(s\) \[5\] out of range.*2 examples"):
        task.check_test_ids([0, 5])


def test_loss_that_returns_a_batch_mean_is_refused():
    task = small_task(pretrain_loss=lambda out, y: nn.functional.cross_entropy(out, y))
    with pytest.raises(TaskError, match="one loss per example.*reduction='none'"):
        task.validate(task.initial_pretrain_params())


def test_non_finite_loss_is_refused():
    task = small_task()
    task.pretrain_x[0, 0] = float("nan")
    with pytest.raises(TaskError, match="objective is non-finite"):
        train_stages(task, TrainConfig(max_iter=5, alpha=1.0), progress=False)
    clean = small_task().to("cpu", torch.float64)        # float64 reaches a certified minimum
    clean.test_x[1, 0] = float("inf")
    trained = train_stages(clean, TrainConfig(alpha=1.0), progress=False)          # a certified minimum
    with pytest.raises(TaskError, match=r"non-finite on test id\(s\) \[1\]"):
        multi_stage_scores(clean, trained, [0, 1], InfluenceConfig(), progress=False)
