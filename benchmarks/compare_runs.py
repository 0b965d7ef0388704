"""Do two run directories hold the same scores? For refactors: same command, code before and after.

    python benchmarks/compare_runs.py runs/before runs/after [--rtol 1e-6]

Prints per scenario max |Δscore| / max |score| and whether every score agrees within ``rtol`` (relative
to the largest score of that scenario, so near-zero scores do not dominate); exit status 1 when a
scenario differs or the runs scored different test points. Reads only the run store (no torch).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from precompute.runstore import open_run  # noqa: E402


def compare(before: Path, after: Path, rtol: float) -> list[str]:
    """One line per scenario; lines of differing scenarios start with "DIFFERENT"."""
    a, b = open_run(before.parent, before.name), open_run(after.parent, after.name)
    if list(a.manifest["test_points"]) != list(b.manifest["test_points"]):
        return [f"DIFFERENT test points: {a.manifest['test_points']} vs {b.manifest['test_points']}"]
    lines = []
    for scenario in a.manifest["scenarios"]:
        x, y = np.asarray(a.scores(scenario)), np.asarray(b.scores(scenario))
        scale = float(np.abs(x).max()) or 1.0
        worst = float(np.abs(x - y).max()) / scale
        lines.append(f"{'same' if worst <= rtol else 'DIFFERENT'} {scenario}: max |Δ| / max |score| = {worst:.1e} "
                     f"({x.shape[0]} test points x {x.shape[1]} examples)")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rtol", type=float, default=1e-6)
    args = parser.parse_args()
    lines = compare(args.before.resolve(), args.after.resolve(), args.rtol)
    print("\n".join(lines))
    return 1 if any(line.startswith("DIFFERENT") for line in lines) else 0


if __name__ == "__main__":
    raise SystemExit(main())
