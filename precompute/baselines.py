"""Baseline attributions, scored on the same leave-one-out ground truth as the multi-stage scores.

Every method gives a value [T, m] per scenario (test point × pretraining example). Those that
estimate an effect use the score convention (positive = removing z is predicted to RAISE the test
loss, z helpful); the two properties of z alone are reported with their natural sign:

    pretrain_loss         ℓ_P(z; p*)                          (same for every test point and scenario)
    predictive_entropy    entropy of softmax(pretraining outputs on z) at p*   (idem; needs [N, C] logits)
    grad_dot              ∇_θ ℓ_P(z; p*) · ∇_θ f_t(q)         TracIn-style at the trained parameters; θ is
                                                              the only block both stages share. > 0: a
                                                              gradient step on z lowers f_t: z helpful
    grad_cosine           the same, normalised to a cosine
    embedding_similarity  cos(φ_θ(x_z), φ_θ(x_t)) with the scenario's embedding θ (θ* or θ_ft)
    single_stage          ∇_p ℓ_P(z) · H_P⁻¹ [∇_θ f_t; 0] / m: influence through the embedding that
                          ignores the finetune coupling (no H_θU H_UU⁻¹ ∇_U f term, no proximal solve)
    single_stage_ekfac    the same with H_P⁻¹ replaced by EK-FAC (+ L2 and the run's damping): what a
                          kronfluence user gets from the pretraining model and the finetune test gradient

Scenario-dependent methods use that scenario's finetuned q (θ and U).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .config import SolverConfig, ValidationConfig
from .influence import gradients_at_test_points, pretrain_solver
from .scoring import per_example_gradients, score_pretraining
from .metrics import pearson, spearman
from .solvers import InverseHVP
from .task import TwoStageTask
from .training import TrainedStages

BASELINES = ("pretrain_loss", "predictive_entropy", "grad_dot", "grad_cosine", "embedding_similarity",
             "single_stage", "single_stage_ekfac")


def _cosine_rows(a: Tensor, b: Tensor) -> Tensor:
    """[N, D] x [T, D] -> [T, N] cosines (0 where a vector is 0)."""
    a = a / a.norm(dim=1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(torch.finfo(b.dtype).tiny)
    return b @ a.T


def baseline_scores(task: TwoStageTask, trained: TrainedStages, test_ids, scenarios: tuple[str, ...] | None = None,
                    solver: SolverConfig | InverseHVP = SolverConfig("exact"), chunk_size: int = 256,
                    progress: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """{method: {scenario: float64 array [T, m]}} for the methods in ``BASELINES``.

    ``solver`` is the pretraining inverse-Hessian solver of "single_stage" (a config, or an already
    factorised solver to reuse the one that produced the multi-stage scores).
    """
    ids = task.check_test_ids(test_ids)
    scenarios = tuple(trained.finetune) if scenarios is None else tuple(scenarios)
    p, nt, m, t = trained.p.detach(), task.n_theta, task.m, len(ids)
    out: dict[str, dict[str, np.ndarray]] = {name: {} for name in BASELINES}
    test_grads = {s: gradients_at_test_points(task, trained.q(s), ids)[:nt].T for s in scenarios}   # [T, Pθ]
    test_feats = {s: task.features(task.theta_of(trained.q(s)).detach(), task.test_x[ids]).reshape(t, -1)
                  for s in scenarios}
    loss, entropy = np.empty(m), np.empty(m)
    dot = {s: np.empty((t, m)) for s in scenarios}
    cosine = {s: np.empty((t, m)) for s in scenarios}
    similarity = {s: np.empty((t, m)) for s in scenarios}
    with torch.no_grad():
        for start in range(0, m, chunk_size):
            sl = slice(start, min(start + chunk_size, m))
            x, y = task.pretrain_x[sl], task.pretrain_y[sl]
            loss[sl] = task.pretrain_losses(p, x, y).cpu().numpy()
            logits = task.pretrain_outputs(p, x)
            if logits.dim() == 2 and logits.shape[1] > 1:
                logp = torch.log_softmax(logits, dim=1)
                entropy[sl] = (-(logp.exp() * logp).sum(1)).cpu().numpy()
            else:
                entropy[sl] = np.nan
            g = per_example_gradients(task, p, x, y)[:, :nt]                                      # [B, Pθ]
            for s in scenarios:
                dot[s][:, sl] = (test_grads[s] @ g.T).cpu().numpy()
                cosine[s][:, sl] = _cosine_rows(g, test_grads[s]).cpu().numpy()
                feats = task.features(task.theta_of(trained.q(s)).detach(), x).reshape(len(x), -1)
                similarity[s][:, sl] = _cosine_rows(feats, test_feats[s]).cpu().numpy()
    for s in scenarios:
        out["pretrain_loss"][s] = np.broadcast_to(loss, (t, m)).copy()
        out["predictive_entropy"][s] = np.broadcast_to(entropy, (t, m)).copy()
        out["grad_dot"][s], out["grad_cosine"][s], out["embedding_similarity"][s] = dot[s], cosine[s], similarity[s]

    # Single-stage influence, exact and EK-FAC: every scenario's right-hand sides in one solve each and
    # one streamed pass for both.
    inverse = solver if isinstance(solver, InverseHVP) else pretrain_solver(task, p, solver, hessians=trained.hessians)
    rhs = torch.cat([test_grads[s].T for s in scenarios], dim=1)
    rhs = torch.cat([rhs, torch.zeros(task.w_layout.size, rhs.shape[1], dtype=rhs.dtype, device=rhs.device)])
    vectors, _ = inverse.solve(rhs)
    damping = float(solver.damping)
    kfac, _ = pretrain_solver(task, p, SolverConfig("ekfac", damping=damping)).solve(rhs)
    single = score_pretraining(task, p, torch.cat([vectors, kfac], dim=1), chunk_size,
                               progress=progress).astype(np.float64)
    n = len(scenarios) * t
    for i, s in enumerate(scenarios):
        out["single_stage"][s] = single[i * t: (i + 1) * t]
        out["single_stage_ekfac"][s] = single[n + i * t: n + (i + 1) * t]
    return out


def evaluate_baselines(task: TwoStageTask, trained: TrainedStages, test_ids, pairs: pd.DataFrame,
                       config: ValidationConfig, solver: SolverConfig | InverseHVP = SolverConfig("exact"),
                       scores: dict[str, dict[str, np.ndarray]] | None = None,
                       progress: bool = False) -> dict[str, dict[str, dict]]:
    """{method: {scenario: {"pearson", "spearman", "spearman_random", "n_pairs"}}} on the LOO pairs.

    Each converged pair (scenario, test_id, pretrain_id, actual) of ``validate``'s table is matched
    with the baseline's value for (test_id, pretrain_id); correlations are of that value against
    the actual loss change. "spearman_random" uses the random-kind pairs only: the helpful and
    harmful pairs were selected by the multi-stage score, which favours it on the full set.
    Baselines are computed for the validated test ids (the first ``config.n_test_points``) unless
    ``scores`` (from ``baseline_scores`` for ``test_ids``) is given.
    """
    test_ids = [int(i) for i in test_ids]
    scenarios = tuple(pd.unique(pairs.scenario)) if len(pairs) else tuple(trained.finetune)
    if scores is None:
        test_ids = test_ids[: config.n_test_points]
        scores = baseline_scores(task, trained, test_ids, scenarios, solver, progress=progress)
    row_of = {t: i for i, t in enumerate(test_ids)}
    ok = pairs[pairs.converged]
    result: dict[str, dict[str, dict]] = {}
    for method, per_scenario in scores.items():
        result[method] = {}
        for s in scenarios:
            rows = ok[(ok.scenario == s) & ok.test_id.isin(list(row_of))]
            value = per_scenario[s][rows.test_id.map(row_of).to_numpy(), rows.pretrain_id.to_numpy()]
            rand = (rows.kind == "random").to_numpy()
            actual = rows.actual.to_numpy()
            result[method][s] = {"pearson": pearson(value, actual), "spearman": spearman(value, actual),
                                 "spearman_random": spearman(value[rand], actual[rand]), "n_pairs": int(len(rows))}
    return result


__all__ = ["BASELINES", "baseline_scores", "evaluate_baselines"]
