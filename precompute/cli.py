"""Command line.

    python -m precompute check                               is the math right on this machine?
    python -m precompute --preset digits --out runs/digits   one run
    python -m precompute --preset demo                       the demo runs the explorer opens

Every knob maps onto the dataclasses in ``precompute.config`` (their docstrings say what each means).
Bad input stops with one line, ``error: ...``, and exit status 2; nothing half-written is left.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from .presets import PRESET_MODELS, preset_solver
from .config import (SCENARIOS, SCORE_PRECISIONS, SOLVERS, CleaningConfig, DataConfig, InfluenceConfig,
                     ModelConfig, RunConfig, SolverConfig, TrainConfig, ValidationConfig)

# (run name, preset, flag overrides): the noisy run (for the Data cleaning page) is quick-sized and
# skips the retraining check, to keep the whole demo within 5 minutes on 2 cores.
DEMO_RUNS = (("digits", "digits", {}), ("news", "news", {}),
             ("digits-noisy", "digits", {"label_noise": 0.1, "quick": True, "no_validate": True}))
# The demo leads with Fashion-MNIST garments where the data is installed (quick-sized: the full preset
# takes far longer than the demo's 10 minutes); elsewhere it says so in one line and shows digits.
DEMO_FASHION = ("fashion", "fashion", {"quick": True})


def demo_runs(data_dir: str, say) -> tuple:
    from .data.fashion import FASHION_INSTALL, fashion_available

    if fashion_available(data_dir or None):
        return (DEMO_FASHION, *DEMO_RUNS)
    say(f"note: Fashion-MNIST is not installed (`{FASHION_INSTALL}`, or --data-dir); the demo shows digits and news")
    return DEMO_RUNS


QUICK_VALIDATION = ValidationConfig(n_test_points=3, k=3, group_percents=(5.0, 10.0))
QUICK_CLEANING = CleaningConfig(folds=3, percents=(5.0, 10.0))


def check_main(argv: list[str]) -> int:
    """Formula vs finite differences of the whole pipeline; exit 1 if any relative error > 1e-4."""
    from .fd_check import TOLERANCE, run_check

    parser = argparse.ArgumentParser(
        prog="python -m precompute check",
        description="Check the multi-stage influence formula against a central finite difference of the "
                    "whole pipeline (re-pretrain with weight 1±h, re-finetune, re-evaluate) on a tiny "
                    "float64 model of real digits, for both scenarios.")
    parser.add_argument("--alpha", type=float, default=1.0, help="proximal coefficient of 'updated' (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tiny task (default 0)")
    args = parser.parse_args(argv)
    result = run_check(alpha=args.alpha, seed=args.seed)
    print(f"{'scenario':9} {'z':>4} {'test':>4} {'formula df/dw':>15} {'finite diff':>15} {'rel. error':>10}")
    for r in result.rows:
        print(f"{r['scenario']:9} {r['z']:>4} {r['test_id']:>4} {r['formula']:>15.8e} "
              f"{r['finite_difference']:>15.8e} {r['rel_error']:>10.2e}")
    for scenario in ("fixed", "updated"):
        err = result.max_error(scenario)
        print(f"{scenario}: max relative error {err:.2e} ({'ok' if err <= TOLERANCE else 'FAIL'}, tolerance {TOLERANCE:.0e})")
    print("PASS" if result.passed else "FAIL")
    return 0 if result.passed else 1


def _csv(kind=str):
    return lambda text: tuple(kind(x.strip()) for x in text.split(",") if x.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m precompute",
        description="Train both stages, score every pretraining example for chosen finetune test points "
                    "with the multi-stage influence function, check the scores by retraining, and write a "
                    "run directory for the explorer. Score = predicted change of the test loss if the "
                    "pretraining example is removed (> 0 helpful, < 0 harmful). "
                    "Also: 'python -m precompute check' verifies the math against finite differences.")
    g = p.add_argument_group("what to run")
    g.add_argument("--preset", choices=("digits", "news", "fashion", "custom", "demo"), default="demo",
                   help="digits: real 8x8 digits, pretrain 0-4 / finetune 5-9; news: BBC News, pretrain on "
                        "business/politics/tech, finetune entertainment vs sports; custom: your files "
                        "(--pretrain-data); demo: digits and news into the runs root (default)")
    g.add_argument("--out", help="run directory to write (default runs/<preset>); for demo, the runs root "
                                 "(default runs)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing run (the old one is kept until the new one is complete)")
    g.add_argument("--quick", action="store_true", help="small sizes for smoke tests (each preset < 1 min)")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda (default auto)")
    g.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                   help="float64 resolves leave-one-out loss changes in the retraining check (default)")
    g.add_argument("--seed", type=int, default=0, help="seed of splits, initialisation and random removals")
    g.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the preset models are small, and more threads "
                        "only spin-wait; raise it for large models)")

    g = p.add_argument_group("influence")
    g.add_argument("--solver", choices=SOLVERS, default="auto",
                   help="inverse-Hessian solver: exact (dense), cg, lissa, arnoldi; auto = exact up to 6,000 "
                        "parameters, else cg (default auto)")
    g.add_argument("--damping", type=float, default=0.0, help="λ added to every Hessian (default 0)")
    g.add_argument("--rank", type=int, default=128, help="arnoldi: eigenpairs kept (default 128)")
    g.add_argument("--max-iter", type=int, default=1000, help="cg/lissa iterations at most (default 1000)")
    g.add_argument("--alpha", type=float, default=0.1,
                   help="proximal coefficient α of the 'updated' scenario (default 0.1; larger keeps the "
                        "finetuned embedding closer to the pretrained one)")
    g.add_argument("--scenarios", type=_csv(), default=SCENARIOS, help="fixed,updated (default both)")
    g.add_argument("--n-test", type=int, default=None,
                   help="number of finetune test points to score, covering every class with right and "
                        "wrong predictions (default 32, quick 6)")
    g.add_argument("--test-ids", type=_csv(int), default=(), help="explicit finetune test ids, e.g. 0,5,9")
    g.add_argument("--chunk-size", type=int, default=256, help="pretraining examples per scoring chunk")
    g.add_argument("--score-precision", choices=SCORE_PRECISIONS, default="full",
                   help="full (the model's dtype), or bfloat16/float16 autocast for the per-example "
                        "gradients of the scoring pass (needs --dtype float32; a GPU speed-up); the run "
                        "reports the Pearson correlation with full precision on a sample")

    g = p.add_argument_group("scale (see README: torchrun -m precompute ... shards the scoring pass)")
    g.add_argument("--scores-to-disk", action="store_true",
                   help="stream scores into the run directory chunk by chunk (memory maps) instead of "
                        "holding them in memory; for very large pretraining sets")
    g.add_argument("--rank-zero-solve", action="store_true",
                   help="under torchrun: rank 0 solves the pretraining Hessian system over the whole set "
                        "and broadcasts (faster for small sets; default: every rank solves together with "
                        "a data-parallel Hessian-vector product)")

    g = p.add_argument_group("model")
    g.add_argument("--hidden", type=int, help="embedding width (default: digits 16, news 8, custom 16)")
    g.add_argument("--pretrain-l2", type=float, help="λ_P on the pretraining parameters (default 1e-2)")
    g.add_argument("--finetune-l2", type=float, help="λ_F on the finetuning head (default 1e-2)")
    g.add_argument("--vocabulary", type=int, help="text: tf-idf vocabulary size (default 400)")

    g = p.add_argument_group("training")
    g.add_argument("--train-iters", type=int, default=None,
                   help="L-BFGS iterations at most per stage (default 3000); lower it for very large "
                        "pretraining sets, where each iteration is a pass over the data")
    g.add_argument("--newton-steps", type=int, default=None,
                   help="Newton polish steps after L-BFGS (default 10; each costs about P/256 passes "
                        "over the pretraining set; 0 turns it off)")

    g = p.add_argument_group("validation by retraining")
    g.add_argument("--no-validate", action="store_true", help="skip retraining validation and baselines")
    g.add_argument("--val-points", type=int, default=None, help="validation test points (default 8, quick 3)")
    g.add_argument("--k", type=int, default=None, help="leave-one-out removals per kind (default 8, quick 3)")
    g.add_argument("--group-percents", type=_csv(float), default=None, help="group removal sizes (default 1,2,5,10)")
    g.add_argument("--lds", action="store_true", help="also compute the linear datamodeling score")

    g = p.add_argument_group("your own data (--preset custom)")
    g.add_argument("--data-dir", default="", help="fashion: folder holding the Fashion-MNIST IDX files (default "
                                                   "/usr/share/datasets/fashion-mnist, from apt-get install -y "
                                                   "dataset-fashion-mnist)")
    g.add_argument("--pretrain-data", default="", help="image folder root/<class>/*.png, a .csv/.jsonl text "
                                                        "file, or MNIST IDX files as IMAGES,LABELS")
    g.add_argument("--finetune-data", default="", help="same formats; omit to split --pretrain-data by classes")
    g.add_argument("--pretrain-classes", type=_csv(), default=(), help="class names of the pretraining task")
    g.add_argument("--finetune-classes", type=_csv(), default=(), help="class names of the finetuning task")
    g.add_argument("--text-column", default="text", help="text column of CSV/JSONL files (default text)")
    g.add_argument("--label-column", default="label", help="label column of CSV/JSONL files (default label)")
    g.add_argument("--finetune-test-fraction", type=float, default=0.5, help="finetune examples held out as test points")
    g.add_argument("--label-noise", type=float, default=0.0,
                   help="flip this fraction of pretraining labels (recorded, to score mislabel detection; "
                        "turns on --clean)")
    g.add_argument("--clean", action="store_true",
                   help="rank pretraining examples by mislabel signals (multi-stage harm, self-influence, "
                        "loss, margin, cleanlab) and clean-and-retrain")
    return p


def config_from_args(args: argparse.Namespace, preset: str, out: str) -> RunConfig:
    name, damping = preset_solver(preset, args.solver, args.damping)
    solver = SolverConfig(name, damping=damping, rank=args.rank, max_iter=args.max_iter)
    validation = QUICK_VALIDATION if args.quick else ValidationConfig()
    validation = replace(validation, seed=args.seed, lds=args.lds,
                         **{k: v for k, v in (("n_test_points", args.val_points), ("k", args.k),
                                              ("group_percents", args.group_percents)) if v is not None})
    return RunConfig(
        out=out,
        data=DataConfig(preset=preset, pretrain_data=args.pretrain_data, finetune_data=args.finetune_data,
                        pretrain_classes=args.pretrain_classes, finetune_classes=args.finetune_classes,
                        text_column=args.text_column, label_column=args.label_column,
                        finetune_test_fraction=args.finetune_test_fraction, label_noise=args.label_noise,
                        seed=args.seed, data_dir=args.data_dir),
        model=replace(PRESET_MODELS.get(preset, ModelConfig()),
                      **{k: v for k, v in (("hidden", args.hidden), ("pretrain_l2", args.pretrain_l2),
                                           ("finetune_l2", args.finetune_l2), ("vocabulary", args.vocabulary))
                         if v is not None}),
        train=replace(TrainConfig() if args.dtype == "float64" else TrainConfig(lbfgs_tol=1e-4, grad_tol=1e-4),
                      **{k: v for k, v in (("max_iter", args.train_iters), ("newton_polish", args.newton_steps))
                         if v is not None}),
        influence=InfluenceConfig(scenarios=tuple(args.scenarios), alpha=args.alpha, pretrain_solver=solver,
                                  finetune_solver=solver, chunk_size=args.chunk_size,
                                  distributed_solve=not args.rank_zero_solve,
                                  score_precision=args.score_precision),
        validation=validation, cleaning=replace(QUICK_CLEANING if args.quick else CleaningConfig(), seed=args.seed),
        clean=args.clean, device=args.device, dtype=args.dtype,
        n_test_points=args.n_test or (6 if args.quick else 32), test_ids=tuple(args.test_ids),
        validate=not args.no_validate, quick=args.quick, overwrite=args.overwrite,
        scores_to_disk=args.scores_to_disk)


def pipeline_main(argv: list[str]) -> int:
    """One run (or the demo's runs). Under torchrun every rank runs this; rank 0 alone prints."""
    from .distributed import close_distributed, get_rank, init_distributed

    args = build_parser().parse_args(argv)
    import torch
    torch.set_num_threads(max(1, args.threads))
    try:
        init_distributed(args.device)               # joins torchrun's process group; no-op otherwise
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        return run_jobs(args, get_rank() == 0)
    finally:
        close_distributed()


def run_jobs(args: argparse.Namespace, main_rank: bool) -> int:
    from .data import DataError
    from .distributed import DistributedError, broadcast_object
    from .pipeline import run_pipeline
    from .runstore import RunStoreError
    from .solvers import SolverError
    from .task import TaskError

    say = (lambda text: print(text, flush=True)) if main_rank else (lambda text: None)
    if args.preset == "demo":
        root = args.out or "runs"
        jobs = [(preset, f"{root}/{name}", extra) for name, preset, extra in demo_runs(args.data_dir, say)]
    else:
        jobs = [(args.preset, args.out or f"runs/{args.preset}", {})]
    for preset, out, extra in jobs:
        if args.preset == "demo" and not args.overwrite and \
                broadcast_object(main_rank and (Path(out) / "manifest.json").exists()):   # rank 0 decides
            say(f"== {out} exists: kept (pass --overwrite to rebuild it)")
            continue
        try:
            config = config_from_args(argparse.Namespace(**{**vars(args), **extra}), preset, out)
            say(f"== {preset} -> {out}")
            summary = run_pipeline(config)
        except (DataError, TaskError, SolverError, RunStoreError, DistributedError, ValueError) as err:
            if main_rank:                           # other ranks' errors reach rank 0 by name
                print(f"error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            if main_rank:
                print(f"interrupted: nothing was written to {out}", file=sys.stderr)
            return 130
        if main_rank:                               # the other ranks hold no manifest
            say("\n".join(summary.lines()))
    if args.preset == "demo":
        say(f"open the explorer: streamlit run explorer/app.py --server.address 127.0.0.1 -- --runs {root}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["check"]:
        return check_main(argv[1:])
    return pipeline_main(argv)
