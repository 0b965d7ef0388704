"""`python -m precompute check`: is the influence math right on this machine?

Builds a tiny float64 two-stage model on real digits (8x8 pooled to 4x4), trains both stages to
machine precision (L-BFGS, then dense Newton), and compares, for several (pretraining example,
test point) pairs and both scenarios, the formula's d f / d w_z = −score(z, t) (float64, exact
solves) with a finite difference of the whole pipeline: re-pretrain with weight 1 ± h on z
(denominator m fixed), re-finetune, re-evaluate f (the test loss, or the task's ``measurement``).

The printed error must not depend on the machine or the thread count, so neither rounding nor
convergence noise may dominate it:
- every re-solve takes a fixed number of plain Newton steps from the trained optimum (no
  objective-decrease test, which stops at a machine-dependent point near the rounding floor), so
  each re-solved loss is exact to rounding;
- the steps are large (h = 1e-2 and h/2), so a loss difference is ~1e-5 and rounding contributes
  ~1e-11 relative, and Richardson extrapolation D = (4·D(h/2) − D(h)) / 3 of the two central
  differences cancels their h² truncation term, leaving O(h⁴): a deterministic ~1e-9 figure,
  printed to two significant digits.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from .config import InfluenceConfig, SolverConfig, TrainConfig
from .curvature import batched_hvp, dense_hessian
from .influence import stacked_test_vectors
from .scoring import per_example_gradients
from .task import Measurement, TwoStageTask
from .training import TrainedStages, train_stages

TOLERANCE = 1e-4
# L-BFGS gets close, dense Newton then reaches machine precision (P is about 100 here).
TIGHT = TrainConfig(max_iter=300, lbfgs_tol=1e-6, grad_tol=1e-12, newton_polish=8)
STEP = 1e-2
"""h: central differences at weights 1 ± h and 1 ± h/2, then Richardson extrapolation."""
NEWTON_STEPS = 6
"""Plain Newton steps per re-solve (the start is O(h) away: quadratic convergence to rounding)."""
NEWTON = TrainConfig(max_iter=0, grad_tol=1e-12, newton_polish=6)
"""Newton-only TrainConfig for tests that re-solve one stage with the training code."""


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


def newton(objective, x0: torch.Tensor, steps: int = NEWTON_STEPS) -> torch.Tensor:
    """``steps`` plain Newton steps x ← x − H(x)⁻¹∇(x), every one taken (deterministic end point)."""
    x = x0.detach().clone()
    for _ in range(steps):
        g = torch.func.grad(objective)(x)
        h = dense_hessian(batched_hvp(objective, x), x.numel(), x.dtype, x.device)
        x = x - torch.linalg.solve(h, g)
    return x


def pipeline_test_loss(task: TwoStageTask, trained: TrainedStages, scenario: str, z: int, weight: float,
                       test_id: int) -> float:
    """f(x_t) (``task.test_measurement``) after re-pretraining with w_z = weight (others 1) and
    re-finetuning, warm-started."""
    weights = torch.ones(task.m, dtype=task.dtype)
    weights[z] = weight
    p = newton(lambda pp: task.pretrain_objective(pp, weights), trained.p)
    theta = task.theta_of(p)
    if scenario == "fixed":
        u = newton(lambda uu: task.finetune_objective(torch.cat([theta, uu])), trained.q("fixed")[task.n_theta:])
        q = torch.cat([theta, u])
    else:
        q = newton(lambda qq: task.finetune_objective(qq, theta, trained.alpha), trained.q(scenario))
    return float(task.test_measurement(q, torch.tensor([test_id]))[0])


def central_difference(task: TwoStageTask, trained: TrainedStages, scenario: str, z: int, t: int, h: float) -> float:
    up = pipeline_test_loss(task, trained, scenario, z, 1 + h, t)
    down = pipeline_test_loss(task, trained, scenario, z, 1 - h, t)
    return (up - down) / (2 * h)


@dataclass
class CheckResult:
    alpha: float
    step: float
    m: int = 0
    n_params: tuple[int, int] = (0, 0)                # pretraining P, finetuning Q
    rows: list[dict] = field(default_factory=list)   # scenario, z, test_id, formula, finite_difference, rel_error

    def max_error(self, scenario: str) -> float:
        return max(r["rel_error"] for r in self.rows if r["scenario"] == scenario)

    @property
    def passed(self) -> bool:
        return all(r["rel_error"] <= TOLERANCE for r in self.rows)

    def describe(self) -> list[str]:
        """What was compared and how, for the command's output."""
        p, q = self.n_params
        return [
            f"task: tiny float64 two-stage model on real digits (pretrain on 0-2, m = {self.m}; finetune on 3-4; "
            f"P = {p}, Q = {q}), both stages trained to machine precision",
            "formula: d f/d w_z = -score(z, t) = [g_t; 0]^T H_P^-1 grad l_P(z) / m, test-side vectors from exact (dense) solves, "
            "per-example gradients, all in float64",
            f"finite difference: re-pretrain with w_z = 1 +/- h, re-finetune, re-evaluate f (each re-solve: "
            f"{NEWTON_STEPS} Newton steps from the trained optimum); central differences at h = {self.step:g} and "
            f"h/2, Richardson-extrapolated: (4 D(h/2) - D(h)) / 3, error O(h^4)",
            f"pairs: for each of {len({r['test_id'] for r in self.rows})} test points, the "
            f"{len(self.rows) // (2 * max(1, len({r['test_id'] for r in self.rows})))} pretraining examples with the "
            "largest |score|, in each scenario",
        ]


def run_check(test_ids: tuple[int, ...] = (0, 1, 2), per_test: int = 2, alpha: float = 1.0,
              step: float = STEP, seed: int = 0, measurement: Measurement | None = None) -> CheckResult:
    """Formula vs extrapolated finite difference for the ``per_test`` largest-|score| examples of each
    test id; f is the test loss, or ``measurement`` (e.g. ``precompute.task.correct_class_margin``)."""
    task = build_check_task(seed)
    task.measurement = measurement
    trained = train_stages(task, replace(TIGHT, alpha=alpha), progress=False)
    exact = SolverConfig("exact")
    config = InfluenceConfig(pretrain_solver=exact, finetune_solver=exact)
    vectors, _ = stacked_test_vectors(task, trained, list(test_ids), config)
    grads = per_example_gradients(task, trained.p, task.pretrain_x, task.pretrain_y)      # [m, P] float64
    result = CheckResult(alpha, step, task.m, (task.n_pretrain_params, task.n_finetune_params))
    for scenario in config.scenarios:
        matrix = (grads @ vectors[scenario]).T.detach().numpy() / task.m                     # scores [T, m]
        for row, t in enumerate(test_ids):
            for z in np.argsort(-np.abs(matrix[row]))[:per_test]:
                coarse = central_difference(task, trained, scenario, int(z), t, step)
                fine = central_difference(task, trained, scenario, int(z), t, step / 2)
                fd = (4 * fine - coarse) / 3
                formula = -float(matrix[row, z])
                result.rows.append({"scenario": scenario, "z": int(z), "test_id": int(t), "formula": formula,
                                    "finite_difference": fd, "rel_error": abs(formula - fd) / abs(fd),
                                    "plain_rel_error": abs(formula - fine) / abs(fine)})
    return result
