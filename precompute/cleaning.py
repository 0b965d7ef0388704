"""Debugging mislabeled pretraining data: rank suspects, measure detection, clean and retrain.

Every signal is one float per pretraining example z, HIGHER = MORE SUSPICIOUS. With
g_z = ∇_p ℓ_P(z; p*) (p = [θ; W]) and the pretraining Hessian H_P (+ the solver's damping λ):

    multi_stage_harmfulness  −Σ_{t ∈ suspects} score(z, t) = −g_z · (Σ_t s_t) / m
                             the predicted DROP of the summed test loss of the suspect finetune test
                             points (default: the misclassified ones) if z is removed and both stages
                             are retrained. The T test-side vectors s_t are summed first, so the
                             column costs a single right-hand side in the streamed pass. Harm to some
                             suspects and help to others cancel in this sum.
    multi_stage_total_harm   Σ_{t ∈ suspects} max(0, −score(z, t)): the summed predicted harm only,
                             without that cancellation (from the per-test scores [T, m] of the same
                             streamed pass).
    self_influence           g_zᵀ (H_P + λI)⁻¹ g_z ≥ 0: m × the predicted rise of z's own loss if z is
                             removed (how much the model bent to fit z).
    pretrain_loss            ℓ_P(z; p*).
    margin                   max_{k ≠ y_z} logit_k − logit_{y_z}: > 0 when the pretrained model
                             prefers another class than the given label.
    cleanlab                 confident learning on OUT-OF-SAMPLE probabilities (K-fold retraining of
                             the pretraining stage): examples that ``cleanlab.filter.find_label_issues``
                             flags score 1 + (1 − p̂(given label)), the others 1 − p̂(given label); so
                             cleanlab's flagged set ranks first, ordered by self-confidence.

``suggested_label`` (int) is the argmax of the out-of-sample probabilities.

Suspects come from an AUDIT part of the finetune test set (``CleaningConfig.audit_fraction``);
clean-and-retrain reports the whole test set (as asked) and the HELD-OUT rest separately, since
the multi-stage signals are chosen with the audit points' labels and would otherwise be graded on
the examples they were fitted to.

Measured on digits (10% of 901 labels flipped; ``--preset digits --label-noise 0.1``): the simple
signals find the flipped labels best (AUC ≈ 0.99); multi_stage_harmfulness hardly does (AUC ≈ 0.5:
a flipped example hurts some misclassified test points and helps others, and the sum cancels),
multi_stage_total_harm does (AUC ≈ 0.94), and 78% of each misclassified test point's 20 most
harmful examples are flipped (base rate 10%). The multi-stage signals remove what hurts the
finetune task, not only wrong labels: at a 2% budget they raise held-out accuracy most.

``run_cleaning`` is the one entry point for the pipeline: signals, detection metrics against the
injected noise, and clean-and-retrain (remove the top x% of each signal, retrain both stages warm-
started, measure the finetune test accuracy and loss), written to ``cleaning/signals.parquet``,
``cleaning/retrain.parquet`` and the manifest's ``mislabel_detection``. A chain whose pretraining was
minibatch Adam (fashion-all; ``retrained_from_scratch``) is retrained by repeating that training instead
(``precompute.scratch_retraining``), for the cleanlab folds and for clean-and-retrain alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .config import CleaningConfig, InfluenceConfig, TrainConfig
from .contract import NON_SIGNAL_COLUMNS
from .errors import ConfigError
from .influence import pretrain_solver, stacked_test_vectors
from .metrics import auc, detection_curve, recall_at, top_fraction
from .retraining import Retrainer, retrain, solve_stage
from .scoring import score_pretraining, self_influence
from .scratch_retraining import out_of_fold_probabilities, retrain_chains
from .solvers import InverseHVP
from .task import TaskError, TwoStageTask
from .training import TrainedStages

SIGNALS = ("multi_stage_harmfulness", "multi_stage_total_harm", "self_influence", "pretrain_loss", "margin",
           "cleanlab")
"""Signal columns of ``cleaning/signals.parquet``, in display order (higher = more suspicious)."""
RECALL_PERCENTS = (2, 5, 10, 20)
TOP_HARMFUL = 20

PROTOCOL = (
    "Clean-and-retrain: for each signal, the top x% pretraining examples are removed (weight 0, "
    "denominator m fixed) and both stages are retrained warm-started from the trained parameters "
    "(batched preconditioned L-BFGS); finetune test accuracy and mean loss are measured on the whole "
    "finetune test set and on the held-out part whose labels were not used to pick the suspects of the "
    "multi-stage signals. Baselines: nothing removed ('none', same protocol), a random x% ('random') and "
    "exactly the flipped examples ('oracle'). cleanlab uses out-of-sample probabilities from K-fold "
    "retraining of the pretraining stage (warm-started at p*).")
SCRATCH_PROTOCOL = (
    "Clean-and-retrain: for each signal, the top x% pretraining examples are removed (weight 0, "
    "denominator m fixed) and the chain is trained again: the minibatch pretraining repeated from the same "
    "initial weights with the same minibatch order and schedule (with nothing removed it reproduces the "
    "trained model), then both finetunes warm-started at the trained heads and certified; finetune test "
    "accuracy and mean loss are measured on the whole finetune test set and on the held-out part whose "
    "labels were not used to pick the suspects of the multi-stage signals. Baselines: nothing removed "
    "('none'), a random x% ('random') and exactly the flipped examples ('oracle'). cleanlab uses out-of-sample "
    "probabilities from K repeats of the pretraining, each without one fold.")


@dataclass
class CleaningResult:
    """What ``run_cleaning`` produced.

    signals:   DataFrame [m rows]: id, one float column per signal, suggested_label (+ flipped).
    detection: {signal: {"auc", "recall_top_2", ..., "recall_top_20"}} and, when there are
               misclassified test points, "top20_harmful_of_misclassified": {"flipped_in_top20_harmful",
               "base_rate", "n_test_points"}. Empty without ground truth (flipped is None).
    retrain:   DataFrame: signal, percent, scenario, n_removed, test_accuracy, test_loss (whole finetune
               test set), heldout_accuracy, heldout_loss (test points outside the audit part; NaN if
               none), converged (both stages reached retrain_tol).
    scenario / suspect_test_ids / heldout_test_ids: what the multi-stage signals were computed for.
    """

    signals: pd.DataFrame
    detection: dict
    retrain: pd.DataFrame
    scenario: str
    suspect_test_ids: list[int]
    heldout_test_ids: list[int]
    timings_s: dict[str, float] = field(default_factory=dict)
    protocol: str = PROTOCOL

    def manifest_info(self) -> dict:
        """For the manifest's "cleaning" key (the explorer's Data cleaning page reads it)."""
        return {"scenario": self.scenario, "signals": signal_columns(self.signals),
                "suspect_test_ids": self.suspect_test_ids, "heldout_test_ids": self.heldout_test_ids,
                "protocol": self.protocol, "timings_s": self.timings_s, "best_cleaning": self.best_cleaning()}

    def best_cleaning(self) -> dict:
        """{scenario: {"percent", "signal", "accuracy", "none", "on"}}: at the smallest removal size, the
        signal whose cleaning gave the highest finetune accuracy, on the held-out test points ("on":
        "held-out") when there are any (the multi-stage signals saw the audit part's labels), else on
        the whole test set; "none": the same accuracy with nothing removed."""
        table = self.retrain
        if table is None or table.empty:
            return {}
        column, on = (("heldout_accuracy", "held-out") if table["heldout_accuracy"].notna().all()
                      else ("test_accuracy", "whole test set"))
        out = {}
        for scenario, rows in table.groupby("scenario", sort=False):
            signals = rows[rows.signal.isin(signal_columns(self.signals))]
            none = rows[rows.signal == "none"]
            if signals.empty or none.empty:
                continue
            smallest = signals[signals.percent == signals.percent.min()]
            best = smallest.loc[smallest[column].idxmax()]
            out[str(scenario)] = {"percent": float(best.percent), "signal": str(best.signal),
                                  "accuracy": float(best[column]), "none": float(none[column].iloc[0]), "on": on}
        return out


# ---- per-example quantities ----------------------------------------------------------------------

def misclassified_test_ids(task: TwoStageTask, q: Tensor) -> np.ndarray:
    """Finetune test ids the finetuned model q gets wrong, int64 [k] (may be empty)."""
    with torch.no_grad():
        pred = task.finetune_outputs(q, task.test_x).argmax(1)
    return (pred != task.test_y).nonzero()[:, 0].cpu().numpy().astype(np.int64)


def finetune_test_metrics(task: TwoStageTask, q: Tensor, test_ids=None) -> tuple[float, float]:
    """(accuracy, mean loss) of q on the finetune test set (or its rows ``test_ids``); NaN if empty."""
    ids = torch.arange(len(task.test_x), device=task.device) if test_ids is None else \
        torch.as_tensor(test_ids, dtype=torch.long, device=task.device)
    if len(ids) == 0:
        return float("nan"), float("nan")
    with torch.no_grad():
        out = task.finetune_outputs(q, task.test_x[ids])
        loss = task.finetune_loss(out, task.test_y[ids]).mean()
    return float((out.argmax(1) == task.test_y[ids]).double().mean()), float(loss)


def audit_split(n_test: int, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(audit ids, held-out ids), sorted int64; ``fraction`` of the test ids go to the audit part."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"audit_fraction must be in (0, 1], got {fraction}")
    order = np.random.default_rng((seed, 0xA0D1)).permutation(n_test)
    k = n_test if fraction >= 1 else min(n_test - 1, max(1, int(round(fraction * n_test))))
    return np.sort(order[:k]), np.sort(order[k:])


def _pretrain_logits(task: TwoStageTask, p: Tensor) -> Tensor:
    """Pretraining outputs [m, C] (class logits: margin and cleanlab assume a classifier)."""
    with torch.no_grad():
        return task.pretrain_outputs(p, task.pretrain_x)


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold id in 0..k-1 per example, int64 [m]; every class spread evenly over the folds."""
    rng = np.random.default_rng((seed, 0xF01D))
    fold = np.empty(len(labels), np.int64)
    offset = 0
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        fold[idx] = (np.arange(len(idx)) + offset) % k
        offset += len(idx)
    return fold


def out_of_sample_probabilities(task: TwoStageTask, trained: TrainedStages, retrainer: Retrainer,
                                folds: int, tol: float, max_iter: int, seed: int = 0) -> np.ndarray:
    """K-fold out-of-sample class probabilities of the pretraining model, float64 [m, C].

    Fold f's model is the pretraining stage retrained without fold f (weights 0 there and
    m/(m − |fold|) elsewhere, so the objective is the mean over the kept examples), warm-started at
    p*; all K models are optimised together (``precompute.retraining.solve_stage``). Warm starting
    from p*, which saw every example, can leak a little in-sample memory into non-convex models;
    the retrained optimum no longer contains the held-out examples' loss terms.
    """
    labels = task.pretrain_y.cpu().numpy()
    fold = stratified_folds(labels, folds, seed)
    weights = torch.zeros(folds, task.m, dtype=task.dtype, device=task.device)
    for f in range(folds):
        keep = torch.as_tensor(fold != f, device=task.device)
        weights[f, keep] = task.m / float(keep.sum())
    fit, _ = solve_stage(retrainer.objectives["pretrain"], trained.p.detach().expand(folds, -1), weights,
                         retrainer.precond["pretrain"], tol, max_iter, "pretraining (K-fold)")
    probs = [torch.softmax(_pretrain_logits(task, fit.params[f]), 1).cpu().numpy() for f in range(folds)]
    return np.stack(probs)[fold, np.arange(task.m)]


def cleanlab_signal(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Confident-learning suspicion, float64 [m] in [0, 2].

    Flagged by ``find_label_issues`` (prune_by_noise_rate): 1 + (1 − p̂_y); otherwise 1 − p̂_y, with
    p̂_y the out-of-sample probability of the given label (cleanlab's self-confidence quality).
    """
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    quality = get_label_quality_scores(labels, probs, method="self_confidence")
    issues = find_label_issues(labels, probs, filter_by="prune_by_noise_rate", n_jobs=1)
    return issues.astype(np.float64) + (1.0 - quality)


def retrained_from_scratch(trained: TrainedStages) -> bool:
    """True when the chain's pretraining is minibatch Adam: its retrainings repeat the training
    (``precompute.scratch_retraining``), as there is no certified minimum to warm-start Newton-type steps at."""
    return trained.pretrain.method == "minibatch"


def _train_config(train: TrainConfig | None) -> TrainConfig:
    if train is None:
        raise ConfigError("this chain was pretrained by minibatches: its mislabel checks repeat that training, "
                          "so pass the TrainConfig it was trained with (train=...)")
    return train


# ---- signals --------------------------------------------------------------------------------------

def suspect_test_vectors(task: TwoStageTask, trained: TrainedStages, scenario: str, suspect_test_ids,
                         config: InfluenceConfig, solver: InverseHVP | None = None) -> Tensor:
    """Test-side vectors S = H_P⁻¹ [g_t; 0_W] of the suspect test points in one scenario, [P, T]."""
    vectors, _ = stacked_test_vectors(task, trained, suspect_test_ids, replace(config, scenarios=(scenario,)),
                                      solver)
    return vectors[scenario]


def suspect_scores(task: TwoStageTask, p: Tensor, vectors: Tensor, chunk_size: int = 256
                   ) -> tuple[np.ndarray, np.ndarray]:
    """One streamed pass over [S, Σ_t s_t]: (per-test scores float32 [T, m], summed score float64 [m]).

    The summed column comes from the summed test-side vector (one right-hand side), not from adding
    the T rows; the two agree up to rounding. Memory: T × m float32 for the per-test rows.
    """
    t = vectors.shape[1]
    both = score_pretraining(task, p, torch.cat([vectors, vectors.sum(1, keepdim=True)], 1), chunk_size,
                             progress=False)
    return both[:t], both[t].astype(np.float64)


def ranking_signals(task: TwoStageTask, trained: TrainedStages, scenario: str, suspect_test_ids,
                    config: InfluenceConfig, flipped: np.ndarray | None = None, *,
                    cleaning: CleaningConfig = CleaningConfig(), solver: InverseHVP | None = None,
                    retrainer: Retrainer | None = None,
                    scores: tuple[np.ndarray, np.ndarray] | None = None,
                    train: TrainConfig | None = None, progress: bool = False) -> pd.DataFrame:
    """One row per pretraining example: id, the SIGNALS (float64, higher = more suspicious), suggested_label.

    suspect_test_ids: finetune test ids whose loss defines the multi-stage signals (for example the
    misclassified ones) in ``scenario``. flipped (bool [m], optional ground truth) is copied into a
    ``flipped`` column for evaluation; no signal uses it. ``solver``, ``retrainer`` and ``scores``
    (the output of ``suspect_scores``) let a caller reuse work it has already done. A minibatch-pretrained
    chain (``retrained_from_scratch``) needs ``train``, the configuration it was trained with: its cleanlab
    folds repeat that training.
    """
    p = trained.p
    solver = solver or pretrain_solver(task, p, config.pretrain_solver, hessians=trained.hessians)
    if scores is None:
        vectors = suspect_test_vectors(task, trained, scenario, suspect_test_ids, config, solver)
        scores = suspect_scores(task, p, vectors, config.chunk_size)
    per_test, summed = scores

    labels = task.pretrain_y
    logits = _pretrain_logits(task, p)
    with torch.no_grad():
        loss = task.pretrain_loss(logits, labels)
        given = logits.gather(1, labels[:, None])[:, 0]
        margin = logits.scatter(1, labels[:, None], float("-inf")).max(1).values - given

    if retrained_from_scratch(trained):
        probs = out_of_fold_probabilities(task, _train_config(train),
                                          stratified_folds(labels.cpu().numpy(), cleaning.folds, cleaning.seed),
                                          progress)
    else:
        retrainer = retrainer or Retrainer(task, trained, scenarios=())
        probs = out_of_sample_probabilities(task, trained, retrainer, cleaning.folds, cleaning.retrain_tol,
                                            cleaning.retrain_max_iter, cleaning.seed)
    y = labels.cpu().numpy()
    table = pd.DataFrame({
        "id": np.arange(task.m, dtype=np.int64),
        "multi_stage_harmfulness": -summed,
        "multi_stage_total_harm": np.clip(-per_test.astype(np.float64), 0, None).sum(0),
        "self_influence": self_influence(task, p, solver, config.chunk_size),
        "pretrain_loss": loss.cpu().numpy().astype(np.float64),
        "margin": margin.cpu().numpy().astype(np.float64),
        "cleanlab": cleanlab_signal(y, probs),
        "suggested_label": probs.argmax(1).astype(np.int64),
    })
    if flipped is not None:
        table["flipped"] = np.asarray(flipped, bool)
    bad = [c for c in SIGNALS if not np.isfinite(table[c]).all()]
    if bad:
        raise TaskError(f"non-finite cleaning signal(s): {', '.join(bad)}")
    return table


def signal_columns(signals: pd.DataFrame) -> list[str]:
    """The signal columns of a signals table: SIGNALS first, then any other float column."""
    known = [c for c in SIGNALS if c in signals]
    return known + [c for c in signals.columns if c not in known and c not in NON_SIGNAL_COLUMNS
                    and pd.api.types.is_float_dtype(signals[c])]


# ---- detection ------------------------------------------------------------------------------------

def detection_metrics(signals: pd.DataFrame, flipped: np.ndarray,
                      harmful_scores: np.ndarray | None = None, top: int = TOP_HARMFUL) -> dict:
    """How well each signal finds the flipped examples.

    Returns {signal: {"auc", "recall_top_x" for x in RECALL_PERCENTS}} (recall: fraction of
    the flipped examples among the top x % of that signal). With ``harmful_scores`` [T, m] (scores of
    misclassified test points, score < 0 = harmful) it adds "top20_harmful_of_misclassified":
    {"flipped_in_top20_harmful": mean over test points of the flipped fraction of their ``top`` most
    harmful examples, "base_rate": flipped fraction of the whole set, "n_test_points": T}.
    """
    flipped = np.asarray(flipped, bool)
    out: dict = {}
    for name in signal_columns(signals):
        s = signals[name].to_numpy()
        out[name] = {"auc": auc(s, flipped),
                     **{f"recall_top_{x}": recall_at(s, flipped, x) for x in RECALL_PERCENTS}}
    if harmful_scores is not None and len(harmful_scores):
        rows = np.asarray(harmful_scores, np.float64)
        k = min(top, rows.shape[1])
        most_harmful = np.argsort(rows, axis=1, kind="stable")[:, :k]
        out[f"top{top}_harmful_of_misclassified"] = {
            f"flipped_in_top{top}_harmful": float(flipped[most_harmful].mean()),
            "base_rate": float(flipped.mean()), "n_test_points": int(len(rows))}
    return out


# ---- clean and retrain ----------------------------------------------------------------------------

def removal_plan(signals: pd.DataFrame, flipped: np.ndarray | None, percents, seed: int = 0
                 ) -> list[tuple[str, float, np.ndarray]]:
    """(signal, percent, removed ids) rows: none, each signal × percent, random × percent, oracle."""
    m = len(signals)
    rng = np.random.default_rng((seed, 0x5EED))   # not ``seed`` alone: flip_labels draws from that stream
    plan: list[tuple[str, float, np.ndarray]] = [("none", 0.0, np.empty(0, np.int64))]
    for name in signal_columns(signals):
        plan += [(name, float(x), top_fraction(signals[name].to_numpy(), x)) for x in percents]
    plan += [("random", float(x), rng.choice(m, max(1, int(round(m * x / 100))), replace=False)) for x in percents]
    if flipped is not None and np.any(flipped):
        ids = np.flatnonzero(flipped)
        plan.append(("oracle", 100.0 * len(ids) / m, ids))
    return plan


def clean_and_retrain(task: TwoStageTask, trained: TrainedStages, signals: pd.DataFrame,
                      flipped: np.ndarray | None, cleaning: CleaningConfig = CleaningConfig(),
                      retrainer: Retrainer | None = None, heldout_test_ids=None,
                      progress: bool = False, train: TrainConfig | None = None) -> pd.DataFrame:
    """Remove the top x % of each signal (and random x %, the oracle, nothing), retrain, evaluate.

    All removals are retrained together (batched, warm-started at the trained parameters; weight 0,
    denominator m). Returns one row per (removal, scenario): signal, percent, scenario, n_removed,
    test_accuracy, test_loss (whole finetune test set), heldout_accuracy, heldout_loss (rows
    ``heldout_test_ids``; NaN when None), converged (both stages reached ``retrain_tol``; for a chain
    ``retrained_from_scratch``, whose pretraining is never certified: the scenario's finetune certified).
    Such a chain is trained again per row (``precompute.scratch_retraining``, needs ``train``).
    """
    plan = removal_plan(signals, flipped, cleaning.percents, cleaning.seed)
    weights = torch.ones(len(plan), task.m, dtype=task.dtype, device=task.device)
    for b, (_, _, ids) in enumerate(plan):
        weights[b, torch.as_tensor(ids, dtype=torch.long, device=task.device)] = 0.0
    if retrained_from_scratch(trained):
        scenarios = tuple(trained.finetune)
        chains = retrain_chains(task, _train_config(train), trained, weights, scenarios, progress)
        q_of = {s: [c.q[s] for c in chains] for s in scenarios}
        converged_of = {s: np.array([c.certified[s] for c in chains]) for s in scenarios}
    else:
        retrainer = retrainer or Retrainer(task, trained)
        result = retrain(task, trained, weights, cleaning.validation(), progress=progress, retrainer=retrainer)
        scenarios = retrainer.scenarios
        q_of = {s: result.q[s] for s in scenarios}
        converged_of = {s: result.chain_converged(s).cpu().numpy() for s in scenarios}
    heldout = [] if heldout_test_ids is None else heldout_test_ids
    rows = []
    for scenario in scenarios:
        converged = converged_of[scenario]
        for b, (name, percent, ids) in enumerate(plan):
            q = q_of[scenario][b]
            acc, loss = finetune_test_metrics(task, q)
            h_acc, h_loss = finetune_test_metrics(task, q, heldout)
            rows.append({"signal": name, "percent": percent, "scenario": scenario, "n_removed": len(ids),
                         "test_accuracy": acc, "test_loss": loss, "heldout_accuracy": h_acc,
                         "heldout_loss": h_loss, "converged": bool(converged[b])})
    return pd.DataFrame(rows)


# ---- entry point ----------------------------------------------------------------------------------

def run_cleaning(task: TwoStageTask, trained: TrainedStages, flipped: np.ndarray | None,
                 config: InfluenceConfig, cleaning: CleaningConfig = CleaningConfig(),
                 progress: bool = False, train: TrainConfig | None = None,
                 solver: InverseHVP | None = None) -> CleaningResult:
    """Signals, detection metrics and clean-and-retrain for one trained chain.

    flipped: bool [m] ground truth of injected label noise (``TaskData.flipped``), or None (then
    ``detection`` is empty and clean-and-retrain has no oracle row). The suspects behind the
    multi-stage signals are the finetune test points of the audit part that are misclassified in
    ``cleaning.scenario`` (the whole audit part if none is). Write ``result.signals`` to
    ``cleaning/signals.parquet``, ``result.retrain`` to ``cleaning/retrain.parquet`` and
    ``result.detection`` to the manifest's ``mislabel_detection``. ``train``: the configuration the chain
    was trained with, needed when its pretraining was minibatch (``retrained_from_scratch``); ``solver``: the
    pretraining solver the influence step already fitted at p* (else one is built from ``config``).
    """
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name], clock = now - clock, now

    scenario = cleaning.scenario or config.scenarios[0]
    if scenario not in trained.finetune:
        raise TaskError(f"cleaning scenario {scenario!r} was not trained (have {', '.join(trained.finetune)})")
    audit, heldout = audit_split(len(task.test_x), cleaning.audit_fraction, cleaning.seed)
    misclassified = np.intersect1d(misclassified_test_ids(task, trained.q(scenario)), audit)
    suspects = misclassified if len(misclassified) else audit
    solver = solver or pretrain_solver(task, trained.p, config.pretrain_solver, hessians=trained.hessians)
    vectors = suspect_test_vectors(task, trained, scenario, suspects.tolist(), config, solver)
    scores = suspect_scores(task, trained.p, vectors, config.chunk_size)
    scratch = retrained_from_scratch(trained)
    if scratch:
        _train_config(train)                    # before any work, not after the signals
    retrainer = None if scratch else Retrainer(task, trained)
    lap("cleaning: test vectors")
    signals = ranking_signals(task, trained, scenario, suspects.tolist(), config, flipped, cleaning=cleaning,
                              solver=solver, retrainer=retrainer, scores=scores, train=train, progress=progress)
    lap("cleaning: signals")
    detection: dict = {}
    if flipped is not None:
        detection = detection_metrics(signals, flipped, scores[0] if len(misclassified) else None)
    retrained = clean_and_retrain(task, trained, signals, flipped, cleaning, retrainer,
                                  heldout if len(heldout) else None, progress, train)
    lap("cleaning: retrain")
    return CleaningResult(signals, detection, retrained, scenario, suspects.tolist(), heldout.tolist(), timings,
                          SCRATCH_PROTOCOL if scratch else PROTOCOL)


__all__ = ["SIGNALS", "CleaningConfig", "CleaningResult", "audit_split", "auc", "clean_and_retrain", "detection_curve",
           "detection_metrics", "finetune_test_metrics", "misclassified_test_ids", "out_of_sample_probabilities",
           "ranking_signals", "recall_at", "removal_plan", "retrained_from_scratch", "run_cleaning", "self_influence", "signal_columns",
           "suspect_scores", "suspect_test_vectors", "top_fraction"]
