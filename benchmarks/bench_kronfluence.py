"""kronfluence 1.0.1 beside this project's ekfac and pcg, on fashion-all's CNN and garments.

    pip install --no-deps kronfluence==1.0.1 && pip install accelerate einops einconv opt-einsum
    python benchmarks/bench_kronfluence.py [--quick] [--queries 16] [--reference 2] [--threads 2]

(kronfluence declares torchvision, which it never imports and which breaks beside torch 2.13.0, hence
--no-deps.) Trains fashion-all's chain once with the preset's own configuration, then on that pretrained
CNN and the same garments:

1. Single stage, the common ground: the influence of every pretraining garment on the pretraining loss of
   Q query garments (Fashion-MNIST test garments of the pretraining classes), g_qᵀ (G + λI)⁻¹ g_z with G the
   Gauss-Newton matrix (Fisher) of the mean pretraining loss and λ = λ_P + the preset's damping (the L2 term
   and the damping: the same damped system for everyone):
     kronfluence  EK-FAC (true Fisher, sampled labels), damping_factor λ
     ekfac        this project's EK-FAC (``precompute.ekfac``), the same λ
     pcg          this project's pcg on the exact damped system, the first R queries: the reference
   Seconds (factors + solve + one scoring pass over the m garments) and Pearson / Spearman against pcg over
   the R × m scores.
2. The multi-stage whole step (``MultiStageInfluence(...).fit().scores``): ekfac for the preset's 16 finetune
   test points, pcg for R of them (its seconds per test point are then scaled to 16, and say so;
   ``--multistage-reference 0`` skips it).

Prints one JSON object: seconds, correlations and the ratios the issue asks for (multi-stage ekfac /
kronfluence single stage, goal ≤ 2; pcg's whole step / kronfluence, goal ≤ 10).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from precompute.cli import build_parser, config_from_args  # noqa: E402
from precompute.data import image_features  # noqa: E402
from precompute.data.fashion import load_fashion_mnist  # noqa: E402
from precompute.influence import pretrain_solver  # noqa: E402
from precompute.multistage import MultiStageInfluence  # noqa: E402
from precompute.pipeline import load  # noqa: E402
from precompute.presets import FASHION_PRETRAIN  # noqa: E402
from precompute.scoring import per_example_gradients, score_pretraining  # noqa: E402
from precompute.training import train_stages  # noqa: E402


def pretrained_module(task, p: torch.Tensor) -> nn.Module:
    """The pretrained CNN as one nn.Module (embedding, then the pretraining head) with p's weights."""
    embedding, head = copy.deepcopy(task.embedding), copy.deepcopy(task.pretrain_head)
    for module, layout, flat in ((embedding, task.theta_layout, p[: task.n_theta]),
                                 (head, task.w_layout, p[task.n_theta:])):
        missing, unexpected = module.load_state_dict(layout.unflatten(flat.detach().clone()), strict=False)
        if unexpected or any(k in dict(module.named_parameters()) for k in missing):
            raise SystemExit(f"error: could not load the trained weights into {type(module).__name__}")
    return nn.Sequential(embedding, head).eval()


def query_garments(task, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` Fashion-MNIST test garments of the pretraining classes, as the task's inputs."""
    test = load_fashion_mnist(split="t10k")
    classes = [test.class_names.index(name) for name in FASHION_PRETRAIN]
    ids = np.flatnonzero(np.isin(test.labels, classes))[:count]
    x = torch.as_tensor(image_features(test.images[ids]), dtype=task.dtype, device=task.device)
    y = torch.as_tensor([classes.index(int(c)) for c in test.labels[ids]], device=task.device)
    return x, y


def kronfluence_scores(model: nn.Module, train: TensorDataset, queries: TensorDataset, damping: float,
                       batch: int) -> tuple[np.ndarray, dict]:
    """kronfluence EK-FAC pairwise scores [Q, m] and its seconds (factors, scores)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach().float(), 1), 1)[:, 0]
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    task = Classification()
    with tempfile.TemporaryDirectory() as out:
        analyzer = Analyzer("bench", model=prepare_model(model, task), task=task, cpu=True, output_dir=out,
                            disable_tqdm=True, log_level=40)
        start = time.perf_counter()
        analyzer.fit_all_factors("ekfac", train, per_device_batch_size=batch,
                                 factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
        factors = time.perf_counter() - start
        analyzer.compute_pairwise_scores("scores", "ekfac", queries, train, per_device_query_batch_size=len(queries),
                                         per_device_train_batch_size=batch,
                                         score_args=ScoreArguments(damping_factor=damping), overwrite_output_dir=True)
        total = time.perf_counter() - start
        scores = analyzer.load_pairwise_scores("scores")["all_modules"].double().cpu().numpy()
    return scores, {"factors_s": factors, "scores_s": total - factors, "total_s": total}


def agreement(scores: np.ndarray, reference: np.ndarray) -> dict:
    a, b = scores[: len(reference)].ravel(), reference.ravel()
    return {"pearson": float(np.corrcoef(a, b)[0, 1]), "spearman": float(spearmanr(a, b)[0])}


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fashion-all --quick: 2,000 garments")
    parser.add_argument("--queries", type=int, default=16, help="query garments of the single-stage step")
    parser.add_argument("--reference", type=int, default=2, help="queries / test points pcg solves as the reference")
    parser.add_argument("--multistage-reference", type=int, default=None,
                        help="test points pcg solves in the multi-stage step (default --reference; 0 skips it: at full "
                             "size each costs about 10 minutes, and the run's own agreement check measures it)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=512, help="kronfluence's batch size (factors and scores)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    flags = ["--preset", "fashion-all", "--seed", str(args.seed)] + (["--quick"] if args.quick else [])
    config = config_from_args(build_parser().parse_args(flags), "fashion-all", "unused")
    data, task, config = load(config, torch.device("cpu"), torch.float32)
    trained, train_s = timed(lambda: train_stages(task, config.train, config.influence.scenarios, progress=False))
    p = trained.p
    solver_config = config.influence.pretrain_solver
    damping = task.pretrain_l2 + solver_config.damping
    out: dict = {"m": task.m, "P": task.n_pretrain_params, "threads": args.threads, "seed": args.seed,
                 "damped_system": f"G + {damping:g} I (L2 {task.pretrain_l2:g} + damping {solver_config.damping:g})",
                 "train_s": train_s}

    # 1. single stage
    xq, yq = query_garments(task, args.queries)
    gq = per_example_gradients(task, p, xq, yq).T.contiguous()                      # [P, Q]

    def ours(name: str, columns: int):
        solver = pretrain_solver(task, p, replace(solver_config, name=name))
        vectors = solver.solve(gq[:, :columns])[0]
        return score_pretraining(task, p, vectors, config.influence.chunk_size, progress=False).astype(np.float64)

    reference, reference_s = timed(lambda: ours("pcg", args.reference))
    ekfac, ekfac_s = timed(lambda: ours("ekfac", args.queries))
    kron, kron_times = kronfluence_scores(pretrained_module(task, p), TensorDataset(task.pretrain_x, task.pretrain_y),
                                          TensorDataset(xq, yq), damping, args.batch)
    out["single_stage"] = {
        "queries": args.queries, "reference_queries": args.reference,
        "kronfluence": {**kron_times, **agreement(kron, reference)},
        "ekfac": {"total_s": ekfac_s, **agreement(ekfac, reference)},
        "pcg": {"total_s": reference_s, "per_query_s": reference_s / args.reference},
        "ekfac_vs_kronfluence": agreement(ekfac, kron),
    }

    # 2. the multi-stage whole step
    test_ids = list(range(config.n_test_points))

    def whole(influence_config, ids):
        return MultiStageInfluence(task, trained, influence_config, progress=False).fit().scores(ids)

    ms_ekfac, ms_ekfac_s = timed(lambda: whole(config.influence, test_ids))
    kron_s = kron_times["total_s"]
    out["multi_stage"] = {"test_points": len(test_ids), "ekfac_s": ms_ekfac_s}
    out["ratios"] = {"single_stage_ekfac_over_kronfluence": ekfac_s / kron_s,
                     "multi_stage_ekfac_over_kronfluence_single": ms_ekfac_s / kron_s}
    points = args.reference if args.multistage_reference is None else args.multistage_reference
    if points:
        pcg_config = replace(config.influence, pretrain_solver=replace(solver_config, name="pcg"),
                             finetune_solver=replace(config.influence.finetune_solver, name="pcg"))
        ms_pcg, ms_pcg_s = timed(lambda: whole(pcg_config, test_ids[:points]))
        per_point = ms_pcg_s / points
        out["multi_stage"] |= {
            "pcg_test_points": points, "pcg_s_per_test_point": per_point,
            "pcg_s_scaled_to_all_test_points": per_point * len(test_ids),
            "ekfac_vs_pcg": {s: agreement(np.asarray(ms_ekfac[s], np.float64), np.asarray(ms_pcg[s], np.float64))
                             for s in ms_pcg}}
        out["ratios"]["multi_stage_pcg_over_kronfluence_single (all test points, scaled)"] = \
            per_point * len(test_ids) / kron_s
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
