"""Minimum certificates: is a trained stage a strict local minimum, where influence is defined?

A certificate is two numbers at the stage's final parameters x (docs/design.md, "Minima,
certificates and seeds"):

    grad_norm = ‖∇objective(x)‖₂          must be ≤ grad_tol
    eig_min   = λ_min(∇²objective(x))     must be > 0

``eig_min`` is exact (dense ``eigvalsh``) up to ``dense_max`` parameters and a Lanczos estimate on
Hessian-vector products above. Lanczos's smallest Ritz value is a Rayleigh quotient, so it is an
upper bound of λ_min: a negative one proves a saddle (its Ritz vector is a direction of negative
curvature); a positive one is an estimate.

Retrained models (many at once, ``batched_inertia``) are certified against the shared
preconditioner M (SPD, the Hessian at the trained optimum): by Sylvester's law of inertia
M^{-1/2} H_b M^{-1/2} has the same signs of eigenvalues as H_b, and it is close to I for a
warm-started retraining, so a few Lanczos steps resolve its smallest eigenvalue.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .curvature import SharedHessian, batched_hvp, dense_hessian, hessian_products
from .errors import PrecomputeError
from .solvers import lanczos

LANCZOS_STEPS = 64
"""Krylov steps of the single-model Lanczos estimate above the dense limit (one HVP each)."""
ROUNDING_ULPS = 100
"""An objective change below this many ulps of |L| is rounding noise, not descent (training's saddle
escapes and Newton steps, retraining's line search and escapes)."""
ROUNDING_FACTOR = 10.0
"""Safety factor of the gradient's rounding floor (``Certificate.grad_floor``)."""
INERTIA_STEPS = 16
"""Krylov steps of the batched inertia check of retrained models (one vmapped HVP each)."""


class CertificateError(PrecomputeError, RuntimeError):
    """A trained stage is not a certified minimum, so exact influence is undefined there."""


@dataclass(frozen=True)
class Certificate:
    """grad_norm ≤ grad_tol and eig_min > 0 at a stage's parameters; ``method``: "dense" or "lanczos"."""

    grad_norm: float
    eig_min: float
    grad_tol: float
    method: str
    grad_floor: float = 0.0
    """The rounding floor of ‖∇‖ at x: ROUNDING_FACTOR · eps · λ_max · max(‖x‖, 1). A gradient is computed
    to about eps·‖H‖·‖x‖, so a stiff stage (a large α) cannot show a smaller one: below the floor the
    point is stationary to working precision, whatever ``grad_tol`` asks."""

    @property
    def certified(self) -> bool:
        return self.grad_norm <= max(self.grad_tol, self.grad_floor) and self.eig_min > 0

    def summary(self) -> dict:
        return {"grad_norm": self.grad_norm, "eig_min": self.eig_min, "certified": self.certified,
                "grad_tol": self.grad_tol, "grad_floor": self.grad_floor, "eig_method": self.method}

    def describe(self, stage: str) -> str:
        """One line: why ``stage`` is not certified, and what to change."""
        why = []
        if self.grad_norm > max(self.grad_tol, self.grad_floor):
            why.append(f"‖∇‖ = {self.grad_norm:.1e} above the target {max(self.grad_tol, self.grad_floor):.0e}")
        if not self.eig_min > 0:
            why.append(f"smallest Hessian eigenvalue {self.eig_min:.2e} ≤ 0 (a saddle, not a minimum)")
        return (f"{stage} is not at a certified minimum ({'; '.join(why) or 'unknown'}); influence is only defined "
                "at one: raise --train-iters or --newton-steps, raise the L2 (--pretrain-l2/--finetune-l2), or try "
                "another --seed")


def lanczos_extremes(hvp: Callable[[Tensor], Tensor], x: Tensor, steps: int = LANCZOS_STEPS,
                     seed: int = 0) -> tuple[float, Tensor, float]:
    """(smallest Ritz value, its unit Ritz vector [D], largest |Ritz value|) of the symmetric operator
    ``hvp`` ([D, k] -> [D, k]), from ``steps`` (at most D) products (``solvers.lanczos``). The smallest
    Ritz value is a Rayleigh quotient, so it is ≥ λ_min."""
    q, ritz, small = lanczos(hvp, x.numel(), max(1, min(steps, x.numel())), x.dtype, x.device, seed,
                             return_vectors=True)
    vector = q @ small[:, 0]
    return float(ritz[0]), vector / vector.norm(), float(ritz.abs().max())


def smallest_eigenpair(objective: Callable[[Tensor], Tensor], x: Tensor, dense_max: int,
                       shared: SharedHessian | None = None,
                       on_columns: Callable[[int, int, int], object] | None = None,
                       on_eigh: Callable[[Tensor, Tensor], object] | None = None,
                       products: str = "double-backward") -> tuple[float, Tensor, str, float]:
    """(λ_min, unit eigenvector [D], method, largest |eigenvalue|) of ∇²objective(x): dense up to
    ``dense_max`` parameters (``shared``: where the dense build is shared, see ``curvature.dense_hessian``), Lanczos above.
    ``on_columns(first, last, D)`` before each block of the dense build (progress: minutes on a CNN).
    ``on_eigh(evals [D], evecs [D, D])``: receives the dense eigendecomposition (a Newton step's factorisation).
    ``products``: how the dense build's products are made (``curvature.hessian_products``)."""
    if x.numel() <= dense_max:
        hvp = hessian_products(objective, x, products)
        hessian = dense_hessian(hvp, x.numel(), x.dtype, x.device, shared=shared, on_columns=on_columns)
        evals, evecs = torch.linalg.eigh(hessian)
        if on_eigh is not None:
            on_eigh(evals, evecs)
        return float(evals[0]), evecs[:, 0].clone(), "dense", float(evals.abs().max())
    value, vector, largest = lanczos_extremes(batched_hvp(objective, x), x)
    return value, vector, "lanczos", largest


def certify(objective: Callable[[Tensor], Tensor], x: Tensor, grad_tol: float, dense_max: int,
            shared: SharedHessian | None = None,
            gradient: Callable[[Tensor], Tensor] | None = None,
            on_columns: Callable[[int, int, int], object] | None = None,
            on_eigh: Callable[[Tensor, Tensor], object] | None = None,
            products: str = "double-backward") -> tuple[Certificate, Tensor]:
    """The certificate of ``x`` and the eigenvector of its smallest Hessian eigenvalue (a way off a saddle).

    ``gradient``: x -> ∇objective(x) when autograd through ``objective`` is not the way (streamed sets).
    ``on_columns``, ``on_eigh``, ``products``: progress of the dense Hessian's build, its eigendecomposition, how
    its products are made (``smallest_eigenpair``)."""
    g = gradient(x) if gradient is not None else torch.func.grad(objective)(x.detach())
    eig_min, vector, method, eig_max = smallest_eigenpair(objective, x.detach(), dense_max, shared, on_columns,
                                                          on_eigh, products)
    floor = ROUNDING_FACTOR * torch.finfo(x.dtype).eps * eig_max * max(float(x.norm()), 1.0)
    return Certificate(float(g.norm()), eig_min, grad_tol, method, floor), vector


def batched_inertia(hvp: Callable[[Tensor], Tensor], inv_sqrt: Callable[[Tensor], Tensor], b: int, dim: int,
                    dtype: torch.dtype, device: torch.device, steps: int = INERTIA_STEPS, seed: int = 0,
                    return_vectors: bool = False,
                    on_step: Callable[[int, int], object] | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """[B] smallest eigenvalue estimates of A_b = S H_b S, S = M^{-1/2} (``inv_sqrt``: rows [B, D] -> S rows),
    with ``hvp``: rows [B, D] -> H_b rows. A_b has the inertia of H_b (Sylvester), so its sign is the
    sign of λ_min(H_b); A_b = I exactly when H_b = M. Batched Lanczos with full reorthogonalisation.
    ``return_vectors``: also [B, D] unit directions S y_b (y_b the Ritz vector): where the value is
    negative, H_b has negative curvature along it (a way off the saddle). ``on_step(j, steps)`` after
    each Krylov step (one batched Hessian product each): progress."""
    steps = max(1, min(steps, dim))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(b, dim, generator=gen, dtype=dtype).to(device)
    q = q / q.norm(dim=1, keepdim=True)
    basis = torch.zeros(b, steps, dim, dtype=dtype, device=device)
    tri = torch.zeros(b, steps, steps, dtype=torch.float64, device=device)
    for j in range(steps):
        basis[:, j] = q
        w = inv_sqrt(hvp(inv_sqrt(q)))
        tri[:, j, j] = (w * q).sum(1).double()
        if on_step is not None:
            on_step(j + 1, steps)
        for _ in range(2):
            w = w - torch.einsum("bk,bkd->bd", torch.einsum("bkd,bd->bk", basis[:, : j + 1], w), basis[:, : j + 1])
        if j == steps - 1:
            break
        beta = w.norm(dim=1)
        tri[:, j, j + 1] = tri[:, j + 1, j] = beta.double()
        # an exhausted Krylov space (beta 0) restarts with a fresh random direction, orthogonalised
        fresh = torch.randn(b, dim, generator=gen, dtype=dtype).to(device)
        fresh = fresh - torch.einsum("bk,bkd->bd", torch.einsum("bkd,bd->bk", basis[:, : j + 1], fresh),
                                     basis[:, : j + 1])
        tiny = beta <= 1e-12
        tri[tiny, j, j + 1] = tri[tiny, j + 1, j] = 0.0
        q = torch.where(tiny[:, None], fresh / fresh.norm(dim=1, keepdim=True), w / beta.clamp_min(1e-300)[:, None])
    ritz, small = torch.linalg.eigh(tri)
    if not return_vectors:
        return ritz[:, 0].to(dtype)
    direction = inv_sqrt(torch.einsum("bk,bkd->bd", small[:, :, 0].to(dtype), basis))
    return ritz[:, 0].to(dtype), direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-300)
