"""Chunked pretraining objective (precompute.streaming) against autograd over the whole set.

Value, gradient and Hessian-vector products of ``StreamedPretrainObjective`` are checked against
``torch.func`` on the in-memory objective (dense Hessian by brute force); training, the pretraining
solve and scoring on a memory-mapped (``LazyRows``) task against the same steps on the in-memory
task; the data-parallel HVP with streamed shards against the dense Hessian, in one process and on
two gloo ranks.
"""

from __future__ import annotations

from dataclasses import replace

import copy

import numpy as np
import pytest
import torch

from precompute.config import InfluenceConfig, SolverConfig
from precompute.curvature import distributed_pretrain_hvp, pretrain_shard_objective
from precompute.distributed import shard_range
from precompute.scoring import score_in_blocks
from precompute.fd_check import TIGHT, build_check_task
from precompute.influence import multi_stage_scores, pretrain_solver, stacked_test_vectors
from precompute.streaming import LazyRows, StreamedPretrainObjective, pretraining_objective
from precompute.training import pretrain, train_stages
from ranks import run_on_ranks

M = 61            # the check task's pretraining set; chunk sizes below include ones that do not divide it
TEST_IDS = [0, 1, 2]
CONFIG = InfluenceConfig(pretrain_solver=SolverConfig("exact"), finetune_solver=SolverConfig("exact"),
                         chunk_size=8)


@pytest.fixture(scope="module")
def task():
    return build_check_task(n_pretrain=M)


@pytest.fixture(scope="module")
def point(task):
    """A generic point (not an optimum) and example weights in [0, 2)."""
    gen = torch.Generator().manual_seed(0)
    p = task.initial_pretrain_params() + 0.3 * torch.randn(task.n_pretrain_params, dtype=task.dtype, generator=gen)
    weights = 2 * torch.rand(task.m, dtype=task.dtype, generator=gen)
    v = torch.randn(task.n_pretrain_params, 5, dtype=task.dtype, generator=gen)
    return p, weights, v


def lazy_copy(task, tmp_path):
    """The same task with its pretraining set memory-mapped from .npy files."""
    np.save(tmp_path / "x.npy", task.pretrain_x.numpy())
    np.save(tmp_path / "y.npy", task.pretrain_y.numpy())
    lazy = copy.copy(task)
    lazy.pretrain_x = LazyRows(np.load(tmp_path / "x.npy", mmap_mode="r"), dtype=task.dtype)
    lazy.pretrain_y = LazyRows(np.load(tmp_path / "y.npy", mmap_mode="r"))
    return lazy


@pytest.mark.parametrize("chunk", [1, 7, 16, M, 100])
@pytest.mark.parametrize("weighted", [False, True])
def test_value_grad_hvp_match_autograd(task, point, chunk, weighted):
    p, weights, v = point
    w = weights if weighted else None
    full = lambda pp: task.pretrain_objective(pp, w)            # noqa: E731
    hessian = torch.func.hessian(full)(p)                        # brute force, P x P
    streamed = StreamedPretrainObjective(task, w, chunk)
    value, gradient = streamed.value_and_grad(p)
    torch.testing.assert_close(value, full(p), rtol=1e-13, atol=0)
    torch.testing.assert_close(streamed(p), full(p), rtol=1e-13, atol=0)
    torch.testing.assert_close(gradient, torch.func.grad(full)(p), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(streamed.hvp(p, rhs_block=2)(v), hessian @ v, rtol=1e-12, atol=1e-14)
    assert streamed.passes == 3


def test_shards_sum_to_the_objective(task, point):
    """rows = a shard: its data term only (full denominator m, no L2); the shards plus L2 once give L_P."""
    p, weights, v = point
    hessian = torch.func.hessian(lambda pp: task.pretrain_objective(pp, weights))(p)
    total_value, total_hv = 0.0, torch.zeros_like(v)
    for rank in range(3):
        sl = shard_range(task.m, rank, 3)
        part = StreamedPretrainObjective(task, weights, chunk_size=6, rows=sl)
        losses = task.pretrain_losses(p, task.pretrain_x[sl], task.pretrain_y[sl])
        torch.testing.assert_close(part(p), (weights[sl] * losses).sum() / task.m, rtol=1e-13, atol=0)
        total_value = total_value + part(p)
        total_hv += part.hvp(p)(v)
    l2 = task.pretrain_l2
    torch.testing.assert_close(total_value + 0.5 * l2 * (p @ p), task.pretrain_objective(p, weights), rtol=1e-13, atol=0)
    torch.testing.assert_close(total_hv + l2 * v, hessian @ v, rtol=1e-12, atol=1e-14)


def test_data_parallel_hvp_streams_shards(task, point, tmp_path):
    """One process: the chunked shard objective is chosen for chunk_size > 0 or a LazyRows task."""
    p, _, v = point
    expected = torch.func.hessian(task.pretrain_objective)(p) @ v
    lazy = lazy_copy(task, tmp_path)
    assert isinstance(pretrain_shard_objective(lazy), StreamedPretrainObjective)
    assert not isinstance(pretrain_shard_objective(task), StreamedPretrainObjective)
    for hvp in (distributed_pretrain_hvp(task, p, chunk_size=7), distributed_pretrain_hvp(lazy, p)):
        torch.testing.assert_close(hvp(v), expected, rtol=1e-12, atol=1e-14)


def _two_rank_streamed_hvp(rank, world, task, p, v):
    return distributed_pretrain_hvp(task, p, chunk_size=7, rhs_block=2)(v)


def test_two_ranks_streamed_hvp(task, point):
    p, _, v = point
    expected = torch.func.hessian(task.pretrain_objective)(p) @ v
    for hv in run_on_ranks(_two_rank_streamed_hvp, 2, task, p, v):
        torch.testing.assert_close(hv, expected, rtol=1e-12, atol=1e-14)


def test_lazy_task_trains_solves_and_scores_like_in_memory(task, tmp_path):
    lazy = lazy_copy(task, tmp_path)
    assert isinstance(pretraining_objective(lazy), StreamedPretrainObjective)
    trained = train_stages(task, replace(TIGHT, alpha=0.1), progress=False)
    trained_lazy = train_stages(lazy, replace(TIGHT, alpha=0.1), progress=False)
    # both reach a certified minimum (L-BFGS, then Newton on the chunked Hessian); two stationary points of
    # one strict minimum lie within (‖g₁‖ + ‖g₂‖)/λ_min of each other, whatever rounding each machine does
    for a, b in zip(trained_lazy.stages().values(), trained.stages().values()):
        assert a.certified and b.certified
        bound = 2 * (a.grad_norm + b.grad_norm) / min(a.eig_min, b.eig_min) + 1e-12
        assert float((a.params - b.params).norm()) <= bound, (float((a.params - b.params).norm()), bound)

    # the pretraining solve on the streamed Hessian, at the same parameters: same test-side vectors
    vectors, _ = stacked_test_vectors(task, trained, TEST_IDS, CONFIG)
    vectors_lazy, diag = stacked_test_vectors(lazy, trained, TEST_IDS, CONFIG)
    for s in CONFIG.scenarios:
        torch.testing.assert_close(vectors_lazy[s], vectors[s], rtol=1e-9, atol=1e-12)
        assert diag[s]["pretrain_solve"]["relative_residual"] < 1e-10

    # end to end on the lazy task (its own training): the in-memory scores, in memory and block-wise
    expected, _ = multi_stage_scores(task, trained, TEST_IDS, CONFIG, progress=False)
    scores, _ = multi_stage_scores(lazy, trained_lazy, TEST_IDS, CONFIG, progress=False)
    stacked = torch.cat([vectors_lazy[s] for s in CONFIG.scenarios], dim=1)
    blocks = np.empty((stacked.shape[1], task.m), dtype=np.float32)
    score_in_blocks(lazy, trained.p, stacked, slice(0, task.m), blocks, chunk_size=5, block_size=20)
    for i, s in enumerate(CONFIG.scenarios):
        np.testing.assert_allclose(scores[s], expected[s], rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(blocks[i * 3: (i + 1) * 3], expected[s], rtol=1e-5, atol=1e-9)


def test_stream_chunk_streams_an_in_memory_task(task):
    """TrainConfig.stream_chunk > 0 streams a task held in memory; same optimum."""
    from dataclasses import replace
    reference = pretrain(task, TIGHT, desc=None)
    streamed = pretrain(task, replace(TIGHT, stream_chunk=9), desc=None)
    assert streamed.certified and reference.certified
    # both stationary to within their gradients: ‖Δp‖ ≤ (‖g₁‖ + ‖g₂‖)/λ_min (factor 2 for the Hessian's variation)
    bound = 2 * (streamed.grad_norm + reference.grad_norm) / min(streamed.eig_min, reference.eig_min) + 1e-12
    assert float((streamed.params - reference.params).norm()) <= bound
    with pytest.raises(ValueError):
        replace(TIGHT, stream_chunk=-1)


def test_solver_on_lazy_task_uses_streamed_hvp(task, point, tmp_path):
    p, _, v = point
    solver = pretrain_solver(lazy_copy(task, tmp_path), p, SolverConfig("cg", damping=0.5))
    torch.testing.assert_close(solver.hvp(v), torch.func.hessian(task.pretrain_objective)(p) @ v,
                               rtol=1e-12, atol=1e-14)
