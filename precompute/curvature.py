"""Curvature products of a scalar objective: Hessian-vector products and dense Hessians.

This is the bottom of the math layer: ``training``, ``solvers``' callers, ``influence`` and
``retraining`` build their curvature here, and it imports nothing of theirs (no import cycles).
Every product takes and returns column blocks: V [D, k] -> H V [D, k].

Data-parallel products (``distributed_hvp``, ``distributed_pretrain_hvp``). The pretraining
objective L_P = (1/m) Σ_i w_i ℓ_i + (λ_P/2)‖p‖² splits over ranks as
Σ_r [(1/m) Σ_{i∈shard r} w_i ℓ_i] + (λ_P/2)‖p‖²: each rank's HVP covers its shard's part (with the
full m), the parts are all-reduced (sum), and the L2 term λ_P·v is added once, after the reduction.
Every rank must call the resulting ``hvp`` the same number of times with the same vectors (the
solvers in ``precompute.solvers`` are deterministic functions of the HVP results, which the
all-reduce makes identical on every rank, so a solve with the same right-hand side runs in lockstep).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .distributed import all_reduce_sum, get_rank, get_world_size, is_distributed, shard_range
from .streaming import DEFAULT_CHUNK, StreamedPretrainObjective, batched_double_backward, is_lazy
from .task import TwoStageTask

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


def distributed_hvp(objective_per_shard: Callable[[Tensor], Tensor] | None, x: Tensor, l2: float = 0.0,
                    rhs_block: int = 64) -> BatchedHVP:
    """V [D, k] -> (Σ_ranks ∇²objective_r(x) + l2·I) V, for ``make_solver(hvp, dim, config, ...)``.

    ``objective_per_shard``: this rank's share of the objective, already divided by the FULL
    denominator (e.g. (1/m) Σ_{i∈shard} w_i ℓ_i), without the L2 term; None for an empty shard.
    A ``StreamedPretrainObjective`` (``rows`` = the shard) makes each product one chunked pass.
    ``l2``: coefficient of a (l2/2)‖x‖² term, added once after the all-reduce. Every rank must call
    the returned function in lockstep with identical V (each call is one all-reduce).
    """
    local = None if objective_per_shard is None else batched_hvp(objective_per_shard, x, rhs_block)

    def apply(v: Tensor) -> Tensor:
        hv = local(v) if local is not None else torch.zeros_like(v)
        if is_distributed():
            hv = all_reduce_sum(hv)
        return hv + l2 * v if l2 else hv

    return apply


def pretrain_shard_objective(task: TwoStageTask, rank: int | None = None, world: int | None = None,
                             weights: Tensor | None = None,
                             chunk_size: int = 0) -> Callable[[Tensor], Tensor] | None:
    """p -> (1/m) Σ_{i∈shard} w_i ℓ_P(z_i; p) over this rank's shard (no L2); None if it is empty.

    ``weights``: the full [m] example weights (default 1); the denominator is the full m.
    Streamed (a ``StreamedPretrainObjective`` over the shard, ``chunk_size`` examples at a time,
    default ``DEFAULT_CHUNK``) when ``chunk_size`` > 0 or the task's inputs are ``LazyRows``;
    otherwise the shard's tensors are held and its HVP graph is built once.
    """
    rank = get_rank() if rank is None else rank
    world = get_world_size() if world is None else world
    sl = shard_range(task.m, rank, world)
    if sl.stop == sl.start:
        return None
    if chunk_size > 0 or is_lazy(task):
        return StreamedPretrainObjective(task, weights, chunk_size or DEFAULT_CHUNK, rows=sl)
    x, y = task.pretrain_x[sl], task.pretrain_y[sl]
    w = None if weights is None else weights[sl]
    m = task.m

    def objective(p: Tensor) -> Tensor:
        losses = task.pretrain_losses(p, x, y)
        return (losses if w is None else w * losses).sum() / m

    return objective


def distributed_pretrain_hvp(task: TwoStageTask, p: Tensor, weights: Tensor | None = None,
                             rhs_block: int = 64, chunk_size: int = 0) -> BatchedHVP:
    """Data-parallel ∇²L_P(p) V over (θ, W): shard parts all-reduced, λ_P V added once.

    Each shard's part is streamed in chunks when ``chunk_size`` > 0 or the inputs are ``LazyRows``
    (see ``pretrain_shard_objective``)."""
    return distributed_hvp(pretrain_shard_objective(task, weights=weights, chunk_size=chunk_size), p,
                           task.pretrain_l2, rhs_block)
