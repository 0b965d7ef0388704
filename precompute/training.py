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
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import progress as progress_report
from .config import TrainConfig
from .certificate import ROUNDING_ULPS, Certificate, CertificateError, certify
from .curvature import (HessianStore, SharedHessian, batched_hvp, dense_hessian, hessian_key, hessian_products,
                        updated_hessian_key)
from .streaming import StreamedPretrainObjective, pretraining_objective
from .task import TaskError, TwoStageTask

Objective = Callable[[Tensor], Tensor]
CHORD_RATE = 2.0
"""A chord step (the polish's old factorisation) is kept while it cuts ‖∇‖ at least this much: a dense
Hessian costs P products (35 s on the quick CNN), a chord step a few objective evaluations, so linear
convergence at rate 1/2 beats rebuilding (at 4, the quick CNN's pretraining rebuilt at a 3.8-fold step)."""


APPROXIMATE_FLOOR = 1e-4
"""Relative eigenvalue floor of a subsample's factorisation: where its data term is indefinite, its smallest
|eigenvalues| sit near 0 while the full Hessian's do not, and an unbounded M⁻¹ there would stall CG."""
APPROXIMATE_CHORD_STEPS = 60
"""Newton steps per subsample factorisation (each step: CG on exact products, a few objective values)."""
APPROXIMATE_CG_ITERS = 100
"""CG products per Newton step when a subsample's Hessian preconditions the polish (its small eigenvalues
differ from the full data's by the sampling noise, so CG needs more than the 30 of a chord step)."""


@dataclass
class TrainResult:
    params: Tensor          # flat optimum (p for pretraining, q = [θ; U] for finetuning)
    objective: float
    grad_norm: float        # ‖∇objective‖₂ at ``params``
    iterations: int
    converged: bool         # grad_norm <= grad_tol
    certificate: Certificate | None = None   # ‖∇‖ and λ_min of the Hessian at ``params``
    saddles_escaped: int = 0
    method: str = "full-batch"  # "full-batch" (L-BFGS + Newton, certified) or "minibatch" (Adam, damped)

    @property
    def certified(self) -> bool:
        """A strict local minimum: ‖∇‖ ≤ grad_tol and λ_min > 0 (False when never certified)."""
        return self.certificate is not None and self.certificate.certified

    @property
    def eig_min(self) -> float | None:
        return None if self.certificate is None else self.certificate.eig_min

    def summary(self) -> dict:
        out = {"objective": self.objective, "grad_norm": self.grad_norm, "method": self.method,
               "iterations": self.iterations, "converged": self.converged,
               "eig_min": self.eig_min, "certified": self.certified, "saddles_escaped": self.saddles_escaped}
        if self.certificate is not None:
            out |= {"grad_tol": self.certificate.grad_tol, "grad_floor": self.certificate.grad_floor,
                    "eig_method": self.certificate.method}
        return out


def minimize(objective: Objective, x0: Tensor, config: TrainConfig, desc: str | None = None,
             shared: Callable[[Tensor], SharedHessian] | None = None,
             approximate: Objective | None = None) -> TrainResult:
    """Rounds of full-batch L-BFGS (to ‖∇‖ ≤ lbfgs_tol) and Newton polish (to ‖∇‖ ≤ grad_tol), then a
    certificate (``precompute.certificate``): ‖∇‖ and the smallest Hessian eigenvalue at the result.

    Non-convex stages can stall L-BFGS next to a saddle. Wherever negative curvature shows (in the
    polish's factorisation, or in the certificate), one step goes along that eigenvector, both signs
    tried, the lower kept, and the next round of L-BFGS carries on from there: a saddle costs one
    dense Hessian and some cheap L-BFGS iterations, not a dense Hessian per Newton step.
    ``shared``: x -> where the certificate's dense Hessian at x is kept for later users at the same
    point (``curvature.HessianStore``: the influence solve, the retraining preconditioner).
    ``approximate``: a cheaper objective with about the same Hessian (a subsample of the data) whose
    dense Hessian preconditions the polish (``newton_polish``); the certificate still uses ``objective``.
    """
    x = x0.detach().clone()
    if not torch.isfinite(objective(x)):
        raise TaskError(f"{desc or 'training'}: objective is non-finite at the start; check the inputs and loss")
    iterations, rounds, escaped = 0, 0, [0]
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

    def on_escape() -> None:
        escaped[0] += 1

    dense = x.numel() <= config.newton_max_params
    polish = newton_polish if x.numel() <= min(config.dense_polish_max_params, config.newton_max_params) \
        else newton_cg_polish
    certificate = None
    while True:
        rounds += 1                              # a round that ends on a saddle escape is not counted
        x, used = _lbfgs(objective, x, config, config.max_iter - iterations, desc,
                         lambda n, gn, done=iterations: report(done + n, gn))
        iterations += used
        bar.update(iterations - bar.n)           # ``report`` may already have counted some of them
        if config.newton_polish and _grad_norm(objective, x) > config.grad_tol:
            before = escaped[0]      # (at the target already, the certificate's Hessian judges the point)
            extra = {"products": config.hessian_products} if polish is newton_polish else {}
            if polish is newton_polish and approximate is not None:
                extra["approximate"] = approximate
            x, _ = polish(objective, x, config.newton_polish, config.grad_tol, on_note=bar.set_note,
                          on_escape=on_escape, **extra)
            if escaped[0] > before and escaped[0] <= config.max_escapes:
                rounds -= 1                      # every escape lowers L, so this cannot cycle
                continue                         # off a saddle: L-BFGS takes it from here
        bar.set_note(f"certifying the minimum ({'dense Hessian' if dense else 'Lanczos'}, {x.numel()} parameters)")
        factorised: list[tuple[Tensor, Tensor]] = []
        certificate, lowest = certify(objective, x, config.grad_tol, config.newton_max_params,
                                      None if shared is None else shared(x),
                                      gradient=lambda xx: _gradient(objective, xx),
                                      on_columns=lambda a, b, n: bar.set_note(
                                          f"certifying the minimum: dense Hessian, columns {a}-{b} of {n}"),
                                      on_eigh=lambda evals, evecs: factorised.append((evals, evecs)),
                                      products=config.hessian_products)
        if certificate.certified:
            break
        if factorised and certificate.eig_min > 0 and config.newton_polish and rounds < config.rounds:
            # positive definite but ‖∇‖ above target (a flat minimum the Hessian-free polish could not resolve):
            # the certificate's factorisation preconditions Newton steps on exact products from here, so the
            # next dense Hessian is the one that certifies, not another round's
            bar.set_note(f"Newton steps with the certificate's factorisation from ‖∇‖ {certificate.grad_norm:.1e} "
                         f"(target {config.grad_tol:.0e}, λ_min {certificate.eig_min:.1e})")
            x, _ = newton_polish(objective, x, 1, config.grad_tol, on_note=bar.set_note, factorised=factorised.pop(),
                                 products=config.hessian_products)
            continue
        if certificate.eig_min < 0 and escaped[0] < config.max_escapes:
            moved = escape_saddle(objective, x, lowest)
            if moved is None:
                # no step along the eigenvector lowers L beyond rounding (float32, a tiny |λ_min|); while ‖∇‖
                # is still above target, another round of L-BFGS + polish may walk away from the saddle
                if certificate.grad_norm > config.grad_tol and rounds < config.rounds and iterations < config.max_iter:
                    continue
                break
            x = moved
            on_escape()
            continue
        if rounds >= config.rounds or certificate.eig_min < 0 or iterations >= config.max_iter \
                or (not config.newton_polish and used == 0):
            break                                # out of rounds, escapes or iterations, or nothing left to try
    gnorm = _grad_norm(objective, x)
    bar.close(f"‖∇‖ {gnorm:.1e}, target {config.grad_tol:.0e}, λ_min {certificate.eig_min:.1e}"
              + (f", {escaped[0]} saddle{'s' if escaped[0] > 1 else ''} escaped" if escaped[0] else ""))
    return TrainResult(x, float(objective(x)), gnorm, iterations, gnorm <= config.grad_tol, certificate, escaped[0])


def escape_saddle(objective: Objective, x: Tensor, direction: Tensor) -> Tensor | None:
    """x ± t·direction (unit ``direction`` of negative curvature) for the first t in 1, 1/2, 1/4, ...
    where either sign lowers the objective beyond rounding; the lower of the two signs. None: no step
    lowers it (then ``direction`` was not downhill in either sign)."""
    value = float(objective(x))
    slack = ROUNDING_ULPS * torch.finfo(x.dtype).eps * max(abs(value), 1.0)
    step = 1.0
    while step > 1e-6:
        candidates = [(x + sign * step * direction).detach() for sign in (1.0, -1.0)]
        values = [float(objective(c)) for c in candidates]
        best = min(range(2), key=lambda i: values[i])
        if values[best] < value - slack:
            return candidates[best]
        step /= 2
    return None


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
        before = x.detach().clone()
        opt.step(closure)
        done = opt.state[opt._params[0]]["n_iter"]
        # torch counts an iteration whose line search found no lower point; at the floor of rounding it
        # would do so for the rest of the budget (‖∇‖ unchanged), so an unmoved x ends the phase
        if done == used or torch.equal(x.detach(), before):
            used = done
            break
        used = done
    return x.detach(), used


def newton_polish(objective: Objective, x: Tensor, steps: int, grad_tol: float = 0.0,
                  chord_steps: int = 20, on_note: Callable[[str], object] | None = None,
                  on_escape: Callable[[], object] | None = None,
                  approximate: Objective | None = None,
                  factorised: tuple[Tensor, Tensor] | None = None,
                  products: str = "double-backward") -> tuple[Tensor, bool]:
    """Saddle-free Newton steps (|eigenvalues| of the dense Hessian) with step halving.

    Near a minimum this is plain Newton and converges quadratically. Where a fresh Hessian has a
    negative eigenvalue (beside a saddle, where influence functions do not apply, even when ‖∇‖ is
    not yet below ``grad_tol``) it steps along that eigenvector, both signs tried (``escape_saddle``).
    ``on_escape`` given: it is called after such a step and the polish returns, so the caller's
    cheaper optimiser (L-BFGS) carries on from there; None: the polish carries on itself.
    A dense Hessian costs P Hessian-vector products, so each factorisation is reused (chord steps,
    at most ``chord_steps``) while every step still cuts ‖∇‖ at least ``CHORD_RATE``-fold; ``steps`` bounds the
    factorisations. Returns (x, reached a minimum: ‖∇‖ ≤ grad_tol with a positive definite Hessian,
    factorised during this polish within the last ``chord_steps`` steps). ``on_note`` receives a
    progress line while each Hessian is built (P products: minutes on a CNN).
    ``approximate`` given (an objective over a subsample of the data): the factorisation is its Hessian,
    which costs a fraction of the full one, and every step is Newton by CG on exact products of
    ``objective`` preconditioned by it (``APPROXIMATE_CG_ITERS``); its negative eigenvalues prove nothing
    about ``objective``, so saddles are left to the caller's certificate.
    ``factorised``: (eigenvalues [D], eigenvectors [D, D]) of ∇²objective(x) already built (a certificate's),
    used as the first step's factorisation instead of building one. ``products``: how a dense Hessian's
    products are made (``curvature.hessian_products``).
    """
    value = float(objective(x))
    dim = x.numel()
    saddles = 0               # reported: stepping off a saddle makes ‖∇‖ rise for a while, on purpose
    for step in range(steps):
        g = _gradient(objective, x)

        def columns(first: int, last: int, total: int, step=step, gnorm=float(g.norm()), saddles=saddles) -> None:
            escaped = f", {saddles} saddle{'s' if saddles > 1 else ''} left behind" if saddles else ""
            on_note(f"Newton polish {step + 1}{escaped} at ‖∇‖ {gnorm:.1e}: Hessian columns {first}-{last} of {total}")

        if step == 0 and factorised is not None:
            evals, evecs = factorised
        else:                                   # (the products are only built where a factorisation is)
            hvp = hessian_products(objective if approximate is None else approximate, x, products, rhs_block=256)
            hessian = dense_hessian(hvp, dim, x.dtype, x.device, on_columns=columns if on_note is not None else None)
            evals, evecs = torch.linalg.eigh(hessian)
            del hessian
        floor = (1e-10 if approximate is None else APPROXIMATE_FLOOR) * float(evals.abs().max())
        if approximate is None and evals[0] < -floor:   # negative curvature: go along it, whatever ‖∇‖ is
            moved = escape_saddle(objective, x, evecs[:, 0])
            if moved is not None:
                x, value, saddles = moved, float(objective(moved)), saddles + 1
                if on_escape is not None:
                    on_escape()
                    return x.detach(), False
                continue
        for chord in range(chord_steps if approximate is None else APPROXIMATE_CHORD_STEPS):
            gnorm = float(g.norm())
            at_stationary_point = gnorm <= grad_tol
            if at_stationary_point and (evals[0] > 0 or approximate is not None):
                return x.detach(), bool(evals[0] > 0) and approximate is None   # a subsample's λ_min proves nothing
            if at_stationary_point and chord:
                break                         # judge the point on a Hessian of its own
            precondition = lambda r: evecs @ ((evecs.T @ r) / evals.abs().clamp_min(floor))
            direction = precondition(g)
            if approximate is not None or (chord and evals[0] > 0):   # |eigenvalues|: M is SPD either way
                # Newton at x by CG on exact products, preconditioned by the old (or the subsample's)
                # factorisation, close to H(x): Newton's quadratic rate without rebuilding the dense Hessian
                newton = _preconditioned_cg(batched_hvp(objective, x), g, precondition, 30) if approximate is None \
                    else _preconditioned_cg(batched_hvp(objective, x), g, precondition, APPROXIMATE_CG_ITERS,
                                            rtol=min(0.1, gnorm ** 0.5), best_effort=True)
                direction = direction if newton is None else newton
            slack = ROUNDING_ULPS * torch.finfo(x.dtype).eps * max(abs(value), 1.0)

            def accept(v: float, candidate: Tensor, value=value, gnorm=gnorm, slack=slack) -> bool:
                # near the minimum a Newton step lowers L by ~‖∇‖²/λ, below L's rounding: there a step
                # counts when L stays within rounding and ‖∇‖ falls
                return v < value or (v <= value + slack and float(_gradient(objective, candidate).norm()) < gnorm)

            moved = _halving_step(objective, x, direction, accept)
            if moved is None:
                if chord:
                    break             # a fresh Hessian may still find a way down
                return x.detach(), False
            x, value = moved
            g = _gradient(objective, x)
            if approximate is not None and on_note is not None:
                on_note(f"Newton polish {step + 1}, step {chord + 1} (CG preconditioned by a subsample's "
                        f"Hessian): ‖∇‖ {float(g.norm()):.1e}")
            if approximate is None and float(g.norm()) > gnorm / CHORD_RATE:
                break                 # the old Hessian no longer gives fast progress: rebuild it
            # (a subsample's factorisation is no better rebuilt nearby: its error is the sampling noise,
            # and CG on exact products does the Newton work; rebuilt when a step fails or the steps run out)
    return x.detach(), False


def newton_cg_polish(objective: Objective, x: Tensor, steps: int, grad_tol: float = 0.0,
                     cg_iters: int = 100, on_note: Callable[[str], object] | None = None,
                     on_escape: Callable[[], object] | None = None) -> tuple[Tensor, bool]:
    """Hessian-free Newton steps for models too large for a dense Hessian (``newton_max_params``).

    Each step solves H d = ∇ by conjugate gradients on Hessian-vector products (at most ``cg_iters``,
    to a relative residual of min(0.1, √‖∇‖): inexact Newton, superlinear near a minimum) and takes
    the largest of 1, 1/2, 1/4, ... that lowers the objective. CG stops at the first direction of
    non-positive curvature (Steihaug) and keeps what it has (the gradient if nothing yet), so a
    step always goes downhill. Returns (x, ‖∇‖ ≤ grad_tol with no negative curvature met in the
    last solve). ``on_escape`` is accepted for ``newton_polish``'s signature: the certificate after the
    polish finds saddles here (Lanczos).
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
        moved = _halving_step(objective, x, direction, lambda v, _candidate: v <= value)
        if moved is None:
            break
        x, value = moved
    return x.detach(), False


def _halving_step(objective: Objective, x: Tensor, direction: Tensor, accept) -> tuple[Tensor, float] | None:
    """x − t·direction for the first t in 1, 1/2, 1/4, … (down to 1e-6) that ``accept(value, candidate)``
    takes, with its objective value; None when no step is accepted."""
    step = 1.0
    while step > 1e-6:
        candidate = (x - step * direction).detach()
        new_value = float(objective(candidate))
        if accept(new_value, candidate):
            return candidate, new_value
        step /= 2
    return None


def _preconditioned_cg(hvp, g: Tensor, precondition, max_iter: int = 30, rtol: float = 1e-6,
                       best_effort: bool = False) -> Tensor | None:
    """H⁻¹g by CG from M⁻¹g with preconditioner ``precondition`` (M⁻¹, symmetric positive definite);
    None when it meets non-positive curvature or misses ``rtol`` within ``max_iter`` products
    (``best_effort``: then the last iterate, still a descent direction while all curvature was positive)."""
    d = precondition(g)
    r = g - hvp(d[:, None])[:, 0]
    z = precondition(r)
    p, rz = z.clone(), float(r @ z)
    target = rtol * float(g.norm())
    for _ in range(max_iter):
        if float(r.norm()) <= target:
            return d
        hp = hvp(p[:, None])[:, 0]
        curvature = float(p @ hp)
        if curvature <= 0:
            return None
        step = rz / curvature
        d, r = d + step * p, r - step * hp
        z = precondition(r)
        rz_new = float(r @ z)
        p, rz = z + (rz_new / rz) * p, rz_new
    return d if best_effort or float(r.norm()) <= target else None


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

def perturbed(x: Tensor, config: TrainConfig, stream: int) -> Tensor:
    """x·(1 + init_jitter·N(0, 1)) elementwise (``TrainConfig.init_jitter``): what another CPU's rounding
    does to a trajectory, for sweeps. ``stream`` separates the stages' draws. x itself when 0."""
    if not config.init_jitter:
        return x
    gen = torch.Generator(device="cpu").manual_seed(config.jitter_seed * 16 + stream)
    noise = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.device, x.dtype)
    return x * (1 + config.init_jitter * noise)


def pretrain(task: TwoStageTask, config: TrainConfig, weights: Tensor | None = None,
             p0: Tensor | None = None, desc: str | None = "pretraining",
             hessians: HessianStore | None = None) -> TrainResult:
    """p* = argmin L_P (example weights optional, denominator m fixed), certified (``TrainResult.certificate``).

    Chunk by chunk (memory O(chunk), not O(m)) when ``config.stream_chunk`` > 0 or the task's
    pretraining inputs are ``LazyRows``; see ``precompute.streaming.pretraining_objective``. The
    certificate's dense Hessian (unit weights only) is kept in ``hessians`` under
    ``hessian_key("pretrain", ...)`` for the influence solve at the same point.
    """
    start = perturbed(task.initial_pretrain_params(), config, 0) if p0 is None else p0
    if config.minibatch_epochs:
        return minibatch_pretrain(task, config, weights, start, desc)
    shared = (lambda x: hessians.slot(hessian_key("pretrain", task, x))) if hessians and weights is None else None
    objective = pretraining_objective(task, weights, config.stream_chunk)
    return minimize(objective, start, config, desc, shared,
                    approximate=subsample_objective(task, weights, config.newton_subsample, objective))


def minibatch_pretrain(task: TwoStageTask, config: TrainConfig, weights: Tensor | None, start: Tensor,
                       desc: str | None = "pretraining") -> TrainResult:
    """p ≈ argmin L_P by ``config.minibatch_epochs`` epochs of minibatch Adam (``minibatch_size`` examples
    per step, learning rate ``minibatch_lr`` decayed by a cosine to 0), for pretraining sets whose full-batch
    L-BFGS and dense certificate cost too much (``--preset fashion-all``: 30,000 garments, 54,693 parameters).

    The result is a damped stationary point, not a certified minimum: its full-batch ‖∇L_P‖ is measured
    and reported (``grad_norm``), ``certificate`` is None and ``method`` "minibatch", so only damped solves
    (damping > 0) may score it (``TrainedStages.require_certified``). Deterministic for a fixed seed: the
    minibatch order comes from ``TrainConfig.jitter_seed``'s generator, not the global one.
    """
    m, batch = task.m, config.minibatch_size
    steps_per_epoch = math.ceil(m / batch)
    total = config.minibatch_epochs * steps_per_epoch
    x = start.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=config.minibatch_lr)
    order = torch.Generator(device="cpu").manual_seed(config.jitter_seed * 16 + 7)
    bar = progress_report.bar(desc or "", total=config.minibatch_epochs, unit="epochs", enabled=desc is not None)
    step, running = 0, float("nan")
    for _ in range(config.minibatch_epochs):
        permutation = torch.randperm(m, generator=order).to(task.pretrain_x.device)
        for begin in range(0, m, batch):
            rows = permutation[begin:begin + batch]
            for group in optimizer.param_groups:
                group["lr"] = config.minibatch_lr * 0.5 * (1 + math.cos(math.pi * step / total))
            losses = task.pretrain_losses(x, task.pretrain_x[rows], task.pretrain_y[rows])
            if weights is not None:
                losses = weights[rows] * losses
            loss = losses.mean() + 0.5 * task.pretrain_l2 * (x * x).sum()
            if not torch.isfinite(loss):
                raise TaskError(f"{desc or 'pretraining'}: minibatch loss became non-finite at step {step}; "
                                "lower --minibatch-lr")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            running = value if math.isnan(running) else 0.95 * running + 0.05 * value
            step += 1
        bar.update(1)
        bar.set_note(f"minibatch loss {running:.4f}")
    params = x.detach()
    objective = pretraining_objective(task, weights, config.stream_chunk)
    gnorm = _grad_norm(objective, params)
    bar.close(f"minibatch Adam, full-batch ‖∇‖ {gnorm:.1e} (a damped stationary point, not certified)")
    return TrainResult(params, float(objective(params)), gnorm, step, gnorm <= config.grad_tol, None, 0, "minibatch")


SUBSAMPLE_SEED = 0


def subsample_objective(task: TwoStageTask, weights: Tensor | None, size: int,
                        objective: Objective) -> Objective | None:
    """p -> (1/size) Σ_{i∈S} w_i ℓ_P(z_i; p) + (λ_P/2)‖p‖² over a fixed random subset S of ``size``
    pretraining examples: about L_P's Hessian at 1/(m/size) of its cost (``TrainConfig.newton_subsample``).
    None when ``size`` is 0, not below m, or the set is streamed (its rows are not all in memory)."""
    if not size or size >= task.m or isinstance(objective, StreamedPretrainObjective):
        return None
    gen = torch.Generator(device="cpu").manual_seed(SUBSAMPLE_SEED)
    rows = torch.randperm(task.m, generator=gen)[:size].sort().values.to(task.pretrain_x.device)
    x, y = task.pretrain_x[rows], task.pretrain_y[rows]
    w = None if weights is None else weights[rows]

    def approximate(p: Tensor) -> Tensor:
        losses = task.pretrain_losses(p, x, y)
        return (losses if w is None else w * losses).sum() / size + 0.5 * task.pretrain_l2 * (p * p).sum()

    return approximate


def finetune_fixed(task: TwoStageTask, p: Tensor, config: TrainConfig, u0: Tensor | None = None,
                   desc: str | None = "finetuning (fixed)") -> TrainResult:
    """U* = argmin_U L_F(θ*, U); returns q = [θ*; U*] (its certificate is over U, the free block)."""
    theta = task.theta_of(p).detach()
    start = perturbed(task.initial_u(), config, 1) if u0 is None else u0
    result = minimize(task.fixed_objective(theta), start, config, desc)
    result.params = torch.cat([theta, result.params])
    return result


def finetune_updated(task: TwoStageTask, p: Tensor, alpha: float, config: TrainConfig,
                     q0: Tensor, desc: str | None = "finetuning (updated)",
                     hessians: HessianStore | None = None) -> TrainResult:
    """(θ_ft, U*) = argmin L_F(θ, U) + (α/2)‖θ − θ*‖², started at q0 (usually [θ*; U*_fixed]); the
    certificate's dense Hessian is kept in ``hessians`` under ``updated_hessian_key`` for the influence
    solve and retraining."""
    anchor = task.theta_of(p).detach()
    shared = (lambda q: hessians.slot(updated_hessian_key(task, q, anchor, alpha))) if hessians else None
    return minimize(lambda q: task.finetune_objective(q, anchor, alpha), q0, config, desc, shared)


@dataclass
class TrainedStages:
    """Trained parameters of both stages: p* and, per scenario, q = [θ; U]."""

    pretrain: TrainResult
    finetune: dict[str, TrainResult]
    alpha: float
    hessians: HessianStore = field(default_factory=HessianStore, repr=False)
    """Dense Hessians built by the certificates (pretraining, updated finetune), shared with the exact
    influence solves, the retraining preconditioners and the baselines at the same points."""

    @property
    def p(self) -> Tensor:
        return self.pretrain.params

    def q(self, scenario: str) -> Tensor:
        return self.finetune[scenario].params

    def stages(self, scenarios: tuple[str, ...] | None = None) -> dict[str, TrainResult]:
        """{"pretraining": ..., "finetuning (<scenario>)": ...} for ``scenarios`` (default: all)."""
        chosen = tuple(self.finetune) if scenarios is None else scenarios
        return {"pretraining": self.pretrain, **{f"finetuning ({s})": self.finetune[s] for s in chosen}}

    def require_certified(self, scenarios: tuple[str, ...] | None = None, damping: float = 0.0) -> None:
        """Raises ``CertificateError`` naming the first stage that is not a certified minimum.

        Exact influence is the derivative of a minimiser; a damped solve (``damping`` > 0) answers the
        proximal question of its own (docs/design.md) and is allowed on any stage. A stage that was
        never certified (built by hand) is not checked."""
        if damping > 0:
            return
        for name, stage in self.stages(scenarios).items():
            if stage.method == "minibatch":
                raise CertificateError(
                    f"{name} was trained by minibatches to a damped stationary point (‖∇‖ = {stage.grad_norm:.1e}), "
                    "not a certified minimum; score it with a damped solve: pass --damping (e.g. 1e-3)")
            if stage.certificate is not None and not stage.certified:
                raise CertificateError(stage.certificate.describe(name))

    @classmethod
    def from_params(cls, task: TwoStageTask, p: Tensor, q: dict[str, Tensor], alpha: float = 0.1,
                    grad_tol: float = TrainConfig.grad_tol) -> "TrainedStages":
        """Already-trained weights: p = [θ*; W] [P] and, per scenario, q = [θ; U] [Q].

        ``task.pretrain_params_from`` / ``finetune_params_from`` build the flat vectors from state
        dicts. Each stage records its objective and certificate (‖∇‖ ≤ grad_tol and the smallest
        Hessian eigenvalue > 0), because influence assumes a minimum; "fixed" must reuse θ* (the embedding was frozen) and
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

        hessians = HessianStore()

        def result(objective: Objective, x: Tensor, key: tuple | None = None) -> TrainResult:
            certificate, _ = certify(objective, x, grad_tol, TrainConfig.newton_max_params,
                                     None if key is None else hessians.slot(key),
                                     gradient=lambda xx: _gradient(objective, xx))
            return TrainResult(x, float(objective(x)), certificate.grad_norm, 0,
                               certificate.grad_norm <= grad_tol, certificate)

        pre = result(pretraining_objective(task), p, hessian_key("pretrain", task, p))
        finetuned = {}
        for s, qs in q.items():
            if s == "fixed":                   # "fixed" optimises U only: its minimum is that of the U block
                theta = task.theta_of(qs)
                finetuned[s] = result(lambda u, theta=theta: task.finetune_objective(torch.cat([theta, u])),
                                      qs[task.n_theta:])
                finetuned[s].params = qs
            else:
                finetuned[s] = result(objectives[s], qs, updated_hessian_key(task, qs, anchor, alpha))
        return cls(pre, finetuned, alpha, hessians)


def train_stages(task: TwoStageTask, config: TrainConfig, scenarios: tuple[str, ...] = ("fixed", "updated"),
                 progress: bool = True) -> TrainedStages:
    """Pretrain, then finetune in each scenario ("updated" warm-starts from the "fixed" head, with the
    proximal coefficient ``config.alpha``, which the result records as ``alpha``)."""
    alpha = config.alpha
    label = (lambda s: s) if progress else (lambda s: None)
    hessians = HessianStore()
    pre = pretrain(task, config, desc=label("pretraining"), hessians=hessians)
    fixed = finetune_fixed(task, pre.params, config, desc=label("finetuning (fixed)"))
    finetuned = {"fixed": fixed}
    if "updated" in scenarios:
        finetuned["updated"] = finetune_updated(task, pre.params, alpha, config, fixed.params,
                                                desc=label("finetuning (updated)"), hessians=hessians)
    return TrainedStages(pre, {s: finetuned[s] for s in scenarios}, alpha, hessians)
