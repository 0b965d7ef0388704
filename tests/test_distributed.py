"""Scale-out: two gloo processes on 127.0.0.1 (``ranks.run_on_ranks``) give the single-process results.

One two-rank run checks scores (gathered and memory-mapped), the data-parallel HVP, the exact and
cg solves on it, and a committed run directory; one checks the data-parallel pcg and ekfac solves
(scores, and EK-FAC factors fitted shard by shard); two more runs check that a failing rank (a caught
error mid-scoring, and an uncaught one before the commit barrier) propagates and leaves nothing.
"""

from __future__ import annotations

from dataclasses import replace

import copy
import os
import signal
import time

import numpy as np
import pandas as pd
import pytest
import torch

from precompute.config import InfluenceConfig, SolverConfig
from precompute.curvature import batched_hvp, distributed_pretrain_hvp
from precompute.distributed import raise_on_sigterm, shard_range, torchrun_env
from precompute.run_commit import commit_after_barrier, rank_zero_writer
from precompute.fd_check import TIGHT, build_check_task
from precompute.influence import multi_stage_scores, stacked_test_vectors
from precompute.runstore import list_runs, open_run
from precompute.scoring import score_in_blocks, score_pretraining, write_scores_memmap
from precompute.streaming import LazyRows
from precompute.training import train_stages
from ranks import run_on_ranks

TEST_IDS = [0, 1, 2]
ALPHA = 0.1
EXACT = SolverConfig("exact")


def influence_config(pretrain_solver: str = "exact") -> InfluenceConfig:
    return InfluenceConfig(pretrain_solver=SolverConfig(pretrain_solver), finetune_solver=EXACT,
                           chunk_size=8)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def trained_task():
    # m = 61: the two shards differ in size (31 / 30), which exercises the padded gather
    task = build_check_task(n_pretrain=61)
    return task, train_stages(task, replace(TIGHT, alpha=ALPHA), progress=False)


# ---- single-process pieces ---------------------------------------------------------------------------

def test_shard_range_tiles_balanced():
    for m in (0, 1, 5, 61, 1000):
        for world in (1, 2, 3, 7):
            shards = [shard_range(m, r, world) for r in range(world)]
            assert shards[0].start == 0 and shards[-1].stop == m
            assert all(a.stop == b.start for a, b in zip(shards, shards[1:]))
            sizes = [s.stop - s.start for s in shards]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        shard_range(10, 2, 2)


def test_torchrun_env_parsing():
    assert torchrun_env({}) is None
    env = torchrun_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (env.rank, env.world_size, env.local_rank) == (3, 4, 1)
    with pytest.raises(ValueError):
        torchrun_env({"RANK": "4", "WORLD_SIZE": "4"})


def test_blocks_and_memmaps_match_one_pass(trained_task, tmp_path):
    """Block-wise scoring from a memory-mapped input into a memory-mapped output = one plain pass."""
    task, trained = trained_task
    vectors = torch.randn(task.n_pretrain_params, 5, dtype=task.dtype, generator=torch.Generator().manual_seed(1))
    reference = score_pretraining(task, trained.p, vectors, chunk_size=16, progress=False)

    np.save(tmp_path / "x.npy", task.pretrain_x.numpy())
    np.save(tmp_path / "y.npy", task.pretrain_y.numpy())
    lazy = copy.copy(task)
    lazy.pretrain_x = LazyRows(np.load(tmp_path / "x.npy", mmap_mode="r"), dtype=task.dtype)
    lazy.pretrain_y = LazyRows(np.load(tmp_path / "y.npy", mmap_mode="r"))
    out = write_scores_memmap(tmp_path / "scores.npy", (5, task.m))
    score_in_blocks(lazy, trained.p, vectors, slice(0, task.m), out, chunk_size=7, block_size=20)
    out.flush()
    np.testing.assert_allclose(np.load(tmp_path / "scores.npy", allow_pickle=False), reference, rtol=1e-6, atol=1e-12)


def test_sigterm_aborts_the_writer(tmp_path):
    """torchrun / mp.spawn SIGTERM the surviving ranks: the handler deletes the temporary run."""
    previous = signal.getsignal(signal.SIGTERM)
    try:
        raise_on_sigterm()
        with pytest.raises(SystemExit):
            with rank_zero_writer(tmp_path / "run") as writer:
                writer.save_array("scores/fixed.npy", np.zeros((1, 2), np.float32))
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)                       # the handler raises here
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert list(tmp_path.iterdir()) == []


# ---- two ranks ---------------------------------------------------------------------------------------

def _minimal_run_files(writer, task, scenarios) -> dict:
    """Tables, images and manifest a committed run needs besides its scores (contents are dummies)."""
    m, n = task.m, len(task.test_x)
    writer.save_table("pretrain.parquet", pd.DataFrame({
        "id": np.arange(m), "label": task.pretrain_y.numpy(), "label_name": [str(v) for v in task.pretrain_y.tolist()],
        "source": [f"check#{i}" for i in range(m)], "pretrain_loss": np.zeros(m), "predicted_label": np.zeros(m, int)}))
    test = pd.DataFrame({"id": np.arange(n), "label": task.test_y.numpy(),
                         "label_name": [str(v) for v in task.test_y.tolist()], "source": [f"t#{i}" for i in range(n)]})
    for s in scenarios:
        test[f"pred_{s}"], test[f"loss_{s}"], test[f"correct_{s}"] = 0, 0.0, False
    writer.save_table("finetune_test.parquet", test)
    writer.save_array("images/pretrain.npy", np.zeros((m, 4, 4), np.uint8))
    writer.save_array("images/finetune_test.npy", np.zeros((n, 4, 4), np.uint8))
    return {"preset": "custom", "modality": "image", "n_pretrain": m, "n_finetune_test": n,
            "test_points": TEST_IDS, "validation_test_points": [], "scenarios": list(scenarios),
            "pretrain_class_names": ["0", "1", "2"], "finetune_class_names": ["3", "4"], "pretrain_accuracy": 0.0,
            "finetune_accuracy": {s: 0.0 for s in scenarios}, "validation": {}, "baselines": {},
            "group_removal": {}, "validation_protocol": "not run", "timings_s": {}, "diagnostics": {},
            "config": {}, "label_noise": None, "mislabel_detection": None, "image_shape": [4, 4]}


def _two_rank_checks(rank, world, task, trained, run_dir):
    out = {}
    config = influence_config()
    scores, _ = multi_stage_scores(task, trained, TEST_IDS, config)              # vectors from rank 0
    out["gathered"] = scores
    v = torch.randn(task.n_pretrain_params, 5, dtype=task.dtype, generator=torch.Generator().manual_seed(2))
    out["hvp"] = distributed_pretrain_hvp(task, trained.p)(v)
    for name in ("exact", "cg"):
        out[name] = stacked_test_vectors(task, trained, TEST_IDS, influence_config(name), data_parallel=True)[0]
    with rank_zero_writer(run_dir) as writer:
        mapped, _ = multi_stage_scores(task, trained, TEST_IDS, config, distributed_solve=True,
                                       out_dir=None if writer is None else writer.path)
        manifest = None
        if writer is not None:
            out["mapped"] = {s: np.array(a) for s, a in mapped.items()}
            manifest = _minimal_run_files(writer, task, config.scenarios)
        out["committed"] = commit_after_barrier(writer, manifest)
    return out


def test_two_ranks_match_single_process(trained_task, tmp_path):
    task, trained = trained_task
    ranks = run_on_ranks(_two_rank_checks, 2, task, trained, tmp_path / "run")
    expected, _ = multi_stage_scores(task, trained, TEST_IDS, influence_config(), progress=False)
    zero, one = ranks
    assert one["gathered"] is None and "mapped" not in one
    for s in ("fixed", "updated"):
        assert zero["gathered"][s].dtype == np.float32 and zero["gathered"][s].shape == (3, 61)
        np.testing.assert_allclose(zero["gathered"][s], expected[s], rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(zero["mapped"][s], expected[s], rtol=1e-6, atol=1e-12)

    v = torch.randn(task.n_pretrain_params, 5, dtype=task.dtype, generator=torch.Generator().manual_seed(2))
    single = batched_hvp(task.pretrain_objective, trained.p)(v)
    for r in ranks:
        torch.testing.assert_close(r["hvp"], single, rtol=1e-10, atol=1e-13)

    # exact: the same dense Hessian up to summation order; cg: the same iteration, stopped at a relative
    # residual of 1e-6, so the two runs agree to about that (measured 2e-7), and both with exact (8e-7)
    exact, _ = stacked_test_vectors(task, trained, TEST_IDS, influence_config("exact"))
    cg, _ = stacked_test_vectors(task, trained, TEST_IDS, influence_config("cg"))
    for s in ("fixed", "updated"):
        assert relative_error(zero["exact"][s], exact[s]) < 1e-10
        assert relative_error(zero["cg"][s], cg[s]) < 1e-5
        assert relative_error(zero["cg"][s], exact[s]) < 1e-5
        for name in ("exact", "cg"):
            assert torch.equal(zero[name][s], one[name][s])        # broadcast: identical on every rank

    assert zero["committed"] == one["committed"] == tmp_path / "run"
    assert list_runs(tmp_path) == ["run"]
    np.testing.assert_allclose(open_run(tmp_path, "run").scores("updated"), expected["updated"], rtol=1e-6, atol=1e-12)


KFAC = ("pcg", "ekfac")


def kfac_config(name: str) -> InfluenceConfig:
    solver = SolverConfig(name, tol=1e-10)
    return InfluenceConfig(pretrain_solver=solver, finetune_solver=solver, chunk_size=8)


def _fitted(task, trained, n: int, data_parallel: bool) -> list:
    """Pretraining factors (Λ, then the fallback diagonal) over the first n examples."""
    from precompute.ekfac import fit_ekfac
    from precompute.layers import pretrain_roots

    factors = fit_ekfac(task.pretrain_outputs, task.pretrain_loss, trained.p, task.pretrain_x[:n],
                        task.pretrain_y[:n], n, pretrain_roots(task), chunk_size=16, data_parallel=data_parallel)
    return [*factors.lam, factors.diag]


def _two_rank_kfac(rank, world, task, trained):
    """Scores of pcg and ekfac with the data-parallel solve (the torchrun default), and factors fitted
    shard by shard (m = 61: shards of 31 and 30 in chunks of 16; n = 1: rank 1's shard is empty)."""
    out = {name: multi_stage_scores(task, trained, TEST_IDS, kfac_config(name), progress=False,
                                    distributed_solve=True) for name in KFAC}
    out["factors"] = {n: _fitted(task, trained, n, True) for n in (task.m, 1)}
    return out


def test_two_ranks_pcg_and_ekfac_match_single_process(trained_task):
    """Data-parallel pcg is exact (tol 1e-10), so it agrees with one process; ekfac's factors are
    fitted over each rank's shard and all-reduced, so they are one process's (up to summation
    order) and its approximate scores agree too."""
    task, trained = trained_task
    zero, one = run_on_ranks(_two_rank_kfac, 2, task, trained)
    for n in (task.m, 1):
        for got0, got1, want in zip(zero["factors"][n], one["factors"][n], _fitted(task, trained, n, False)):
            assert torch.equal(got0, got1)                              # broadcast: identical on every rank
            torch.testing.assert_close(got0, want, rtol=1e-10, atol=1e-14)
    for name in KFAC:
        expected, _ = multi_stage_scores(task, trained, TEST_IDS, kfac_config(name), progress=False)
        scores, diagnostics = zero[name]
        assert one[name][0] is None
        for s in ("fixed", "updated"):
            assert diagnostics[s]["pretrain_solve"]["solver"] == name and diagnostics[s]["world_size"] == 2
            np.testing.assert_allclose(scores[s], expected[s], rtol=1e-5, atol=1e-6 * np.abs(expected[s]).max())


def _fail_mid_scoring(rank, world, task, trained, run_dir):
    if rank == 1:       # a NaN input in rank 1's shard: TaskError raised inside the scoring pass
        task.pretrain_x = task.pretrain_x.clone()
        task.pretrain_x[45] = float("nan")
    with rank_zero_writer(run_dir) as writer:
        assert (writer is None) or writer.path.exists()
        scores, _ = multi_stage_scores(task, trained, TEST_IDS, influence_config(),
                                       out_dir=None if writer is None else writer.path)
        commit_after_barrier(writer, None)


def _crash_before_commit(rank, world, task, trained, run_dir):
    with rank_zero_writer(run_dir) as writer:
        multi_stage_scores(task, trained, TEST_IDS, influence_config(),
                           out_dir=None if writer is None else writer.path)
        if rank == 1:
            raise RuntimeError("rank 1 crashed outside any agreement")
        commit_after_barrier(writer, None)


@pytest.mark.slow          # two spawned processes per case that fail on purpose and clean up (about 15 s each)
@pytest.mark.parametrize("fn, message", [(_fail_mid_scoring, "pretraining example 45"),
                                         (_crash_before_commit, "crashed")])
def test_failing_rank_leaves_no_run(trained_task, tmp_path, fn, message):
    task, trained = trained_task
    with pytest.raises(Exception, match=message):
        run_on_ranks(fn, 2, task, trained, tmp_path / "run", timeout_s=60)
    assert list(tmp_path.iterdir()) == []          # neither the run nor its temporary sibling
