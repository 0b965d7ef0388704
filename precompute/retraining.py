"""Ground truth by actual retraining: both stages, for many example-weight vectors at once.

Each row ``w_b`` of a weight matrix [B, m] (1 = keep, 0 = removed; the denominator m stays fixed,
design.md §3) defines a retrained chain

    p_b       = argmin_p L_P(p; w_b)                                    warm start p*
    fixed:    U_b = argmin_U L_F(θ_b, U),  q_b = [θ_b; U_b]            warm start U*_fixed
    updated:  q_b = argmin_q L_F(q) + (α/2)‖θ − θ_b‖²                  warm start q*_updated

Optimiser: preconditioned fixed-point Newton, x ← x − t·M⁻¹∇L_b(x), with M the dense Hessian of the
*unperturbed* objective at the trained optimum (plus a tiny damping), eigendecomposed once and
shared by all B models; the gradients of all models come from one ``vmap(grad_and_value)`` call.
Removing a few of m examples changes the Hessian by O(k/m), so the iteration contracts by about
that factor per step (a handful of steps to 1e-10); large removals (LDS halves) contract more
slowly but still monotonically. Per model, t starts at 1 and is halved while the objective
increases (backtracking safeguard for non-convex objectives). A model has converged when
‖∇L_b‖₂ ≤ tol; models that reach max_iter, or whose step cannot lower the objective any more,
are flagged. Everything is deterministic (fixed start, no randomness).

Limit: M is dense, [D, D] with D = P (pretraining) or Q (finetuning); D > ``MAX_DENSE_PARAMS``
raises ``RetrainError`` (memory D² floats and an O(D³) eigendecomposition).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap
from tqdm.auto import tqdm

from .config import SolverConfig, ValidationConfig
from .influence import batched_hvp
from .solvers import ExactSolver
from .task import TwoStageTask
from .training import TrainedStages

MAX_DENSE_PARAMS = 5000
"""Largest stage size D for which the dense preconditioner is built (D² floats, O(D³) eigh)."""
RELATIVE_DAMPING = 1e-8
"""Eigenvalues of M are floored at this fraction of the largest one (keeps M⁻¹ bounded)."""
MAX_HALVINGS = 30
HISTORY = 10
"""Curvature pairs kept per model by the preconditioned L-BFGS."""
ARMIJO = 1e-4
# An objective "increase" below this many ulps of |L| is rounding noise near the optimum, where
# the decrease of a Newton step (~‖g‖²/λ) is itself of the order of a few ulps.
ROUNDING_SLACK = 100 * torch.finfo(torch.float64).eps

BatchedObjective = Callable[[Tensor, Tensor], Tensor]
"""(x [D], data [...]) -> scalar objective of one model, vmapped over models."""


class RetrainError(RuntimeError):
    """Retraining cannot run as asked (too many parameters for the dense preconditioner, bad weights)."""


class Preconditioner:
    """M⁻¹ for M = dense Hessian of ``objective`` at ``x`` (eigenvalues floored), applied to rows.

    Eigenvalues are replaced by max(|λ|, RELATIVE_DAMPING·λ_max): at a trained minimum this is
    H + a negligible damping; at a saddle it still gives a descent direction.
    """

    def __init__(self, objective: Callable[[Tensor], Tensor], x: Tensor, what: str):
        dim = x.numel()
        if dim > MAX_DENSE_PARAMS:
            raise RetrainError(
                f"retraining {what}: {dim} parameters exceed the dense-preconditioner limit of "
                f"{MAX_DENSE_PARAMS} (a {dim}x{dim} Hessian); validate on a smaller model or skip validation")
        hessian = ExactSolver(batched_hvp(objective, x), dim, SolverConfig("exact"), x.dtype, x.device).hessian()
        evals, self.vecs = torch.linalg.eigh(hessian)
        self.eig_min, self.eig_max = float(evals[0]), float(evals[-1])
        floor = RELATIVE_DAMPING * max(abs(self.eig_max), torch.finfo(x.dtype).tiny)
        self.inv = 1.0 / evals.abs().clamp_min(floor)

    def __call__(self, g: Tensor) -> Tensor:
        """Rows of g [B, D] -> rows of M⁻¹g [B, D]."""
        return ((g @ self.vecs) * self.inv) @ self.vecs.T


@dataclass
class StageFit:
    """One stage retrained for B models."""

    params: Tensor        # [B, D]
    grad_norm: Tensor     # [B] final ‖∇objective‖₂
    converged: Tensor     # [B] bool, grad_norm <= tol
    iterations: int       # steps taken by the slowest model


def preconditioned_lbfgs(objective: BatchedObjective, x0: Tensor, data: Tensor, precond: Preconditioner,
                         tol: float, max_iter: int, history: int = HISTORY) -> StageFit:
    """Minimise objective(x_b, data_b) for every row b, all rows in one vmapped call per evaluation.

    x0 [B, D], data [B, ...]. Direction d = −H_b g from the L-BFGS two-loop recursion with the
    initial inverse Hessian M⁻¹ (so the first step is exactly the preconditioned Newton step
    x − M⁻¹∇L_b); step t = 1, halved per model until the objective decreases (Armijo). Only models
    with ‖∇‖ > tol are evaluated, so a converged model never changes afterwards (batched equals
    one at a time up to matmul rounding).
    """
    batched = vmap(grad_and_value(objective), in_dims=(0, 0))
    b, dim = x0.shape
    kw = {"dtype": x0.dtype, "device": x0.device}
    x = x0.detach().clone()
    g, f = batched(x, data)
    gnorm = g.norm(dim=1)
    s_hist, y_hist = torch.zeros(b, history, dim, **kw), torch.zeros(b, history, dim, **kw)
    rho = torch.zeros(b, history, **kw)          # 1/(sᵀy) per stored pair, 0 marks an empty slot
    stalled = torch.zeros(b, dtype=torch.bool, device=x.device)
    iterations = 0
    for _ in range(max_iter):
        active = ((gnorm > tol) & ~stalled).nonzero()[:, 0]
        if active.numel() == 0:
            break
        iterations += 1
        ga, fa, xa, da = g[active], f[active], x[active], data[active]
        step = -_two_loop(ga, s_hist[active], y_hist[active], rho[active], precond)
        slope = (ga * step).sum(1)
        uphill = ~(slope < 0)                    # a stale history can lose descent: restart from M⁻¹
        if uphill.any():
            rho[active[uphill]] = 0.0
            step[uphill] = -precond(ga[uphill])
            slope = (ga * step).sum(1)
        t = torch.ones(len(active), **kw)
        todo = torch.arange(len(active), device=x.device)
        for _ in range(MAX_HALVINGS + 1):
            cand = xa[todo] + t[todo, None] * step[todo]
            gc, fc = batched(cand, da[todo])
            bound = fa[todo] + ARMIJO * t[todo] * slope[todo] + ROUNDING_SLACK * fa[todo].abs().clamp_min(1.0)
            ok = torch.isfinite(fc) & (fc <= bound)
            rows, acc = active[todo[ok]], todo[ok]
            s_new, y_new = cand[ok] - xa[acc], gc[ok] - ga[acc]
            x[rows], g[rows], f[rows] = cand[ok], gc[ok], fc[ok]
            # Keep a pair only with positive curvature, so the implied inverse Hessian stays PD.
            sy = (s_new * y_new).sum(1)
            keep = sy > 1e-12 * s_new.norm(dim=1) * y_new.norm(dim=1)
            rows_k = rows[keep]
            s_hist[rows_k] = torch.cat([s_new[keep, None], s_hist[rows_k, :-1]], 1)
            y_hist[rows_k] = torch.cat([y_new[keep, None], y_hist[rows_k, :-1]], 1)
            rho[rows_k] = torch.cat([(1.0 / sy[keep])[:, None], rho[rows_k, :-1]], 1)
            todo = todo[~ok]
            if todo.numel() == 0:
                break
            t[todo] = t[todo] / 2
        # No decrease even with a 2⁻³⁰ step: the rounding floor is reached; stop that model.
        stalled[active[todo]] = True
        gnorm = g.norm(dim=1)
    return StageFit(x, gnorm, gnorm <= tol, iterations)


def _two_loop(g: Tensor, s: Tensor, y: Tensor, rho: Tensor, precond: Preconditioner) -> Tensor:
    """H_b g for every row: L-BFGS two-loop recursion, newest pair at index 0, H0 = M⁻¹.

    g [B, D], s and y [B, h, D], rho [B, h] (0 for empty slots, which then contribute nothing).
    """
    q = g.clone()
    alphas = []
    for j in range(s.shape[1]):
        a = rho[:, j] * (s[:, j] * q).sum(1)
        q = q - a[:, None] * y[:, j]
        alphas.append(a)
    r = precond(q)
    for j in reversed(range(s.shape[1])):
        beta = rho[:, j] * (y[:, j] * r).sum(1)
        r = r + (alphas[j] - beta)[:, None] * s[:, j]
    return r


@dataclass
class RetrainResult:
    """Retrained parameters of both stages for B weight vectors (rows follow the weight matrix)."""

    p: Tensor                                                  # [B, P]
    q: dict[str, Tensor]                                       # scenario -> [B, Q]
    grad_norm: dict[str, Tensor]                               # "pretrain" | scenario -> [B]
    converged: dict[str, Tensor]                               # "pretrain" | scenario -> [B] bool
    iterations: dict[str, int] = field(default_factory=dict)  # max steps per stage over chunks
    seconds: float = 0.0

    def chain_grad_norm(self, scenario: str) -> Tensor:
        """[B]: max of the pretraining and that scenario's finetuning gradient norms."""
        return torch.maximum(self.grad_norm["pretrain"], self.grad_norm[scenario])

    def chain_converged(self, scenario: str) -> Tensor:
        """[B] bool: both stages of that scenario converged."""
        return self.converged["pretrain"] & self.converged[scenario]


class Retrainer:
    """Holds the shared preconditioners (built once) and retrains chunks of weight vectors."""

    def __init__(self, task: TwoStageTask, trained: TrainedStages, scenarios: tuple[str, ...] | None = None):
        self.task, self.trained = task, trained
        self.scenarios = tuple(trained.finetune) if scenarios is None else tuple(scenarios)
        nt, alpha = task.n_theta, trained.alpha
        p = trained.p.detach()
        self.precond = {"pretrain": Preconditioner(task.pretrain_objective, p, "pretraining")}
        self.objectives: dict[str, BatchedObjective] = {
            "pretrain": lambda pp, w: task.pretrain_objective(pp, w),
            "fixed": lambda u, theta: task.finetune_objective(torch.cat([theta, u])),
            "updated": lambda q, anchor: task.finetune_objective(q, anchor, alpha)}
        for s in self.scenarios:
            q = trained.q(s).detach()
            if s == "fixed":
                theta = q[:nt]
                self.precond[s] = Preconditioner(lambda u: task.finetune_objective(torch.cat([theta, u])),
                                                 q[nt:], "finetuning (fixed)")
            else:
                anchor = task.theta_of(p)
                self.precond[s] = Preconditioner(lambda qq: task.finetune_objective(qq, anchor, alpha),
                                                 q, "finetuning (updated)")

    def run(self, weights: Tensor, tol: float, max_iter: int) -> RetrainResult:
        """Retrains both stages for every row of weights [B, m], all rows at once."""
        task, nt = self.task, self.task.n_theta
        b = len(weights)
        pre = preconditioned_lbfgs(self.objectives["pretrain"], self.trained.p.expand(b, -1), weights,
                                 self.precond["pretrain"], tol, max_iter)
        theta = pre.params[:, :nt]
        q, gn, conv, its = {}, {"pretrain": pre.grad_norm}, {"pretrain": pre.converged}, {"pretrain": pre.iterations}
        for s in self.scenarios:
            base = self.trained.q(s).detach()
            if s == "fixed":
                fit = preconditioned_lbfgs(self.objectives[s], base[nt:].expand(b, -1), theta, self.precond[s],
                                         tol, max_iter)
                q[s] = torch.cat([theta, fit.params], dim=1)
            else:
                fit = preconditioned_lbfgs(self.objectives[s], base.expand(b, -1), theta, self.precond[s],
                                         tol, max_iter)
                q[s] = fit.params
            gn[s], conv[s], its[s] = fit.grad_norm, fit.converged, fit.iterations
        return RetrainResult(pre.params, q, gn, conv, its)


def retrain(task: TwoStageTask, trained: TrainedStages, weights: Tensor, config: ValidationConfig,
            scenarios: tuple[str, ...] | None = None, progress: bool = True,
            retrainer: Retrainer | None = None) -> RetrainResult:
    """Retrains both stages for each row of ``weights`` [B, m] (1 keep, 0 removed; denominator m).

    Rows are processed in chunks of ``config.batch_size`` (one vmapped optimisation per chunk),
    to ``config.retrain_tol`` or ``config.retrain_max_iter``. Returns p [B, P], q per scenario
    [B, Q], gradient norms and converged flags per stage. ``retrainer`` reuses preconditioners.
    """
    weights = torch.as_tensor(weights).to(device=task.device, dtype=task.dtype)
    if weights.dim() != 2 or weights.shape[1] != task.m:
        raise RetrainError(f"weights must have shape [B, {task.m}], got {tuple(weights.shape)}")
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise RetrainError("weights must be finite and non-negative")
    start = time.perf_counter()
    retrainer = retrainer or Retrainer(task, trained, scenarios)
    parts: list[RetrainResult] = []
    bar = tqdm(total=len(weights), desc="retraining", unit="model", leave=False, disable=not progress)
    for i in range(0, len(weights), config.batch_size):
        parts.append(retrainer.run(weights[i: i + config.batch_size], config.retrain_tol, config.retrain_max_iter))
        bar.update(len(parts[-1].p))
    bar.close()
    keys = ["pretrain", *retrainer.scenarios]
    cat = lambda get, k: torch.cat([get(r)[k] for r in parts])
    return RetrainResult(
        p=torch.cat([r.p for r in parts]),
        q={s: cat(lambda r: r.q, s) for s in retrainer.scenarios},
        grad_norm={k: cat(lambda r: r.grad_norm, k) for k in keys},
        converged={k: cat(lambda r: r.converged, k) for k in keys},
        iterations={k: max(r.iterations[k] for r in parts) for k in keys},
        seconds=time.perf_counter() - start)


__all__ = ["MAX_DENSE_PARAMS", "Preconditioner", "RetrainError", "RetrainResult", "Retrainer", "StageFit",
           "preconditioned_lbfgs", "retrain"]
