"""Command line.

    python -m precompute check                               is the math right on this machine?
    python -m precompute --preset digits --out runs/digits   one run
    python -m precompute --preset demo                       the demo runs the explorer opens

Every knob maps onto the dataclasses in ``precompute.config`` (their docstrings say what each means).
Bad input stops with one line, ``error: ...``, and exit status 2; nothing half-written is left.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import Field, fields, replace
from pathlib import Path

from .config import CURVATURES, SCENARIOS, SCORE_PRECISIONS, SOLVERS, DataConfig, ModelConfig, RunConfig, TrainConfig
from .errors import PrecomputeError
from .presets import (NOISY_PRETRAIN_L2, PRESET_DTYPES, PRESET_MODELS, PRESETS, QUICK_MODELS, cost_note,
                      full_config, noisy_config, preset_threads, quick_config)

# (run name, preset, {flag dest: value}): the demo leads with Fashion-MNIST at quick size (the full
# preset takes far longer than the demo's 10 minutes) where Debian's package or --data-dir has it, else
# with digits. The noisy run (for the Data cleaning page) is full-size digits validated by retraining
# on 3 test points (the quick validation sizes), to keep the demo's time down.
DEMO_LEAD = ("fashion", "fashion", {"quick": True})
DEMO_FALLBACK = ("digits", "digits", {})
DEMO_REST = (("news", "news", {}),
             ("digits-noisy", "digits", {"data.label_noise": 0.1, "validation.n_test_points": 3, "validation.k": 3,
                                         "validation.group_percents": (5.0, 10.0)}))


def demo_runs(data_dir: str | None = None) -> tuple[tuple[str, str, dict], ...]:
    """The demo's runs in order, its lead first: fashion when its files are found, else digits."""
    from .data.fashion import fashion_available

    return ((DEMO_LEAD if fashion_available(data_dir) else DEMO_FALLBACK),) + DEMO_REST


# Flags that name a config field but are resolved per job (the demo writes ROOT/<name> for --out ROOT).
NOT_CONFIG = frozenset({"out", "preset"})
# Flags that set several fields: one seed for data, removals and folds; one solver for both stages.
FANOUT = {"seed": ("data.seed", "validation.seed", "cleaning.seed", "train.jitter_seed"),
          "solver": ("influence.pretrain_solver", "influence.finetune_solver")}


def check_main(argv: list[str]) -> int:
    """Formula vs finite differences of the whole pipeline; exit 1 if any relative error > 1e-4."""
    from .fd_check import TOLERANCE, run_check

    parser = OneLineParser(
        prog="python -m precompute check",
        description="Check the multi-stage influence formula against a central finite difference of the "
                    "whole pipeline (re-pretrain with weight 1±h, re-finetune, re-evaluate) on a tiny "
                    "float64 model of real digits, for both scenarios.")
    parser.add_argument("--alpha", type=float, default=1.0, help="proximal coefficient of 'updated' (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tiny task (default 0)")
    args = parser.parse_args(argv)
    result = run_check(alpha=args.alpha, seed=args.seed)
    print("\n".join(result.describe()) + "\n")
    print(f"{'scenario':9} {'z':>4} {'test':>4} {'formula df/dw':>16} {'extrapolated FD':>16} {'rel. error':>10} "
          f"{'(FD at h/2)':>11}")
    for r in result.rows:
        print(f"{r['scenario']:9} {r['z']:>4} {r['test_id']:>4} {r['formula']:>16.9e} "
              f"{r['finite_difference']:>16.9e} {r['rel_error']:>10.1e} {r['plain_rel_error']:>11.1e}")
    for scenario in ("fixed", "updated"):
        err = result.max_error(scenario)
        print(f"{scenario}: max relative error {err:.1e} over {sum(r['scenario'] == scenario for r in result.rows)} "
              f"pairs ({'ok' if err <= TOLERANCE else 'FAIL'}, tolerance {TOLERANCE:.0e})")
    print("PASS" if result.passed else "FAIL")
    return 0 if result.passed else 1


def _csv(kind=str):
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(x.strip()) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, e.g. "
                                             f"{'0,5,9' if kind is int else '1,5' if kind is float else 'a,b'}; "
                                             f"got {text!r}") from None
    parse.__name__ = f"{kind.__name__} list"
    return parse


class UsageError(PrecomputeError, ValueError):
    """A command-line value is invalid; the message names the flag and the fix."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad command line prints one line (``error: ...; see --help``), exit 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def _paths(dest: str) -> tuple[str, ...]:
    """The dotted ``RunConfig`` field path(s) a flag's dest sets: "solver.damping" -> both solvers'."""
    head, _, rest = dest.partition(".")
    return tuple(f"{path}.{rest}" if rest else path for path in FANOUT.get(head, (head,)))


def _field(path: str) -> Field:
    """The dataclass field at a dotted path: "train.alpha" -> TrainConfig.alpha."""
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
    p = OneLineParser(
        prog="python -m precompute",
        description="Train both stages, score every pretraining example for chosen finetune test points "
                    "with the multi-stage influence function, check the scores by retraining, and write a "
                    "run directory for the explorer. Score = predicted change of the test loss if the "
                    "pretraining example is removed (> 0 helpful, < 0 harmful). "
                    "Also: 'python -m precompute check' verifies the math against finite differences.")
    g = p.add_argument_group("what to run")
    g.add_argument("--preset", choices=PRESETS + ("demo",), default="demo",
                   help="digits: real 8x8 digits, pretrain 0-4 / finetune 5-9; news: BBC News, pretrain on "
                        "business/politics/tech, finetune entertainment vs sports; fashion: Fashion-MNIST, "
                        "a CNN pretrained on T-shirt/coat/shirt/sandal/boot, finetuned on trouser/pullover/"
                        "dress/sneaker/bag (slow on a CPU: see docs/performance.md); fashion-all: every one of "
                        "the 30,000 pretraining garments, a 54,693-parameter CNN in float32, minibatch pretraining, "
                        "ekfac scores checked against pcg (no retraining); custom: your files (--pretrain-data); "
                        "demo: fashion (quick; digits where Fashion-MNIST is not installed), news and digits-noisy into the runs root (default)")
    g.add_argument("--out", help="run directory to write (default runs/<preset>); for demo, the runs root "
                                 "(default runs)")
    g.add_argument("--overwrite", **option("overwrite"))
    g.add_argument("--quick", **option("quick"))
    g.add_argument("--device", **option("device"))
    g.add_argument("--dtype", choices=("float64", "float32"), **option("dtype"))
    g.add_argument("--seed", **option("seed"))
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 2 for fashion and fashion-all, whose CNN's Hessian products run "
                        "1.75x faster on 2 threads; 1 for the other presets, whose models are small, so "
                        "more threads only spin-wait; at most the machine's cores)")

    g = p.add_argument_group("influence")
    g.add_argument("--solver", choices=SOLVERS, **option("solver.name"))
    g.add_argument("--curvature", choices=CURVATURES, **option("solver.curvature"))
    g.add_argument("--damping", **option("solver.damping"))
    g.add_argument("--rank", **option("solver.rank"))
    g.add_argument("--max-iter", **option("solver.max_iter"))
    g.add_argument("--alpha", **option("train.alpha"))
    g.add_argument("--scenarios", type=_csv(), **option("influence.scenarios"))
    g.add_argument("--n-test", **option("n_test_points"))
    g.add_argument("--test-ids", type=_csv(int), **option("test_ids"))
    g.add_argument("--chunk-size", **option("influence.chunk_size"))
    g.add_argument("--score-precision", choices=SCORE_PRECISIONS, **option("influence.score_precision"))
    g.add_argument("--agreement-solver", choices=("",) + SOLVERS[1:], **option("influence.agreement_solver"))
    g.add_argument("--agreement-points", **option("influence.agreement_points"))

    g = p.add_argument_group("scale (see docs/cli.md: torchrun -m precompute ... shards the scoring pass)")
    g.add_argument("--scores-to-disk", **option("scores_to_disk"))
    g.add_argument("--rank-zero-solve", **option(
        "influence.distributed_solve", "under torchrun: rank 0 solves the pretraining Hessian system over the "
        "whole set and broadcasts (faster for small sets; default: every rank solves together with a "
        "data-parallel Hessian-vector product)"))

    g = p.add_argument_group("model (defaults per preset: " + "; ".join(
        f"{name} hidden {m.hidden}" + (f", vocabulary {m.vocabulary}" if name == "news" else "")
        + (f", channels {','.join(map(str, m.channels))} (quick: hidden {QUICK_MODELS[name].hidden}, channels "
           f"{','.join(map(str, QUICK_MODELS[name].channels))}, pretraining L2 {QUICK_MODELS[name].pretrain_l2:g})"
           if name in QUICK_MODELS else "")
        for name, m in PRESET_MODELS.items()) + "; with --label-noise: " + ", ".join(
        f"{name} pretraining L2 {l2:g}" for name, l2 in NOISY_PRETRAIN_L2.items()) + ")")
    g.add_argument("--hidden", **option("model.hidden"))
    g.add_argument("--channels", type=_csv(int), **option("model.channels"))
    g.add_argument("--pretrain-l2", **option("model.pretrain_l2"))
    g.add_argument("--finetune-l2", **option("model.finetune_l2"))
    g.add_argument("--vocabulary", **option("model.vocabulary"))
    g.add_argument("--max-params", **option("model.max_params"))

    g = p.add_argument_group("training")
    g.add_argument("--train-iters", **option("train.max_iter"))
    g.add_argument("--newton-steps", **option("train.newton_polish"))
    g.add_argument("--init-jitter", **option("train.init_jitter"))
    g.add_argument("--minibatch-epochs", **option("train.minibatch_epochs"))
    g.add_argument("--minibatch-lr", **option("train.minibatch_lr"))

    g = p.add_argument_group("validation by retraining")
    g.add_argument("--no-validate", **option("validate", "skip retraining validation and baselines"))
    g.add_argument("--val-points", **option("validation.n_test_points"))
    g.add_argument("--k", **option("validation.k"))
    g.add_argument("--retrain-iters", **option("validation.retrain_max_iter"))
    g.add_argument("--retrain-newton-steps", **option("validation.retrain_newton_steps"))
    g.add_argument("--group-percents", type=_csv(float), **option("validation.group_percents"))
    g.add_argument("--lds", **option("validation.lds"))

    g = p.add_argument_group("your own data (--preset custom)")
    g.add_argument("--data-dir", **option("data.data_dir"))
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
    dtype = args.dtype or PRESET_DTYPES.get(preset, RunConfig.dtype)
    config = RunConfig(out=out, data=DataConfig(preset=preset), model=PRESET_MODELS.get(preset, ModelConfig()),
                       dtype=dtype)
    if dtype == "float32":                         # float32 cannot reach the float64 tolerances
        config = replace(config, train=TrainConfig(lbfgs_tol=1e-4, grad_tol=1e-4))
    config = quick_config(config) if args.quick else full_config(config)
    for dest, value in vars(args).items():
        config_fields = {f.name for f in fields(RunConfig)}
        if value is None or dest in NOT_CONFIG or _paths(dest)[0].split(".")[0] not in config_fields:
            continue                               # not given, or not a config flag (preset, out, threads)
        for path in _paths(dest):
            config = _set(config, path, value)
    if getattr(args, "model.pretrain_l2", None) is None:
        config = noisy_config(config)              # label noise raises a preset's L2; --pretrain-l2 wins
    return config


def _effective(args: argparse.Namespace) -> argparse.Namespace:
    """Each valued flag as the run will see it (given, or the config's default), by flag name:
    ``--max-iter`` -> ``max_iter`` (switches such as --no-validate keep their raw value). Flags
    default to None so that only given ones override a config."""
    values = {}
    for action in build_parser()._actions:
        if not action.option_strings or action.dest == "help":
            continue
        name = action.option_strings[0].lstrip("-").replace("-", "_")
        value = getattr(args, action.dest, None)
        if value is None and _paths(action.dest)[0].split(".")[0] in {f.name for f in fields(RunConfig)}:
            value = _get(RunConfig(out=""), _paths(action.dest)[0])
        values[name] = value
    return argparse.Namespace(**values)


def check_args(args: argparse.Namespace) -> None:
    """Every value checked before any work: UsageError naming the flag and the fix."""
    def need(ok: bool, flag: str, value, rule: str, example: str) -> None:
        if not ok:
            shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
            raise UsageError(f"{flag} {shown}: {rule}; for example {flag} {example}")

    def finite(x) -> bool:
        return x is not None and math.isfinite(x)

    args = _effective(args)

    need(0 <= args.seed < 2 ** 32, "--seed", args.seed, "must be an integer from 0 to 4294967295", "0")
    need(args.threads is None or args.threads >= 1, "--threads", args.threads, "must be at least 1", "1")
    need(finite(args.damping) and args.damping >= 0, "--damping", args.damping, "must be a finite number >= 0", "1e-3")
    need(finite(args.alpha) and args.alpha > 0, "--alpha", args.alpha,
         "must be a finite number > 0 (the proximal coefficient)", "0.1")
    need(args.rank >= 1, "--rank", args.rank, "must be at least 1", "128")
    need(args.max_iter >= 1, "--max-iter", args.max_iter, "must be at least 1", "1000")
    need(args.chunk_size >= 1, "--chunk-size", args.chunk_size, "must be at least 1", "256")
    need(bool(args.scenarios) and len(set(args.scenarios)) == len(args.scenarios)
         and set(args.scenarios) <= set(SCENARIOS), "--scenarios", tuple(args.scenarios),
         f"must be distinct names among {', '.join(SCENARIOS)}", "fixed,updated")
    need(args.n_test is None or args.n_test >= 1, "--n-test", args.n_test, "must be at least 1", "32")
    need(all(t >= 0 for t in args.test_ids), "--test-ids", args.test_ids,
         "finetune test ids are 0 or more", "0,5,9")
    need(len(set(args.test_ids)) == len(args.test_ids), "--test-ids", args.test_ids,
         "lists an id twice; give each id once", ",".join(map(str, dict.fromkeys(args.test_ids))))
    for flag, value, example in (("--hidden", args.hidden, "16"), ("--vocabulary", args.vocabulary, "400"),
                                 ("--val-points", args.val_points, "8"), ("--k", args.k, "8"),
                                 ("--retrain-iters", args.retrain_iters, "200"),
                                 ("--max-params", args.max_params, "1000000")):
        need(value is None or value >= 1, flag, value, "must be at least 1", example)
    need(len(args.channels) == 2 and all(c >= 1 for c in args.channels), "--channels", tuple(args.channels),
         "must be two channel counts of at least 1", "8,16")
    for flag, value in (("--pretrain-l2", args.pretrain_l2), ("--finetune-l2", args.finetune_l2)):
        need(value is None or (finite(value) and value >= 0), flag, value, "must be a finite number >= 0", "1e-2")
    for flag, value in (("--train-iters", args.train_iters), ("--newton-steps", args.newton_steps),
                        ("--retrain-newton-steps", args.retrain_newton_steps)):
        need(value is None or value >= 0, flag, value, "must be 0 or more", "10")
    need(args.minibatch_epochs >= 0, "--minibatch-epochs", args.minibatch_epochs, "must be 0 or more", "10")
    need(finite(args.minibatch_lr) and args.minibatch_lr > 0, "--minibatch-lr", args.minibatch_lr,
         "must be a finite number > 0", "3e-3")
    need(args.agreement_points >= 1, "--agreement-points", args.agreement_points, "must be at least 1", "4")
    need(finite(args.init_jitter) and 0 <= args.init_jitter < 1, "--init-jitter", args.init_jitter,
         "must be a relative size from 0 to below 1", "1e-12")
    need(args.group_percents is None or (bool(args.group_percents) and all(
        finite(x) and 0 < x < 100 for x in args.group_percents)), "--group-percents", args.group_percents,
         "each size must be a percentage between 0 and 100 (exclusive)", "1,2,5,10")
    need(finite(args.label_noise) and 0 <= args.label_noise <= 1, "--label-noise", args.label_noise,
         "must be a fraction from 0 to 1", "0.1")
    need(finite(args.finetune_test_fraction) and 0 < args.finetune_test_fraction < 1, "--finetune-test-fraction",
         args.finetune_test_fraction, "must be a fraction between 0 and 1 (exclusive)", "0.5")
    for flag, names in (("--pretrain-classes", args.pretrain_classes), ("--finetune-classes", args.finetune_classes)):
        need(len(set(names)) == len(names), flag, names, "lists a class twice; give each class once",
             ",".join(dict.fromkeys(names)))
    one_source = not args.finetune_data or args.finetune_data == args.pretrain_data
    both = [c for c in args.pretrain_classes if c in set(args.finetune_classes)]
    if one_source and both:
        raise UsageError(f"--pretrain-classes and --finetune-classes both list {', '.join(both)}: a class "
                         "belongs to one task; remove it from one of the two lists")
    device = args.device
    need(device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit()),
         "--device", device, "must be auto, cpu, cuda or cuda:N", "cpu")


def _exit_on_sigterm(signum, frame):
    """SIGTERM: remove the unfinished run (its temporary directory and the parents it created), say
    so and exit 143. Not by raising: an exception raised in a signal handler is lost when the signal
    lands while a ``__del__`` or weakref callback runs, and the run would go on."""
    from .run_writer import abort_open_writers

    aborted = abort_open_writers()
    print("interrupted (SIGTERM)" + "".join(f": nothing was written to {out}" for out in aborted),
          file=sys.stderr, flush=True)
    os._exit(143)


def pipeline_main(argv: list[str]) -> int:
    """One run (or the demo's runs). Under torchrun every rank runs this; rank 0 alone prints."""
    from .distributed import close_distributed, get_rank, init_distributed

    args = build_parser().parse_args(argv)
    check_args(args)
    try:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)   # under torchrun, init_distributed replaces it
    except ValueError:                                       # not the main thread
        pass
    try:
        init_distributed(args.device or RunConfig.device)   # joins torchrun's process group; no-op otherwise
    except (PrecomputeError, RuntimeError) as err:   # RuntimeError: torch's rendezvous could not connect
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    try:
        return run_jobs(args, get_rank() == 0)
    finally:
        close_distributed()


def run_jobs(args: argparse.Namespace, main_rank: bool) -> int:
    import torch

    from .distributed import broadcast_object, get_world_size
    from .pipeline import resolve_device, run_pipeline

    say = (lambda text: print(text, flush=True)) if main_rank else (lambda text: None)
    if args.preset == "demo":
        root = args.out or "runs"
        data_dir = getattr(args, "data.data_dir", None)
        runs = demo_runs(data_dir)
        if runs[0] is DEMO_FALLBACK:
            from .data.fashion import FASHION_DIR, FASHION_INSTALL
            say(f"note: Fashion-MNIST is not in {data_dir or FASHION_DIR}, so the demo leads with digits "
                f"(install it with `{FASHION_INSTALL}` on Debian/Ubuntu, or pass --data-dir)")
        jobs = [(preset, f"{root}/{name}", extra) for name, preset, extra in runs]
    else:
        jobs = [(args.preset, args.out or f"runs/{args.preset}", {})]
    from .guards import check_resources

    for preset, out, extra in jobs:
        if args.preset == "demo" and not args.overwrite and \
                broadcast_object(main_rank and (Path(out) / "manifest.json").exists()):   # rank 0 decides
            say(f"== {out} exists: kept (pass --overwrite to rebuild it)")
            continue
        try:
            config = config_from_args(argparse.Namespace(**{**vars(args), **extra}), preset, out)
            torch.set_num_threads(args.threads or preset_threads(preset, get_world_size()))
            check_resources(config)
            say(f"== {preset} -> {out}")
            note = cost_note(config, resolve_device(config.device).type)
            if note:
                say(note)
            summary = run_pipeline(config)
        except PrecomputeError as err:              # DataError, ConfigError, TaskError, RetrainError, ...
            if main_rank:                           # other ranks' errors reach rank 0 by name
                print(f"error: {one_line(err)}", file=sys.stderr)
            return 2
        except OSError as err:                      # reading inputs: permissions, vanished files
            if main_rank:
                print(f"error: {err.filename or out}: {err.strerror or err}; check the path and its "
                      "permissions", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            if main_rank:
                print(f"interrupted: nothing was written to {out}", file=sys.stderr)
            return 130
        if main_rank:                               # the other ranks hold no manifest
            say("\n".join(summary.lines()))
    if args.preset == "demo":
        say(f"open the explorer (on 127.0.0.1 only): python -m explorer --runs {root}")
    return 0


def one_line(err: BaseException) -> str:
    """An error's message on one line (the CLI prints every failure as one line)."""
    return " ".join(str(err).split()) or type(err).__name__


def write_crash_log(err: BaseException) -> Path | None:
    """Save the traceback of an unexpected error to a log file; its path, or None if none could be written."""
    name = f"precompute-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for folder in (Path(tempfile.gettempdir()), Path.cwd()):
        try:
            path = folder / name
            path.write_text("python -m precompute " + " ".join(sys.argv[1:]) + "\n\n"
                            + "".join(traceback.format_exception(err)), encoding="utf-8")
            return path
        except OSError:
            continue
    return None


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 on success, 2 for bad input (one line ``error: ...``), 1 for an internal error
    (one line plus the path of a log file holding the traceback), 130/143 when interrupted."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["check"]:
            return check_main(argv[1:])
        return pipeline_main(argv)
    except PrecomputeError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as done:                      # argparse (after its one line), --help
        return done.code if isinstance(done.code, int) else 0 if done.code is None else 2
    except Exception as err:       # noqa: BLE001 (the last line of defence: no traceback on screen)
        log = write_crash_log(err)
        where = f"the traceback is in {log}" if log else "no log file could be written"
        print(f"error: internal error ({type(err).__name__}: {one_line(err)}); {where}; please report it",
              file=sys.stderr)
        return 1
