"""Curvature products of a scalar objective: Hessian-vector products and dense Hessians.

This is the bottom of the math layer: ``training``, ``solvers``' callers, ``influence`` and
``retraining`` build their curvature here, and it imports nothing of theirs (no import cycles).
Every product takes and returns column blocks: V [D, k] -> H V [D, k].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .streaming import StreamedPretrainObjective, batched_double_backward

BatchedHVP = Callable[[Tensor], Tensor]
"""[D, k] -> [D, k]: H @ V for a symmetric H, without damping."""


def batched_hvp(objective, x: Tensor, rhs_block: int = 64) -> BatchedHVP:
    """V [D, k] -> ∇²objective(x) @ V.

    The gradient graph at x is built once and kept; each product is one batched double-backward
    through it (about 6x faster than re-tracing forward-over-reverse for every call on small models).
    A ``StreamedPretrainObjective`` instead makes each product one chunked pass over the data
    (memory O(chunk), the graph of one chunk at a time).
    """
    if isinstance(objective, StreamedPretrainObjective):
        return objective.hvp(x, rhs_block)
    leaf = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        gradient = torch.autograd.grad(objective(leaf), leaf, create_graph=True)[0]
    return lambda v: batched_double_backward(gradient, leaf, v, rhs_block)


def dense_hessian(hvp: BatchedHVP, dim: int, dtype: torch.dtype, device: torch.device | str,
                  block: int = 256) -> Tensor:
    """The symmetric [dim, dim] matrix of ``hvp``, from ``dim`` products in blocks of ``block``."""
    eye = torch.eye(dim, dtype=dtype, device=device)
    h = torch.cat([hvp(eye[:, i: i + block]) for i in range(0, dim, block)], dim=1)
    return 0.5 * (h + h.T)
