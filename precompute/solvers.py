"""Inverse-Hessian-vector products behind one interface.

Each solver applies ``x = (H + λI)⁻¹ b`` to a block of right-hand sides ``b`` of shape [D, k], given
only a batched Hessian-vector product ``hvp: [D, k] -> [D, k]`` (H symmetric, without damping).

    exact    dense H from D HVPs, eigendecomposition; exact, O(D²) memory. Tests and small models.
    cg       conjugate gradient, all k right-hand sides at once; exact up to ``tol``; needs H + λI
             positive definite (stops with an error on negative curvature).
    lissa    Neumann series x ← b/s + (I − (H+λI)/s) x with s from a Lanczos estimate of H's spectrum; simple but
             slow when H is ill-conditioned; guards against divergence.
    arnoldi  rank-r eigendecomposition from a Krylov (Lanczos/Arnoldi) run, computed once and reused
             for every right-hand side; approximate outside the top-r subspace.

Every solve returns ``SolveDiagnostics`` (iterations, relative residual ‖(H+λI)x − b‖/‖b‖, eigenvalue
estimates) and raises ``SolverError`` instead of returning non-finite or diverged results.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from .config import SolverConfig
from .curvature import BatchedHVP, SharedHessian, dense_hessian
from .errors import PrecomputeError


class SolverError(PrecomputeError, RuntimeError):
    """An inverse-HVP solve failed (diverged, indefinite, non-finite or not converged)."""


@dataclass
class SolveDiagnostics:
    solver: str
    damping: float
    dim: int
    n_rhs: int
    iterations: int
    relative_residual: float       # max over right-hand sides of ‖(H+λI)x − b‖ / ‖b‖ (approximate solvers:
                                   # over the first APPROXIMATE_RESIDUAL_COLUMNS of them)
    eig_min: float                 # estimate of the smallest eigenvalue of H (without damping)
    eig_max: float                 # estimate of the largest eigenvalue of H
    rank: int | None = None        # arnoldi only
    curvature_model: dict | None = None   # ekfac/pcg: which layers used EK-FAC, which the fallback

    def as_dict(self) -> dict:
        return asdict(self)


APPROXIMATE_RESIDUAL_COLUMNS = 2
"""Right-hand sides whose exact residual an approximate solver (ekfac) reports."""


class InverseHVP(ABC):
    """Applies (H + λI)⁻¹ to blocks of vectors. Built by ``precompute.solver_registry.build_solver``."""

    name = ""
    approximate = False            # True: the residual is reported, not enforced (arnoldi, ekfac)
    curvature_model: dict | None = None

    def __init__(self, hvp: BatchedHVP, dim: int, config: SolverConfig, dtype: torch.dtype,
                 device: torch.device | str):
        self.hvp, self.dim, self.config = hvp, dim, config
        self.dtype, self.device = dtype, torch.device(device)
        self.damping = float(config.damping)

    def operator(self, v: Tensor) -> Tensor:
        return self.hvp(v) + self.damping * v

    def solve(self, b: Tensor) -> tuple[Tensor, SolveDiagnostics]:
        """x = (H + λI)⁻¹ b for b of shape [D] or [D, k]."""
        squeeze = b.dim() == 1
        b2 = b[:, None] if squeeze else b
        if b2.shape[0] != self.dim:
            raise SolverError(f"right-hand side has {b2.shape[0]} rows, the Hessian is {self.dim}x{self.dim}")
        if not torch.isfinite(b2).all():
            raise SolverError(f"{self.name}: right-hand side is not finite (check the test loss and its gradient)")
        x, iterations = self._solve(b2)
        if not torch.isfinite(x).all():
            raise SolverError(f"{self.name}: solve returned non-finite values; raise the damping (now {self.damping})")
        # an approximate solver's residual is a diagnostic, not a check: a few columns show it, and each
        # column costs an exact product (a pass over 30,000 garments in fashion-all)
        sample = slice(0, APPROXIMATE_RESIDUAL_COLUMNS) if self.approximate else slice(None)
        residual = _relative_residual(self.operator, x[:, sample], b2[:, sample])
        eig_min, eig_max = self.eigenvalue_range()
        diag = SolveDiagnostics(self.name, self.damping, self.dim, b2.shape[1], iterations, residual,
                                eig_min, eig_max, self._rank(), self.curvature_model)
        if not self.approximate and residual > self.config.max_residual:
            raise SolverError(
                f"{self.name}: relative residual {residual:.2e} exceeds {self.config.max_residual:.0e} after "
                f"{iterations} iterations; raise max_iter or the damping (now {self.damping}), or use 'exact'")
        return (x[:, 0] if squeeze else x), diag

    def apply(self, b: Tensor) -> Tensor:
        """x = (H + λI)⁻¹ b for b [D, k] without diagnostics, for the many blocks of a streamed pass of an
        approximate solver (``solve``'s residual costs exact products: a pass over the data per column).
        An exact or iterative solver still checks its residual (``solve``)."""
        return self._solve(b)[0] if self.approximate else self.solve(b)[0]

    @abstractmethod
    def _solve(self, b: Tensor) -> tuple[Tensor, int]:
        ...

    def eigenvalue_range(self) -> tuple[float, float]:
        """(smallest, largest) eigenvalue estimates of H from a short Lanczos run (cached)."""
        if not hasattr(self, "_eig_range"):
            steps = min(self.dim, 40)
            _, ritz = lanczos(self.hvp, self.dim, steps, self.dtype, self.device, self.config.seed)
            self._eig_range = (float(ritz.min()), float(ritz.max()))
        return self._eig_range

    def _rank(self) -> int | None:
        return None


class ExactSolver(InverseHVP):
    """Dense Hessian from D HVPs (identity columns in blocks), then eigh; reused for all solves."""

    name = "exact"

    def __init__(self, *args, block: int = 256, shared: SharedHessian | None = None, **kw):
        super().__init__(*args, **kw)
        self.block, self.shared = block, shared       # shared: the dense build kept for other users
        self._eig: tuple[Tensor, Tensor] | None = None

    def hessian(self) -> Tensor:
        return dense_hessian(self.hvp, self.dim, self.dtype, self.device, self.block, self.shared)

    def eigh(self) -> tuple[Tensor, Tensor]:
        if self._eig is None:
            evals, evecs = torch.linalg.eigh(self.hessian())
            self._eig = (evals, evecs)
            lo = float(evals[0]) + self.damping
            if lo <= 0:
                raise SolverError(
                    f"exact: H + λI is not positive definite (smallest eigenvalue {float(evals[0]):.3e}, "
                    f"damping {self.damping}); set damping above {-float(evals[0]):.3e} or train to a minimum")
        return self._eig

    def _solve(self, b: Tensor) -> tuple[Tensor, int]:
        evals, evecs = self.eigh()
        return evecs @ ((evecs.T @ b) / (evals + self.damping)[:, None]), 0

    def eigenvalue_range(self) -> tuple[float, float]:
        evals, _ = self.eigh()
        return float(evals[0]), float(evals[-1])


class CGSolver(InverseHVP):
    """Conjugate gradient on all right-hand sides at once (one batched HVP per iteration)."""

    name = "cg"

    def _solve(self, b: Tensor) -> tuple[Tensor, int]:
        return batched_cg(self.operator, b, lambda v: v, self.config.max_iter, self.config.tol,
                          f"cg: negative curvature {{}}; the Hessian is indefinite at these parameters: raise the "
                          f"damping (now {self.damping})")


class PCGSolver(InverseHVP):
    """Preconditioned CG on all right-hand sides at once: ``preconditioner`` applies M⁻¹ ≈ (H+λI)⁻¹
    (symmetric positive definite, e.g. the damped EK-FAC inverse) to [D, k] blocks. Converges to the
    exact answer of the exact products ``hvp``, in fewer iterations the closer M is to H + λI."""

    name = "pcg"

    def __init__(self, *args, preconditioner: BatchedHVP | None = None, curvature_model: dict | None = None,
                 eigenvalue_estimate: Callable[[], tuple[float, float]] | None = None, **kw):
        super().__init__(*args, **kw)
        self.preconditioner = preconditioner or (lambda v: v)
        self.curvature_model = curvature_model
        self.eigenvalue_estimate = eigenvalue_estimate

    def eigenvalue_range(self) -> tuple[float, float]:
        """The preconditioner's model's range when given (no products: at 30,000 examples a 40-step Lanczos
        estimate costs 40 passes over the data), else the exact products' Lanczos estimate."""
        return self.eigenvalue_estimate() if self.eigenvalue_estimate is not None else super().eigenvalue_range()

    def _solve(self, b: Tensor) -> tuple[Tensor, int]:
        return batched_cg(self.operator, b, self.preconditioner, self.config.max_iter, self.config.tol,
                          f"pcg: negative curvature {{}}; the Hessian is indefinite at these parameters: use "
                          f"--curvature ggn or raise the damping (now {self.damping})")


def batched_cg(operator: BatchedHVP, b: Tensor, precondition: BatchedHVP, max_iter: int, tol: float,
               curvature_error: str) -> tuple[Tensor, int]:
    """(Preconditioned) conjugate gradients for A X = B on all k columns of b [D, k] at once.

    ``operator``: V -> A V (A symmetric positive definite, damping included); ``precondition``:
    V -> M⁻¹ V (symmetric positive definite; the identity gives plain CG). A column stops once its
    relative residual ‖r‖/‖b‖ ≤ ``tol``. Returns (X [D, k], iterations). Raises ``SolverError``
    with ``curvature_error`` (its ``{}`` filled with pᵀAp) when a direction meets non-positive
    curvature, so no score is ever computed from an indefinite solve.
    """
    tiny = torch.finfo(b.dtype).tiny
    x, r = torch.zeros_like(b), b.clone()
    z = precondition(r)
    p, rz = z.clone(), (r * z).sum(0)
    b_norm = b.norm(dim=0).clamp_min(tiny)
    it = 0
    for it in range(1, max_iter + 1):
        active = r.norm(dim=0) > tol * b_norm
        if not active.any():
            return x, it - 1
        ap = operator(p)
        curvature = (p * ap).sum(0)
        if (curvature[active] <= 0).any():
            raise SolverError(curvature_error.format(f"(pᵀ(H+λI)p = {float(curvature[active].min()):.3e})"))
        step = torch.where(active, rz / curvature.where(active, torch.ones_like(curvature)), torch.zeros_like(rz))
        x, r = x + step * p, r - step * ap
        z = precondition(r)
        rz_new = (r * z).sum(0)
        beta = torch.where(active, rz_new / rz.where(rz.abs() > tiny, torch.ones_like(rz)), torch.zeros_like(rz))
        p, rz = z + beta * p, rz_new
    return x, it


class LissaSolver(InverseHVP):
    """Deterministic (full-batch) LiSSA: x ← b/s + (I − (H+λI)/s) x, s from the spectrum estimate.

    With Lanczos estimates λ_lo ≤ eig(H) ≤ λ_hi, s = 1.1 (|λ_hi| + λ) and the error contracts by
    ρ = 1 − (λ_lo + λ)/s per iteration, so reaching ``tol`` takes about ln(tol (1 − ρ))/ln ρ
    iterations. LiSSA stops when its update falls below tol (1 − ρ)‖x‖ (the update alone
    underestimates the error by 1/(1 − ρ), the condition number), and refuses up front, with the
    number of iterations it would need, when that exceeds ``max_iter``: raise it, add damping, or
    use cg / pcg, whose iterations grow with √κ instead of κ.
    """

    name = "lissa"

    def _solve(self, b: Tensor) -> tuple[Tensor, int]:
        lo, hi = self.eigenvalue_range()
        scale = 1.1 * (max(abs(hi), abs(lo)) + self.damping)
        self.scale = scale
        low = lo + self.damping
        if low <= 0:
            raise SolverError(f"lissa: H + λI is not positive definite (smallest eigenvalue estimate {lo:.3e}); "
                              f"raise the damping (now {self.damping}) above {-lo:.3e}")
        rho = 1.0 - low / scale
        tol = self.config.tol
        needed = math.ceil(math.log(tol * (1 - rho)) / math.log(rho)) if rho > 0 else 1
        if needed > self.config.max_iter:
            raise SolverError(
                f"lissa: would need about {needed:,} iterations (condition number {scale / low:.3g}) for tol "
                f"{tol:.0e}, max_iter is {self.config.max_iter:,}; raise max_iter, raise the damping (now "
                f"{self.damping}), or use cg or pcg")
        x = b / scale
        first_norm = float(x.norm())
        it = 0
        for it in range(1, self.config.max_iter + 1):
            x_new = b / scale + x - self.operator(x) / scale
            delta = float((x_new - x).norm())
            x = x_new
            norm = float(x.norm())
            if not math.isfinite(norm) or norm > 1e6 * max(first_norm, 1e-30):
                raise SolverError(
                    f"lissa: diverged after {it} iterations (‖x‖ grew to {norm:.2e}); H + λI is not positive "
                    f"definite or the scale {scale:.3e} is too small: raise the damping (now {self.damping})")
            if delta <= tol * (1 - rho) * norm:
                break
        return x, it


class ArnoldiSolver(InverseHVP):
    """Low-rank inverse from the top-|λ| Ritz pairs of a Krylov run (Schioppa et al. style).

    The factorisation costs ``rank + oversample`` HVPs once; every later solve is two matmuls.
    Directions outside the kept subspace are dropped, so the residual is reported, not enforced.
    """

    name = "arnoldi"
    approximate = True

    def factorise(self) -> tuple[Tensor, Tensor]:
        if not hasattr(self, "_factors"):
            steps = min(self.dim, self.config.rank + self.config.oversample)
            q, ritz, ritz_vecs = lanczos(self.hvp, self.dim, steps, self.dtype, self.device, self.config.seed,
                                         return_vectors=True)
            order = torch.argsort(ritz.abs(), descending=True)[: min(self.config.rank, steps)]
            evals, evecs = ritz[order], q @ ritz_vecs[:, order]
            if (evals + self.damping <= 0).any():
                worst = float(evals.min())
                raise SolverError(
                    f"arnoldi: eigenvalue estimate {worst:.3e} makes H + λI indefinite; set damping above {-worst:.3e}")
            self._factors = (evals, evecs)
            self._eig_range = (float(ritz.min()), float(ritz.max()))
        return self._factors

    def _solve(self, b: Tensor) -> tuple[Tensor, int]:
        evals, evecs = self.factorise()
        return evecs @ ((evecs.T @ b) / (evals + self.damping)[:, None]), len(evals)

    def eigenvalue_range(self) -> tuple[float, float]:
        self.factorise()
        return self._eig_range

    def _rank(self) -> int | None:
        return int(self.factorise()[0].numel())


def power_iteration(hvp: BatchedHVP, dim: int, steps: int, dtype, device, seed: int) -> float:
    """Estimate of the largest-magnitude eigenvalue of H (Rayleigh quotient after ``steps``)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(dim, 1, generator=gen, dtype=dtype).to(device)
    v = v / v.norm()
    value = 0.0
    for _ in range(steps):
        hv = hvp(v)
        value = float((v * hv).sum())
        norm = hv.norm()
        if norm == 0 or not torch.isfinite(norm):
            break
        v = hv / norm
    return value


def lanczos(hvp: BatchedHVP, dim: int, steps: int, dtype, device, seed: int, return_vectors: bool = False):
    """Lanczos with full re-orthogonalisation (the symmetric case of Arnoldi).

    Returns (Q [D, s], Ritz values [s]) or, with ``return_vectors``, also the projected matrix's
    eigenvectors [s, s] so that Q @ vecs approximates eigenvectors of H. The projected matrix is
    Qᵀ H Q as recorded by the re-orthogonalisation (every coefficient, in float64), not the
    three-term tridiagonal: once the Krylov space is exhausted (a clustered spectrum, e.g. the L2
    floor of a rank-deficient Hessian) in float32 the new vectors are rounding noise whose products
    have O(1) components along earlier vectors, and a tridiagonal that drops them produced spurious
    negative Ritz values (−0.23 for a matrix with spectrum [0.01, 0.59]).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.zeros(dim, steps, dtype=dtype, device=device)
    v = torch.randn(dim, generator=gen, dtype=dtype).to(device)
    q[:, 0] = v / v.norm()
    t = torch.zeros(steps, steps, dtype=torch.float64)
    eps = torch.finfo(dtype).eps
    s = steps
    for j in range(steps):
        w = hvp(q[:, j: j + 1])[:, 0]
        scale = float(w.norm())
        # Two passes of Gram-Schmidt keep Q orthonormal in float32; their coefficients are column j of QᵀHQ.
        for _ in range(2):
            coef = q[:, : j + 1].T @ w
            w = w - q[:, : j + 1] @ coef
            t[: j + 1, j] += coef.double().cpu()
        beta = float(w.norm())
        if j + 1 == steps:
            break
        if beta <= max(1e-10, 100 * eps) * max(1.0, scale):
            s = j + 1  # invariant subspace found: the Krylov space is exhausted
            break
        q[:, j + 1] = w / beta
    q, t = q[:, :s], t[:s, :s]
    # t's upper triangle holds q_iᵀ H q_j (i ≤ j); H is symmetric, so reflect it
    ritz, vecs = torch.linalg.eigh(torch.triu(t) + torch.triu(t, 1).T)
    ritz, vecs = ritz.to(dtype=dtype, device=device), vecs.to(dtype=dtype, device=device)
    return (q, ritz, vecs) if return_vectors else (q, ritz)


def _relative_residual(operator: BatchedHVP, x: Tensor, b: Tensor) -> float:
    r = operator(x) - b
    rel = r.norm(dim=0) / b.norm(dim=0).clamp_min(torch.finfo(b.dtype).tiny)
    return float(rel.max())
