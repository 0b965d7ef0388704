"""`torchrun -m precompute ...`: the same command sharded over two gloo ranks on 127.0.0.1.

The two-rank runs must give the single-process scores (float tolerance) and a valid run directory
written once by rank 0; a rank killed mid-run must leave neither a run nor a temporary directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from precompute.cli import main
from precompute.runstore import list_runs, open_run

pytestmark = pytest.mark.slow          # each test is a real two-process run of the CLI

QUICK = ["--preset", "digits", "--quick", "--no-validate", "--seed", "3"]


def torchrun(*args: str) -> list[str]:
    """A two-rank torchrun command line, rendezvous and gloo on the loopback device only."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "precompute", *args]


def loopback_env() -> dict[str, str]:
    return {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "digits"
    assert main([*QUICK, "--out", str(out)]) == 0
    return open_run(out.parent, out.name)


@pytest.mark.parametrize("extra", [(), ("--scores-to-disk", "--rank-zero-solve")],
                         ids=["gathered+distributed-solve", "to-disk+rank-zero-solve"])
def test_two_ranks_give_the_single_process_run(single_process_run, tmp_path, extra):
    out = tmp_path / "digits"
    proc = subprocess.run(torchrun(*QUICK, *extra, "--out", str(out)), env=loopback_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run written to") == 1, proc.stdout          # rank 0 alone reports
    assert "(2 ranks)" in proc.stdout

    assert list_runs(tmp_path) == ["digits"]                               # no temporary leftovers
    run = open_run(tmp_path, "digits")
    reference = single_process_run
    assert run.manifest["world_size"] == 2
    assert run.test_points == reference.test_points
    for scenario in ("fixed", "updated"):
        got, want = run.scores(scenario), reference.scores(scenario)
        assert got.shape == want.shape == (len(reference.test_points), reference.n_pretrain)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits"]


def _rank_pids(agent_pid: int) -> dict[int, int]:
    """{RANK: pid} of the worker processes torchrun started (read from their environment)."""
    children = Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()
    ranks = {}
    for pid in map(int, children):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"RANK="):
                ranks[int(item[5:])] = pid
    return ranks


def test_a_rank_killed_mid_run_leaves_nothing(tmp_path):
    out = tmp_path / "digits"
    proc = subprocess.Popen(torchrun(*QUICK, "--out", str(out)), env=loopback_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".digits.tmp-*")):                  # rank 0 has started writing
            assert proc.poll() is None and time.monotonic() < deadline, "the run never started"
            time.sleep(0.2)
        ranks = _rank_pids(proc.pid)
        while 1 not in ranks:
            assert time.monotonic() < deadline, f"rank 1 not found among {ranks}"
            time.sleep(0.1)
            ranks = _rank_pids(proc.pid)
        os.kill(ranks[1], signal.SIGKILL)                                  # a crash, no cleanup
        stdout, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "run written to" not in stdout
    assert list(tmp_path.iterdir()) == [], f"left behind: {list(tmp_path.iterdir())}"


def test_bad_input_is_reported_once_by_rank_0(tmp_path):
    proc = subprocess.run(torchrun(*QUICK, "--test-ids", "9999", "--out", str(tmp_path / "digits")),
                          env=loopback_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: test id(s) [9999] out of range: the finetune test set has 100 examples (ids 0..99)"]
    assert list(tmp_path.iterdir()) == []
