"""Command line: `python -m precompute check` and `python -m precompute --preset ... --out runs/NAME`."""

from __future__ import annotations

import argparse
import sys


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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["check"]:
        return check_main(argv[1:])
    from .pipeline_cli import pipeline_main
    return pipeline_main(argv)
