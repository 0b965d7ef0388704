"""Solver benchmark: time and agreement with `exact` for each inverse-HVP solver on the digits preset.

For T test points and both scenarios, runs the whole influence step (finetune-side solves,
pretraining solve, streamed scoring) with each solver and prints one JSON object with, per solver,
seconds and, per scenario (never pooled: the fixed scenario's scores are several times larger, so a
pooled figure hides a weak updated scenario), the Pearson and Spearman correlations of its scores
with the exact solver's.

Usage: python benchmarks/bench_solvers.py [--tests 32] [--damping 0.001] [--dtype float64]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from precompute.config import DataConfig, InfluenceConfig, SolverConfig, TrainConfig  # noqa: E402
from precompute.influence import multi_stage_scores  # noqa: E402
from precompute.presets import PRESET_MODELS, build_task, load_task_data  # noqa: E402
from precompute.training import train_stages  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests", type=int, default=32)
    parser.add_argument("--damping", type=float, default=1e-2,
                        help="the same damping for every solver, so they solve the same system")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = PRESET_MODELS["digits"]
    task = build_task(load_task_data(DataConfig(preset="digits"), model), model).to(args.device, getattr(torch, args.dtype))
    trained = train_stages(task, TrainConfig(alpha=0.1), progress=False)
    ids = list(range(args.tests))
    solvers = {"exact": SolverConfig("exact", damping=args.damping),
               "cg": SolverConfig("cg", damping=args.damping, tol=1e-8, max_iter=2000),
               "lissa": SolverConfig("lissa", damping=args.damping, tol=1e-8, max_iter=5000),
               "arnoldi": SolverConfig("arnoldi", damping=args.damping, rank=256, oversample=32),
               "ekfac": SolverConfig("ekfac", damping=args.damping),
               "pcg": SolverConfig("pcg", damping=args.damping, tol=1e-8, max_iter=2000)}
    results, reference = {}, None
    for name, solver in solvers.items():
        config = InfluenceConfig(pretrain_solver=solver, finetune_solver=solver, chunk_size=1024)
        start = time.perf_counter()
        try:
            scores, diag = multi_stage_scores(task, trained, ids, config, progress=False)
        except Exception as err:   # a solver that fails is a result too
            results[name] = {"error": str(err)}
            continue
        seconds = time.perf_counter() - start
        reference = scores if name == "exact" else reference
        print(name, round(seconds, 2), file=sys.stderr, flush=True)
        results[name] = {"seconds": round(seconds, 2),
                         "vs_exact": {s: {"pearson": round(float(np.corrcoef(reference[s].ravel(), scores[s].ravel())[0, 1]), 6),
                                          "spearman": round(float(spearmanr(reference[s].ravel(), scores[s].ravel())[0]), 6)}
                                      for s in ("fixed", "updated")},
                         "pretrain_residual": diag["fixed"]["pretrain_solve"]["relative_residual"],
                         "pretrain_iterations": diag["fixed"]["pretrain_solve"]["iterations"]}
    print(json.dumps({"m": task.m, "n_params": task.n_pretrain_params, "tests": args.tests,
                      "damping": args.damping, "dtype": args.dtype, "device": args.device,
                      "solvers": results}, indent=1))


if __name__ == "__main__":
    main()
