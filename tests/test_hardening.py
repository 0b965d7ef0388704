"""Issue 11: hostile and careless use. Each test fails without its fix.

--overwrite never deletes what is not a run; resource guards and value checks before any work; one
line for every failure (no traceback); nothing left behind (parents, SIGTERM, stale temporaries);
the run reader refuses damaged manifests, tables and symlinks; a dead peer rank cleans up.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from precompute.cli import main
from precompute.errors import PrecomputeError
from precompute.run_schema import RunStoreError
from precompute.run_writer import RunWriter, remove_stale_temporaries
from precompute.runstore import open_run
from run_factory import write_synthetic_run

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--preset", "digits", "--quick", "--no-validate"]


def cli(capsys, *args: str) -> tuple[int, list[str]]:
    """Exit status and the lines printed to stderr by the CLI (in this process)."""
    code = main(list(args))
    return code, capsys.readouterr().err.strip().splitlines()


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 120, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "precompute", *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, **popen)


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    """A contract-valid synthetic run, copied by the tests that damage it."""
    root = tmp_path_factory.mktemp("runs")
    return write_synthetic_run(root, "digits", m=60, n_test=20, T=4, seed=1)


# ---- 1. --overwrite ---------------------------------------------------------------------------------

def test_overwrite_refuses_the_runs_root_and_user_folders(capsys, tmp_path, small_run):
    root = tmp_path / "runs"
    shutil.copytree(small_run, root / "digits")
    (root / "notes.txt").write_text("mine")
    user = tmp_path / "photos"
    user.mkdir()
    (user / "cat.png").write_bytes(b"not really")
    before = tree(tmp_path)
    for out in (root, user):
        code, err = cli(capsys, *QUICK, "--out", str(out), "--overwrite")
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith(f"error: --overwrite refused: {out} is not a complete run") and "nothing was deleted" in err[0]
    assert tree(tmp_path) == before


def test_overwrite_refuses_a_damaged_run(capsys, tmp_path, small_run):
    shutil.copytree(small_run, tmp_path / "digits")
    (tmp_path / "digits" / "scores" / "fixed.npy").unlink()
    before = tree(tmp_path)
    code, err = cli(capsys, *QUICK, "--out", str(tmp_path / "digits"), "--overwrite")
    assert code == 2 and len(err) == 1 and "missing scores/fixed.npy" in err[0], err
    assert tree(tmp_path) == before


def test_replacing_a_run_keeps_the_old_one_readable_until_commit(tmp_path, small_run):
    shutil.copytree(small_run, tmp_path / "digits")
    old = open_run(tmp_path, "digits")
    new = write_synthetic_run(tmp_path / "other", "digits", m=50, n_test=20, T=3, seed=2)
    with RunWriter(tmp_path / "digits", overwrite=True) as w:
        for rel in (p.relative_to(new) for p in new.rglob("*") if p.is_file() and p.name != "manifest.json"):
            (w.path / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(new / rel, w.path / rel)
        assert open_run(tmp_path, "digits").n_pretrain == old.n_pretrain == 60    # still the old run
        w.commit(json.loads((new / "manifest.json").read_text()) | {"name": "digits"})
    assert open_run(tmp_path, "digits").n_pretrain == 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits", "other"]       # the old one is gone


def test_the_swap_is_one_atomic_exchange(tmp_path):
    """Linux renameat2(RENAME_EXCHANGE): there is no moment without a run at the path."""
    from precompute.run_writer import _exchange

    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "v").write_text("new")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "v").write_text("old")
    assert _exchange(tmp_path / "new", tmp_path / "run")
    assert (tmp_path / "run" / "v").read_text() == "new" and (tmp_path / "new" / "v").read_text() == "old"


# ---- 2. resource guards -----------------------------------------------------------------------------

def test_huge_images_are_refused_before_loading(tmp_path):
    from PIL import Image

    for cls in ("a", "b", "c", "d"):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (4000, 4000)).save(tmp_path / "img" / cls / f"{i}.png")
    t0 = time.monotonic()
    proc = run_cli("--preset", "custom", "--pretrain-data", str(tmp_path / "img"), "--pretrain-classes", "a,b",
                   "--finetune-classes", "c,d", "--no-validate", "--out", str(tmp_path / "runs" / "big"), timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "4000x4000" in lines[0] and "--max-params" in lines[0] and "resize" in lines[0]
    assert time.monotonic() - t0 < 45
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, needle", [
    (["--preset", "digits", "--no-validate", "--solver", "exact", "--hidden", "400"], "use --solver cg"),
    (["--preset", "digits", "--hidden", "100"], "pass --no-validate"),          # RetrainError after minutes before
    (["--preset", "digits", "--k", "3000"], "lower --k or --val-points"),
    (["--preset", "digits", "--no-validate", "--chunk-size", "1000000"], "use --chunk-size 444444 or less"),
    (["--preset", "news", "--no-validate", "--vocabulary", "500000"], "--max-params"),
])
def test_resource_guards_stop_before_work(capsys, tmp_path, args, needle):
    code, err = cli(capsys, *args, "--quick", "--out", str(tmp_path / "a" / "run"))
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert list(tmp_path.iterdir()) == []


# ---- 3. every value checked before training ----------------------------------------------------------

@pytest.mark.parametrize("args, flag", [
    (["--test-ids", "3,3"], "--test-ids"), (["--test-ids", "-1"], "--test-ids"), (["--n-test", "0"], "--n-test"),
    (["--n-test", "-4"], "--n-test"), (["--alpha", "nan"], "--alpha"), (["--alpha", "inf"], "--alpha"),
    (["--alpha", "-1"], "--alpha"), (["--damping", "nan"], "--damping"), (["--damping=-1e-3"], "--damping"),
    (["--label-noise", "-0.1"], "--label-noise"), (["--label-noise", "1.5"], "--label-noise"),
    (["--hidden", "0"], "--hidden"), (["--k", "0"], "--k"), (["--seed", "-1"], "--seed"),
    (["--group-percents", "0,200"], "--group-percents"), (["--finetune-test-fraction", "1"], "--finetune-test-fraction"),
    (["--threads", "0"], "--threads"), (["--chunk-size", "0"], "--chunk-size"), (["--device", "gpu"], "--device"),
    (["--scenarios", "fixed,fixed"], "--scenarios"), (["--pretrain-l2", "nan"], "--pretrain-l2"),
    (["--test-ids", "a"], "--test-ids"),
])
def test_bad_values_name_the_flag_and_the_fix(capsys, tmp_path, args, flag):
    code, err = cli(capsys, *QUICK, *args, "--out", str(tmp_path / "run"))
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error:") and flag in err[0]
    assert "for example" in err[0] or "e.g." in err[0]
    assert list(tmp_path.iterdir()) == []


def test_a_class_in_both_tasks_is_refused(capsys, tmp_path):
    code, err = cli(capsys, "--preset", "custom", "--pretrain-data", str(tmp_path), "--pretrain-classes", "a,b",
                    "--finetune-classes", "b,c", "--out", str(tmp_path / "run"))
    assert code == 2 and err == ["error: --pretrain-classes and --finetune-classes both list b: a class belongs "
                                 "to one task; remove it from one of the two lists"]


# ---- 4. one line, never a traceback ------------------------------------------------------------------

@pytest.mark.parametrize("out, fix", [("/proc/precompute-test/run", "choose another --out"),
                                      ("/sys/precompute-test/run", "choose an --out in a folder you can write"),
                                      ("FILE/run", "choose another --out")], ids=["proc", "sys", "under-a-file"])
def test_an_impossible_out_is_one_line(capsys, tmp_path, out, fix):
    (tmp_path / "FILE").write_text("x")
    out = out.replace("FILE", str(tmp_path / "FILE"))
    code, err = cli(capsys, *QUICK, "--out", out)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: cannot write run {out}:"), err
    assert err[0].endswith(fix)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_a_read_only_out_is_one_line(capsys, tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    code, err = cli(capsys, *QUICK, "--out", str(tmp_path / "ro" / "run"))
    assert code == 2 and len(err) == 1 and "folder you can write" in err[0], err


def test_a_full_disk_while_writing_is_one_line_and_leaves_nothing(tmp_path):
    """RLIMIT_FSIZE makes every write past 4 KiB fail with EFBIG, as a full disk fails with ENOSPC
    (CPython ignores SIGXFSZ, so the write returns the error)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    proc = run_cli(*QUICK, "--train-iters", "30", "--newton-steps", "0", "--damping", "0.1",
                   "--out", str(tmp_path / "runs" / "digits"), preexec_fn=limit, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot write run {tmp_path / 'runs' / 'digits'}: ")
    assert "free disk space" in errors[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()                            # not even the parent it created


def test_an_internal_error_is_one_line_and_a_log(capsys, monkeypatch, tmp_path):
    """Fault injection: a bug cannot be produced on demand, so the pipeline is made to raise one."""
    import precompute.pipeline

    def buggy(config, progress=True):
        return {}["no such key"]

    monkeypatch.setattr(precompute.pipeline, "run_pipeline", buggy)
    code, err = cli(capsys, *QUICK, "--out", str(tmp_path / "run"))
    assert code == 1 and len(err) == 1 and err[0].startswith("error: internal error (KeyError"), err
    log = Path(err[0].split("the traceback is in ")[1].split(";")[0])
    try:
        assert "Traceback" in log.read_text() and "buggy" in log.read_text()
    finally:
        log.unlink()


def test_every_project_error_is_a_precompute_error():
    from precompute.data import DataError
    from precompute.distributed import DistributedError
    from precompute.guards import ResourceLimitError
    from precompute.retraining import RetrainError
    from precompute.solvers import SolverError
    from precompute.task import TaskError

    for cls in (DataError, DistributedError, ResourceLimitError, RetrainError, RunStoreError,
                SolverError, TaskError):
        assert issubclass(cls, PrecomputeError), cls


# ---- 5. nothing left behind --------------------------------------------------------------------------

def test_a_failed_run_removes_the_parent_folders_it_created(capsys, tmp_path):
    out = tmp_path / "a" / "b" / "c" / "digits"
    code, err = cli(capsys, *QUICK, "--test-ids", "9999", "--out", str(out))   # fails after the writer exists
    assert code == 2 and err[0].startswith("error: test id(s) [9999] out of range"), err
    assert list(tmp_path.iterdir()) == []


def test_sigterm_cleans_up_like_ctrl_c(tmp_path):
    root = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "precompute", *QUICK, "--out", str(root / "digits")], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(root.glob(".digits.tmp-*")):
            assert proc.poll() is None and time.monotonic() < deadline, "the run never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stderr[-2000:]
    assert "interrupted (SIGTERM): nothing was written" in stderr and "Traceback" not in stderr
    assert not root.exists()


def test_the_next_run_removes_stale_temporaries_of_dead_processes(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".digits.tmp-{dead.pid}-0123abcd"
    live = tmp_path / f".news.tmp-{os.getpid()}-89abcdef"
    not_ours = tmp_path / f".notes-{dead.pid}"
    for d in (stale, live, not_ours):
        (d / "scores").mkdir(parents=True)
        (d / "scores" / "x.npy").write_bytes(b"x")
    with RunWriter(tmp_path / "other") as w:
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, not_ours.name, w.path.name])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, not_ours.name])
    assert remove_stale_temporaries(tmp_path) == []


def test_a_writer_lost_before_its_with_block_removes_its_directory(tmp_path):
    writer = RunWriter(tmp_path / "runs" / "digits")
    assert writer.path.is_dir()
    del writer                                            # e.g. an exception before ``with writer:``
    assert not (tmp_path / "runs").exists()


# ---- 6. the run reader on damaged runs ----------------------------------------------------------------

def _damaged_copy(small_run: Path, tmp_path: Path) -> Path:
    shutil.copytree(small_run, tmp_path / "runs" / "r")
    return tmp_path / "runs" / "r"


@pytest.mark.parametrize("key, value, needle", [
    ("n_pretrain", "60", "n_pretrain must be an integer"),
    ("finetune_accuracy", {"fixed": "high"}, "finetune_accuracy.fixed must be a finite number"),
    ("validation", [[1, 2]], "validation must be an object"),
    ("pretrain_class_names", [["0"], "1"], "pretrain_class_names[0] must be a string"),
    ("timings_s", {"train": [1]}, "timings_s.train must be a finite number"),
    ("label_noise", {"rate": "lots", "seed": 0, "n_flipped": 1}, "label_noise.rate"),
    ("config", {"a": json.loads("[" * 200 + "]" * 200)}, "nested at most"),
])
def test_manifest_values_of_the_wrong_type_are_refused(small_run, tmp_path, key, value, needle):
    run = _damaged_copy(small_run, tmp_path)
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps(manifest | {key: value}))
    with pytest.raises(RunStoreError, match="run 'r'") as info:
        open_run(run.parent, "r")
    assert needle in str(info.value)


def test_absurdly_deep_json_is_refused(small_run, tmp_path):
    run = _damaged_copy(small_run, tmp_path)
    (run / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(RunStoreError, match="not valid JSON"):
        open_run(run.parent, "r")


def test_corrupt_parquet_pages_are_a_run_store_error(small_run, tmp_path):
    run = _damaged_copy(small_run, tmp_path)
    path = run / "pretrain.parquet"
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    middle = rng.integers(4, len(data) // 2, size=64)      # data pages; the footer stays intact
    for i in middle:
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RunStoreError, match="pretrain.parquet") as info:
        open_run(run.parent, "r").pretrain_table()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("rel", ["manifest.json", "pretrain.parquet", "validation/pairs.parquet",
                                 "text-vectorizer"])
def test_symlinks_out_of_the_run_are_refused(small_run, tmp_path, rel):
    run = _damaged_copy(small_run, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    if rel == "text-vectorizer":            # an optional file the reader opens only on demand
        rel = "text/vectorizer.json"
        (outside / "v.json").write_text('{"vocabulary": ["secret"]}')
        (run / "text").mkdir()
        target = outside / "v.json"
    else:
        target = outside / Path(rel).name
        shutil.move(run / rel, target)
    (run / rel).symlink_to(target)
    with pytest.raises(RunStoreError, match="outside the run directory"):
        reader = open_run(run.parent, "r")
        reader.vectorizer_vocabulary()
        reader.pairs()


# ---- 9. a rank that dies before the first agreement ----------------------------------------------------

def _rank_dies_before_agreeing(rank: int, world_size: int, out: str) -> None:
    from precompute.run_commit import rank_zero_writer

    if rank == 1:
        os._exit(3)                                        # a crash: no cleanup, sockets closed
    with rank_zero_writer(out):
        pass


def test_a_peer_dying_while_the_run_directory_is_created_leaves_nothing(tmp_path):
    from ranks import RanksFailed, run_on_ranks

    with pytest.raises(RanksFailed):
        run_on_ranks(_rank_dies_before_agreeing, 2, str(tmp_path / "runs" / "digits"), timeout_s=60)
    assert list(tmp_path.iterdir()) == [], list(tmp_path.rglob("*"))


def _corrupt_column_pages(path: Path, column: str) -> None:
    """Overwrite the data pages of one column chunk with junk; footer and other columns stay intact."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata.row_group(0)
    chunk = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema == column)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data = bytearray(path.read_bytes())
    data[start: start + chunk.total_compressed_size] = b"\xa5" * chunk.total_compressed_size
    path.write_bytes(bytes(data))


@pytest.mark.usefixtures("clear_streamlit_caches")
def test_corrupt_pages_show_the_broken_run_notice_in_the_explorer(small_run, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    run = _damaged_copy(small_run, tmp_path)
    _corrupt_column_pages(run / "pretrain.parquet", "source")
    open_run(run.parent, "r")                                # the schema and the id column are intact
    monkeypatch.setenv("EXPLORER_RUNS_DIR", str(run.parent))
    at = AppTest.from_file(str(REPO / "explorer" / "app.py"), default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("pretrain.parquet is damaged" in e.value for e in at.error)
    assert any("incomplete or damaged" in m.value for m in at.markdown)
