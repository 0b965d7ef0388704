"""Multi-stage influence (Chen et al. 2020): test-side vectors first, then one streamed pass.

For finetune test points t (measurement f_t, by default the test loss) and pretraining examples z
(docs/design.md §2):

    fixed:    g_t = ∇_θ f − H_θU H_UU⁻¹ ∇_U f                    (blocks of ∇²L_F at (θ*, U*))
    updated:  g_t = α [(H_F + αD)⁻¹ ∇_(θ,U) f]_θ                (∇²L_F at (θ_ft, U*), D = diag(I_θ, 0))
    s_t       = H_P⁻¹ [g_t; 0_W]                                 (H_P over θ and W together)
    score(z, t) = ∇_p ℓ_P(z) · s_t / m = −I_up(z, t) / m

score > 0: removing z is predicted to RAISE f_t (z helpful); score < 0: z harmful.
``multi_stage_scores`` is the one path for one process and for N ranks: the test-side matrix
S = [s_1 … s_T] [P, T] (``stacked_test_vectors``), then one streamed pass over the pretraining set
(``precompute.scoring.sharded_score_pretraining``: memory O(chunk_size · P + P · T), never
O(m · P)). Under torchrun the two plug-ins are the pretraining Hessian-vector product (local on
rank 0, or data-parallel on every rank: ``precompute.curvature.distributed_pretrain_hvp``) and the
scoring pass (each rank its shard); with one process both are the plain single-process steps.
For models whose parameters all sit in nn.Linear or nn.Conv2d layers, a chunk of the scoring pass
costs one forward and one backward (``precompute.layer_scores``: per-example gradients are never formed).
When the pretraining inputs are memory-mapped (``precompute.streaming.LazyRows``), the H_P
products of the solve stream too.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.func import jacrev

from . import progress as progress_report
from .config import InfluenceConfig, SolverConfig
from .curvature import (HessianStore, batched_hvp, distributed_pretrain_hvp, finetune_curvature, hessian_key,
                        pretrain_curvature, updated_hessian_key)
from .distributed import agreed, broadcast_object, broadcast_vectors, get_rank, get_world_size, rank_zero_compute
from .scoring import add_precision_check, sharded_score_pretraining
from .ekfac import finetune_factors, pretrain_factors
from .layers import find_layers, finetune_roots, pretrain_roots
from .solver_registry import LinearSystem, build_solver, resolve_auto, small_system_config
from .solvers import ArnoldiSolver, BatchedHVP, ExactSolver, InverseHVP
from .task import TaskError, TwoStageTask
from .training import TrainedStages


class ProductMeter:
    """``on_product`` for a solver built once and used later (``MultiStageInfluence.fit``): it counts
    the Hessian columns of each product into the progress bar open at that moment (``reporting``)."""

    def __init__(self) -> None:
        self.bar: progress_report.Bar | None = None

    def __call__(self, columns: int) -> None:
        if self.bar is not None:
            self.bar.update(columns)

    @contextmanager
    def reporting(self, bar: progress_report.Bar):
        self.bar = bar
        try:
            yield bar
        finally:
            self.bar = None


def counted(hvp: BatchedHVP, on_product: Callable[[int], object] | None) -> BatchedHVP:
    """``hvp`` that reports the number of columns of each product (for a progress bar)."""
    if on_product is None:
        return hvp

    def apply(v: Tensor) -> Tensor:
        out = hvp(v)
        on_product(v.shape[1])
        return out

    return apply


def pretrain_system(task: TwoStageTask, p: Tensor, config: SolverConfig,
                    on_product: Callable[[int], object] | None = None, data_parallel: bool = False,
                    hessians: HessianStore | None = None) -> LinearSystem:
    """The system (H_P + λI) over all of (θ, W) at p*: products of ``config.curvature``, the EK-FAC
    factors of the pretraining layers (fitted on first use, shard by shard with ``data_parallel``),
    L2 λ_P on the diagonal, and the dense Hessian shared through ``hessians`` (the training
    certificate's build, reused by the retraining check).

    On a task whose pretraining inputs are ``LazyRows`` every product is a chunked pass over them
    (``precompute.streaming``), so memory does not grow with m. ``data_parallel``: each product sums
    every rank's shard part (``distributed_pretrain_hvp``; collective, so every rank must ``solve``
    the same right-hand side); Hessian products only."""
    if data_parallel and config.curvature != "hessian":
        raise TaskError(f"--curvature {config.curvature} under torchrun needs --rank-zero-solve (the "
                        "data-parallel products are Hessian products)")
    hvp = distributed_pretrain_hvp(task, p) if data_parallel else pretrain_curvature(task, p, config.curvature)
    keep = hessians is not None and config.curvature == "hessian" and not data_parallel
    return LinearSystem(counted(hvp, on_product), task.n_pretrain_params, p.dtype, p.device,
                        roots=tuple(pretrain_roots(task)), shift=torch.full_like(p, task.pretrain_l2),
                        factors=lambda: pretrain_factors(task, p, config, data_parallel),
                        shared=hessians.slot(hessian_key("pretrain", task, p)) if keep else None)


def pretrain_solver(task: TwoStageTask, p: Tensor, config: SolverConfig,
                    on_product: Callable[[int], object] | None = None, data_parallel: bool = False,
                    hessians: HessianStore | None = None) -> InverseHVP:
    """(H_P + λI)⁻¹ at p*, over all of (θ, W); reusable for every test point and scenario
    (``pretrain_system``; "auto" resolves by ``pretrain_config``)."""
    return build_solver(pretrain_system(task, p, config, on_product, data_parallel, hessians), config)


def pretrain_config(task: TwoStageTask, config: SolverConfig) -> SolverConfig:
    """``config`` with "auto" resolved for (H_P + λI) over (θ, W): exact, pcg or cg (``solver_registry.resolve``)."""
    return resolve_auto(config, task.n_pretrain_params, task.pretrain_l2, not find_layers(pretrain_roots(task))[1])


def updated_system(task: TwoStageTask, q: Tensor, anchor: Tensor, alpha: float, config: SolverConfig,
                   hessians: HessianStore | None = None) -> LinearSystem:
    """The system (H_F + αD + λI) over (θ, U) at (θ_ft, U*): α on θ's diagonal and λ_F on U's (which
    EK-FAC adds to the layers' eigenvalues); the dense Hessian is the training certificate's."""
    shift = torch.cat([torch.full((task.n_theta,), float(alpha), dtype=q.dtype, device=q.device),
                       torch.full((task.u_layout.size,), task.finetune_l2, dtype=q.dtype, device=q.device)])
    keep = hessians is not None and config.curvature == "hessian"
    return LinearSystem(finetune_curvature(task, q, anchor, alpha, config.curvature), task.n_finetune_params,
                        q.dtype, q.device, roots=tuple(finetune_roots(task)), shift=shift,
                        factors=lambda: finetune_factors(task, q, config),
                        shared=hessians.slot(updated_hessian_key(task, q, anchor, alpha)) if keep else None)


def gradients_at_test_points(task: TwoStageTask, q: Tensor, test_ids: Tensor) -> Tensor:
    """∇_q f_t for each test id, [Q, T] (f: ``task.test_measurement``, the test loss by default);
    raises if a value is not finite."""
    values = task.test_measurement(q, test_ids)
    if not torch.isfinite(values).all():
        what = "finetune_loss" if task.measurement is None else "measurement"
        raise TaskError(f"{what} is non-finite on test id(s) "
                        f"{test_ids[~torch.isfinite(values)].tolist()}; check those inputs")
    return jacrev(lambda qq: task.test_measurement(qq, test_ids))(q.detach()).T


@dataclass
class EmbeddingSensitivity:
    """g_t for one scenario and the diagnostics of the finetune-side solve."""

    g: Tensor                      # [Pθ, T]
    diagnostics: dict = field(default_factory=dict)


def embedding_sensitivity_fixed(task: TwoStageTask, q: Tensor, test_ids: Tensor,
                                config: SolverConfig) -> EmbeddingSensitivity:
    """g_t = ∇_θ f − H_θU H_UU⁻¹ ∇_U f at (θ*, U*): the total derivative of f w.r.t. θ* when U re-optimises."""
    nt = task.n_theta
    grads = gradients_at_test_points(task, q, test_ids)                      # [Q, T]
    theta = q[:nt].detach()
    full_hvp = batched_hvp(task.finetune_objective, q)            # over (θ, U), no proximal term

    uu_hvp = batched_hvp(lambda u: task.finetune_objective(torch.cat([theta, u])), q[nt:])
    head = LinearSystem(uu_hvp, task.u_layout.size, q.dtype, q.device)          # small: exact unless huge
    solver = build_solver(head, small_system_config(config, task.u_layout.size))
    v, diag = solver.solve(grads[nt:])                             # H_UU⁻¹ ∇_U f, [PU, T]
    cross = full_hvp(torch.cat([torch.zeros(nt, v.shape[1], dtype=v.dtype, device=v.device), v]))[:nt]
    return EmbeddingSensitivity(grads[:nt] - cross, {"finetune_solve": diag.as_dict()})


def embedding_sensitivity_updated(task: TwoStageTask, q: Tensor, anchor: Tensor, alpha: float,
                                  test_ids: Tensor, config: SolverConfig,
                                  hessians: HessianStore | None = None) -> EmbeddingSensitivity:
    """g_t = α [(H_F + αD)⁻¹ ∇f]_θ at (θ_ft, U*): d f / d θ* through the proximal anchor."""
    grads = gradients_at_test_points(task, q, test_ids)
    solver = build_solver(updated_system(task, q, anchor.detach(), alpha, config, hessians), config)
    u, diag = solver.solve(grads)
    return EmbeddingSensitivity(alpha * u[: task.n_theta], {"finetune_solve": diag.as_dict()})


def finetune_side(task: TwoStageTask, trained: TrainedStages, ids: Tensor,
                  config: InfluenceConfig) -> tuple[Tensor, dict[str, dict]]:
    """g_t of every scenario, stacked column-wise [Pθ, T · len(scenarios)], and each scenario's
    finetune-solve diagnostics."""
    g, diagnostics = [], {}
    for scenario in config.scenarios:
        q = trained.q(scenario)
        if scenario == "fixed":
            side = embedding_sensitivity_fixed(task, q, ids, config.finetune_solver)
        else:
            side = embedding_sensitivity_updated(task, q, task.theta_of(trained.p), trained.alpha, ids,
                                                 config.finetune_solver, trained.hessians)
        g.append(side.g)
        diagnostics[scenario] = side.diagnostics
    return torch.cat(g, dim=1), diagnostics


def stacked_test_vectors(task: TwoStageTask, trained: TrainedStages, test_ids, config: InfluenceConfig,
                         solver: InverseHVP | None = None, progress: bool = False,
                         data_parallel: bool = False,
                         meter: ProductMeter | None = None) -> tuple[dict[str, Tensor], dict[str, dict]]:
    """S_scenario = H_P⁻¹ [g; 0_W], [P, T] per scenario, with one pretraining solve for all scenarios.

    Returns ({scenario: S}, {scenario: diagnostics}), the same on every rank. ``solver`` lets a
    caller reuse a pretraining solver across calls (its ``meter``, if it was built with one, reports
    its products). ``progress``: count the Hessian-vector products of the pretraining solve (each a
    pass over the set when it streams from disk).

    Under a process group (collective) the finetune side (finetune data only) runs on rank 0 and is
    broadcast; the pretraining solve runs on rank 0 alone, or with ``data_parallel`` on every rank
    in lockstep over a data-parallel HVP; the vectors are broadcast from rank 0 so every rank holds
    bit-identical ones. One process: the plain steps, in the same order.

    Raises ``CertificateError`` when a stage is not a certified minimum and a solve is undamped
    (``TrainedStages.require_certified``): exact influence is undefined there.
    """
    ids = task.check_test_ids(test_ids)
    trained.require_certified(tuple(config.scenarios),
                              min(config.pretrain_solver.damping, config.finetune_solver.damping))
    device = trained.p.device
    g, side_diagnostics = rank_zero_compute(finetune_side, task, trained, ids, config, device=device,
                                            what="finetune-side solves")
    p = broadcast_vectors(trained.p, device=device)         # every rank linearises at rank 0's p
    rhs = torch.cat([g, torch.zeros(task.w_layout.size, g.shape[1], dtype=g.dtype, device=g.device)])

    def solve() -> tuple[Tensor, dict]:
        exact = pretrain_config(task, config.pretrain_solver).name == "exact"
        # a solver built earlier reports through its meter; a factorised one (exact, arnoldi) needs no products
        iterative = meter is not None and not isinstance(solver, (ExactSolver, ArnoldiSolver))
        with solve_progress(progress and (solver is None or iterative) and get_rank() == 0,
                            task.n_pretrain_params if exact else None) as bar:
            with meter.reporting(bar) if meter is not None else nullcontext():
                s, diag = (solver or pretrain_solver(task, p, config.pretrain_solver, bar.update, data_parallel,
                                                     trained.hessians)).solve(rhs)
        return s, diag.as_dict()

    if data_parallel:
        with agreed("pretraining solve"):    # every rank sees the same numbers, so all fail alike
            s_all, solve_diagnostics = solve()
        s_all = broadcast_vectors(s_all, device=device)
    else:
        s_all, solve_diagnostics = rank_zero_compute(solve, device=device, what="pretraining solve")
    vectors = dict(zip(config.scenarios, torch.split(s_all, len(ids), dim=1)))
    extra = {"world_size": get_world_size()} if data_parallel else {}
    diagnostics = {s: {**side_diagnostics[s], "pretrain_solve": solve_diagnostics, **extra} for s in config.scenarios}
    return vectors, diagnostics


def solve_progress(enabled: bool, total: int | None = None) -> progress_report.Bar:
    """Progress of a pretraining solve, in Hessian columns (use as a context manager); ``total``:
    the columns an exact solve needs (P), for an ETA."""
    return progress_report.bar("pretraining solve", total=total, unit="Hessian columns", enabled=enabled)


def multi_stage_scores(task: TwoStageTask, trained: TrainedStages, test_ids, config: InfluenceConfig,
                       progress: bool = True, out_dir: str | Path | None = None, distributed_solve: bool = False,
                       solver: InverseHVP | None = None,
                       meter: ProductMeter | None = None) -> tuple[dict[str, np.ndarray] | None, dict[str, dict]]:
    """Scores [T, m] float32 per scenario for the given finetune test ids, with solver diagnostics.

    All scenarios share one streamed pass: their test-side vectors are stacked column-wise. Works
    for one process and under torchrun (collective: every rank calls it; rank 0 returns the
    scores, other ranks None, every rank the diagnostics). ``out_dir`` (rank 0's value, e.g.
    ``writer.path`` of a ``rank_zero_writer``): scores go straight to
    ``out_dir/scores/<scenario>.npy`` memory maps instead of memory. ``distributed_solve``: the
    pretraining solve runs on every rank with the data-parallel HVP (else on rank 0 alone).
    ``solver``, ``meter``: a pretraining solver to reuse and its product meter (see ``stacked_test_vectors``).
    """
    ids = task.check_test_ids(test_ids)
    vectors, diagnostics = stacked_test_vectors(task, trained, ids, config, solver=solver, progress=progress,
                                                data_parallel=distributed_solve, meter=meter)
    stacked = torch.cat([vectors[s] for s in config.scenarios], dim=1)
    out_dir = broadcast_object(None if out_dir is None else Path(out_dir))
    paths = None if out_dir is None else [out_dir / "scores" / f"{s}.npy" for s in config.scenarios]
    scores = sharded_score_pretraining(task, trained.p, stacked, config.chunk_size, out_path=paths,
                                       progress=progress, precision=config.score_precision)
    if scores is None:
        return None, diagnostics
    t = len(ids)
    split = (dict(zip(config.scenarios, scores)) if paths is not None
             else {s: scores[i * t: (i + 1) * t] for i, s in enumerate(config.scenarios)})
    add_precision_check(diagnostics, task, trained.p, vectors, split, config)      # rank 0: it holds the scores
    return split, diagnostics


__all__ = ["EmbeddingSensitivity", "ProductMeter", "embedding_sensitivity_fixed", "embedding_sensitivity_updated", "finetune_side",
           "gradients_at_test_points", "multi_stage_scores", "pretrain_config", "pretrain_solver", "pretrain_system",
           "stacked_test_vectors", "updated_system"]
