"""Figures over seeds, not one lucky run: a preset's run for several seeds, medians and ranges.

Runs ``python -m precompute --preset P [--quick] --seed S`` (the README's command, one subprocess
per seed, each into a temporary directory) and reads each run's manifest. Prints, per scenario
(never pooled), the median and [min, max] over seeds of: Pearson, Spearman and slope of predicted
against actual warm-start leave-one-out retraining, converged pairs (of all pairs), finetune
accuracy, and whether every stage was a certified minimum; then the wall time of each step and
of the whole run. A run checked by a reference solver instead of retraining (fashion-all) also gets its
solver agreement (Pearson, Spearman, top-100 overlaps) per scenario. ``--json`` adds the per-seed rows
as one JSON object on the last line.

Usage: python benchmarks/bench_seeds.py --preset digits [--quick] [--seeds 0,1,2,3,4] [--threads N]
       [--init-jitter 1e-12] [-- extra precompute flags]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def run_seed(preset: str, seed: int, quick: bool, threads: int | None, extra: list[str], out: Path) -> dict:
    """One CLI run; returns its per-seed row (figures per scenario, step times, certificates)."""
    cmd = [sys.executable, "-m", "precompute", "--preset", preset, "--seed", str(seed), "--out", str(out)]
    cmd += (["--quick"] if quick else []) + (["--threads", str(threads)] if threads else []) + extra
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"seed": seed, "ok": False, "error": last, "wall_s": wall}
    manifest = json.loads((out / "manifest.json").read_text())
    row = {"seed": seed, "ok": True, "wall_s": wall, "timings_s": manifest["timings_s"], "scenarios": {},
           "distinct_units": (manifest.get("embedding_units") or {}).get("distinct")}
    for s in manifest["scenarios"]:
        v = manifest["validation"].get(s, {})
        training = manifest["diagnostics"][s]["training"]
        row["scenarios"][s] = {
            "pearson": v.get("pearson"), "spearman": v.get("spearman"), "slope": v.get("slope"),
            "pairs": v.get("n_pairs"), "all_pairs": (v.get("n_pairs") or 0) + (v.get("n_not_converged") or 0),
            "accuracy": manifest["finetune_accuracy"][s],
            "certified": all(t.get("certified", False) for t in training.values()),
            "eig_min": min(t.get("eig_min") or float("nan") for t in training.values()),
            "reasons": v.get("not_converged_reasons", {}),
            "baselines_spearman": {k: (b.get(s) or {}).get("spearman") for k, b in manifest.get("baselines", {}).items()}}
        agreement = (manifest.get("solver_agreement") or {}).get(s)
        if agreement and "error" not in agreement:     # a run checked by a reference solver, not by retraining
            row["scenarios"][s]["agreement"] = {k: agreement.get(k) for k in (
                "reference", "pearson", "spearman", "top_helpful_overlap", "top_harmful_overlap", "n_test_points")}
    return row


def seed_line(scenario: str, figures: dict) -> str:
    """One scenario of one seed for the progress line: retraining Pearson and pairs, or solver agreement."""
    if figures.get("pearson") is not None:
        return f"{scenario} P {figures['pearson']:.3f} ({figures['pairs']}/{figures['all_pairs']})"
    agreement = figures.get("agreement")
    return f"{scenario} vs {agreement['reference']} P {agreement['pearson']:.3f}" if agreement else f"{scenario} unchecked"


def median_range(values) -> str:
    vals = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if not len(vals):
        return "n/a"
    fmt = (lambda x: f"{x:.3f}") if np.all(np.abs(vals) < 10) else (lambda x: f"{x:.0f}")
    return f"{fmt(np.median(vals))} [{fmt(vals.min())}, {fmt(vals.max())}]"


def table(rows: list[dict]) -> list[str]:
    """Markdown lines: one row per scenario, then one per step's seconds."""
    ok = [r for r in rows if r["ok"]]
    out = [f"{len(ok)} of {len(rows)} seeds ran ({', '.join(str(r['seed']) for r in ok)}); median [min, max]"]
    if not ok:
        return out
    out += ["", "| scenario | Pearson | Spearman | slope | converged pairs | finetune accuracy | all stages certified |",
            "|---|---|---|---|---|---|---|"]
    for s in ok[0]["scenarios"]:
        per = [r["scenarios"][s] for r in ok]
        pairs = median_range([p["pairs"] for p in per]) + f" of {per[0]['all_pairs']}"
        out.append(f"| {s} | {median_range([p['pearson'] for p in per])} | {median_range([p['spearman'] for p in per])} "
                   f"| {median_range([p['slope'] for p in per])} | {pairs} | {median_range([p['accuracy'] for p in per])} "
                   f"| {sum(p['certified'] for p in per)} of {len(per)} |")
    if all("agreement" in r["scenarios"][s] for r in ok for s in r["scenarios"]):
        ref = ok[0]["scenarios"][next(iter(ok[0]["scenarios"]))]["agreement"]
        out += ["", f"Solver agreement with {ref['reference']} on {ref['n_test_points']} test points (no retraining check):",
                "", "| scenario | Pearson | Spearman | top-100 helpful overlap | top-100 harmful overlap |",
                "|---|---|---|---|---|"]
        for s in ok[0]["scenarios"]:
            per = [r["scenarios"][s]["agreement"] for r in ok]
            out.append(f"| {s} | " + " | ".join(median_range([p[k] for p in per]) for k in (
                "pearson", "spearman", "top_helpful_overlap", "top_harmful_overlap")) + " |")
    out += ["", "| step | seconds |", "|---|---|"]
    for step in ok[0]["timings_s"]:
        out.append(f"| {step} | {median_range([r['timings_s'].get(step) for r in ok])} |")
    out.append(f"| whole run (wall) | {median_range([r['wall_s'] for r in ok])} |")
    units = [r["distinct_units"] for r in ok if r.get("distinct_units") is not None]
    if units:
        out.append(f"distinct embedding units (collapse shows as few): {', '.join(map(str, units))}")
    for r in rows:
        if not r["ok"]:
            out.append(f"seed {r['seed']} failed: {r['error']}")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (at least 5 for the README)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--init-jitter", type=float, default=0.0)
    parser.add_argument("--json", action="store_true", help="also print the per-seed rows as JSON")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.init_jitter:
        extra += ["--init-jitter", str(args.init_jitter)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-seeds-") as tmp:
        for seed in seeds:
            rows.append(run_seed(args.preset, seed, args.quick, args.threads, extra, Path(tmp) / f"seed{seed}"))
            r = rows[-1]
            summary = ", ".join(seed_line(s, v) for s, v in r.get("scenarios", {}).items()) if r["ok"] else r["error"]
            print(f"seed {seed}: {r['wall_s']:.0f}s, {summary}", file=sys.stderr, flush=True)
    name = f"{args.preset}{' --quick' if args.quick else ''}"
    print(f"## {name}: " + "\n".join(table(rows)))
    if args.json:
        print(json.dumps(rows))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
