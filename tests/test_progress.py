"""Progress reporting: plain log lines at a steady interval when the output is not a terminal."""

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from precompute import progress

REPO = Path(__file__).resolve().parents[1]
STAMP = re.compile(r"^\[\s*(\d+\.\d)s\] (.*)$")


def test_plain_mode_prints_heartbeats_with_note_and_eta(monkeypatch):
    monkeypatch.setenv("PRECOMPUTE_PROGRESS_INTERVAL", "0.1")
    monkeypatch.setenv("PRECOMPUTE_PROGRESS", "plain")
    out = io.StringIO()
    with progress.step("validation", stream=out):
        bar = progress.Bar("retraining", total=10, unit="models", stream=out)
        bar.update(5)
        bar.set_note("largest ‖∇‖ 3.0e-06")
        time.sleep(0.45)
        bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("validation: started")
    beats = [ln for ln in lines if "5/10 models (50%), largest ‖∇‖ 3.0e-06" in ln]
    assert len(beats) >= 2 and all("ETA" in ln and "validation > retraining" in ln for ln in beats)
    assert "retraining: done in" in lines[-2] and "validation: done in" in lines[-1]


def test_disabled_and_terminal_modes_print_no_log_lines(monkeypatch):
    monkeypatch.setenv("PRECOMPUTE_PROGRESS_INTERVAL", "0.05")
    out = io.StringIO()
    with progress.Bar("x", total=3, enabled=False, stream=out) as bar:
        bar.update(1)
        time.sleep(0.15)
    assert out.getvalue() == ""
    assert progress.format_seconds(3.24) == "3.2s" and progress.format_seconds(185) == "3m05s"


def test_quick_run_to_a_pipe_reports_every_step_at_least_every_10_seconds(tmp_path):
    """A real quick run, stdout and stderr into a pipe, default interval (5 s): every step and the
    retraining (per chunk, stage, iteration and gradient norm) show up, and no gap exceeds 10 s."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PRECOMPUTE_PROGRESS", None)
    env.pop("PRECOMPUTE_PROGRESS_INTERVAL", None)
    cmd = [sys.executable, "-m", "precompute", "--preset", "digits", "--quick", "--val-points", "2", "--k", "2",
           "--n-test", "4", "--out", str(tmp_path / "run")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    arrivals: list[tuple[float, str]] = []
    for line in proc.stdout:
        arrivals.append((time.monotonic(), line.rstrip("\n")))
    assert proc.wait() == 0, "\n".join(t for _, t in arrivals)
    text = [t for _, t in arrivals]
    stamped = [t for t in text if STAMP.match(t)]
    assert not any("\r" in t or "it/s" in t for t in text), "a tqdm bar reached the pipe"
    for name in ("load data", "train", "influence", "validation", "baselines", "write files"):
        assert any(t.endswith(f"] {name}: started") for t in stamped), name
        assert any(f"] {name}: done in" in t for t in stamped), name
    retraining = [t for t in stamped if "validation > retraining:" in t and "ETA" in t]
    # each tick shows the stage and either its iteration and gradient norm or the certificate's Lanczos step
    # (which of the two the last tick catches depends on the machine's speed)
    assert retraining and all(re.search(r"model-stages \(\d+%\), models 1-\d+ of \d+ \(chunk 1/1\), "
                                        r"(pretraining|finetuning \(\w+\)): (iteration \d+, \d+/\d+ converged, "
                                        r"largest ‖∇‖ \d\.\de[-+]\d\d|certifying the retrained minima, "
                                        r"Lanczos step \d+/\d+)", t) for t in retraining), retraining
    assert any("pretraining:" in t and "‖∇‖" in t for t in stamped)     # training reports its gradient
    # the gaps between lines as they arrived, from the first progress line to the summary
    first = next(i for i, (_, t) in enumerate(arrivals) if STAMP.match(t))
    last = next(i for i, (_, t) in enumerate(arrivals) if t.startswith("run written to"))
    gaps = [b[0] - a[0] for a, b in zip(arrivals[first:last], arrivals[first + 1:last + 1])]
    assert max(gaps) <= 10.0, f"longest silence {max(gaps):.1f} s"
    print(f"progress lines: {len(stamped)}, longest gap {max(gaps):.1f} s")
