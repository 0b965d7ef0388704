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
from dataclasses import Field, fields, replace
from pathlib import Path

from .config import SCORE_PRECISIONS, SOLVERS, DataConfig, ModelConfig, RunConfig, TrainConfig
from .presets import PRESET_MODELS, quick_config

# (run name, preset, {flag dest: value}): the noisy run (for the Data cleaning page) is quick-sized
# and skips the retraining check, to keep the whole demo within 5 minutes on 2 cores.
DEMO_RUNS = (("digits", "digits", {}), ("news", "news", {}),
             ("digits-noisy", "digits", {"data.label_noise": 0.1, "quick": True, "validate": False}))
# Flags that set several fields: one seed for data, removals and folds; one solver for both stages.
FANOUT = {"seed": ("data.seed", "validation.seed", "cleaning.seed"),
          "solver": ("influence.pretrain_solver", "influence.finetune_solver")}


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


def _paths(dest: str) -> tuple[str, ...]:
    """The dotted ``RunConfig`` field path(s) a flag's dest sets: "solver.damping" -> both solvers'."""
    head, _, rest = dest.partition(".")
    return tuple(f"{path}.{rest}" if rest else path for path in FANOUT.get(head, (head,)))


def _field(path: str) -> Field:
    """The dataclass field at a dotted path: "influence.alpha" -> InfluenceConfig.alpha."""
    owner: type = RunConfig
    *parents, name = path.split(".")
    for part in parents:
        owner = {f.name: f for f in fields(owner)}[part].default_factory     # nested configs: default_factory
    return {f.name: f for f in fields(owner)}[name]


def _get(config, path: str):
    for part in path.split("."):
        config = getattr(config, part)
    return config


def _set(config, path: str, value):
    """``config`` with the field at ``path`` (dotted) replaced by ``value``."""
    head, _, rest = path.partition(".")
    return replace(config, **{head: _set(getattr(config, head), rest, value) if rest else value})


def _default_text(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value) or "none"


def option(dest: str, help: str | None = None, **extra) -> dict:
    """``add_argument`` keywords for the config field(s) ``dest`` names (a dotted path in
    ``RunConfig``, or a ``FANOUT`` name): the field's help (its metadata) with its default (and quick
    mode's, where it differs), and its type. A bool field makes a store_true flag, or store_false
    when ``help`` is given (a negated flag, e.g. --no-validate). The flag itself defaults to None,
    so ``config_from_args`` sets only what was given; defaults live in ``precompute.config`` alone."""
    path = _paths(dest)[0]
    default, quick = _get(RunConfig(out=""), path), _get(quick_config(RunConfig(out="")), path)
    text = help or _field(path).metadata["help"]
    kwargs: dict = {"dest": dest, "default": None}
    if isinstance(default, bool):
        kwargs["action"] = "store_false" if help else "store_true"
    else:
        text += f" (default {_default_text(default)}" + (f"; quick {_default_text(quick)})" if quick != default else ")")
        if "choices" not in extra:
            kwargs["metavar"] = dest.rpartition(".")[2].upper()
        if not isinstance(default, tuple):
            kwargs["type"] = type(default)
    return {**kwargs, "help": text.replace("%", "%%"), **extra}     # argparse formats help with %


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m precompute",
        description="Train both stages, score every pretraining example for chosen finetune test points "
                    "with the multi-stage influence function, check the scores by retraining, and write a "
                    "run directory for the explorer. Score = predicted change of the test loss if the "
                    "pretraining example is removed (> 0 helpful, < 0 harmful). "
                    "Also: 'python -m precompute check' verifies the math against finite differences.")
    g = p.add_argument_group("what to run")
    g.add_argument("--preset", choices=("digits", "news", "custom", "demo"), default="demo",
                   help="digits: real 8x8 digits, pretrain 0-4 / finetune 5-9; news: BBC News, pretrain on "
                        "business/politics/tech, finetune entertainment vs sports; custom: your files "
                        "(--pretrain-data); demo: digits and news into the runs root (default)")
    g.add_argument("--out", help="run directory to write (default runs/<preset>); for demo, the runs root "
                                 "(default runs)")
    g.add_argument("--overwrite", **option("overwrite"))
    g.add_argument("--quick", **option("quick"))
    g.add_argument("--device", **option("device"))
    g.add_argument("--dtype", choices=("float64", "float32"), **option("dtype"))
    g.add_argument("--seed", **option("seed"))
    g.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the preset models are small, and more threads "
                        "only spin-wait; raise it for large models)")

    g = p.add_argument_group("influence")
    g.add_argument("--solver", choices=SOLVERS, **option("solver.name"))
    g.add_argument("--damping", **option("solver.damping"))
    g.add_argument("--rank", **option("solver.rank"))
    g.add_argument("--max-iter", **option("solver.max_iter"))
    g.add_argument("--alpha", **option("influence.alpha"))
    g.add_argument("--scenarios", type=_csv(), **option("influence.scenarios"))
    g.add_argument("--n-test", **option("n_test_points"))
    g.add_argument("--test-ids", type=_csv(int), **option("test_ids"))
    g.add_argument("--chunk-size", **option("influence.chunk_size"))
    g.add_argument("--score-precision", choices=SCORE_PRECISIONS, **option("influence.score_precision"))

    g = p.add_argument_group("scale (see README: torchrun -m precompute ... shards the scoring pass)")
    g.add_argument("--scores-to-disk", **option("scores_to_disk"))
    g.add_argument("--rank-zero-solve", **option(
        "influence.distributed_solve", "under torchrun: rank 0 solves the pretraining Hessian system over the "
        "whole set and broadcasts (faster for small sets; default: every rank solves together with a "
        "data-parallel Hessian-vector product)"))

    g = p.add_argument_group("model (defaults per preset: " + "; ".join(
        f"{name} hidden {m.hidden}" + (f", vocabulary {m.vocabulary}" if name == "news" else "")
        for name, m in PRESET_MODELS.items()) + ")")
    g.add_argument("--hidden", **option("model.hidden"))
    g.add_argument("--pretrain-l2", **option("model.pretrain_l2"))
    g.add_argument("--finetune-l2", **option("model.finetune_l2"))
    g.add_argument("--vocabulary", **option("model.vocabulary"))

    g = p.add_argument_group("training")
    g.add_argument("--train-iters", **option("train.max_iter"))
    g.add_argument("--newton-steps", **option("train.newton_polish"))

    g = p.add_argument_group("validation by retraining")
    g.add_argument("--no-validate", **option("validate", "skip retraining validation and baselines"))
    g.add_argument("--val-points", **option("validation.n_test_points"))
    g.add_argument("--k", **option("validation.k"))
    g.add_argument("--group-percents", type=_csv(float), **option("validation.group_percents"))
    g.add_argument("--lds", **option("validation.lds"))

    g = p.add_argument_group("your own data (--preset custom)")
    g.add_argument("--pretrain-data", **option("data.pretrain_data"))
    g.add_argument("--finetune-data", **option("data.finetune_data"))
    g.add_argument("--pretrain-classes", type=_csv(), **option("data.pretrain_classes"))
    g.add_argument("--finetune-classes", type=_csv(), **option("data.finetune_classes"))
    g.add_argument("--text-column", **option("data.text_column"))
    g.add_argument("--label-column", **option("data.label_column"))
    g.add_argument("--finetune-test-fraction", **option("data.finetune_test_fraction"))
    g.add_argument("--label-noise", **option("data.label_noise"))
    g.add_argument("--clean", **option("clean"))
    return p


def config_from_args(args: argparse.Namespace, preset: str, out: str) -> RunConfig:
    """The dataclasses' defaults, the preset's model, float32 training tolerances and quick mode,
    then every flag given (a dest is a dotted field path or a ``FANOUT`` name)."""
    config = RunConfig(out=out, data=DataConfig(preset=preset), model=PRESET_MODELS.get(preset, ModelConfig()))
    if args.dtype == "float32":                    # float32 cannot reach the float64 tolerances
        config = replace(config, train=TrainConfig(lbfgs_tol=1e-4, grad_tol=1e-4))
    if args.quick:
        config = quick_config(config)
    for dest, value in vars(args).items():
        if value is None or _paths(dest)[0].split(".")[0] not in {f.name for f in fields(RunConfig)}:
            continue                               # not given, or not a config field (preset, out, threads)
        for path in _paths(dest):
            config = _set(config, path, value)
    return config


def pipeline_main(argv: list[str]) -> int:
    """One run (or the demo's runs). Under torchrun every rank runs this; rank 0 alone prints."""
    from .distributed import close_distributed, get_rank, init_distributed

    args = build_parser().parse_args(argv)
    import torch
    torch.set_num_threads(max(1, args.threads))
    try:
        init_distributed(args.device or RunConfig.device)   # joins torchrun's process group; no-op otherwise
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
        jobs = [(preset, f"{root}/{name}", extra) for name, preset, extra in DEMO_RUNS]
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
