"""Retraining a minibatch-pretrained chain by running its training again (``--preset fashion-all``).

A chain whose pretraining is minibatch Adam (``training.minibatch_pretrain``) has no certified minimum
to warm-start the batched Newton-type retraining of ``precompute.retraining`` from, and its 54,693
parameters are beyond that module's dense preconditioner. Its ground truth is the training itself,
repeated: the same initial weights, minibatch order and learning-rate schedule, with the removed
examples weighted 0 (the denominator stays m, docs/design.md §3). With nothing removed, the repeat
gives p* bit for bit on the same machine (``tests/test_scratch_retraining.py``), so a difference
between two rows is the removal's effect plus the change of the optimiser's path that it causes,
which is what a user who retrains without those examples gets.

The finetunes then run as in training (L-BFGS + Newton, certified), warm-started at the trained heads:
the fixed finetune is convex in U given θ, and the updated one starts where training started it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import progress as progress_report
from .config import TrainConfig
from .task import TwoStageTask
from .training import TrainedStages, finetune_fixed, finetune_updated, minibatch_pretrain, perturbed


@dataclass
class RetrainedChain:
    """One chain trained again without some examples.

    p [P]: pretraining (minibatch, never certified); q: scenario -> [Q]; certified: scenario -> bool,
    whether that scenario's finetune reached a certified minimum (the chain's "converged").
    """

    p: Tensor
    q: dict[str, Tensor]
    certified: dict[str, bool]


def pretrain_again(task: TwoStageTask, config: TrainConfig, weights: Tensor | None) -> Tensor:
    """The pretraining run of ``training.pretrain`` repeated with example weights [m] (0 = removed): p [P]."""
    start = perturbed(task.initial_pretrain_params(), config, 0)
    return minibatch_pretrain(task, config, weights, start, desc=None).params


def retrain_chain(task: TwoStageTask, config: TrainConfig, trained: TrainedStages, weights: Tensor,
                  scenarios: tuple[str, ...]) -> RetrainedChain:
    """Both stages trained again with example weights [m]; finetunes warm-started at the trained heads."""
    p = pretrain_again(task, config, weights)
    fixed = finetune_fixed(task, p, config, u0=trained.q("fixed")[task.n_theta:] if "fixed" in trained.finetune
                           else None, desc=None)
    q, certified = {"fixed": fixed.params}, {"fixed": fixed.certified}
    if "updated" in scenarios:
        updated = finetune_updated(task, p, trained.alpha, config, fixed.params, desc=None)
        q["updated"], certified["updated"] = updated.params, updated.certified
    return RetrainedChain(p, {s: q[s] for s in scenarios}, {s: certified[s] for s in scenarios})


def retrain_chains(task: TwoStageTask, config: TrainConfig, trained: TrainedStages, weights: Tensor,
                   scenarios: tuple[str, ...], progress: bool = False) -> list[RetrainedChain]:
    """``retrain_chain`` for every row of weights [B, m], one after the other (each is a full training run)."""
    bar = progress_report.bar("cleaning: retraining from scratch", total=len(weights), unit="chains",
                              enabled=progress)
    out = []
    for row in weights:
        out.append(retrain_chain(task, config, trained, row, scenarios))
        bar.update(1)
    bar.close(f"finetunes certified in {sum(all(c.certified.values()) for c in out)} of them")
    return out


def out_of_fold_probabilities(task: TwoStageTask, config: TrainConfig, fold: np.ndarray,
                              progress: bool = False) -> np.ndarray:
    """Out-of-sample pretraining class probabilities, float64 [m, C], from K repeats of the pretraining.

    fold: int [m] in 0..K-1. Repeat f weights fold f's examples 0 and the others m/(m − |fold f|) (the
    objective is then the mean over the kept examples), so no fold's probabilities come from a model
    that fitted its labels: unlike a warm start at p*, nothing of the held-out examples leaks in.
    """
    folds = int(fold.max()) + 1
    bar = progress_report.bar("cleaning: K-fold pretraining (cleanlab)", total=folds, unit="folds", enabled=progress)
    probs = None
    for f in range(folds):
        keep = torch.as_tensor(fold != f, device=task.device)
        weights = torch.zeros(task.m, dtype=task.dtype, device=task.device)
        weights[keep] = task.m / float(keep.sum())
        p = pretrain_again(task, config, weights)
        held = np.flatnonzero(fold == f)
        with torch.no_grad():
            rows = torch.as_tensor(held, device=task.device)
            fold_probs = torch.softmax(task.pretrain_outputs(p, task.pretrain_x[rows]), 1).double().cpu().numpy()
        if probs is None:
            probs = np.empty((task.m, fold_probs.shape[1]))
        probs[held] = fold_probs
        bar.update(1)
    bar.close()
    return probs


__all__ = ["RetrainedChain", "out_of_fold_probabilities", "pretrain_again", "retrain_chain", "retrain_chains"]
