"""The influence engine against finite differences, brute force and dense linear algebra."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from precompute.config import InfluenceConfig, SolverConfig, TrainConfig
from precompute.fd_check import TIGHT, TOLERANCE, build_check_task, run_check
from precompute.influence import (multi_stage_scores, per_example_gradients, precision_check, score_pretraining,
                                  stacked_test_vectors)
from precompute.solvers import SolverError, make_solver
from precompute.task import TaskError, TwoStageTask
from precompute.training import train_stages

EXACT = SolverConfig("exact")


@pytest.fixture(scope="module")
def tiny():
    task = build_check_task(seed=1)
    trained = train_stages(task, TIGHT, alpha=1.0, progress=False)
    return task, trained


def scores_with(task, trained, solver: SolverConfig, test_ids=(0, 1, 2, 3), alpha=None, chunk=256):
    config = InfluenceConfig(alpha=alpha or trained.alpha, pretrain_solver=solver, finetune_solver=solver,
                             chunk_size=chunk)
    scores, diagnostics = multi_stage_scores(task, trained, list(test_ids), config, progress=False)
    return scores, diagnostics


def test_formula_matches_finite_differences_of_the_whole_pipeline():
    result = run_check(test_ids=(0, 3), per_test=2)
    assert {r["scenario"] for r in result.rows} == {"fixed", "updated"}
    for scenario in ("fixed", "updated"):
        assert result.max_error(scenario) < TOLERANCE, result.rows
    # Non-trivial derivatives: a check of zeros would pass vacuously.
    assert min(abs(r["finite_difference"]) for r in result.rows) > 1e-5


@pytest.mark.parametrize("name,threshold,extra", [
    ("cg", 0.999, {"tol": 1e-10}),
    ("lissa", 0.99, {"max_iter": 3000, "tol": 1e-8}),
    ("arnoldi", 0.99, {"rank": 90, "oversample": 13}),
])
def test_solvers_agree_with_exact(tiny, name, threshold, extra):
    task, trained = tiny
    # LiSSA needs a modest condition number to converge in a few thousand steps: compare both at
    # the same damping, which is how a user would run it.
    damping = 0.05 if name == "lissa" else 0.0
    reference, _ = scores_with(task, trained, SolverConfig("exact", damping=damping))
    approx, diagnostics = scores_with(task, trained, SolverConfig(name, damping=damping, **extra))
    for scenario in ("fixed", "updated"):
        r = np.corrcoef(reference[scenario].ravel(), approx[scenario].ravel())[0, 1]
        assert r >= threshold, (scenario, r)
        diag = diagnostics[scenario]["pretrain_solve"]
        assert diag["solver"] == name and diag["eig_max"] > 0


def test_solvers_on_a_known_matrix():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(30, 30, generator=gen, dtype=torch.float64)
    h = a @ a.T / 30 + 0.5 * torch.eye(30, dtype=torch.float64)
    b = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    truth = torch.linalg.solve(h + 0.1 * torch.eye(30, dtype=torch.float64), b)
    for name in ("exact", "cg", "lissa", "arnoldi"):
        cfg = SolverConfig(name, damping=0.1, tol=1e-12, max_iter=5000, rank=30, oversample=0)
        x, diag = make_solver(lambda v: h @ v, 30, cfg, torch.float64, "cpu").solve(b)
        assert torch.allclose(x, truth, rtol=1e-6, atol=1e-8), name
        assert diag.relative_residual < 1e-6
        true_eigs = torch.linalg.eigvalsh(h)
        assert abs(diag.eig_max - float(true_eigs[-1])) < 1e-6 * float(true_eigs[-1])


@pytest.mark.parametrize("name", ["exact", "cg", "lissa", "arnoldi"])
def test_indefinite_hessian_is_refused(name):
    h = torch.diag(torch.tensor([2.0, 1.0, -1.0], dtype=torch.float64))
    b = torch.ones(3, 2, dtype=torch.float64)
    cfg = SolverConfig(name, max_iter=500, rank=3, oversample=0)
    with pytest.raises(SolverError, match="damping"):
        make_solver(lambda v: h @ v, 3, cfg, torch.float64, "cpu").solve(b)


def test_per_example_gradients_match_a_loop_of_backward_calls(tiny):
    task, trained = tiny
    p = trained.p
    batched = per_example_gradients(task, p, task.pretrain_x[:7], task.pretrain_y[:7])
    for i in range(7):
        leaf = p.clone().requires_grad_(True)
        task.pretrain_losses(leaf, task.pretrain_x[i:i + 1], task.pretrain_y[i:i + 1]).sum().backward()
        torch.testing.assert_close(batched[i], leaf.grad)


def test_scores_are_the_brute_force_inner_product(tiny):
    """score[t, z] = ∇ℓ(z)·H_P⁻¹[g_t; 0]/m with a dense H_P from torch.func.hessian and an explicit loop."""
    from precompute.influence import embedding_sensitivity_fixed, embedding_sensitivity_updated

    task, trained = tiny
    ids = torch.tensor([0, 2])
    g = {"fixed": embedding_sensitivity_fixed(task, trained.q("fixed"), ids, EXACT).g,
         "updated": embedding_sensitivity_updated(task, trained.q("updated"), task.theta_of(trained.p),
                                                  trained.alpha, ids, EXACT).g}
    h = torch.func.hessian(task.pretrain_objective)(trained.p)
    scores, _ = scores_with(task, trained, EXACT, test_ids=(0, 2))
    for scenario in ("fixed", "updated"):
        s_dense = torch.linalg.solve(h, torch.cat([g[scenario], torch.zeros(task.w_layout.size, 2, dtype=h.dtype)]))
        for z in range(0, task.m, 9):
            leaf = trained.p.clone().requires_grad_(True)
            task.pretrain_losses(leaf, task.pretrain_x[z:z + 1], task.pretrain_y[z:z + 1]).sum().backward()
            expected = (leaf.grad @ s_dense / task.m).numpy()
            np.testing.assert_allclose(scores[scenario][:, z], expected, rtol=1e-4, atol=1e-9)


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


def test_scores_do_not_depend_on_chunk_size(tiny):
    task, trained = tiny
    a, _ = scores_with(task, trained, EXACT, chunk=1)
    b, _ = scores_with(task, trained, EXACT, chunk=7)
    c, _ = scores_with(task, trained, EXACT, chunk=10_000)
    for s in a:
        np.testing.assert_allclose(a[s], b[s], rtol=1e-6, atol=1e-10)
        np.testing.assert_allclose(a[s], c[s], rtol=1e-6, atol=1e-10)


def test_updated_tends_to_fixed_as_alpha_grows():
    task = build_check_task(seed=2)
    gaps = []
    for alpha in (1.0, 1e2, 1e4):
        trained = train_stages(task, TIGHT, alpha=alpha, progress=False)
        s, _ = scores_with(task, trained, EXACT, alpha=alpha)
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


def test_bfloat16_scoring_is_reported_against_full_precision(tiny):
    """--score-precision bfloat16: autocast really lowers the precision, the scores still track
    float64, and precision_check's sampled figures agree with the full comparison."""
    task64, trained64 = tiny
    ref, _ = scores_with(task64, trained64, EXACT)
    task32 = build_check_task(seed=1).to("cpu", torch.float32)
    from precompute.training import TrainedStages, TrainResult
    cast = lambda r: TrainResult(r.params.float(), r.objective, r.grad_norm, r.iterations, r.converged)
    trained32 = TrainedStages(cast(trained64.pretrain), {s: cast(r) for s, r in trained64.finetune.items()}, 1.0)
    config = InfluenceConfig(alpha=1.0, pretrain_solver=EXACT, finetune_solver=EXACT, score_precision="bfloat16")
    low, diagnostics = multi_stage_scores(task32, trained32, [0, 1, 2, 3], config, progress=False)
    for s in ref:
        r = np.corrcoef(ref[s].ravel(), low[s].ravel())[0, 1]
        assert 0.99 < r < 0.999999, r                       # close, but not float32-exact
        check = diagnostics[s]["score_precision"]
        assert check["n_sample"] == task32.m                # m = 60 < the sample size: every example
        assert abs(check["pearson_vs_full"] - r) < 1e-3
        assert 1e-5 < check["max_rel_error"] < 0.1
    # a 7-example sample of full-precision scores re-scored at full precision: identical, which
    # checks the sample's 1/m rescaling
    vectors, _ = stacked_test_vectors(task64, trained64, [0, 1, 2, 3], InfluenceConfig(
        alpha=1.0, pretrain_solver=EXACT, finetune_solver=EXACT))
    for s, check in precision_check(task64, trained64.p, vectors, ref, n_sample=7).items():
        assert check["n_sample"] == 7 and check["max_rel_error"] < 1e-6 and check["pearson_vs_full"] > 1 - 1e-9
    with pytest.raises(TaskError, match="float32"):
        score_pretraining(task64, trained64.p, torch.zeros(task64.n_pretrain_params, 1, dtype=torch.float64),
                          progress=False, precision="bfloat16")


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
        train_stages(task, TrainConfig(max_iter=5), alpha=1.0, progress=False)
    clean = small_task()
    clean.test_x[1, 0] = float("inf")
    trained = train_stages(clean, TrainConfig(max_iter=5), alpha=1.0, progress=False)
    with pytest.raises(TaskError, match=r"non-finite on test id\(s\) \[1\]"):
        multi_stage_scores(clean, trained, [0, 1], InfluenceConfig(), progress=False)


def test_unknown_solver_name():
    with pytest.raises(ValueError, match="unknown solver 'newton'"):
        SolverConfig("newton")


@pytest.mark.parametrize("method,columns,path", [("auto", 3, "layer_scores"), ("jvp", 3, "directional_derivatives"),
                                                  ("auto", 60, "layer_scores"), ("grad", 60, "per_example_gradients")])
def test_score_memory_is_bounded_by_the_chunk(tiny, monkeypatch, method, columns, path):
    """The streamed pass never touches more than chunk_size examples at once, on every path, and
    every path gives the brute-force inner products with per-example gradients."""
    import precompute.scoring as inf
    task, trained = tiny
    seen = []
    real = getattr(inf, path)

    def spy(task_, p, x, *rest):
        seen.append(len(x))
        return real(task_, p, x, *rest)

    monkeypatch.setattr(inf, path, spy)
    vectors = torch.randn(task.n_pretrain_params, columns, dtype=torch.float64)
    scores = score_pretraining(task, trained.p, vectors, chunk_size=16, progress=False, method=method)
    assert max(seen) == 16 and sum(seen) == task.m
    monkeypatch.undo()
    expected = (per_example_gradients(task, trained.p, task.pretrain_x, task.pretrain_y) @ vectors / task.m).T
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-5, atol=1e-9)


def _with_layers(task: TwoStageTask, embedding: nn.Module) -> TwoStageTask:
    return TwoStageTask(embedding.double(), task.pretrain_head, task.finetune_head, task.pretrain_x, task.pretrain_y,
                        task.finetune_x, task.finetune_y, task.test_x, task.test_y)


class _Twice(nn.Module):
    """One Linear applied twice (shared weights): per-example gradients are sums of two outer products."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(16, 16)
        self.out = nn.Linear(16, 5)

    def forward(self, x):
        return torch.tanh(self.out(torch.tanh(self.layer(torch.tanh(self.layer(x))))))


class _Tokens(nn.Module):
    """A Linear over a [B, 4, 4] input (a 3-D activation): the outer-product path does not apply."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 5)

    def forward(self, x):
        return torch.tanh(self.layer(x.reshape(-1, 4, 4))).mean(1)


@pytest.mark.parametrize("make,expected_slots", [
    (lambda: nn.Sequential(nn.Linear(16, 5), nn.LayerNorm(5), nn.Tanh()), False),   # non-Linear parameters
    (_Twice, True),                                                                  # runtime fallback
    (_Tokens, True),                                                                 # runtime fallback
])
def test_models_outside_the_outer_product_path_fall_back_to_per_example_gradients(tiny, make, expected_slots):
    from precompute.layer_scores import layer_slots
    base, _ = tiny
    torch.manual_seed(0)
    task = _with_layers(base, make())
    assert (layer_slots(task) is not None) == expected_slots
    p = task.initial_pretrain_params()
    vectors = torch.randn(task.n_pretrain_params, 4, dtype=torch.float64)
    scores = score_pretraining(task, p, vectors, chunk_size=16, progress=False)
    expected = (per_example_gradients(task, p, task.pretrain_x, task.pretrain_y) @ vectors / task.m).T
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-5, atol=1e-9)
    if not expected_slots:
        with pytest.raises(TaskError, match="nn.Linear"):
            score_pretraining(task, p, vectors, progress=False, method="linear")
