"""`python -m precompute check` prints the figure the README states, whatever the thread count."""

import os
import re
import subprocess
import sys
from pathlib import Path

from precompute.fd_check import run_check

REPO = Path(__file__).resolve().parents[1]


def readme_figures() -> dict[str, str]:
    text = (REPO / "README.md").read_text()
    return dict((s, v) for v, s in re.findall(r"\*\*(\d\.\de-\d\d) \((fixed|updated)\)\*\*", text))


def test_check_figure_matches_the_readme_in_process_one_thread():
    result = run_check()
    figures = readme_figures()
    for scenario in ("fixed", "updated"):
        assert f"{result.max_error(scenario):.1e}" == figures[scenario]
        assert result.max_error(scenario) < 1e-8
    assert min(abs(r["finite_difference"]) for r in result.rows) > 1e-4      # non-trivial derivatives


def test_check_command_prints_method_and_the_readme_figure_with_two_threads():
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", "import torch; torch.set_num_threads(2); "
                          "from precompute.cli import main; raise SystemExit(main(['check']))"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Richardson-extrapolated" in out.stdout and "6 Newton steps" in out.stdout
    for scenario, figure in readme_figures().items():
        assert f"{scenario}: max relative error {figure} over 6 pairs (ok" in out.stdout, out.stdout
