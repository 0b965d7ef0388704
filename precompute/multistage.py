"""``MultiStageInfluence``: fit the pretraining curvature once, then score any finetune test points.

    from precompute import MultiStageInfluence
    influence = MultiStageInfluence(task, trained, config).fit()
    scores = influence.scores([0, 1, 2])      # {scenario: float32 [T, m]}
    self_inf = influence.self_influence()     # float64 [m]

``trained`` comes from ``precompute.training.train_stages`` or, for weights trained elsewhere,
``TrainedStages.from_params``. What is explained is ``task.measurement`` (the test loss unless the
task sets another, e.g. ``precompute.task.correct_class_margin``); a score is the predicted change
of that measurement if the pretraining example is removed (docs/design.md §2).

The same object works under torchrun (after ``precompute.distributed.init_distributed()``): every
rank builds it and calls the same methods in the same order; rank 0 receives the arrays, the other
ranks None. With ``config.distributed_solve`` (the default) the pretraining curvature is a
data-parallel Hessian-vector product over every rank's shard; otherwise rank 0 holds it alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import Tensor

from .config import InfluenceConfig
from .distributed import gather_columns, get_rank, get_world_size, rank_zero_compute, shard_range, shard_task
from .influence import ProductMeter, multi_stage_scores, pretrain_solver, solve_progress, stacked_test_vectors
from .scoring import self_influence
from .solvers import ArnoldiSolver, ExactSolver, InverseHVP, SolverError
from .task import TwoStageTask
from .training import TrainedStages


class MultiStageInfluence:
    """Multi-stage influence of a pretraining set on finetune test points, for one trained chain.

    task:    the ``TwoStageTask`` (modules, data, losses, optional measurement).
    trained: p* and q per scenario (``TrainedStages``).
    config:  scenarios, solvers, chunk size (``InfluenceConfig``; default ``InfluenceConfig()``); α is
             the one the "updated" stage was trained with (``trained.alpha``).
    progress: progress bars (rank 0 only).
    """

    def __init__(self, task: TwoStageTask, trained: TrainedStages, config: InfluenceConfig | None = None,
                 progress: bool = False):
        self.task, self.trained = task, trained
        self.config = InfluenceConfig() if config is None else config
        self.progress = progress
        self.data_parallel = self.config.distributed_solve and get_world_size() > 1
        self.solver: InverseHVP | None = None
        self.meter = ProductMeter()                   # the solver's products, into the current progress bar
        self.fitted = False
        self.diagnostics: dict[str, dict] = {}        # of the latest ``scores`` call

    def fit(self) -> "MultiStageInfluence":
        """Builds the pretraining solver (H_P + λI)⁻¹ at p* once; exact and arnoldi factorise here
        (a dense eigendecomposition, or r Lanczos products), so every later call is two matmuls.
        The fitted curvature is held here (``solver``: its dense factorisation or EK-FAC factors) and
        in ``trained.hessians`` (the dense Hessians the training certificates built), for retraining
        and the baselines to reuse. Collective under torchrun. Returns self; raises ``CertificateError``
        when a stage is not a certified minimum and the solves are undamped."""
        if not self.fitted:
            # exact influence needs minima: refuse before any factorisation (``stacked_test_vectors`` checks too)
            self.trained.require_certified(tuple(self.config.scenarios),
                                           min(self.config.pretrain_solver.damping, self.config.finetune_solver.damping))
            if self.data_parallel or get_rank() == 0:        # otherwise rank 0 solves for everyone
                self.solver = pretrain_solver(self.task, self.trained.p, self.config.pretrain_solver, self.meter,
                                              data_parallel=self.data_parallel, hessians=self.trained.hessians)
                factorise = {ExactSolver: "eigh", ArnoldiSolver: "factorise"}.get(type(self.solver))
                if factorise:
                    total = self.task.n_pretrain_params if factorise == "eigh" else None
                    show = self.progress and get_rank() == 0
                    with solve_progress(show, total) as bar, self.meter.reporting(bar):
                        getattr(self.solver, factorise)()
            self.fitted = True
        return self

    def test_vectors(self, test_ids) -> dict[str, Tensor]:
        """s_t = H_P⁻¹ [g_t; 0_W] per scenario, [P, T], on every rank."""
        vectors, self.diagnostics = stacked_test_vectors(self.task, self.trained, test_ids, self.config,
                                                         solver=self.fit().solver, progress=self.progress,
                                                         data_parallel=self.data_parallel, meter=self.meter)
        return vectors

    def scores(self, test_ids, out_dir: str | Path | None = None) -> dict[str, np.ndarray] | None:
        """{scenario: float32 [T, m]}: row i scores every pretraining example for ``test_ids[i]``;
        score > 0: removing z raises the measurement. ``out_dir``: write
        ``out_dir/scores/<scenario>.npy`` memory maps instead of holding the matrices in memory.
        Rank 0 gets the scores, other ranks None; solver diagnostics land in ``self.diagnostics``."""
        scores, self.diagnostics = multi_stage_scores(self.task, self.trained, test_ids, self.config,
                                                      progress=self.progress, out_dir=out_dir,
                                                      distributed_solve=self.data_parallel,
                                                      solver=self.fit().solver, meter=self.meter)
        return scores

    def self_influence(self) -> np.ndarray | None:
        """g_zᵀ (H_P + λI)⁻¹ g_z ≥ 0 for every pretraining example, float64 [m] (rank 0; None elsewhere).

        m × the predicted rise of z's own pretraining loss if z is removed; large values flag
        atypical or mislabelled examples. Under torchrun with a data-parallel curvature it needs a
        factorised solver (exact or arnoldi): each rank then scores its shard.
        """
        self.fit()
        task, p = self.task, self.trained.p
        if not self.data_parallel:
            return rank_zero_compute(lambda: self_influence(task, p, self.solver, self.config.chunk_size),
                                     what="self-influence")
        if not isinstance(self.solver, (ExactSolver, ArnoldiSolver)):
            raise SolverError(f"self-influence under torchrun with a data-parallel {self.solver.name} solve would "
                              "need a different right-hand side on every rank; use the exact or arnoldi "
                              "solver, or distributed_solve=False")
        mine = shard_range(task.m, get_rank(), get_world_size())
        local = self_influence(shard_task(task, mine), p, self.solver, self.config.chunk_size)
        out = gather_columns(local[None], task.m)
        return None if out is None else out[0]


__all__ = ["MultiStageInfluence"]
