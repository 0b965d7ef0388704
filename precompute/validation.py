"""Predicted score against actual retraining (docs/design.md §3): leave-one-out, group removal, LDS.

Sign convention (as everywhere): score(z, t) = predicted change of the test loss of t when z is
removed; ``actual`` = test loss after removing and retraining minus the test loss of the
no-removal model retrained by the same procedure (so optimiser bias cancels). A good score has
actual ≈ predicted: Pearson and Spearman near 1 and slope (of actual on predicted) near 1.

Every removal set (one example for leave-one-out, a group, an LDS subset's complement) is
retrained once: pretraining with weight 0 on the removed examples, then each scenario's
finetuning; all test losses and accuracies are read off the same retrained models, so a set
shared by several test points or scenarios costs one retraining.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.func import vmap

from .config import ValidationConfig
from .contract import GROUP_COLUMNS
from .contract import PAIRS_CERTIFICATE_COLUMNS, PAIRS_COLUMNS as PAIR_COLUMNS
from .metrics import fit_summary, pearson, spearman
from .retraining import (HISTORY, MAX_HALVINGS, NEWTON_AFTER, REFRESH_ITERS, SHARED_ITERS, RetrainResult,
                          retrain)
from .task import TaskError, TwoStageTask
from .training import TrainedStages

KINDS = ("helpful", "harmful", "random")

GROUP_DTYPES = {"scenario": "string", "test_id": "int64", "kind": "string", "percent": "float64", "n_removed": "int64",
                "predicted": "float64", "actual": "float64", "accuracy_change": "float64", "converged": bool}
"""Column types of an empty group table (``group_percents`` empty): a run without group removal still
writes a typed ``validation/group.parquet`` that the run contract accepts."""


# ---- the protocol ------------------------------------------------------------------------------

@dataclass
class ValidationResult:
    """Everything measured by ``validate``; see the module docstring for the sign convention.

    pairs:   leave-one-out rows, columns ``PAIR_COLUMNS``.
    group:   group-removal rows, columns ``GROUP_COLUMNS``.
    summary: {scenario: fit_summary over converged pairs + n_not_converged, spearman_random (random
             pairs only), n_left_basin, pearson_in_basin, spearman_in_basin (without pairs whose
             retraining left the trained basin, see ``RetrainResult.left_basin``), per_test_point
             {test_id: pearson}}.
    group_summary: {scenario: {"<kind>_<percent>": mean actual, "fraction_harmful<p>_lowers_loss",
             "fraction_helpful<p>_raises_loss"}} (means over validation test points).
    lds:     None, or {scenario: {"mean", "per_test_point", "n_subsets", "fraction"}}.
    protocol: plain-English description of what was done.
    retrain_stats: {"count" (models retrained, the reference included), "seconds", "max_grad_norm",
             "n_not_converged", "iterations" (max steps per stage), "per_model_hessians" (stragglers'
             own dense Hessians built, per stage)}.
    """

    pairs: pd.DataFrame
    group: pd.DataFrame
    summary: dict
    group_summary: dict
    lds: dict | None
    protocol: str
    retrain_stats: dict = field(default_factory=dict)


class _RemovalSets:
    """Unique removal sets; index 0 is the empty set (the no-removal reference)."""

    def __init__(self) -> None:
        self.index: dict[tuple[int, ...], int] = {(): 0}
        self.sets: list[tuple[int, ...]] = [()]

    def add(self, ids) -> int:
        key = tuple(sorted({int(i) for i in np.asarray(ids).reshape(-1)}))
        if key not in self.index:
            self.index[key] = len(self.sets)
            self.sets.append(key)
        return self.index[key]

    def weights(self, m: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        w = torch.ones(len(self.sets), m, dtype=dtype, device=device)
        for b, ids in enumerate(self.sets):
            w[b, list(ids)] = 0.0
        return w


def _percent_key(percent: float) -> str:
    return f"{percent:g}"


def _group_size(percent: float, m: int) -> int:
    return int(min(m, max(1, round(percent * m / 100.0))))


def _readouts(task: TwoStageTask, result: RetrainResult, scenario: str, ids: Tensor,
              chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Test measurements (``task.test_measurement``: the loss by default) at ``ids`` [B, T] and accuracy
    over the whole finetune test set [B] per model.

    Accuracy is argmax-of-outputs for [N, C] outputs, nan for any other output shape.
    """
    q_all = result.q[scenario]
    losses, accs = [], []
    with torch.no_grad():
        for i in range(0, len(q_all), chunk):
            q = q_all[i: i + chunk]
            losses.append(vmap(lambda qq: task.test_measurement(qq, ids))(q))
            out = vmap(lambda qq: task.finetune_outputs(qq, task.test_x))(q)
            if out.dim() == 3 and out.shape[-1] > 1:
                accs.append((out.argmax(-1) == task.test_y).to(torch.float64).mean(1))
            else:
                accs.append(torch.full((len(q),), float("nan"), dtype=torch.float64))
    return torch.cat(losses).cpu().numpy().astype(np.float64), torch.cat(accs).cpu().numpy()


def validate(task: TwoStageTask, trained: TrainedStages, scores: dict[str, np.ndarray], test_ids: list[int],
             config: ValidationConfig, progress: bool = True) -> ValidationResult:
    """Leave-one-out, group removal and (optionally) LDS against actual retraining.

    scores: {scenario: [T, m]} with row i for test_ids[i] (the score convention of influence.py);
    the first ``config.n_test_points`` test ids are validated. Random removals are drawn once per
    test point (and per percent for groups) and shared by the scenarios; LOO, group and LDS draws
    use independent generators seeded from ``config.seed``.
    """
    m = task.m
    scenarios = tuple(scores)
    if not scenarios:
        raise TaskError("no scores given: pass {scenario: [T, m] array}")
    missing = [s for s in scenarios if s not in trained.finetune]
    if missing:
        raise TaskError(f"scores given for scenario(s) {missing} that were not trained")
    for s, sc in scores.items():
        if np.shape(sc) != (len(test_ids), m):
            raise TaskError(f"scores[{s!r}] has shape {np.shape(sc)}, expected ({len(test_ids)}, {m})")
    n_val = min(config.n_test_points, len(test_ids))
    val_ids = [int(t) for t in test_ids[:n_val]]
    rows = {s: np.asarray(scores[s][:n_val], dtype=np.float64) for s in scenarios}      # [K, m] each
    sets = _RemovalSets()
    loo = _loo_specs(rows, config, m, sets)
    group = _group_specs(rows, config, m, sets)
    lds_sets = _lds_specs(config, m, sets)

    weights = sets.weights(m, task.dtype, task.device)
    result = retrain(task, trained, weights, config, scenarios=scenarios, progress=progress)
    ids_t = task.check_test_ids(val_ids)
    left = result.left_basin().cpu().numpy()
    loss, acc, conv, gnorm, reasons, eig = {}, {}, {}, {}, {}, {}
    left_t = result.left_basin()
    for s in scenarios:
        loss[s], acc[s] = _readouts(task, result, s, ids_t)
        loss[s] = loss[s] - loss[s][0]              # actual change vs the no-removal model (row 0)
        acc[s] = acc[s] - acc[s][0]
        # An actual change is only as good as both the removal model and the reference.
        c = result.chain_converged(s).cpu().numpy()
        conv[s] = c & c[0]
        gnorm[s] = result.chain_grad_norm(s).cpu().numpy().astype(np.float64)
        reasons[s] = result.reasons(s, left_t)
        if not c[0]:                                # every pair hangs on the no-removal reference
            reasons[s] = [r or "reference not converged" for r in reasons[s]]
        eig[s] = torch.minimum(result.eig_min["pretrain"], result.eig_min[s]).cpu().numpy().astype(np.float64)

    pairs = pd.DataFrame([(s, val_ids[r], z, kind, pred, loss[s][b, r], gnorm[s][b], bool(conv[s][b]),
                           eig[s][b], reasons[s][b])
                          for s, r, z, kind, pred, b in loo], columns=[*PAIR_COLUMNS, *PAIRS_CERTIFICATE_COLUMNS])
    groups = pd.DataFrame([(s, val_ids[r], kind, pc, n, pred, loss[s][b, r], acc[s][b], bool(conv[s][b]))
                           for s, r, kind, pc, n, pred, b in group], columns=GROUP_COLUMNS)
    if groups.empty:                                # typed, or parquet stores the columns as null
        groups = groups.astype(GROUP_DTYPES)
    pair_left = np.array([left[b] for *_, b in loo], dtype=bool)
    summary = {s: _pair_summary(pairs[pairs.scenario == s], pair_left[(pairs.scenario == s).to_numpy()])
               for s in scenarios}
    group_summary = {s: _group_summary(groups[groups.scenario == s], config.group_percents) for s in scenarios}
    lds = None
    if config.lds:
        lds = {s: _lds_summary(rows[s], loss[s], conv[s], lds_sets, val_ids, config.lds_fraction) for s in scenarios}

    all_conv = np.stack([conv[s] for s in scenarios]).all(0)
    loo_models = sorted({b for *_, b in loo})
    stats = {"count": len(weights), "seconds": result.seconds,
             "max_grad_norm": float(max(gnorm[s].max() for s in scenarios)),
             "n_not_converged": int((~all_conv).sum()), "iterations": result.iterations,
             "per_model_hessians": result.refreshed, "n_left_basin": int(left[loo_models].sum())}
    return ValidationResult(pairs, groups, summary, group_summary, lds,
                            _protocol(config, m, n_val, min(config.k, m)), stats)


def _loo_specs(rows: dict[str, np.ndarray], config: ValidationConfig, m: int, sets: _RemovalSets) -> list[tuple]:
    """(scenario, row, z, kind, predicted, set index) per leave-one-out pair."""
    k = min(config.k, m)
    rng = np.random.default_rng([config.seed, 0])
    specs = []
    for r in range(len(next(iter(rows.values())))):
        random_ids = rng.choice(m, size=k, replace=False)          # shared by the scenarios
        for s, row in rows.items():
            order = np.argsort(-row[r], kind="stable")
            for kind, ids in (("helpful", order[:k]), ("harmful", order[::-1][:k]), ("random", random_ids)):
                specs += [(s, r, int(z), kind, float(row[r, z]), sets.add([z])) for z in ids]
    return specs


def _group_specs(rows: dict[str, np.ndarray], config: ValidationConfig, m: int, sets: _RemovalSets) -> list[tuple]:
    """(scenario, row, kind, percent, n removed, predicted = sum of removed scores, set index)."""
    rng = np.random.default_rng([config.seed, 1])
    specs = []
    for r in range(len(next(iter(rows.values())))):
        random_groups = {pc: rng.choice(m, size=_group_size(pc, m), replace=False) for pc in config.group_percents}
        for s, row in rows.items():
            order = np.argsort(-row[r], kind="stable")
            for pc in config.group_percents:
                n = _group_size(pc, m)
                for kind, ids in (("helpful", order[:n]), ("harmful", order[::-1][:n]), ("random", random_groups[pc])):
                    specs.append((s, r, kind, float(pc), n, float(row[r, ids].sum()), sets.add(ids)))
    return specs


def _lds_specs(config: ValidationConfig, m: int, sets: _RemovalSets) -> list[tuple[np.ndarray, int]]:
    """(removed ids, set index) per LDS subset; each subset keeps lds_fraction of the examples."""
    if not config.lds:
        return []
    rng = np.random.default_rng([config.seed, 2])
    keep = int(round(config.lds_fraction * m))
    out = []
    for _ in range(config.lds_subsets):
        removed = rng.permutation(m)[keep:]
        out.append((removed, sets.add(removed)))
    return out


def _lds_summary(rows: np.ndarray, change: np.ndarray, conv: np.ndarray, lds_sets: list[tuple[np.ndarray, int]],
                 val_ids: list[int], fraction: float) -> dict:
    """Per test point, Spearman over converged subsets of (sum of removed scores, actual change)."""
    used = [(removed, b) for removed, b in lds_sets if conv[b]]
    per_point = {t: spearman([rows[r, removed].sum() for removed, _ in used], [change[b, r] for _, b in used])
                 for r, t in enumerate(val_ids)}
    finite = [v for v in per_point.values() if np.isfinite(v)]
    return {"mean": float(np.mean(finite)) if finite else float("nan"), "per_test_point": per_point,
            "n_subsets": len(used), "fraction": fraction}


def _pair_summary(rows: pd.DataFrame, left_basin: np.ndarray) -> dict:
    conv = rows.converged.to_numpy()
    ok = rows[conv]
    out = fit_summary(ok.predicted.to_numpy(), ok.actual.to_numpy())
    rand = ok[ok.kind == "random"]
    out["spearman_random"] = spearman(rand.predicted.to_numpy(), rand.actual.to_numpy())
    out["n_not_converged"] = int((~conv).sum())
    if "reason" in rows:
        # why each uncounted retraining does not count: iteration cap, stalled, lost the minimum
        out["not_converged_reasons"] = {str(k): int(n) for k, n in rows[~conv].reason.value_counts().items()}
    # Pairs whose retraining slid to another basin (RetrainResult.left_basin): counted, and the fit
    # is also given without them, to separate the score's accuracy from non-local jumps.
    local = rows[conv & ~left_basin]
    out["n_left_basin"] = int((conv & left_basin).sum())
    out["pearson_in_basin"] = pearson(local.predicted.to_numpy(), local.actual.to_numpy())
    out["spearman_in_basin"] = spearman(local.predicted.to_numpy(), local.actual.to_numpy())
    out["per_test_point"] = {int(t): pearson(g.predicted.to_numpy(), g.actual.to_numpy())
                             for t, g in ok.groupby("test_id", sort=False)}
    return out


def _group_summary(rows: pd.DataFrame, percents) -> dict:
    ok = rows[rows.converged]
    out: dict[str, float] = {}
    for pc in percents:
        at = ok[ok.percent == float(pc)]
        for kind in KINDS:
            out[f"{kind}_{_percent_key(pc)}"] = float(at[at.kind == kind].actual.mean()) if len(at) else float("nan")
        harmful, helpful = at[at.kind == "harmful"].actual, at[at.kind == "helpful"].actual
        out[f"fraction_harmful{_percent_key(pc)}_lowers_loss"] = float((harmful < 0).mean()) if len(harmful) else float("nan")
        out[f"fraction_helpful{_percent_key(pc)}_raises_loss"] = float((helpful > 0).mean()) if len(helpful) else float("nan")
    return out


def _protocol(config: ValidationConfig, m: int, n_val: int, k: int) -> str:
    percents = ", ".join(f"{_percent_key(p)}%" for p in config.group_percents)
    lds = (f" Linear datamodeling score: {config.lds_subsets} random subsets each keeping "
           f"{config.lds_fraction:.0%} of the pretraining set; per test point, Spearman between the sum of the "
           "scores of the removed examples and the actual loss change." if config.lds else "")
    stragglers = (f"Models still above the tolerance after {SHARED_ITERS} steps get a dense Hessian of their own at "
                  f"their current point (refreshed every {REFRESH_ITERS} steps). " if config.per_model_hessians and
                  config.retrain_max_iter > SHARED_ITERS else
                  f"No per-model Hessians: models still above the tolerance after {NEWTON_AFTER} steps take "
                  f"truncated Newton steps (at most {config.retrain_newton_steps}, each conjugate gradients on exact "
                  "Hessian-vector products preconditioned by the shared Hessian, stopped at a relative residual "
                  "min(0.5, √‖∇‖)). " if config.retrain_newton_steps and config.retrain_max_iter > NEWTON_AFTER else
                  "Every step uses the shared preconditioner (no per-model Hessians). ")
    return (
        f"Ground truth by actual retraining on the first {n_val} scored test points. A pretraining example is "
        f"removed by setting its weight to 0 while the objective's denominator stays m = {m}, the objective "
        "family the scores differentiate. Both stages are retrained: pretraining, then each scenario's "
        "finetuning ('fixed' re-solves the head with the retrained embedding frozen; 'updated' re-solves "
        "embedding and head with the proximal term anchored at the retrained embedding). Every retraining is "
        "warm-started from the trained parameters and run with the same deterministic optimiser: batched "
        f"L-BFGS (history {HISTORY}) whose initial inverse Hessian is the dense Hessian of the unperturbed "
        "objective at the trained optimum (for a stage above 5,000 parameters: a low-rank Lanczos "
        "factorisation of it plus its bulk curvature, precompute.lowrank, and no per-model Hessians), with a per-model backtracking line search (step halved up to "
        f"{MAX_HALVINGS} times until the objective decreases). A retraining counts as converged when the gradient "
        f"norm of every stage is at most {config.retrain_tol:g} within {config.retrain_max_iter} iterations; "
        "non-converged pairs are flagged and left out of the correlations. " + stragglers +
        "Only models that converged (or stalled) are checked for negative curvature (batched Lanczos against "
        "the shared Hessian) and, at a saddle, stepped off it and retrained. "
        "A model with no removal is retrained the same way and actual changes are measured against it, so "
        "optimiser bias cancels. A removal 'left the basin' when its pretraining parameter change is over 3 "
        "times longer than the linearised change (one Newton step at the trained optimum) or at a cosine below "
        "0.8 to it: the local minimum vanished and the model slid elsewhere, which no first-order score "
        "predicts; such pairs are counted and the fit is also reported without them. "
        f"Leave-one-out: per test point and scenario the top-{k} helpful (largest score), top-{k} harmful "
        f"(smallest score) and {k} random examples (seed {config.seed}), each removed alone; predicted = the "
        "score, actual = retrained test loss minus the no-removal test loss. " + (
            f"Group removal: the top {percents} helpful, harmful or random examples removed at once; predicted = "
            "sum of their scores; accuracy change over the whole finetune test set is also recorded."
            if config.group_percents else "No group removal.") + lds)


__all__ = ["ValidationResult", "validate"]
