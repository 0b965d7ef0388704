"""Every knob of the project, with its default and meaning, in one place.

The CLI (``python -m precompute``) maps its flags onto these dataclasses; library users build them
directly. All are frozen so that a config can be recorded in a run's manifest as it was used.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

SOLVERS = ("exact", "cg", "lissa", "arnoldi")
SCENARIOS = ("fixed", "updated")


@dataclass(frozen=True)
class SolverConfig:
    """How to apply an inverse Hessian, ``x = (H + damping·I)⁻¹ b``.

    name:     "exact" (dense Hessian + eigendecomposition; P up to a few thousand),
              "cg" (conjugate gradient, batched over right-hand sides),
              "lissa" (Neumann series; scale from a power-iteration estimate of λ_max),
              "arnoldi" (rank-``rank`` eigendecomposition reused for every right-hand side).
    damping:  λ added to the Hessian's diagonal. 0 is exact influence; raise it when the solver
              reports a non-positive eigenvalue or does not converge.
    max_iter: iteration cap for cg and lissa.
    tol:      relative residual ‖(H+λI)x − b‖/‖b‖ at which cg stops; lissa stops when its update
              falls below it.
    rank:     number of eigenpairs kept by arnoldi (Krylov steps are ``rank + oversample``).
    oversample: extra Krylov steps for arnoldi, discarded after the eigendecomposition.
    max_residual: a solve whose final relative residual exceeds this raises ``SolverError``
              (arnoldi is exempt: it projects onto its subspace by design; its residual is reported).
    seed:     seed of the random start vectors of power iteration, Lanczos and Arnoldi.
    """

    name: str = "exact"
    damping: float = 0.0
    max_iter: int = 1000
    tol: float = 1e-6
    rank: int = 128
    oversample: int = 16
    max_residual: float = 1e-2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in SOLVERS:
            raise ValueError(f"unknown solver {self.name!r}; choose one of {', '.join(SOLVERS)}")
        if self.damping < 0:
            raise ValueError(f"damping must be >= 0, got {self.damping}")


@dataclass(frozen=True)
class TrainConfig:
    """Deterministic full-batch training of a stage (L-BFGS with a strong-Wolfe line search).

    max_iter:  L-BFGS iterations at most.
    grad_tol:  stop when the gradient norm of the objective falls below it.
    newton_polish: Newton steps with a dense Hessian after L-BFGS, when the stage has at most
               ``newton_max_params`` parameters (reaches machine precision; used by the check).
    """

    max_iter: int = 500
    grad_tol: float = 1e-6
    history_size: int = 20
    newton_polish: int = 0
    newton_max_params: int = 4000


@dataclass(frozen=True)
class InfluenceConfig:
    """Multi-stage influence scoring.

    scenarios:  which finetuning scenarios to score: "fixed" (embedding frozen during finetuning)
                and/or "updated" (embedding finetuned with the proximal term (α/2)‖θ − θ*‖²).
    alpha:      proximal coefficient α of the "updated" scenario.
    pretrain_solver: solver for H_P⁻¹ over (θ, W).
    finetune_solver: solver for H_UU⁻¹ ("fixed") or (H_F + αD)⁻¹ ("updated").
    chunk_size: pretraining examples per chunk of the streamed scoring pass; peak memory is
                about chunk_size × P floats.
    """

    scenarios: tuple[str, ...] = SCENARIOS
    alpha: float = 1.0
    pretrain_solver: SolverConfig = field(default_factory=SolverConfig)
    finetune_solver: SolverConfig = field(default_factory=SolverConfig)
    chunk_size: int = 256

    def __post_init__(self) -> None:
        for s in self.scenarios:
            if s not in SCENARIOS:
                raise ValueError(f"unknown scenario {s!r}; choose from {', '.join(SCENARIOS)}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0 (without the proximal term the influence is 0), got {self.alpha}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")


def config_dict(config) -> dict:
    """A JSON-safe dict of a (nested) config dataclass, for manifests."""
    return asdict(config)


@dataclass(frozen=True)
class ValidationConfig:
    """Ground truth by actual retraining (design.md §3) and baselines.

    n_test_points:   validation test points per scenario (the first K scored test points).
    k:               leave-one-out removals per kind (top-k helpful, top-k harmful, k random).
    group_percents:  group removal sizes, in percent of the pretraining set.
    lds:             also compute the linear datamodeling score (random subsets).
    lds_subsets:     number of random subsets for LDS (at least 32).
    lds_fraction:    fraction of the pretraining set each LDS subset keeps.
    retrain_tol:     a retraining has converged when ‖∇objective‖ ≤ retrain_tol.
    retrain_max_iter: iteration cap per retraining.
    batch_size:      retrainings run together in one batched (vmapped) optimisation.
    seed:            seed of the random removals and subsets.
    """

    n_test_points: int = 8
    k: int = 8
    group_percents: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0)
    lds: bool = False
    lds_subsets: int = 32
    lds_fraction: float = 0.5
    retrain_tol: float = 1e-8
    retrain_max_iter: int = 200
    batch_size: int = 64
    seed: int = 0
