"""Solver agreement: the evidence of a run too large to check by retraining.

Where leave-one-out retraining is out of reach (``--preset fashion-all``: 30,000 pretraining garments,
a 54,693-parameter CNN), a run scores with a fast approximate solver (ekfac) and re-scores its first
test points with a reference one (pcg: CG on exact Gauss-Newton products, preconditioned by the same
EK-FAC factors), then records how far the two agree, per scenario. Agreement says the approximation
is faithful to the damped influence; it does not say the influence predicts retraining (the
Validation page shows that, where a run has it).
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from .config import InfluenceConfig
from .distributed import get_rank
from .metrics import pearson, spearman
from .multistage import MultiStageInfluence
from .solvers import SolverError
from .task import TwoStageTask
from .training import TrainedStages

TOP_K = 100
"""Examples per list compared by ``top_overlap`` (the explorer's galleries show far fewer)."""


def top_overlap(a: np.ndarray, b: np.ndarray, k: int = TOP_K) -> tuple[float, float]:
    """Shares (0..1) of ``a``'s k largest and k smallest entries that are also among ``b``'s (most helpful,
    most harmful), for 1-D score vectors of one test point; k is capped at len(a)."""
    k = min(k, len(a))
    helpful = len(np.intersect1d(np.argsort(-a, kind="stable")[:k], np.argsort(-b, kind="stable")[:k])) / k
    harmful = len(np.intersect1d(np.argsort(a, kind="stable")[:k], np.argsort(b, kind="stable")[:k])) / k
    return helpful, harmful


def agreement_summary(scores: np.ndarray, reference: np.ndarray, k: int = TOP_K) -> dict:
    """How well ``scores`` [T, m] match ``reference`` [T, m] (the same test points, the same examples):
    Pearson and Spearman per test point (their medians and minima) and over all T·m pairs, and the
    mean top-k overlap of the most helpful and of the most harmful examples."""
    if scores.shape != reference.shape or scores.ndim != 2:
        raise ValueError(f"agreement needs two [T, m] score matrices of one shape, got {scores.shape} and "
                         f"{reference.shape}")
    per_point = [pearson(a, b) for a, b in zip(scores, reference)]
    overlaps = np.array([top_overlap(a, b, k) for a, b in zip(scores, reference)])
    return {"pearson": pearson(scores.ravel(), reference.ravel()),
            "spearman": spearman(scores.ravel(), reference.ravel()),
            "pearson_per_point_median": float(np.median(per_point)), "pearson_per_point_min": float(np.min(per_point)),
            "top_k": min(k, scores.shape[1]), "top_helpful_overlap": float(overlaps[:, 0].mean()),
            "top_harmful_overlap": float(overlaps[:, 1].mean()), "n_test_points": int(scores.shape[0])}


def solver_agreement(task: TwoStageTask, trained: TrainedStages, scores: dict[str, np.ndarray], test_ids: list[int],
                     config: InfluenceConfig, progress: bool = False) -> dict[str, dict]:
    """Re-scores the first ``config.agreement_points`` of ``test_ids`` with ``config.agreement_solver`` on the
    pretraining side (every other setting as the run's: damping, curvature, finetune solver) and compares
    with the run's ``scores`` ({scenario: [T, m]}). Returns {scenario: ``agreement_summary`` + "solver",
    "reference", "test_points", "seconds"}, or those with "error" (one line) instead of the statistics when the
    reference solve fails (it does not fail the run); {} when no agreement solver is set, and on ranks other than 0
    (collective under torchrun, like ``MultiStageInfluence``)."""
    if not config.agreement_solver:
        return {}
    ids = list(test_ids[:config.agreement_points])
    reference_config = replace(config, pretrain_solver=replace(config.pretrain_solver, name=config.agreement_solver))
    start = time.perf_counter()
    influence = MultiStageInfluence(task, trained, reference_config, progress=progress).fit()
    try:
        reference = influence.scores(ids)
    except SolverError as err:               # the reference could not solve: recorded, the run keeps its scores
        return {s: {"solver": config.pretrain_solver.name, "reference": config.agreement_solver,
                    "error": " ".join(str(err).split()), "test_points": ids, "seconds": time.perf_counter() - start}
                for s in config.scenarios} if get_rank() == 0 else {}
    seconds = time.perf_counter() - start
    if reference is None:                     # under torchrun, ranks other than 0
        return {}
    out = {}
    for s in config.scenarios:
        solve = influence.diagnostics.get(s, {}).get("pretrain_solve", {})
        out[s] = {**agreement_summary(np.asarray(scores[s][:len(ids)], dtype=np.float64),
                                      np.asarray(reference[s], dtype=np.float64)),
                  "solver": config.pretrain_solver.name, "reference": config.agreement_solver,
                  "reference_relative_residual": solve.get("relative_residual"),
                  "reference_iterations": solve.get("iterations"), "test_points": ids, "seconds": seconds}
    return out


__all__ = ["TOP_K", "top_overlap", "agreement_summary", "solver_agreement"]
