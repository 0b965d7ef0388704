"""Retraining's truncated Newton (CG on each model's own Hessian products, preconditioned by a shared M)
against brute force: dense per-model Newton to machine precision, and a double well whose start sees
negative curvature."""

from __future__ import annotations

import torch
from torch.func import grad, hessian

from precompute.retraining import Preconditioner, _newton_cg, batched_hvp_rows, solve_stage, truncated_newton

F64 = {"dtype": torch.float64}


def logistic_problem(b: int = 5, n: int = 80, d: int = 12, seed: int = 0):
    """Weighted L2-regularised logistic regression: objective(x, w), B weight rows with removals."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=gen, **F64)
    y = torch.sign(torch.randn(n, generator=gen, **F64))

    def objective(x, w):
        return (w * torch.nn.functional.softplus(-y * (a @ x))).sum() / n + 0.5e-2 * (x * x).sum()

    weights = torch.ones(b, n, **F64)
    for r in range(1, b):                      # remove 0, 1, 4, 9, 16 examples
        weights[r, : r * r] = 0.0
    return objective, weights, d


def dense_newton(objective, x, w, steps: int = 30):
    for _ in range(steps):
        x = x - torch.linalg.solve(hessian(objective)(x, w), grad(objective)(x, w))
    return x


def test_truncated_newton_reaches_each_models_own_minimum_quadratically():
    objective, weights, d = logistic_problem()
    x_star = dense_newton(objective, torch.zeros(d, **F64), weights[0])
    shared = Preconditioner.at(lambda x: objective(x, weights[0]), x_star, "test")
    fit = truncated_newton(objective, x_star.expand(len(weights), -1), weights, shared, tol=1e-12)
    assert bool(fit.converged.all()), fit.grad_norm
    assert fit.iterations <= 6                                        # Newton, not a first-order method
    for b in range(len(weights)):
        reference = dense_newton(objective, x_star, weights[b])
        torch.testing.assert_close(fit.params[b], reference, rtol=1e-9, atol=1e-11)


def test_newton_cg_solves_each_rows_system_and_skips_finished_rows():
    objective, weights, d = logistic_problem()
    x = torch.randn(len(weights), d, generator=torch.Generator().manual_seed(3), **F64) * 0.1
    g = torch.stack([grad(objective)(x[b], weights[b]) for b in range(len(x))])
    calls = []
    product = batched_hvp_rows(objective, x, weights)

    def counting(v, rows):
        calls.append(len(rows))
        return product(v, rows)

    step = _newton_cg(counting, g, lambda v, rows: v, max_iter=200)
    for b in range(len(x)):
        h = hessian(objective)(x[b], weights[b])
        exact = -torch.linalg.solve(h, g[b])
        # CG stops at the forcing residual min(0.5, √‖g‖)·‖g‖: the step solves H d = −g to that accuracy
        forcing = min(0.5, float(g[b].norm()) ** 0.5)
        assert float((h @ step[b] + g[b]).norm()) <= forcing * float(g[b].norm()) * (1 + 1e-9)
        assert float((step[b] - exact).norm()) < float(exact.norm())
    assert calls == sorted(calls, reverse=True) and calls[-1] < calls[0]       # finished rows drop out


def test_truncated_newton_leaves_negative_curvature_for_a_minimum():
    """A double well x0⁴/4 − x0²/2 + x1²/2 started on the hump (H has a negative eigenvalue there)."""
    def objective(x, scale):
        return scale * (x[0] ** 4 / 4 - x[0] ** 2 / 2 + x[1] ** 2 / 2)

    starts = torch.tensor([[0.05, 0.3], [-0.2, -0.1], [0.5, 1.0]], **F64)
    data = torch.ones(3, **F64)
    assert torch.linalg.eigvalsh(hessian(objective)(starts[0], data[0]))[0] < 0
    fit = truncated_newton(objective, starts, data, lambda v, rows: v, tol=1e-12, max_steps=40)
    assert bool(fit.converged.all())
    torch.testing.assert_close(fit.params.abs(), torch.tensor([[1.0, 0.0]] * 3, **F64), rtol=0, atol=1e-9)


def test_solve_stage_without_per_model_hessians_finishes_stragglers_by_newton():
    """Shared-M L-BFGS capped at 2 steps leaves the large removals; truncated Newton finishes them."""
    objective, weights, d = logistic_problem()
    x_star = dense_newton(objective, torch.zeros(d, **F64), weights[0])
    shared = Preconditioner.at(lambda x: objective(x, weights[0]), x_star, "test")
    fit, built = solve_stage(objective, x_star.expand(len(weights), -1), weights, shared, 1e-12, max_iter=2,
                             what="test", per_model=False)
    assert built == 0 and bool(fit.converged.all())
    for b in range(len(weights)):
        torch.testing.assert_close(fit.params[b], dense_newton(objective, x_star, weights[b]), rtol=1e-9, atol=1e-11)
