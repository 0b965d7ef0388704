"""Deterministic full-batch training of both stages.

Pretraining minimises L_P over p = [θ; W]. Finetuning has two scenarios (docs/design.md §2):
    "fixed":   U* = argmin_U L_F(θ*, U), θ stays θ*.
    "updated": (θ_ft, U*) = argmin_q L_F(q) + (α/2)‖θ − θ*‖², warm-started at (θ*, U*_fixed).
L-BFGS with a strong-Wolfe line search is deterministic for a fixed start, so re-running gives the
same parameters; a Newton polish (dense up to ``newton_max_params`` parameters, Hessian-free
Newton-CG above) reaches machine precision near a minimum.

An objective is a callable p -> value (differentiated by autograd over one graph), or a
``StreamedPretrainObjective`` (``precompute.streaming``) whose value, gradient and Hessian products
are computed chunk by chunk; ``pretrain`` picks the latter for a memory-mapped (``LazyRows``)
pretraining set or when ``TrainConfig.stream_chunk`` is set.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import progress as progress_report
from .config import TrainConfig
from .curvature import batched_hvp, dense_hessian
from .streaming import StreamedPretrainObjective, pretraining_objective
from .task import TaskError, TwoStageTask

Objective = Callable[[Tensor], Tensor]


@dataclass
class TrainResult:
    params: Tensor          # flat optimum (p for pretraining, q = [θ; U] for finetuning)
    objective: float
    grad_norm: float        # ‖∇objective‖₂ at ``params``
    iterations: int
    converged: bool         # grad_norm <= grad_tol

    def summary(self) -> dict:
        return {"objective": self.objective, "grad_norm": self.grad_norm,
                "iterations": self.iterations, "converged": self.converged}


def minimize(objective: Objective, x0: Tensor, config: TrainConfig, desc: str | None = None) -> TrainResult:
    """Rounds of full-batch L-BFGS (to ‖∇‖ ≤ lbfgs_tol) and Newton polish (to ‖∇‖ ≤ grad_tol).

    Non-convex stages can stall L-BFGS near a saddle; the Newton phase detects negative curvature
    and steps off it, and the next round of L-BFGS continues from there.
    """
    x = x0.detach().clone()
    if not torch.isfinite(objective(x)):
        raise TaskError(f"{desc or 'training'}: objective is non-finite at the start; check the inputs and loss")
    iterations, rounds = 0, 0
    bar = progress_report.bar(desc or "", unit="iterations", enabled=desc is not None)
    first = [None]

    def report(done: int, gnorm: float) -> None:
        """Iterations so far and ‖∇‖; the ETA follows ‖∇‖'s way down to grad_tol on a log scale."""
        first[0] = first[0] or gnorm
        bar.update(done - bar.n)
        bar.set_note(f"‖∇‖ {gnorm:.1e} (target {config.grad_tol:.0e}, at most {config.max_iter} iterations)")
        if first[0] > config.grad_tol and gnorm < first[0]:
            bar.set_fraction(max(bar.item.fraction or 0.0,
                                 math.log(first[0] / gnorm) / math.log(first[0] / config.grad_tol)))

    polish = newton_polish if x.numel() <= config.newton_max_params else newton_cg_polish
    while True:
        rounds += 1
        x, used = _lbfgs(objective, x, config, config.max_iter - iterations, desc,
                         lambda n, gn, done=iterations: report(done + n, gn))
        iterations += used
        bar.update(iterations - bar.n)           # ``report`` may already have counted some of them
        if not config.newton_polish:
            break
        x, at_minimum = polish(objective, x, config.newton_polish, config.grad_tol, on_note=bar.set_note)
        if at_minimum or iterations >= config.max_iter or rounds >= config.rounds:
            break
    gnorm = _grad_norm(objective, x)
    bar.close(f"‖∇‖ {gnorm:.1e}, target {config.grad_tol:.0e}")
    return TrainResult(x, float(objective(x)), gnorm, iterations, gnorm <= config.grad_tol)


def _lbfgs(objective: Objective, x0: Tensor, config: TrainConfig, budget: int,
           desc: str | None, report: Callable[[int, float], object] | None = None) -> tuple[Tensor, int]:
    """L-BFGS with a strong-Wolfe line search until ‖∇‖ ≤ lbfgs_tol, a stall, or ``budget`` iterations."""
    x = x0.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=20, history_size=config.history_size,
                            tolerance_grad=1e-14, tolerance_change=1e-15, line_search_fn="strong_wolfe")

    streamed = isinstance(objective, StreamedPretrainObjective)

    def closure() -> Tensor:
        opt.zero_grad()
        if streamed:
            value, x.grad = objective.value_and_grad(x)
        else:
            value = objective(x)
        if not torch.isfinite(value):
            raise TaskError(f"{desc or 'training'}: objective became non-finite; check the inputs and loss")
        if not streamed:
            value.backward()
        return value

    used = 0
    while used < budget and (gnorm := _grad_norm(objective, x)) > config.lbfgs_tol:
        if report is not None:
            report(used, gnorm)
        opt.param_groups[0]["max_iter"] = min(20, budget - used)      # never past the budget
        opt.step(closure)
        done = opt.state[opt._params[0]]["n_iter"]
        if done == used:
            break
        used = done
    return x.detach(), used


def newton_polish(objective: Objective, x: Tensor, steps: int, grad_tol: float = 0.0,
                  chord_steps: int = 20, on_note: Callable[[str], object] | None = None) -> tuple[Tensor, bool]:
    """Saddle-free Newton steps (|eigenvalues| of the dense Hessian) with step halving.

    Near a minimum this is plain Newton and converges quadratically. Where the gradient has
    vanished but the Hessian has a negative eigenvalue (a saddle, where influence functions do not
    apply) it steps along that eigenvector and carries on, so training ends at a true minimum.
    A dense Hessian costs P Hessian-vector products, so each factorisation is reused (chord steps,
    at most ``chord_steps``) while every step still cuts ‖∇‖ at least fourfold; ``steps`` bounds the
    factorisations. Returns (x, reached a minimum: ‖∇‖ ≤ grad_tol with a positive definite Hessian,
    factorised during this polish within the last ``chord_steps`` steps). ``on_note`` receives a
    progress line while each Hessian is built (P products: minutes on a CNN).
    """
    value = float(objective(x))
    dim = x.numel()
    saddles = 0               # reported: stepping off a saddle makes ‖∇‖ rise for a while, on purpose
    for step in range(steps):
        g = _gradient(objective, x)
        hvp, done = batched_hvp(objective, x, rhs_block=256), [0]

        def counted(v: Tensor, step=step, gnorm=float(g.norm()), saddles=saddles) -> Tensor:
            if on_note is not None:
                escaped = f", {saddles} saddle{'s' if saddles > 1 else ''} left behind" if saddles else ""
                on_note(f"Newton polish {step + 1}{escaped} at ‖∇‖ {gnorm:.1e}: Hessian columns "
                        f"{done[0] + 1}-{done[0] + v.shape[1]} of {dim}")
            done[0] += v.shape[1]
            return hvp(v)

        hessian = dense_hessian(counted, dim, x.dtype, x.device)
        evals, evecs = torch.linalg.eigh(hessian)
        del hessian
        floor = 1e-10 * float(evals.abs().max())
        for chord in range(chord_steps):
            gnorm = float(g.norm())
            at_stationary_point = gnorm <= grad_tol
            if at_stationary_point and evals[0] > 0:
                return x.detach(), True
            if at_stationary_point:   # saddle: both signs of the lowest eigenvector go downhill
                if chord:
                    break             # judge the saddle on a Hessian of this point
                direction = evecs[:, 0] * (1.0 if float(g @ evecs[:, 0]) >= 0 else -1.0)
                saddles += 1
            else:
                direction = evecs @ ((evecs.T @ g) / evals.abs().clamp_min(floor))
            moved = _halving_step(objective, x, direction,
                                  lambda v: v < value or (v == value and not at_stationary_point))
            if moved is None:
                if chord:
                    break             # a fresh Hessian may still find a way down
                return x.detach(), False
            x, value = moved
            g = _gradient(objective, x)
            if float(g.norm()) > gnorm / 4:
                break                 # the old Hessian no longer gives Newton-like progress
    return x.detach(), False


def newton_cg_polish(objective: Objective, x: Tensor, steps: int, grad_tol: float = 0.0,
                     cg_iters: int = 100, on_note: Callable[[str], object] | None = None) -> tuple[Tensor, bool]:
    """Hessian-free Newton steps for models too large for a dense Hessian (``newton_max_params``).

    Each step solves H d = ∇ by conjugate gradients on Hessian-vector products (at most ``cg_iters``,
    to a relative residual of min(0.1, √‖∇‖): inexact Newton, superlinear near a minimum) and takes
    the largest of 1, 1/2, 1/4, ... that lowers the objective. CG stops at the first direction of
    non-positive curvature (Steihaug) and keeps what it has (the gradient if nothing yet), so a
    step always goes downhill. Returns (x, ‖∇‖ ≤ grad_tol with no negative curvature met in the
    last solve).
    """
    value = float(objective(x))
    for step in range(steps):
        g = _gradient(objective, x)
        gnorm = float(g.norm())
        if on_note is not None:
            on_note(f"Newton-CG polish step {step + 1}/{steps} at ‖∇‖ {gnorm:.1e}")
        hvp = batched_hvp(objective, x)
        direction, positive = _steihaug(hvp, g, cg_iters, min(0.1, gnorm ** 0.5))
        if gnorm <= grad_tol:
            return x.detach(), positive
        moved = _halving_step(objective, x, direction, lambda v: v <= value)
        if moved is None:
            break
        x, value = moved
    return x.detach(), False


def _halving_step(objective: Objective, x: Tensor, direction: Tensor, accept) -> tuple[Tensor, float] | None:
    """x − t·direction for the first t in 1, 1/2, 1/4, … (down to 1e-6) whose objective value
    ``accept`` takes, with that value; None when no step is accepted."""
    step = 1.0
    while step > 1e-6:
        candidate = (x - step * direction).detach()
        new_value = float(objective(candidate))
        if accept(new_value):
            return candidate, new_value
        step /= 2
    return None


def _steihaug(hvp, g: Tensor, max_iter: int, rtol: float) -> tuple[Tensor, bool]:
    """Approximate H⁻¹ g by CG from 0; stops at non-positive curvature. Returns (d, no negative curvature)."""
    d = torch.zeros_like(g)
    r = g.clone()
    p = r.clone()
    rs = float(r @ r)
    target = rtol * float(g.norm())
    for _ in range(max_iter):
        hp = hvp(p[:, None])[:, 0]
        curvature = float(p @ hp)
        if curvature <= 0:
            return (d if float(d.norm()) > 0 else g), False
        step = rs / curvature
        d = d + step * p
        r = r - step * hp
        rs_new = float(r @ r)
        if rs_new ** 0.5 <= target:
            break
        p = r + (rs_new / rs) * p
        rs = rs_new
    return d, True


def _gradient(objective: Objective, x: Tensor) -> Tensor:
    if isinstance(objective, StreamedPretrainObjective):
        return objective.value_and_grad(x)[1]
    return torch.func.grad(objective)(x.detach())


def _grad_norm(objective: Objective, x: Tensor) -> float:
    return float(_gradient(objective, x).norm())


# ---- the two stages -----------------------------------------------------------------------------

def pretrain(task: TwoStageTask, config: TrainConfig, weights: Tensor | None = None,
             p0: Tensor | None = None, desc: str | None = "pretraining") -> TrainResult:
    """p* = argmin L_P (example weights optional, denominator m fixed).

    Chunk by chunk (memory O(chunk), not O(m)) when ``config.stream_chunk`` > 0 or the task's
    pretraining inputs are ``LazyRows``; see ``precompute.streaming.pretraining_objective``.
    """
    start = task.initial_pretrain_params() if p0 is None else p0
    return minimize(pretraining_objective(task, weights, config.stream_chunk), start, config, desc)


def finetune_fixed(task: TwoStageTask, p: Tensor, config: TrainConfig, u0: Tensor | None = None,
                   desc: str | None = "finetuning (fixed)") -> TrainResult:
    """U* = argmin_U L_F(θ*, U); returns q = [θ*; U*]."""
    theta = task.theta_of(p).detach()
    start = task.initial_u() if u0 is None else u0
    result = minimize(lambda u: task.finetune_objective(torch.cat([theta, u])), start, config, desc)
    result.params = torch.cat([theta, result.params])
    return result


def finetune_updated(task: TwoStageTask, p: Tensor, alpha: float, config: TrainConfig,
                     q0: Tensor, desc: str | None = "finetuning (updated)") -> TrainResult:
    """(θ_ft, U*) = argmin L_F(θ, U) + (α/2)‖θ − θ*‖², started at q0 (usually [θ*; U*_fixed])."""
    anchor = task.theta_of(p).detach()
    return minimize(lambda q: task.finetune_objective(q, anchor, alpha), q0, config, desc)


@dataclass
class TrainedStages:
    """Trained parameters of both stages: p* and, per scenario, q = [θ; U]."""

    pretrain: TrainResult
    finetune: dict[str, TrainResult]
    alpha: float

    @property
    def p(self) -> Tensor:
        return self.pretrain.params

    def q(self, scenario: str) -> Tensor:
        return self.finetune[scenario].params

    @classmethod
    def from_params(cls, task: TwoStageTask, p: Tensor, q: dict[str, Tensor], alpha: float = 0.1,
                    grad_tol: float = TrainConfig.grad_tol) -> "TrainedStages":
        """Already-trained weights: p = [θ*; W] [P] and, per scenario, q = [θ; U] [Q].

        ``task.pretrain_params_from`` / ``finetune_params_from`` build the flat vectors from state
        dicts. Each stage records its objective and gradient norm (``converged``: ‖∇‖ ≤ grad_tol),
        because influence assumes a minimum; "fixed" must reuse θ* (the embedding was frozen) and
        "updated" needs the proximal α it was finetuned with.
        """
        p = p.detach().to(task.device, task.dtype)
        q = {s: v.detach().to(task.device, task.dtype) for s, v in q.items()}
        for s, qs in q.items():
            task.validate(p, qs)
            if s not in ("fixed", "updated"):
                raise TaskError(f"unknown scenario {s!r}; use 'fixed' and/or 'updated'")
        if "fixed" in q and not torch.equal(task.theta_of(q["fixed"]), task.theta_of(p)):
            raise TaskError("scenario 'fixed' keeps the pretrained embedding: q['fixed'][:Pθ] must equal p[:Pθ]")
        anchor = task.theta_of(p)
        objectives = {"fixed": task.finetune_objective, "updated": lambda qq: task.finetune_objective(qq, anchor, alpha)}

        def result(objective: Objective, x: Tensor, free: slice) -> TrainResult:
            gnorm = float(_gradient(objective, x)[free].norm())
            return TrainResult(x, float(objective(x)), gnorm, 0, gnorm <= grad_tol)

        pre = result(pretraining_objective(task), p, slice(None))
        # "fixed" optimises U only: its stationarity is that of the U block
        finetuned = {s: result(objectives[s], qs, slice(task.n_theta, None) if s == "fixed" else slice(None))
                     for s, qs in q.items()}
        return cls(pre, finetuned, alpha)


def train_stages(task: TwoStageTask, config: TrainConfig, alpha: float,
                 scenarios: tuple[str, ...] = ("fixed", "updated"), progress: bool = True) -> TrainedStages:
    """Pretrain, then finetune in each scenario ("updated" warm-starts from the "fixed" head)."""
    label = (lambda s: s) if progress else (lambda s: None)
    pre = pretrain(task, config, desc=label("pretraining"))
    fixed = finetune_fixed(task, pre.params, config, desc=label("finetuning (fixed)"))
    finetuned = {"fixed": fixed}
    if "updated" in scenarios:
        finetuned["updated"] = finetune_updated(task, pre.params, alpha, config, fixed.params,
                                                desc=label("finetuning (updated)"))
    return TrainedStages(pre, {s: finetuned[s] for s in scenarios}, alpha)
