"""``MultiStageInfluence`` (the user façade), ``TrainedStages.from_params`` and task measurements.

The façade must give the free functions' numbers (it only reorders work: curvature once, then any
test points), self-influence must be the brute-force g_zᵀ (H_P + λI)⁻¹ g_z, a measurement other
than the loss must match a central finite difference of the whole pipeline like the loss does, and
two gloo ranks must give the single-process arrays.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from precompute import MultiStageInfluence, TrainedStages
from precompute.config import InfluenceConfig, SolverConfig
from precompute.curvature import dense_hessian, batched_hvp
from precompute.fd_check import TIGHT, TOLERANCE, build_check_task, run_check
from precompute.influence import multi_stage_scores
from precompute.task import TaskError, class_log_probability, correct_class_margin
from precompute.training import train_stages
from ranks import run_on_ranks

ALPHA = 0.5
EXACT = SolverConfig("exact")
CONFIG = InfluenceConfig(pretrain_solver=EXACT, finetune_solver=EXACT, chunk_size=16)


@pytest.fixture(scope="module")
def chain():
    task = build_check_task(n_pretrain=41)
    return task, train_stages(task, replace(TIGHT, alpha=ALPHA), progress=False)


def test_facade_gives_the_function_path_scores(chain):
    task, trained = chain
    influence = MultiStageInfluence(task, trained, CONFIG).fit()
    assert influence.solver._eig is not None                   # factorised once, in fit
    eig = influence.solver._eig
    first, second = influence.scores([0, 1]), influence.scores([5])
    assert influence.solver._eig is eig                        # reused, not refactorised
    expected, _ = multi_stage_scores(task, trained, [0, 1, 5], CONFIG, progress=False)
    for s in ("fixed", "updated"):
        assert first[s].dtype == np.float32 and first[s].shape == (2, task.m)
        np.testing.assert_array_equal(np.concatenate([first[s], second[s]]), expected[s])
    assert set(influence.diagnostics) == {"fixed", "updated"}


def test_self_influence_is_the_brute_force_quadratic_form(chain):
    task, trained = chain
    damping = 1e-3
    config = InfluenceConfig(pretrain_solver=SolverConfig("exact", damping=damping), finetune_solver=EXACT)
    values = MultiStageInfluence(task, trained, config).self_influence()
    p = trained.p
    h = dense_hessian(batched_hvp(task.pretrain_objective, p), task.n_pretrain_params, p.dtype, p.device)
    h_inv = torch.linalg.inv(h + damping * torch.eye(len(h), dtype=h.dtype))
    for z in (0, 17, 40):
        g = torch.func.grad(lambda pp: task.pretrain_losses(pp, task.pretrain_x[z:z + 1], task.pretrain_y[z:z + 1])[0])(p)
        assert values[z] == pytest.approx(float(g @ h_inv @ g), rel=1e-8)
    assert values.shape == (task.m,) and values.dtype == np.float64


def test_from_params_reproduces_the_trained_chain(chain):
    task, trained = chain
    again = TrainedStages.from_params(task, trained.p, {s: trained.q(s) for s in ("fixed", "updated")}, alpha=ALPHA)
    assert again.pretrain.converged and all(r.converged for r in again.finetune.values())
    assert again.finetune["updated"].grad_norm == pytest.approx(trained.finetune["updated"].grad_norm, abs=1e-12)
    a = MultiStageInfluence(task, again, CONFIG).scores([2])
    b = MultiStageInfluence(task, trained, CONFIG).scores([2])
    for s in a:
        np.testing.assert_array_equal(a[s], b[s])

    moved = trained.q("fixed").clone()
    moved[0] += 1.0
    with pytest.raises(TaskError, match="'fixed' keeps the pretrained embedding"):
        TrainedStages.from_params(task, trained.p, {"fixed": moved}, alpha=ALPHA)
    with pytest.raises(TaskError, match="shape"):
        TrainedStages.from_params(task, trained.p[:-1], {"fixed": trained.q("fixed")}, alpha=ALPHA)
    # a point that is not a minimum is recorded as such (influence assumes one)
    off = TrainedStages.from_params(task, trained.p * 1.01, {"updated": trained.q("updated")}, alpha=ALPHA)
    assert not off.pretrain.converged and off.pretrain.grad_norm > 1e-6


@pytest.mark.parametrize("measurement", [correct_class_margin, class_log_probability(1)], ids=["margin", "log-prob"])
def test_measurement_matches_finite_differences_of_the_whole_pipeline(measurement):
    result = run_check(test_ids=(0, 3), per_test=1, measurement=measurement)
    assert {r["scenario"] for r in result.rows} == {"fixed", "updated"}
    assert result.passed, [(r["scenario"], r["rel_error"]) for r in result.rows]
    assert max(result.max_error(s) for s in ("fixed", "updated")) < TOLERANCE


def test_measurement_changes_what_is_explained(chain):
    task, trained = chain
    loss = MultiStageInfluence(task, trained, CONFIG).scores([0])["updated"]
    task.measurement = correct_class_margin
    try:
        margin = MultiStageInfluence(task, trained, CONFIG).scores([0])["updated"]
    finally:
        task.measurement = None
    # a margin rises where the loss falls: the two rankings are strongly anti-correlated
    assert np.corrcoef(loss[0], margin[0])[0, 1] < -0.5


def _two_rank_facade(rank, world, task, trained, solver):
    config = InfluenceConfig(pretrain_solver=SolverConfig(solver), finetune_solver=EXACT, chunk_size=8)
    influence = MultiStageInfluence(task, trained, config)
    return influence.scores([0, 4]), influence.self_influence()


def test_two_ranks_give_the_single_process_arrays(chain):
    task, trained = chain
    expected = MultiStageInfluence(task, trained, CONFIG)
    want_scores, want_self = expected.scores([0, 4]), expected.self_influence()
    zero, one = run_on_ranks(_two_rank_facade, 2, task, trained, "exact")
    assert one == (None, None)
    for s in ("fixed", "updated"):
        np.testing.assert_allclose(zero[0][s], want_scores[s], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(zero[1], want_self, rtol=1e-8)


def test_one_process_is_the_degenerate_data_parallel_case(chain):
    """distributed_solve in one process: one shard, no reduction; only where the L2 term enters the
    product differs (inside the graph, or added after), so the float32 scores agree to their rounding."""
    task, trained = chain
    local, _ = multi_stage_scores(task, trained, [0, 3], CONFIG, progress=False)
    degenerate, diagnostics = multi_stage_scores(task, trained, [0, 3], CONFIG, progress=False, distributed_solve=True)
    assert diagnostics["fixed"]["world_size"] == 1
    for s in ("fixed", "updated"):
        np.testing.assert_allclose(degenerate[s], local[s], rtol=1e-6, atol=1e-7 * np.abs(local[s]).max())
