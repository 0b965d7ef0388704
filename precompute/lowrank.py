"""A low-rank spectral preconditioner for retraining stages too large for a dense Hessian.

For D > ``retraining.MAX_DENSE_PARAMS`` (e.g. the fashion CNN with --channels 8,16 --hidden 32:
P = 11,813) a dense [D, D] Hessian and its O(D³) eigendecomposition are out of reach; a Lanczos run of ``LANCZOS_STEPS`` Hessian-vector
products at the trained optimum gives Ritz pairs (V, λ) instead, and

    M⁻¹ g = V diag(1/|λ|) Vᵀ g + (I − V Vᵀ) g / τ

with τ the bulk curvature (the Rayleigh quotient of random vectors orthogonal to the Krylov space;
with L2 λ most of a CNN's spectrum sits at about λ) and V the Ritz vectors whose values differ from
τ (the top and the bottom of the spectrum). It is the initial inverse Hessian of the batched L-BFGS
in ``retraining``; the L-BFGS pairs learn the rest of the curvature. It is shared by all models, costs D × rank floats, and
each application is two [B, D] x [D, r] products.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .curvature import BatchedHVP, batched_hvp
from .solvers import InverseHVP, batched_cg, lanczos

LANCZOS_STEPS = 96
"""Hessian-vector products of the Lanczos run (each one pass over the stage's data)."""
KEEP = 96
"""Ritz pairs kept at most: those farthest from the bulk curvature τ (top and bottom of the spectrum,
which converge first in Lanczos)."""
BULK_RATIO = 1.5
"""A Ritz value within a factor BULK_RATIO of τ is left to the bulk term."""
TAIL_PROBES = 4


class LowRankPreconditioner:
    """Same call signature as ``retraining.Preconditioner`` (shared by every model)."""

    def __init__(self, vecs: Tensor, inv: Tensor, tail_inv: float, ritz: Tensor):
        self.vecs, self.inv, self.tail_inv, self.ritz = vecs, inv, tail_inv, ritz    # [D, r], [r]

    @classmethod
    def at(cls, objective: Callable[[Tensor], Tensor], x: Tensor, steps: int | None = None,
           keep: int | None = None, seed: int = 0) -> "LowRankPreconditioner":
        """From ``steps`` Lanczos iterations on ∇²objective(x): the bulk τ and up to ``keep`` outlying Ritz pairs."""
        return cls.from_hvp(batched_hvp(objective, x.detach()), x, steps, keep, seed)

    @classmethod
    def from_hvp(cls, hvp: BatchedHVP, x: Tensor, steps: int | None = None, keep: int | None = None,
                 seed: int = 0) -> "LowRankPreconditioner":
        """The same from a batched Hessian-vector product ([D, k] -> [D, k]); x gives size, dtype, device."""
        steps, keep = steps or LANCZOS_STEPS, keep or KEEP
        dim = x.numel()
        steps = min(steps, dim)
        q, ritz, small = lanczos(hvp, dim, steps, x.dtype, x.device, seed, return_vectors=True)
        # Bulk curvature τ: Rayleigh quotient of random vectors orthogonal to the Krylov space.
        gen = torch.Generator(device="cpu").manual_seed(seed + 1)
        z = torch.randn(dim, TAIL_PROBES, generator=gen, dtype=x.dtype).to(x.device)
        z = z - q @ (q.T @ z)
        z = z - q @ (q.T @ z)
        tau = float(((z * hvp(z)).sum(0) / (z * z).sum(0)).median()) if steps < dim else float(ritz.abs().min())
        tau = max(abs(tau), 1e-8 * float(ritz.abs().max()))
        # Keep the Ritz pairs that differ from the bulk (top and bottom of the spectrum), at most ``keep``.
        distinct = ((ritz.abs() > BULK_RATIO * tau) | (ritz.abs() < tau / BULK_RATIO)).nonzero()[:, 0]
        distinct = distinct[(ritz[distinct].abs() / tau).log().abs().argsort(descending=True)[:keep]]
        vecs = q @ small[:, distinct]
        mags = ritz[distinct].abs().clamp_min(1e-8 * float(ritz.abs().max()))
        return cls(vecs, 1.0 / mags, 1.0 / tau, ritz)

    def __call__(self, g: Tensor, rows: Tensor | None = None) -> Tensor:
        """M⁻¹g for g [B, D] (``rows`` is ignored: one M for all models)."""
        coef = g @ self.vecs
        return (coef * self.inv) @ self.vecs.T + self.tail_inv * (g - coef @ self.vecs.T)


__all__ = ["KEEP", "LANCZOS_STEPS", "LowRankPreconditioner"]


class LowRankPCG(InverseHVP):
    """``--solver lanczos-pcg``: conjugate gradient on exact Hessian products, preconditioned by the
    low-rank Lanczos M above (built once, with the damping added to its eigenvalues, reused for every
    right-hand side). The Lanczos run takes the outlying top and bottom eigenvalues out of CG's way,
    so it converges in far fewer iterations than plain ``cg`` on a CNN's spectrum; the answer is
    CG's (exact up to ``tol``)."""

    name = "lanczos-pcg"

    def preconditioner(self) -> LowRankPreconditioner:
        if not hasattr(self, "_pre"):
            x = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
            hvp = self.hvp
            pre = LowRankPreconditioner.from_hvp(hvp, x, seed=self.config.seed)
            lam = pre.ritz.abs().max().item()
            mags = 1.0 / pre.inv + self.damping
            self._pre = LowRankPreconditioner(pre.vecs, 1.0 / mags, 1.0 / (1.0 / pre.tail_inv + self.damping),
                                              pre.ritz)
            self._eig_range = (float(pre.ritz.min()), float(max(lam, pre.ritz.max().item())))
        return self._pre

    def _solve(self, b: Tensor) -> tuple[Tensor, int]:
        pre = self.preconditioner()
        return batched_cg(self.operator, b, lambda v: pre(v.T).T, self.config.max_iter, self.config.tol,
                          f"lanczos-pcg: negative curvature {{}}; the Hessian is indefinite at these "
                          f"parameters: raise the damping (now {self.damping})")

    def eigenvalue_range(self) -> tuple[float, float]:
        self.preconditioner()
        return self._eig_range


__all__ += ["LowRankPCG"]
