"""The tiny float64 two-stage task shared by the engine, solver and scoring tests (the ``tiny`` fixture)."""

from __future__ import annotations

from dataclasses import replace

from precompute.config import InfluenceConfig, SolverConfig
from precompute.fd_check import TIGHT, build_check_task
from precompute.influence import multi_stage_scores
from precompute.training import train_stages

EXACT = SolverConfig("exact")


def tiny_task():
    """(task, trained): real digits, both stages trained to machine precision."""
    task = build_check_task(seed=1)
    return task, train_stages(task, replace(TIGHT, alpha=1.0), progress=False)


def scores_with(task, trained, solver: SolverConfig, test_ids=(0, 1, 2, 3), chunk=256):
    config = InfluenceConfig(pretrain_solver=solver, finetune_solver=solver,
                             chunk_size=chunk)
    scores, diagnostics = multi_stage_scores(task, trained, list(test_ids), config, progress=False)
    return scores, diagnostics
