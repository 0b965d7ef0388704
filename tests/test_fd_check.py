"""`python -m precompute check` stays within the bound the README states, whatever the thread count.

The bound, not the printed digits: at errors near 4e-10 the last digit is rounding (eps·|f|/h of
each finite difference against derivatives near 1e-4), which moves with the CPU and thread count."""

import os
import re
import subprocess
import sys
from pathlib import Path

from precompute.fd_check import run_check

REPO = Path(__file__).resolve().parents[1]


def readme_bound() -> float:
    """The README's "error stays **below X**" (one match, or the README and this test drifted apart)."""
    (bound,) = re.findall(r"\*\*below (\d(?:\.\d)?e-\d+)\*\* in both scenarios", (REPO / "README.md").read_text())
    return float(bound)


def test_check_error_is_within_the_readme_bound_in_process_one_thread():
    result = run_check()
    bound = readme_bound()
    assert bound <= 1e-8
    for scenario in ("fixed", "updated"):
        assert result.max_error(scenario) < bound
    assert min(abs(r["finite_difference"]) for r in result.rows) > 1e-4      # non-trivial derivatives


def test_check_command_prints_method_and_the_readme_figure_with_two_threads():
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", "import torch; torch.set_num_threads(2); "
                          "from precompute.cli import main; raise SystemExit(main(['check']))"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Richardson-extrapolated" in out.stdout and "6 Newton steps" in out.stdout
    for scenario in ("fixed", "updated"):
        (figure,) = re.findall(rf"{scenario}: max relative error (\S+) over 6 pairs \(ok", out.stdout)
        assert float(figure) < readme_bound(), out.stdout
