"""The scoring pass against brute force: per-example gradients, inner products, chunking, precision,
memory and the fallback paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from precompute.config import InfluenceConfig
from precompute.fd_check import build_check_task
from precompute.influence import multi_stage_scores, stacked_test_vectors
from precompute.scoring import per_example_gradients, precision_check, score_pretraining
from precompute.task import TaskError, TwoStageTask

from tiny_task import EXACT, scores_with


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


def test_scores_do_not_depend_on_chunk_size(tiny):
    task, trained = tiny
    a, _ = scores_with(task, trained, EXACT, chunk=1)
    b, _ = scores_with(task, trained, EXACT, chunk=7)
    c, _ = scores_with(task, trained, EXACT, chunk=10_000)
    for s in a:
        np.testing.assert_allclose(a[s], b[s], rtol=1e-6, atol=1e-10)
        np.testing.assert_allclose(a[s], c[s], rtol=1e-6, atol=1e-10)


def test_bfloat16_scoring_is_reported_against_full_precision(tiny):
    """--score-precision bfloat16: autocast really lowers the precision, the scores still track
    float64, and precision_check's sampled figures agree with the full comparison."""
    task64, trained64 = tiny
    ref, _ = scores_with(task64, trained64, EXACT)
    task32 = build_check_task(seed=1).to("cpu", torch.float32)
    from precompute.training import TrainedStages, TrainResult
    cast = lambda r: TrainResult(r.params.float(), r.objective, r.grad_norm, r.iterations, r.converged)
    trained32 = TrainedStages(cast(trained64.pretrain), {s: cast(r) for s, r in trained64.finetune.items()}, 1.0)
    config = InfluenceConfig(pretrain_solver=EXACT, finetune_solver=EXACT, score_precision="bfloat16")
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
        pretrain_solver=EXACT, finetune_solver=EXACT))
    for s, check in precision_check(task64, trained64.p, vectors, ref, n_sample=7).items():
        assert check["n_sample"] == 7 and check["max_rel_error"] < 1e-6 and check["pearson_vs_full"] > 1 - 1e-9
    with pytest.raises(TaskError, match="float32"):
        score_pretraining(task64, trained64.p, torch.zeros(task64.n_pretrain_params, 1, dtype=torch.float64),
                          progress=False, precision="bfloat16")


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
