"""Delete-and-rerun check: what a user sees who deletes one pretraining example and reruns from scratch.

For a preset at a chosen size, trains both stages (float64, the CLI's training defaults), scores the
pretraining set for a few test points with the exact solver, then for the top-k helpful, top-k
harmful (of the first test point, per scenario) and k random examples deletes the example (the
denominator becomes m − 1) and trains both stages again FROM SCRATCH, from the same initial weights.
Actual change = test loss after deletion − test loss of a reference trained from scratch on all m
examples with the pretraining L2 lowered to λ(m − 1)/m: deleting a file is a weight-0 removal plus
that L2 change, which the reference carries too, so it cancels (it moved the test losses by about
1e-3 on digits). Prints one JSON object: per scenario (never pooled) Pearson and Spearman of
predicted against actual over all (removal, test point) pairs, and per test point.

Unlike the pipeline's validation (warm-started retraining, which follows the trained minimum), a run
from scratch may land in another minimum (a mirror of a collapsed embedding, another basin of a
non-convex net), which no influence score predicts; this script measures how often that matters.

Usage: python benchmarks/bench_delete_rerun.py [--preset digits] [--per-class 60] [--k 3] [--tests 0,1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from precompute.config import DataConfig, InfluenceConfig, SolverConfig, TrainConfig  # noqa: E402
from precompute.influence import multi_stage_scores  # noqa: E402
from precompute.metrics import pearson, spearman  # noqa: E402
from precompute.presets import PRESET_MODELS, QUICK_CAPS, QUICK_MODELS, build_task, load_task_data  # noqa: E402
from precompute.training import train_stages  # noqa: E402


def delete_and_rerun(args: argparse.Namespace) -> dict:
    """The check for the parsed command line (see the module docstring); returns the printed object."""
    start = time.perf_counter()
    # At quick size (--per-class > 0) the fashion CNN is quick mode's (P = 1,989), which the exact solver fits.
    model = QUICK_MODELS.get(args.preset, PRESET_MODELS[args.preset]) if args.per_class else PRESET_MODELS[args.preset]
    data = load_task_data(DataConfig(preset=args.preset, max_pretrain=args.per_class,
                                     max_finetune=QUICK_CAPS[args.preset][1] if args.per_class else 0,
                                     seed=args.seed), model)

    def fresh(**changes):
        """The task with the same initial weights (build_task seeds them), float64."""
        return replace(build_task(data, model, args.seed).to("cpu", torch.float64), **changes)

    def test_losses(task, trained) -> dict[str, np.ndarray]:
        return {s: task.test_loss(trained.q(s), ids).detach().numpy() for s in trained.finetune}

    task = fresh()
    trained = train_stages(task, TrainConfig(alpha=args.alpha), progress=False)
    test_ids = [int(t) for t in args.tests.split(",")]
    ids = torch.tensor(test_ids)
    exact = SolverConfig("exact")
    scores, _ = multi_stage_scores(task, trained, test_ids,
                                   InfluenceConfig(pretrain_solver=exact, finetune_solver=exact),
                                   progress=False)
    ref_task = fresh(pretrain_l2=task.pretrain_l2 * (task.m - 1) / task.m)
    reference = test_losses(ref_task, train_stages(ref_task, TrainConfig(alpha=args.alpha), progress=False))

    chosen = set(np.random.default_rng(args.seed).choice(task.m, args.k, replace=False).tolist())
    for row in scores.values():
        order = np.argsort(-row[0], kind="stable")
        chosen |= set(order[: args.k].tolist()) | set(order[::-1][: args.k].tolist())
    predicted = {s: [] for s in scores}
    actual = {s: [] for s in scores}
    for z in sorted(chosen):
        keep = torch.arange(task.m) != z
        deleted = fresh(pretrain_x=task.pretrain_x[keep], pretrain_y=task.pretrain_y[keep])
        losses = test_losses(deleted, train_stages(deleted, TrainConfig(alpha=args.alpha), progress=False))
        for s in scores:
            predicted[s].append(scores[s][:, z])
            actual[s].append(losses[s] - reference[s])
        print(f"deleted {z}: {len(predicted[next(iter(scores))])}/{len(chosen)}", file=sys.stderr, flush=True)

    out = {"preset": args.preset, "m": task.m, "n_params": task.n_pretrain_params, "deletions": len(chosen),
           "test_ids": test_ids, "retraining": "from scratch, same initial weights, denominator m - 1"}
    for s in scores:
        pred, act = np.array(predicted[s]), np.array(actual[s])            # [deletions, T]
        out[s] = {"pearson": pearson(pred.ravel(), act.ravel()), "spearman": spearman(pred.ravel(), act.ravel()),
                  "per_test_point_pearson": [pearson(pred[:, j], act[:, j]) for j in range(len(test_ids))]}
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("digits", "news", "fashion"), default="digits")
    parser.add_argument("--per-class", type=int, default=60,
                        help="pretraining examples per class (quick: 60; 0: the full preset)")
    parser.add_argument("--k", type=int, default=3, help="deletions per kind (helpful, harmful, random)")
    parser.add_argument("--tests", default="0,1", help="finetune test ids, comma-separated")
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    print(json.dumps(delete_and_rerun(parse()), indent=1))


if __name__ == "__main__":
    main()
