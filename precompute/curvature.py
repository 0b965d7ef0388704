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

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import CURVATURES, HESSIAN_PRODUCTS
from .distributed import all_reduce_sum, get_rank, get_world_size, is_distributed, shard_range
from .errors import ConfigError
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


FORWARD_OVER_REVERSE_CHUNK = 16
"""Columns per vmapped forward-over-reverse call (13 ms per column at 16 or 32 on the quick fashion CNN, 2 cores;
more columns per call were slower)."""


def forward_over_reverse_hvp(objective, x: Tensor, chunk: int = FORWARD_OVER_REVERSE_CHUNK) -> BatchedHVP:
    """V [D, k] -> ∇²objective(x) @ V as the forward-mode derivative of the gradient along each column
    (``torch.func.jvp`` of ``torch.func.grad``), vmapped ``chunk`` columns at a time. On the quick fashion
    CNN (P = 1,989, m = 300) 13 ms per column against 23 for the double backward; on the MLPs the double
    backward is as fast or faster (0.34 against 0.46 ms on digits). Equal to ``batched_hvp`` up to rounding."""
    gradient = torch.func.grad(objective)
    point = x.detach()

    def column(v: Tensor) -> Tensor:
        return torch.func.jvp(gradient, (point,), (v,))[1]

    return lambda v: torch.func.vmap(column, chunk_size=chunk)(v.T).T.detach()


def hessian_products(objective, x: Tensor, method: str = "double-backward", rhs_block: int = 64) -> BatchedHVP:
    """The products a dense Hessian is built from, by ``method`` (one of ``config.HESSIAN_PRODUCTS``: the gradient
    graph kept and differentiated again, ``batched_hvp``, or ``forward_over_reverse_hvp``; a streamed
    objective always makes its own chunked products). ``rhs_block``: the double backward's columns per call."""
    if method not in HESSIAN_PRODUCTS:
        raise ConfigError(f"Hessian products {method!r}: use one of {', '.join(HESSIAN_PRODUCTS)}")
    if method == "forward-over-reverse" and not isinstance(objective, StreamedPretrainObjective):
        return forward_over_reverse_hvp(objective, x)
    return batched_hvp(objective, x, rhs_block)


def dense_hessian(hvp: BatchedHVP, dim: int, dtype: torch.dtype, device: torch.device | str,
                  block: int = 256, shared: SharedHessian | None = None,
                  on_columns: Callable[[int, int, int], object] | None = None) -> Tensor:
    """The symmetric [dim, dim] matrix of ``hvp``, from ``dim`` products in blocks of ``block``.

    ``shared`` names the matrix in a ``HessianStore`` (a trained chain's): built once there, then
    returned to the training certificate, the influence solve and the retraining preconditioner at
    the same point (``dim`` products each otherwise). ``on_columns(first, last, dim)`` before each
    block (progress: the build takes minutes on a CNN)."""
    if shared is not None and (kept := shared.store.lookup(shared.key)) is not None:
        return kept
    eye = torch.eye(dim, dtype=dtype, device=device)
    blocks = []
    for i in range(0, dim, block):
        if on_columns is not None:
            on_columns(i + 1, min(i + block, dim), dim)
        blocks.append(hvp(eye[:, i: i + block]))
    h = torch.cat(blocks, dim=1)
    h = 0.5 * (h + h.T)
    if shared is not None:
        shared.store.keep(shared.key, h)
    return h


SHARED_HESSIAN_MAX_DIM = 5000
"""Largest Hessian kept for sharing (200 MB in float64); also the retraining's dense limit
(``retraining.MAX_DENSE_PARAMS``), above which retraining builds no dense Hessian to share it with."""


class HessianStore:
    """Dense Hessians of one trained chain, at most one per stage ("pretrain", "updated"), each of at
    most ``SHARED_HESSIAN_MAX_DIM`` rows. ``TrainedStages.hessians`` holds one: the matrices live as
    long as the trained stages (or until ``clear``), and nothing is shared between chains."""

    def __init__(self) -> None:
        self._kept: dict[str, tuple[tuple, Tensor]] = {}

    def slot(self, key: tuple) -> "SharedHessian":
        """A handle for ``dense_hessian(..., shared=...)``; ``key`` from ``hessian_key``/``updated_hessian_key``."""
        return SharedHessian(self, key)

    def lookup(self, key: tuple) -> Tensor | None:
        kept = self._kept.get(key[0])
        return kept[1] if kept is not None and kept[0] == key else None

    def keep(self, key: tuple, hessian: Tensor) -> None:
        """Keeps ``hessian`` as its stage's matrix (replacing an older point's), if it is small enough."""
        if hessian.shape[0] <= SHARED_HESSIAN_MAX_DIM:
            self._kept[key[0]] = (key, hessian)

    def keys(self) -> list[tuple]:
        """The keys of the matrices kept now (diagnostics and tests)."""
        return [key for key, _ in self._kept.values()]

    def clear(self) -> None:
        """Drops every kept matrix (a run calls it when validation and baselines are done)."""
        self._kept.clear()

    def __getstate__(self) -> dict:
        return {}          # broadcast with the trained stages, it travels empty: each rank builds its own

    def __setstate__(self, state: dict) -> None:
        self._kept = {}


@dataclass(frozen=True)
class SharedHessian:
    """Where a dense Hessian is shared: a store and the key of the stage and point."""

    store: HessianStore
    key: tuple


def hessian_key(what: str, task, point: Tensor) -> tuple:
    """Identifies a stage's Hessian: the stage, the task object and the exact bytes of the point."""
    digest = hashlib.sha1(point.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    return (what, id(task), str(point.dtype), digest)


def updated_hessian_key(task, q: Tensor, anchor: Tensor, alpha: float) -> tuple:
    """Key of ∇²[L_F(q) + (α/2)‖θ − anchor‖²] at q (the "updated" finetune stage): point, anchor and α."""
    return hessian_key("updated", task, torch.cat([q.detach().flatten(), anchor.detach().flatten(),
                                                   torch.tensor([alpha], dtype=q.dtype, device=q.device)]))


def distributed_hvp(objective_per_shard: Callable[[Tensor], Tensor] | None, x: Tensor, l2: float = 0.0,
                    rhs_block: int = 64) -> BatchedHVP:
    """V [D, k] -> (Σ_ranks ∇²objective_r(x) + l2·I) V, for ``solver_registry.LinearSystem``.

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


# ---- Gauss-Newton products ---------------------------------------------------------------------

# Curvature kinds (``config.CURVATURES``). hessian: ∇² of the objective (exact influence; what the
# finite-difference check measures). ggn: the generalised Gauss-Newton matrix Jᵀ H_out J (+ the
# objective's quadratic terms), positive semi-definite by construction, so CG never meets negative
# curvature on a non-convex net.

Outputs = Callable[[Tensor, Tensor], Tensor]
"""(flat parameters [D], inputs [B, ...]) -> model outputs [B, C]."""


def output_hessian_sqrt(loss_fn, z: Tensor, y: Tensor) -> Tensor:
    """L [B, C, C] with L_i L_iᵀ = ∇²_z ℓ(z_i, y_i), negative eigenvalues clipped to 0 (PSD).

    ``loss_fn(z [B, C], y [B]) -> [B]`` is the task's per-example loss; its Hessian in the outputs is
    taken per example (vmap of torch.func.hessian), so any loss works, not only cross-entropy (where
    it is diag(p) − p pᵀ). Computed in float64 and cast back to z's dtype.
    """
    from torch.func import hessian, vmap

    def single(zi: Tensor, yi: Tensor) -> Tensor:
        return loss_fn(zi[None], yi[None])[0]

    zd = z.detach().double()
    h = vmap(hessian(single), in_dims=(0, 0))(zd, y)                       # [B, C, C]
    h = 0.5 * (h + h.transpose(1, 2))
    evals, evecs = torch.linalg.eigh(h)
    return (evecs * evals.clamp_min(0).sqrt()[:, None, :]).to(z.dtype)


class _GGNChunk:
    """One chunk's retained graph: J v, then H_out, then Jᵀ, batched over columns."""

    def __init__(self, outputs: Outputs, loss_fn, point: Tensor, x: Tensor, y: Tensor):
        self.leaf = point.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            self.z = outputs(self.leaf, x)
            if self.z.dim() == 1:
                self.z = self.z[:, None]
            sqrt = output_hessian_sqrt(loss_fn, self.z, y)
            self.h = sqrt @ sqrt.transpose(1, 2)                                   # [B, C, C]
            # Jᵀu is linear in u; differentiating it in u gives J v (the double-vjp trick: no jvp needed)
            self.u = torch.zeros_like(self.z, requires_grad=True)
            self.jt_u = torch.autograd.grad(self.z, self.leaf, self.u, create_graph=True)[0]

    def apply(self, v: Tensor, rhs_block: int) -> Tensor:
        cols = []
        k = v.shape[1]
        for i in range(0, k, rhs_block):
            block = v[:, i: i + rhs_block].T.contiguous()                          # [k', D]
            jv = torch.autograd.grad(self.jt_u, self.u, block, is_grads_batched=True, retain_graph=True)[0]
            hjv = torch.einsum("bij,kbj->kbi", self.h, jv)
            cols.append(torch.autograd.grad(self.z, self.leaf, hjv, is_grads_batched=True, retain_graph=True)[0].T)
        return torch.cat(cols, dim=1).detach()


def _streamed_ggn(outputs: Outputs, loss_fn, point: Tensor, x: Tensor, y: Tensor, v: Tensor,
                  rhs_block: int) -> Tensor:
    """Σ_i J_iᵀ H_i J_i v over one chunk [k columns of v: D x k], nothing kept afterwards.

    J v is forward mode (``torch.func.jvp``, vmapped over the columns, the primal computed once) and Jᵀ
    one batched vector-Jacobian product: at fashion-all's size (30,000 garments, 54,693 parameters, float32,
    2 cores of an AMD EPYC, blocks of 4 columns, chunks of ``GGN_CHUNK``) a column costs 3.3 s this way, 5.2 s
    by the double backward chunk by chunk and 9.0 s through one graph kept over all 30,000."""
    from torch.func import jvp, vjp, vmap

    def model(pp: Tensor) -> Tensor:
        z = outputs(pp, x)
        return z[:, None] if z.dim() == 1 else z

    z, pullback = vjp(model, point.detach())
    sqrt = output_hessian_sqrt(loss_fn, z.detach(), y)
    h = sqrt @ sqrt.transpose(1, 2)                                               # [B, C, C]
    cols = []
    for i in range(0, v.shape[1], rhs_block):
        tangents = v[:, i: i + rhs_block].T.contiguous()                          # [k', D]
        jv = vmap(lambda t: jvp(model, (point.detach(),), (t,))[1])(tangents)      # [k', B, C]
        cols.append(vmap(pullback)(torch.einsum("bij,kbj->kbi", h, jv))[0].T)
    return torch.cat(cols, dim=1).detach()


def ggn_hvp(outputs: Outputs, loss_fn, point: Tensor, x, y, denominator: int, diagonal: Tensor | None = None,
            chunk_size: int = 0, rhs_block: int = 64) -> BatchedHVP:
    """V [D, k] -> G V with G = (1/denominator) Σ_i J_iᵀ H_i J_i + diag(``diagonal``).

    J_i = ∂outputs(point, x_i)/∂point, H_i = ∇²_z ℓ(z_i, y_i) (PSD-clipped, see
    ``output_hessian_sqrt``). ``diagonal`` [D]: the objective's quadratic terms (L2, proximal α),
    whose Hessian is already diagonal. ``chunk_size`` 0: one retained graph over all of x (fast for
    small sets, memory O(n)); > 0: each product runs forward mode chunk by chunk (memory O(chunk),
    ``_streamed_ggn``). ``x`` may be a tensor or ``LazyRows``.
    """
    n = len(x)
    chunk = chunk_size if chunk_size > 0 else n
    spans = [slice(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    kept = [_GGNChunk(outputs, loss_fn, point, x[sl], y[sl]) for sl in spans] if chunk_size <= 0 else None

    def apply(v: Tensor) -> Tensor:
        out = torch.zeros_like(v)
        if kept is not None:
            for part in kept:
                out += part.apply(v, rhs_block)
        else:
            for sl in spans:
                out += _streamed_ggn(outputs, loss_fn, point, x[sl], y[sl], v, rhs_block)
        out = out / denominator
        return out + diagonal[:, None] * v if diagonal is not None else out

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


IN_MEMORY_GRAPH_MAX = 32_768
"""Above this many in-memory pretraining examples, pretraining Hessian products run chunk by chunk
(``streaming.DEFAULT_CHUNK`` examples, one graph at a time) instead of keeping one autograd graph
over the whole set (measured: 2,632 MiB at m = 100k in one graph, 755 MiB chunked)."""
GGN_CHUNK = 2048
"""Above this many pretraining examples, Gauss-Newton products stream in chunks of this many (``_streamed_ggn``):
on fashion-all (30,000 garments, 2 cores of an AMD EPYC) a column cost 3.3 s in chunks of 2,048 against 9.0 s
through one graph kept over the whole set, and chunks of 1,024 and 4,096 were slower (4.2 and 4.5-5.2 s); its pcg
agreement check took 13m48s instead of 38m28s. Below it one graph is kept (the fastest for small sets)."""


def pretrain_curvature(task, p: Tensor, curvature: str = "hessian", chunk_size: int = 0) -> BatchedHVP:
    """V -> ∇²L_P(p) V ("hessian") or its Gauss-Newton counterpart (data-term GGN + λ_P I).

    chunk_size 0: the Hessian keeps one graph for sets up to ``IN_MEMORY_GRAPH_MAX`` examples in memory (the
    fastest products), else chunks of ``DEFAULT_CHUNK``; the Gauss-Newton products keep one graph up to
    ``GGN_CHUNK`` examples, else stream in chunks of that size. Memory-mapped sets always stream."""
    from .streaming import pretraining_objective

    _check_curvature(curvature)
    if curvature == "hessian":
        chunk = chunk_size or (DEFAULT_CHUNK if is_lazy(task) or task.m > IN_MEMORY_GRAPH_MAX else 0)
        return batched_hvp(pretraining_objective(task, chunk_size=chunk), p)
    chunk = chunk_size or (GGN_CHUNK if is_lazy(task) or task.m > GGN_CHUNK else 0)
    diagonal = torch.full_like(p, task.pretrain_l2)
    return ggn_hvp(task.pretrain_outputs, task.pretrain_loss, p, task.pretrain_x, task.pretrain_y, task.m,
                   diagonal, chunk)


def finetune_curvature(task, q: Tensor, anchor: Tensor | None = None, alpha: float = 0.0,
                       curvature: str = "hessian") -> BatchedHVP:
    """V -> ∇²[L_F(q) + (α/2)‖θ − anchor‖²] V ("hessian"), or the data-term GGN + diag(α on θ, λ_F on U)."""
    if curvature == "hessian":
        return batched_hvp(lambda qq: task.finetune_objective(qq, anchor, alpha), q)
    _check_curvature(curvature)
    diagonal = torch.cat([torch.full((task.n_theta,), alpha if anchor is not None else 0.0, dtype=q.dtype,
                                     device=q.device),
                          torch.full((task.u_layout.size,), task.finetune_l2, dtype=q.dtype, device=q.device)])
    return ggn_hvp(task.finetune_outputs, task.finetune_loss, q, task.finetune_x, task.finetune_y,
                   len(task.finetune_x), diagonal)


def _check_curvature(curvature: str) -> None:
    if curvature not in CURVATURES:
        raise ConfigError(f"unknown curvature {curvature!r}; choose from {', '.join(CURVATURES)}")
