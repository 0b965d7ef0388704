"""Ground truth by actual retraining: both stages, for many example-weight vectors at once.

Each row ``w_b`` of a weight matrix [B, m] (1 = keep, 0 = removed; the denominator m stays fixed,
docs/design.md §3) defines a retrained chain

    p_b       = argmin_p L_P(p; w_b)                                    warm start p*
    fixed:    U_b = argmin_U L_F(θ_b, U),  q_b = [θ_b; U_b]            warm start U*_fixed
    updated:  q_b = argmin_q L_F(q) + (α/2)‖θ − θ_b‖²                  warm start q*_updated

Optimiser (deterministic: fixed start, no randomness): batched L-BFGS whose initial inverse
Hessian is M⁻¹, M the dense Hessian of the *unperturbed* objective at the trained optimum (tiny
damping), eigendecomposed once and shared by all B models; all models' gradients come from one
``vmap(grad_and_value)`` call per evaluation. Its first step is the preconditioned Newton step
x − M⁻¹∇L_b(x); removing k of m examples changes the Hessian by O(k/m), so leave-one-out converges
in a handful of steps, and the L-BFGS pairs absorb the rest of the Hessian change for larger
removals (a plain fixed-point iteration x ← x − M⁻¹∇L_b stalls there: for a 50% removal M⁻¹H_b
has eigenvalues 0.2 to 2.1 on the tiny check task). Per model, the step starts at 1 and is
halved until the objective decreases (Armijo; a safeguard for non-convex objectives). Models
still above tol after ``SHARED_ITERS`` steps get a dense Hessian of their own at their current
point, refreshed every ``REFRESH_ITERS`` steps (saddle-free: |eigenvalues|): this is needed when a
removal makes the local minimum vanish (a fold) and the model slides to another basin, far from
where the shared M is accurate. Where a per-model Hessian costs too much (the CNNs: P Hessian products
each, 35 s to 14 minutes), stragglers after ``NEWTON_AFTER`` steps can switch (opt-in) to truncated Newton
(``newton_cg``: CG on Hessian-vector products, preconditioned by the shared M), which resolves every
direction in which H_b differs from M where L-BFGS keeps ``HISTORY`` pairs. A model has converged when
‖∇L_b‖₂ ≤ tol within max_iter steps; the others are flagged.

Limit: M is dense, [D, D] with D = P (pretraining) or Q (finetuning), up to ``MAX_DENSE_PARAMS``
(memory D² floats and an O(D³) eigendecomposition). Above it (the fashion CNN) M is a low-rank
Lanczos factorisation plus the bulk curvature (``precompute.lowrank``), shared for every step, and a
per-model dense M_b raises ``RetrainError``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, jvp, vmap
from . import progress as progress_report
from .certificate import ROUNDING_ULPS, batched_inertia
from .config import ValidationConfig
from .curvature import SHARED_HESSIAN_MAX_DIM, SharedHessian, batched_hvp, dense_hessian, hessian_key, updated_hessian_key
from .errors import PrecomputeError
from .task import TwoStageTask
from .training import TrainedStages

MAX_DENSE_PARAMS = SHARED_HESSIAN_MAX_DIM      # 5000: the curvature module keeps a Hessian this size for sharing
"""Largest stage size D for which the dense preconditioner is built (D² floats, O(D³) eigh)."""
RELATIVE_DAMPING = 1e-8
"""Eigenvalues of M are floored at this fraction of the largest one (keeps M⁻¹ bounded)."""
MAX_HALVINGS = 30
HISTORY = 10
"""Curvature pairs kept per model by the preconditioned L-BFGS."""
ARMIJO = 1e-4
SHARED_ITERS = 100
"""Steps with the shared base-Hessian preconditioner before stragglers get their own."""
REFRESH_ITERS = 25
REFRESH_GROUP = 16
REFRESH_BYTES = 2**29
"""Stragglers whose dense Hessians are held at once: REFRESH_GROUP, fewer if their D² floats
would exceed REFRESH_BYTES (D = 1125: 16 models, 160 MB; D = 5000: 2 models)."""
# ROUNDING_ULPS: an objective "increase" below this many ulps of |L| is rounding noise near the optimum,
# where the decrease of a Newton step (~‖g‖²/λ) is itself of the order of a few ulps.
MAX_ESCAPES = 2
"""Saddle escapes per retrained model and stage (``Retrainer.certify_stage``)."""
NEWTON_AFTER = 30
"""Without per-model dense Hessians: L-BFGS steps with the shared M before stragglers switch to ``newton_cg``."""
NEWTON_CG_ITERS = 50
"""Conjugate-gradient iterations at most per truncated Newton step (``newton_cg``)."""

BatchedObjective = Callable[[Tensor, Tensor], Tensor]
"""(x [D], data [...]) -> scalar objective of one model, vmapped over models."""
OnIteration = Callable[[int, Tensor], object]
"""(iterations so far, ‖∇‖ of every model [B]) after each iteration: progress reporting."""


class RetrainError(PrecomputeError, RuntimeError):
    """Retraining cannot run as asked (too many parameters for the dense preconditioner, bad weights)."""


class Preconditioner:
    """M⁻¹ from dense Hessians, applied to rows: one M shared by all models, or one per model.

    Eigenvalues are replaced by max(|λ|, RELATIVE_DAMPING·λ_max): at a trained minimum this is
    H + a negligible damping; at a saddle or past a fold it still gives a descent direction
    (saddle-free Newton).
    """

    def __init__(self, vecs: Tensor, inv: Tensor):
        self.vecs, self.inv = vecs, inv          # [D, D] and [D] (shared) or [B, D, D] and [B, D]

    @staticmethod
    def _factor(objective: Callable[[Tensor], Tensor], x: Tensor, what: str,
                shared: SharedHessian | None = None) -> tuple[Tensor, Tensor]:
        dim = x.numel()
        if dim > MAX_DENSE_PARAMS:
            raise RetrainError(
                f"retraining {what}: {dim} parameters exceed the dense-preconditioner limit of "
                f"{MAX_DENSE_PARAMS} (a {dim}x{dim} Hessian); validate on a smaller model or skip validation")
        hessian = dense_hessian(batched_hvp(objective, x), dim, x.dtype, x.device, shared=shared)
        evals, vecs = torch.linalg.eigh(hessian)
        floor = RELATIVE_DAMPING * max(float(evals.abs().max()), torch.finfo(x.dtype).tiny)
        return vecs, 1.0 / evals.abs().clamp_min(floor)

    @classmethod
    def at(cls, objective: Callable[[Tensor], Tensor], x: Tensor, what: str,
           shared: SharedHessian | None = None) -> "Preconditioner":
        """Shared M = ∇²objective(x) (x [D]); above MAX_DENSE_PARAMS a low-rank Lanczos M
        (``precompute.lowrank``), and stragglers keep it (no per-model Hessians, see ``solve_stage``)."""
        if x.numel() > MAX_DENSE_PARAMS:
            from .lowrank import LowRankPreconditioner
            return LowRankPreconditioner.at(objective, x)
        return cls(*cls._factor(objective, x.detach(), what, shared))

    @classmethod
    def per_model(cls, objective: BatchedObjective, x: Tensor, data: Tensor, what: str) -> "Preconditioner":
        """One M_b = ∇²objective(·, data_b)(x_b) per row of x [B, D] (B dense Hessians)."""
        parts = [cls._factor(lambda xx, d=data[b]: objective(xx, d), x[b].detach(), what) for b in range(len(x))]
        return cls(torch.stack([v for v, _ in parts]), torch.stack([i for _, i in parts]))

    def __call__(self, g: Tensor, rows: Tensor) -> Tensor:
        """M⁻¹g for g [len(rows), D]; ``rows`` picks the models' own M when there is one per model."""
        if self.vecs.dim() == 2:
            return ((g @ self.vecs) * self.inv) @ self.vecs.T
        vecs = self.vecs[rows]
        coef = torch.einsum("bd,bde->be", g, vecs) * self.inv[rows]
        return torch.einsum("be,bde->bd", coef, vecs)


@dataclass
class StageFit:
    """One stage retrained for B models."""

    params: Tensor        # [B, D]
    grad_norm: Tensor     # [B] final ‖∇objective‖₂
    converged: Tensor     # [B] bool, grad_norm <= tol
    iterations: int       # steps taken by the slowest model
    stalled: Tensor | None = None   # [B] bool: no step lowered the objective (the rounding floor)


def preconditioned_lbfgs(objective: BatchedObjective, x0: Tensor, data: Tensor, precond: Preconditioner,
                         tol: float, max_iter: int, history: int = HISTORY,
                         on_iter: OnIteration | None = None) -> StageFit:
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
        ga, xa = g[active], x[active]
        step = -_two_loop(ga, s_hist[active], y_hist[active], rho[active], lambda v: precond(v, active))
        slope = (ga * step).sum(1)
        uphill = ~(slope < 0)                    # a stale history can lose descent: restart from M⁻¹
        if uphill.any():
            rho[active[uphill]] = 0.0
            step[uphill] = -precond(ga[uphill], active[uphill])
            slope = (ga * step).sum(1)

        def keep_pair(acc: Tensor, cand: Tensor, gc: Tensor) -> None:
            rows, s_new, y_new = active[acc], cand - xa[acc], gc - ga[acc]
            # Keep a pair only with positive curvature, so the implied inverse Hessian stays PD.
            sy = (s_new * y_new).sum(1)
            keep = sy > 1e-12 * s_new.norm(dim=1) * y_new.norm(dim=1)
            rows_k = rows[keep]
            s_hist[rows_k] = torch.cat([s_new[keep, None], s_hist[rows_k, :-1]], 1)
            y_hist[rows_k] = torch.cat([y_new[keep, None], y_hist[rows_k, :-1]], 1)
            rho[rows_k] = torch.cat([(1.0 / sy[keep])[:, None], rho[rows_k, :-1]], 1)

        todo = _backtrack(batched, x, g, f, data, active, step, slope, keep_pair)
        # No decrease even with a 2⁻³⁰ step: the rounding floor is reached; stop that model.
        stalled[active[todo]] = True
        gnorm = g.norm(dim=1)
        if on_iter is not None:
            on_iter(iterations, gnorm)
    return StageFit(x, gnorm, gnorm <= tol, iterations, stalled & (gnorm > tol))


def _backtrack(batched: Callable, x: Tensor, g: Tensor, f: Tensor, data: Tensor, active: Tensor, step: Tensor,
               slope: Tensor, accepted: Callable[[Tensor, Tensor, Tensor], object] | None = None) -> Tensor:
    """Per active row, x_b + t·step_b for the first t in 1, 1/2, ... 2^-MAX_HALVINGS that passes Armijo (with a
    rounding slack of ``ROUNDING_ULPS`` ulps of |f|); x, g, f [B, ...] are updated in place for those rows.
    ``accepted(local indices, candidates, their gradients)`` sees each batch of accepted rows before the
    update. Returns the local indices (into ``active``) that found no step: the rounding floor."""
    xa, fa, da = x[active], f[active], data[active]
    slack = ROUNDING_ULPS * torch.finfo(x.dtype).eps
    t = torch.ones(len(active), dtype=x.dtype, device=x.device)
    todo = torch.arange(len(active), device=x.device)
    for _ in range(MAX_HALVINGS + 1):
        cand = xa[todo] + t[todo, None] * step[todo]
        gc, fc = batched(cand, da[todo])
        bound = fa[todo] + ARMIJO * t[todo] * slope[todo] + slack * fa[todo].abs().clamp_min(1.0)
        ok = torch.isfinite(fc) & (fc <= bound)
        if accepted is not None and bool(ok.any()):
            accepted(todo[ok], cand[ok], gc[ok])
        rows = active[todo[ok]]
        x[rows], g[rows], f[rows] = cand[ok], gc[ok], fc[ok]
        todo = todo[~ok]
        if todo.numel() == 0:
            break
        t[todo] = t[todo] / 2
    return todo


def _two_loop(g: Tensor, s: Tensor, y: Tensor, rho: Tensor, precond: Callable[[Tensor], Tensor]) -> Tensor:
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


def rowwise_hvp(objective: BatchedObjective) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """(x [B, D], data [B, ...], v [B, D]) -> [B, D] rows ∇²objective(·, data_b)(x_b) v_b, forward-over-reverse."""
    grad_f = grad(objective)
    return vmap(lambda xx, dd, vv: jvp(lambda y: grad_f(y, dd), (xx,), (vv,))[1])


def newton_cg(objective: BatchedObjective, x0: Tensor, data: Tensor, precond: Preconditioner, tol: float,
              max_steps: int, cg_iters: int = NEWTON_CG_ITERS, on_iter: OnIteration | None = None) -> StageFit:
    """Minimise objective(x_b, data_b) for every row b by truncated Newton steps, all rows batched.

    x0 [B, D], data [B, ...]. Each step solves H_b d = −g_b by conjugate gradients preconditioned with
    the shared M⁻¹ (one batched Hessian-vector product per CG iteration, only for rows still iterating),
    to a relative residual η_b = min(0.5, √‖g_b‖) (superlinear local convergence, Nocedal & Wright
    §7.1), or until CG meets non-positive curvature (then the last iterate, or at the first iteration the
    preconditioned gradient step −M⁻¹g_b, both descent directions), or ``cg_iters``. The step is then
    backtracked from t = 1 (Armijo). Where L-BFGS keeps ``HISTORY`` curvature pairs, CG resolves every
    direction in which H_b differs from M (at m = 300 that converges more removals, but mostly ones that
    left the basin; at m = 5,000 it did not converge the 1% groups either: docs/evidence.md). Rows at
    ‖∇‖ ≤ tol are never touched again (batched equals one at a time).
    """
    batched = vmap(grad_and_value(objective), in_dims=(0, 0))
    hvp = rowwise_hvp(objective)
    x = x0.detach().clone()
    g, f = batched(x, data)
    gnorm = g.norm(dim=1)
    stalled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    steps = 0
    for _ in range(max_steps):
        active = ((gnorm > tol) & ~stalled).nonzero()[:, 0]
        if active.numel() == 0:
            break
        steps += 1
        ga, xa, da = g[active], x[active], data[active]
        step = _truncated_cg(lambda rows, v: hvp(xa[rows], da[rows], v), lambda v, rows: precond(v, active[rows]),
                             ga, cg_iters)
        todo = _backtrack(batched, x, g, f, data, active, step, (ga * step).sum(1))
        stalled[active[todo]] = True
        gnorm = g.norm(dim=1)
        if on_iter is not None:
            on_iter(steps, gnorm)
    return StageFit(x, gnorm, gnorm <= tol, steps, stalled & (gnorm > tol))


def _truncated_cg(hvp: Callable[[Tensor, Tensor], Tensor], precond: Callable[[Tensor, Tensor], Tensor], g: Tensor,
                  max_iter: int) -> Tensor:
    """d [B, D] ≈ −H_b⁻¹ g_b by preconditioned CG per row (``newton_cg``); ``hvp(rows, V)`` and
    ``precond(V, rows)`` act on the rows still iterating. Always a descent direction: a row that meets
    non-positive curvature keeps its last iterate (the preconditioned gradient step at the first)."""
    b = len(g)
    d = torch.zeros_like(g)
    r = -g
    z = precond(r, torch.arange(b, device=g.device))
    p, rz = z.clone(), (r * z).sum(1)
    forcing = g.norm(dim=1).sqrt().clamp(max=0.5) * g.norm(dim=1)
    running = torch.ones(b, dtype=torch.bool, device=g.device)
    for k in range(max_iter):
        rows = running.nonzero()[:, 0]
        if rows.numel() == 0:
            break
        hp = hvp(rows, p[rows])
        curv = (p[rows] * hp).sum(1)
        flat = ~(curv > 0)
        if k == 0 and bool(flat.any()):
            d[rows[flat]] = z[rows[flat]]
        running[rows[flat]] = False
        keep, hp = rows[~flat], hp[~flat]
        alpha = rz[keep] / curv[~flat]
        d[keep] += alpha[:, None] * p[keep]
        r[keep] -= alpha[:, None] * hp
        done = r[keep].norm(dim=1) <= forcing[keep]
        running[keep[done]] = False
        go = keep[~done]
        if go.numel() == 0:
            break
        z_go = precond(r[go], go)
        rz_new = (r[go] * z_go).sum(1)
        p[go] = z_go + (rz_new / rz[go])[:, None] * p[go]
        rz[go] = rz_new
    return d


def negative_curvature(eig_min: Tensor) -> Tensor:
    """[B] bool: the λ_min estimate is not positive (NaN, not checked, counts as no evidence)."""
    return ~(eig_min > 0) & ~eig_min.isnan()


def solve_stage(objective: BatchedObjective, x0: Tensor, data: Tensor, shared: Preconditioner, tol: float,
                max_iter: int, what: str, on_iter: OnIteration | None = None,
                per_model: bool = True, newton_steps: int = 0) -> tuple[StageFit, int]:
    """All rows with the shared M first; stragglers then get their own M at their current point.

    Up to ``SHARED_ITERS`` steps use the shared M: leave-one-out (optimum O(1/m) away) takes a
    handful, and on digits (P = 1125) pretraining and "fixed" finetuning converge within 100 even
    for 10% and 50% removals. A model still above tol has moved out of reach of the base Hessian
    (typically the ill-conditioned "updated" stage after a large change of θ, or a fold where the
    local minimum vanished and the model slides to another basin); it gets a fresh dense Hessian
    at its current point every ``REFRESH_ITERS`` steps, in groups of ``REFRESH_GROUP``, until
    converged or ``max_iter`` steps in all. Returns (fit, number of per-model Hessians built).
    ``per_model`` False (or D above ``MAX_DENSE_PARAMS``): no per-model Hessians; the shared M serves every
    L-BFGS step, and with ``newton_steps`` > 0 the stragglers after ``NEWTON_AFTER`` steps take up to that
    many truncated Newton steps (``newton_cg``, the shared M as CG's preconditioner), within ``max_iter``.
    """
    large = x0.shape[1] > MAX_DENSE_PARAMS or not per_model       # shared M for every step (no dense M_b)
    first = min(max_iter, (NEWTON_AFTER if newton_steps else max_iter) if large else SHARED_ITERS)
    fit = preconditioned_lbfgs(objective, x0, data, shared, tol, first, on_iter=on_iter)
    x, gnorm, conv, used, built = fit.params, fit.grad_norm, fit.converged, fit.iterations, 0
    stalled = fit.stalled.clone()
    left = (~conv).nonzero()[:, 0]
    if large and newton_steps and left.numel() and max_iter > first:
        def newton_iter(it: int, gn: Tensor) -> None:
            merged = gnorm.clone()
            merged[left] = gn
            on_iter(first + it, merged)

        sub = newton_cg(objective, x[left], data[left], shared, tol, min(newton_steps, max_iter - first),
                        on_iter=newton_iter if on_iter is not None else None)
        x[left], gnorm[left], conv[left], stalled[left] = sub.params, sub.grad_norm, sub.converged, sub.stalled
        used = first + sub.iterations
    while not large and not bool(conv.all()) and used < max_iter:
        steps = min(REFRESH_ITERS, max_iter - used)
        left = (~conv).nonzero()[:, 0]
        per_hessian = x.shape[1] ** 2 * x.element_size()
        for group in torch.split(left, max(1, min(REFRESH_GROUP, REFRESH_BYTES // per_hessian))):
            own = Preconditioner.per_model(objective, x[group], data[group], what)

            def sub_iter(it: int, gn: Tensor, group=group, used=used) -> None:
                merged = gnorm.clone()
                merged[group] = gn
                on_iter(used + it, merged)

            sub = preconditioned_lbfgs(objective, x[group], data[group], own, tol, steps,
                                       on_iter=sub_iter if on_iter is not None else None)
            x[group], gnorm[group], conv[group], stalled[group] = sub.params, sub.grad_norm, sub.converged, sub.stalled
            built += len(group)
        used += steps
    return StageFit(x, gnorm, conv, used, stalled), built


@dataclass
class RetrainResult:
    """Retrained parameters of both stages for B weight vectors (rows follow the weight matrix)."""

    p: Tensor                                                  # [B, P]
    q: dict[str, Tensor]                                       # scenario -> [B, Q]
    grad_norm: dict[str, Tensor]                               # "pretrain" | scenario -> [B]
    converged: dict[str, Tensor]                               # "pretrain" | scenario -> [B] bool
    iterations: dict[str, int] = field(default_factory=dict)  # max steps per stage over chunks
    refreshed: dict[str, int] = field(default_factory=dict)   # per-model Hessians built per stage
    seconds: float = 0.0
    # [B, P] p* − M⁻¹∇L_P(p*; w_b): the linearised retraining (one Newton step at the trained
    # optimum), i.e. the parameter change the influence function assumes. A retrained p_b far from
    # it (see ``left_basin``) slid to another basin rather than following the local optimum.
    p_linear: Tensor | None = None
    # "pretrain" | scenario -> [B]: smallest eigenvalue of M^{-1/2} H_b M^{-1/2} (M the stage's shared
    # preconditioner), whose sign is that of λ_min(H_b) (``certificate.batched_inertia``); NaN: not checked.
    eig_min: dict[str, Tensor] = field(default_factory=dict)
    stalled: dict[str, Tensor] = field(default_factory=dict)   # "pretrain" | scenario -> [B] bool

    def chain_grad_norm(self, scenario: str) -> Tensor:
        """[B]: max of the pretraining and that scenario's finetuning gradient norms."""
        return torch.maximum(self.grad_norm["pretrain"], self.grad_norm[scenario])

    def chain_converged(self, scenario: str) -> Tensor:
        """[B] bool: both stages of that scenario reached a certified minimum (‖∇‖ ≤ tol, and no
        negative curvature where it was checked)."""
        return self.converged["pretrain"] & self.converged[scenario] & ~self.lost_minimum(scenario)

    def lost_minimum(self, scenario: str) -> Tensor:
        """[B] bool: a stage of the chain ends where its Hessian has a non-positive eigenvalue."""
        out = torch.zeros_like(self.converged["pretrain"])
        for k in ("pretrain", scenario):
            if k in self.eig_min:
                out |= negative_curvature(self.eig_min[k])
        return out

    def reasons(self, scenario: str, left_basin: Tensor | None = None) -> list[str]:
        """Per model, why its chain does not count ("" when it does): "lost the minimum" (negative
        curvature at the end), "stalled" (no step lowers the objective any more, above tol), "iteration
        cap"; converged models whose pretraining slid elsewhere (``left_basin``) say "left the basin"."""
        lost = self.lost_minimum(scenario)
        conv = self.converged["pretrain"] & self.converged[scenario]
        stalled = torch.zeros_like(conv)
        for k in ("pretrain", scenario):
            if k in self.stalled:
                stalled |= self.stalled[k]
        out = []
        for b in range(len(conv)):
            if bool(lost[b]):
                out.append("lost the minimum")
            elif not bool(conv[b]):
                out.append("stalled" if bool(stalled[b]) else "iteration cap")
            elif left_basin is not None and bool(left_basin[b]):
                out.append("left the basin")
            else:
                out.append("")
        return out

    def left_basin(self, reference: int = 0, ratio: float = 3.0, cosine: float = 0.8) -> Tensor:
        """[B] bool heuristic: the pretraining change p_b − p_ref is over ``ratio`` times longer than the
        linearised change, or points elsewhere (cosine below ``cosine``). On digits such removals
        are folds: following w_z from 1 to 0 the local minimum's smallest Hessian eigenvalue reaches
        0 and the model slides to another basin, which no first-order score can predict.
        """
        actual = self.p - self.p[reference]
        linear = self.p_linear - self.p_linear[reference]
        long = actual.norm(dim=1) > ratio * linear.norm(dim=1)
        turned = torch.nn.functional.cosine_similarity(actual, linear, dim=1) < cosine
        out = long | turned
        out[reference] = False
        return out


class Retrainer:
    """The stage objectives and their shared preconditioners (built once, at the trained optimum)."""

    def __init__(self, task: TwoStageTask, trained: TrainedStages, scenarios: tuple[str, ...] | None = None):
        self.task, self.trained = task, trained
        self.scenarios = tuple(trained.finetune) if scenarios is None else tuple(scenarios)
        nt, alpha = task.n_theta, trained.alpha
        # objective(x, data): data is the example weights (pretraining) or the retrained θ_b
        # (fixed: the frozen embedding; updated: the proximal anchor).
        self.objectives: dict[str, BatchedObjective] = {
            "pretrain": lambda pp, w: task.pretrain_objective(pp, w),
            "fixed": lambda u, theta: task.finetune_objective(torch.cat([theta, u])),
            "updated": lambda q, anchor: task.finetune_objective(q, anchor, alpha)}
        self.start = {"pretrain": trained.p.detach()}
        for s in self.scenarios:
            q = trained.q(s).detach()
            self.start[s] = q[nt:] if s == "fixed" else q
        base_data = {"pretrain": torch.ones(task.m, dtype=task.dtype, device=task.device),
                     "fixed": self.trained.q("fixed")[:nt].detach() if "fixed" in self.scenarios else None,
                     "updated": task.theta_of(trained.p).detach()}
        # The dense Hessians at p* and at the updated finetune are the training certificates' builds
        # (``trained.hessians``), which the exact influence solves and the baselines share.
        shared = {"pretrain": trained.hessians.slot(hessian_key("pretrain", task, self.start["pretrain"]))}
        if "updated" in self.scenarios:
            shared["updated"] = trained.hessians.slot(
                updated_hessian_key(task, self.start["updated"], base_data["updated"], alpha))
        self.precond = {k: Preconditioner.at(lambda x, f=self.objectives[k], d=base_data[k]: f(x, d), self.start[k], k,
                                             shared.get(k))
                        for k in ("pretrain", *self.scenarios)}

    def run(self, weights: Tensor, tol: float, max_iter: int,
            on_iter: Callable[[str, int, Tensor], object] | None = None, per_model: bool = True,
            on_certify: Callable[[str, int, int], object] | None = None, newton_steps: int = 0) -> RetrainResult:
        """Retrains both stages for every row of weights [B, m], all rows at once.

        ``on_iter(stage, iterations, ‖∇‖ [B])`` is called after every iteration and
        ``on_certify(stage, step, steps)`` after every Lanczos step of the certificates (progress)."""
        nt, b = self.task.n_theta, len(weights)
        fits, built, eig_min = {}, {}, {}
        hook = (lambda stage: None) if on_iter is None else (lambda stage: lambda it, gn: on_iter(stage, it, gn))
        check = (lambda stage: None) if on_certify is None else (lambda stage: lambda j, n: on_certify(stage, j, n))
        fit, built["pretrain"] = solve_stage(
            self.objectives["pretrain"], self.start["pretrain"].expand(b, -1), weights, self.precond["pretrain"],
            tol, max_iter, "pretraining", hook("pretraining"), per_model, newton_steps)
        fits["pretrain"], eig_min["pretrain"] = self.certify_stage("pretrain", fit, weights, tol, max_iter, per_model,
                                                                   hook("pretraining"), check("pretraining"),
                                                                   newton_steps)
        theta = fits["pretrain"].params[:, :nt]
        for s in self.scenarios:
            stage = f"finetuning ({s})"
            fit, built[s] = solve_stage(self.objectives[s], self.start[s].expand(b, -1), theta, self.precond[s],
                                        tol, max_iter, stage, hook(stage), per_model, newton_steps)
            fits[s], eig_min[s] = self.certify_stage(s, fit, theta, tol, max_iter, per_model, hook(stage), check(stage),
                                                     newton_steps)
        q = {s: torch.cat([theta, fits[s].params], 1) if s == "fixed" else fits[s].params for s in self.scenarios}
        start = self.start["pretrain"].expand(b, -1)
        g0 = vmap(grad(self.objectives["pretrain"]), in_dims=(0, 0))(start, weights)
        return RetrainResult(fits["pretrain"].params, q, {k: f.grad_norm for k, f in fits.items()},
                             {k: f.converged for k, f in fits.items()}, {k: f.iterations for k, f in fits.items()},
                             built, p_linear=start - self.precond["pretrain"](g0, None), eig_min=eig_min,
                             stalled={k: f.stalled for k, f in fits.items()})

    def certify_stage(self, stage: str, fit: StageFit, data: Tensor, tol: float, max_iter: int,
                      per_model: bool = True, on_iter: OnIteration | None = None,
                      on_certify: Callable[[int, int], object] | None = None,
                      newton_steps: int = 0) -> tuple[StageFit, Tensor]:
        """(fit, [B] λ_min estimates) after stepping models that ended beside a saddle off it.

        A retrained model whose Hessian has negative curvature (``inertia``) is not at a minimum, even
        with ‖∇‖ ≤ tol: it steps along that direction (both signs, the lower kept, ``escape_saddles``)
        and is retrained from there (up to ``max_iter`` more steps), at most ``MAX_ESCAPES`` times.
        Only models that converged or stalled are checked: one still descending at the iteration cap
        does not count whatever its curvature, and its check (``INERTIA_STEPS`` full-batch Hessian
        products) plus up to ``MAX_ESCAPES`` × ``max_iter`` more steps would cost more than its
        retraining did (its estimate stays NaN, its reason "iteration cap").
        ``on_iter`` / ``on_certify(step, steps)``: progress of the re-solves and of the Lanczos steps."""
        x, gnorm, conv = fit.params.clone(), fit.grad_norm.clone(), fit.converged.clone()
        stalled = fit.stalled.clone() if fit.stalled is not None else torch.zeros_like(conv)
        eig = torch.full((len(x),), float("nan"), dtype=x.dtype, device=x.device)
        direction = torch.zeros_like(x)
        checked = (conv | stalled).nonzero()[:, 0]
        if checked.numel():
            eig[checked], direction[checked] = self.inertia(stage, x[checked], data[checked], vectors=True,
                                                            on_step=on_certify)
        for _ in range(MAX_ESCAPES):
            lost = negative_curvature(eig).nonzero()[:, 0]
            if lost.numel() == 0:
                break
            moved_x, moved = escape_saddles(self.objectives[stage], x[lost], data[lost], direction[lost])
            if not bool(moved.any()):
                break
            rows = lost[moved]

            def merged(it: int, gn: Tensor, rows=rows) -> None:
                every = gnorm.clone()
                every[rows] = gn
                on_iter(it, every)

            sub, _ = solve_stage(self.objectives[stage], moved_x[moved], data[rows], self.precond[stage], tol,
                                 max_iter, stage, merged if on_iter is not None else None, per_model, newton_steps)
            x[rows], gnorm[rows], conv[rows] = sub.params, sub.grad_norm, sub.converged
            stalled[rows] = sub.stalled
            again = rows[sub.converged | sub.stalled]
            eig[rows], direction[rows] = float("nan"), 0.0
            if again.numel():
                eig[again], direction[again] = self.inertia(stage, x[again], data[again], vectors=True,
                                                            on_step=on_certify)
        return StageFit(x, gnorm, conv, fit.iterations, stalled), eig

    def inertia(self, stage: str, x: Tensor, data: Tensor, vectors: bool = False,
                on_step: Callable[[int, int], object] | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """[B] sign-faithful λ_min estimates of each retrained model's Hessian in ``stage``
        (``certificate.batched_inertia`` against the stage's shared dense M); NaN with a low-rank M.
        ``vectors``: also [B, D] directions of that curvature (negative where the estimate is)."""
        precond = self.precond[stage]
        if not isinstance(precond, Preconditioner) or precond.vecs.dim() != 2:
            nan = torch.full((len(x),), float("nan"), dtype=x.dtype, device=x.device)
            return (nan, torch.zeros_like(x)) if vectors else nan
        vecs, scale = precond.vecs, precond.inv.sqrt()
        hvp = rowwise_hvp(self.objectives[stage])
        return batched_inertia(lambda v: hvp(x, data, v), lambda rows: ((rows @ vecs) * scale) @ vecs.T, len(x),
                               x.shape[1], x.dtype, x.device, return_vectors=vectors, on_step=on_step)


def escape_saddles(objective: BatchedObjective, x: Tensor, data: Tensor, direction: Tensor) -> tuple[Tensor, Tensor]:
    """Per row, x_b ± t·d_b for the first t in 1, 1/2, ... 2⁻²⁰ where either sign lowers the objective
    beyond rounding, the lower sign kept. Returns (x' [B, D], moved [B] bool); unmoved rows keep x_b."""
    values = vmap(objective)(x, data)
    slack = ROUNDING_ULPS * torch.finfo(x.dtype).eps * values.abs().clamp_min(1.0)
    out, moved = x.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for k in range(21):
        todo = (~moved).nonzero()[:, 0]
        if todo.numel() == 0:
            break
        step = 2.0 ** -k
        plus, minus = x[todo] + step * direction[todo], x[todo] - step * direction[todo]
        f_plus, f_minus = vmap(objective)(plus, data[todo]), vmap(objective)(minus, data[todo])
        better = torch.where((f_plus <= f_minus)[:, None], plus, minus)
        lower = torch.minimum(f_plus, f_minus)
        ok = torch.isfinite(lower) & (lower < values[todo] - slack[todo])
        out[todo[ok]], moved[todo[ok]] = better[ok], True
    return out, moved


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
    stages = ["pretraining", *(f"finetuning ({s})" for s in retrainer.scenarios)]
    n_chunks = -(-len(weights) // config.batch_size)
    # one unit = one model through one stage; a model counts once its gradient norm is below tol
    bar = progress_report.bar("retraining", total=len(weights) * len(stages), unit="model-stages",
                              enabled=progress)
    for c, i in enumerate(range(0, len(weights), config.batch_size)):
        chunk = weights[i: i + config.batch_size]

        def on_iter(stage: str, it: int, gn: Tensor, c=c, i=i, b=len(chunk)) -> None:
            done = int((gn <= config.retrain_tol).sum())
            bar.update(i * len(stages) + stages.index(stage) * b + done - bar.n)
            bar.set_note(f"models {i + 1}-{i + b} of {len(weights)} (chunk {c + 1}/{n_chunks}), {stage}: "
                         f"iteration {it}, {done}/{b} converged, largest ‖∇‖ {float(gn.max()):.1e}")

        def on_certify(stage: str, step: int, steps: int, c=c, i=i, b=len(chunk)) -> None:
            bar.set_note(f"models {i + 1}-{i + b} of {len(weights)} (chunk {c + 1}/{n_chunks}), {stage}: "
                         f"certifying the retrained minima, Lanczos step {step}/{steps}")

        parts.append(retrainer.run(chunk, config.retrain_tol, config.retrain_max_iter, on_iter,
                                   config.per_model_hessians, on_certify, config.retrain_newton_steps))
        bar.update((i + len(chunk)) * len(stages) - bar.n)
    bar.close()
    keys = ["pretrain", *retrainer.scenarios]
    cat = lambda get, k: torch.cat([get(r)[k] for r in parts])
    return RetrainResult(
        p=torch.cat([r.p for r in parts]),
        q={s: cat(lambda r: r.q, s) for s in retrainer.scenarios},
        grad_norm={k: cat(lambda r: r.grad_norm, k) for k in keys},
        converged={k: cat(lambda r: r.converged, k) for k in keys},
        iterations={k: max(r.iterations[k] for r in parts) for k in keys},
        refreshed={k: sum(r.refreshed[k] for r in parts) for k in keys},
        p_linear=torch.cat([r.p_linear for r in parts]),
        eig_min={k: cat(lambda r: r.eig_min, k) for k in keys},
        stalled={k: cat(lambda r: r.stalled, k) for k in keys},
        seconds=time.perf_counter() - start)


__all__ = ["MAX_DENSE_PARAMS", "Preconditioner", "RetrainError", "RetrainResult", "Retrainer", "StageFit",
           "newton_cg", "preconditioned_lbfgs", "retrain", "solve_stage"]
