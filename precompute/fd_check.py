"""`python -m precompute check`: is the influence math right on this machine?

Builds a tiny float64 two-stage model on real digits (8x8 pooled to 4x4), trains both stages to
machine precision (L-BFGS, then dense Newton), and compares, for several (pretraining example,
test point) pairs and both scenarios, the formula's d f / d w_z = −score(z, t) with a central finite
difference of the whole pipeline: re-pretrain with weight 1 ± h on z (denominator m fixed),
re-finetune, re-evaluate f (the test loss, or the task's ``measurement``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .config import InfluenceConfig, SolverConfig, TrainConfig
from .influence import multi_stage_scores
from .task import Measurement, TwoStageTask
from .training import TrainedStages, finetune_fixed, finetune_updated, pretrain, train_stages

TOLERANCE = 1e-4
# L-BFGS gets close, dense Newton then reaches machine precision (P is about 100 here).
TIGHT = TrainConfig(max_iter=300, lbfgs_tol=1e-6, grad_tol=1e-12, newton_polish=8)
# Re-solves start at the trained optimum, a perturbation of size h away: Newton alone suffices.
NEWTON = TrainConfig(max_iter=0, grad_tol=1e-12, newton_polish=6)


def build_check_task(seed: int = 0, n_pretrain: int = 60, n_finetune: int = 40, n_test: int = 8,
                     hidden: int = 5) -> TwoStageTask:
    """Tiny float64 task on real digits: pretrain on 0-2, finetune on 3-4, 16 -> hidden tanh embedding."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float64).reshape(-1, 1, 8, 8) / 16.0
    x = nn.functional.avg_pool2d(x, 2).reshape(-1, 16)
    y = torch.tensor(digits.target)
    gen = torch.Generator().manual_seed(seed)

    def pick(classes: list[int], count: int, skip: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.cat([(y == c).nonzero()[:, 0] for c in classes])
        idx = idx[torch.randperm(len(idx), generator=gen)][skip: skip + count]
        labels = torch.tensor([classes.index(int(v)) for v in y[idx]])
        return x[idx], labels

    px, py = pick([0, 1, 2], n_pretrain)
    torch.manual_seed(seed)
    fx_all, fy_all = pick([3, 4], n_finetune + n_test)
    embedding = nn.Sequential(nn.Linear(16, hidden), nn.Tanh())
    task = TwoStageTask(embedding, nn.Linear(hidden, 3), nn.Linear(hidden, 2), px, py,
                        fx_all[:n_finetune], fy_all[:n_finetune], fx_all[n_finetune:], fy_all[n_finetune:],
                        pretrain_l2=1e-2, finetune_l2=1e-2)
    return task.to("cpu", torch.float64)


def pipeline_test_loss(task: TwoStageTask, trained: TrainedStages, scenario: str, z: int, weight: float,
                       test_id: int) -> float:
    """f(x_t) (``task.test_measurement``) after re-pretraining with w_z = weight (others 1) and
    re-finetuning, warm-started."""
    weights = torch.ones(task.m, dtype=task.dtype)
    weights[z] = weight
    p = pretrain(task, NEWTON, weights=weights, p0=trained.p, desc=None).params
    fixed = finetune_fixed(task, p, NEWTON, u0=trained.q("fixed")[task.n_theta:], desc=None).params
    q = fixed if scenario == "fixed" else finetune_updated(
        task, p, trained.alpha, NEWTON, q0=trained.q(scenario), desc=None).params
    return float(task.test_measurement(q, torch.tensor([test_id]))[0])


@dataclass
class CheckResult:
    alpha: float
    step: float
    rows: list[dict] = field(default_factory=list)   # scenario, z, test_id, formula, finite_difference, rel_error

    def max_error(self, scenario: str) -> float:
        return max(r["rel_error"] for r in self.rows if r["scenario"] == scenario)

    @property
    def passed(self) -> bool:
        return all(r["rel_error"] <= TOLERANCE for r in self.rows)


def run_check(test_ids: tuple[int, ...] = (0, 1, 2), per_test: int = 2, alpha: float = 1.0,
              step: float = 1e-3, seed: int = 0, measurement: Measurement | None = None) -> CheckResult:
    """Formula vs central finite difference for the ``per_test`` largest-|score| examples of each
    test id; f is the test loss, or ``measurement`` (e.g. ``precompute.task.correct_class_margin``)."""
    task = build_check_task(seed)
    task.measurement = measurement
    trained = train_stages(task, TIGHT, alpha, progress=False)
    exact = SolverConfig("exact")
    config = InfluenceConfig(alpha=alpha, pretrain_solver=exact, finetune_solver=exact)
    scores, _ = multi_stage_scores(task, trained, list(test_ids), config, progress=False)
    result = CheckResult(alpha, step)
    for scenario, matrix in scores.items():
        for row, t in enumerate(test_ids):
            for z in np.argsort(-np.abs(matrix[row]))[:per_test]:
                up = pipeline_test_loss(task, trained, scenario, int(z), 1 + step, t)
                down = pipeline_test_loss(task, trained, scenario, int(z), 1 - step, t)
                fd = (up - down) / (2 * step)
                formula = -float(matrix[row, z])
                result.rows.append({"scenario": scenario, "z": int(z), "test_id": int(t), "formula": formula,
                                    "finite_difference": fd, "rel_error": abs(formula - fd) / abs(fd)})
    return result
