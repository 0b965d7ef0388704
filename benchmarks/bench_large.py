"""Scoring a pretraining set that lives on disk: memory and time for m = 1,000,000 (CPU).

The digits preset's 901 pretraining images are augmented (``bench_gpu.augmented_blocks``: shifted
copies, then dimmed and noisy rounds of them) to ``--m`` examples and written block by block to
``x.npy`` (float32 [m, 1, 8, 8]) and ``y.npy`` (int64 [m]). The small preset model (P = 1,125) is
trained on the originals, and the test-side vectors (``--tests`` test points x both scenarios,
exact solves) are saved. Then each measurement runs in a fresh process that opens the features
with ``np.load(mmap_mode="r")`` (``precompute.distributed.LazyRows``: chunks become tensors on the
fly) and streams the scores into a ``write_scores_memmap`` .npy:

    bounded     ``score_in_blocks`` with ``--block`` examples per block; after each block the input
                and output maps' pages are dropped from the resident set (``release_pages``)
    unbounded   the same pass without releasing pages (every page touched stays resident)
    ranks2      two gloo ranks on this machine (``sharded_score_pretraining(out_path=...)``), each
                scoring half into the same memory-mapped file

Prints one JSON object: per mode, wall seconds of the scoring pass, seconds per 100,000 examples,
CPU seconds of the pass (per rank for ranks2: on a busy machine the fairer measure of the work),
peak RSS (VmHWM: anonymous + file-backed pages) and RSS before the pass (imports of torch, numpy,
pandas, sklearn and the task take about 370 MiB), per rank for ranks2; plus the
largest difference of the streamed scores from an in-memory ``score_pretraining`` on a sample.

Usage: python benchmarks/bench_large.py [--m 1000000] [--tests 32] [--chunk 1024] [--block 65536]
                                        [--modes bounded,unbounded,ranks2] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gpu import augmented_blocks, digits_task  # noqa: E402
from precompute.config import InfluenceConfig, SolverConfig, TrainConfig  # noqa: E402
from precompute.distributed import (LazyRows, run_on_ranks, score_in_blocks, sharded_score_pretraining,  # noqa: E402
                                    write_scores_memmap)
from precompute.influence import score_pretraining, stacked_test_vectors  # noqa: E402
from precompute.training import train_stages  # noqa: E402


def memory_mb() -> dict:
    """VmHWM (peak RSS), VmRSS, RssAnon, RssFile of this process, in MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def _memory_fields(before: dict) -> dict:
    after = memory_mb()
    return {"rss_before_mb": before["VmRSS"], "peak_rss_mb": after["VmHWM"],
            "peak_growth_mb": round(after["VmHWM"] - before["VmRSS"], 1),
            "after_mb": {"rss": after["VmRSS"], "anon": after["RssAnon"], "file": after["RssFile"]},
            "before_mb": {"rss": before["VmRSS"], "anon": before["RssAnon"], "file": before["RssFile"],
                          "peak": before["VmHWM"]}}


def prepare(workdir: Path, m: int, tests: int) -> dict:
    """Writes x.npy, y.npy (block by block) and state.pt (p, S); returns sizes and timings."""
    task = digits_task("cpu", torch.float32)
    start = time.perf_counter()
    x = np.lib.format.open_memmap(workdir / "x.npy", mode="w+", dtype=np.float32, shape=(m, *task.pretrain_x.shape[1:]))
    y = np.lib.format.open_memmap(workdir / "y.npy", mode="w+", dtype=np.int64, shape=(m,))
    done = 0
    for xb, yb in augmented_blocks(task.pretrain_x.numpy(), task.pretrain_y.numpy(), m):
        x[done: done + len(xb)], y[done: done + len(xb)] = xb, yb
        done += len(xb)
    x.flush(), y.flush()
    del x, y
    write_s = time.perf_counter() - start

    start = time.perf_counter()
    trained = train_stages(task, TrainConfig(max_iter=300, lbfgs_tol=1e-4, grad_tol=1e-4, newton_polish=0),
                           alpha=0.1, progress=False)
    config = InfluenceConfig(alpha=0.1, pretrain_solver=SolverConfig("exact", damping=1e-3),
                             finetune_solver=SolverConfig("exact", damping=1e-3))
    vectors, _ = stacked_test_vectors(task, trained, list(range(tests)), config)
    s = torch.cat([vectors["fixed"], vectors["updated"]], dim=1)
    torch.save({"p": trained.p, "s": s}, workdir / "state.pt")
    return {"write_features_s": round(write_s, 2), "train_and_test_side_s": round(time.perf_counter() - start, 2),
            "features_mb": round((workdir / "x.npy").stat().st_size / 2**20, 1), "n_params": task.n_pretrain_params,
            "T": s.shape[1]}


def lazy_task(workdir: Path):
    task = digits_task("cpu", torch.float32)
    task.pretrain_x = LazyRows(np.load(workdir / "x.npy", mmap_mode="r"), dtype=torch.float32)
    task.pretrain_y = LazyRows(np.load(workdir / "y.npy", mmap_mode="r"))
    state = torch.load(workdir / "state.pt", weights_only=True)
    return task, state["p"], state["s"]


def measure_one(workdir: Path, mode: str, chunk: int, block: int) -> dict:
    """One process, one pass: ``bounded`` or ``unbounded``."""
    task, p, s = lazy_task(workdir)
    out = write_scores_memmap(workdir / f"scores-{mode}.npy", (s.shape[1], task.m))
    before = memory_mb()
    start, cpu = time.perf_counter(), time.process_time()
    score_in_blocks(task, p, s, slice(0, task.m), out, chunk, block_size=block if mode == "bounded" else None)
    out.flush()
    seconds = time.perf_counter() - start
    return {"mode": mode, "m": task.m, "scoring_s": round(seconds, 2), "cpu_s": round(time.process_time() - cpu, 2),
            "s_per_100k": round(seconds / task.m * 1e5, 3), **_memory_fields(before)}


def _rank_pass(rank: int, world: int, workdir: str, chunk: int, block: int) -> dict:
    import torch.distributed as dist
    task, p, s = lazy_task(Path(workdir))
    before = memory_mb()
    dist.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    sharded_score_pretraining(task, p, s, chunk, out_path=Path(workdir) / "scores-ranks2.npy", block_size=block)
    seconds = time.perf_counter() - start
    return {"rank": rank, "scoring_s": round(seconds, 2), "cpu_s": round(time.process_time() - cpu, 2),
            **_memory_fields(before)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, default=1_000_000)
    parser.add_argument("--tests", type=int, default=32, help="test points per scenario (T = 2 x tests)")
    parser.add_argument("--chunk", type=int, default=1024, help="scoring chunk (peak memory grows with it)")
    parser.add_argument("--block", type=int, default=65536)
    parser.add_argument("--modes", default="bounded,unbounded,ranks2")
    parser.add_argument("--workdir", help="where the .npy files go (default: a temporary directory, removed)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)      # internal: child process
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.measure:
        workdir = Path(args.workdir)
        if args.measure == "ranks2":
            ranks = run_on_ranks(_rank_pass, 2, str(workdir), args.chunk, args.block, timeout_s=1800)
            seconds = max(r["scoring_s"] for r in ranks)
            m = len(np.load(workdir / "x.npy", mmap_mode="r"))
            result = {"mode": "ranks2", "m": m, "scoring_s": seconds, "s_per_100k": round(seconds / m * 1e5, 3),
                      "cpu_s_per_rank": max(r["cpu_s"] for r in ranks), "ranks": ranks}
        else:
            result = measure_one(workdir, args.measure, args.chunk, args.block)
        print(json.dumps(result))
        return

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-large-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        setup = prepare(workdir, args.m, args.tests)
        results = []
        for mode in args.modes.split(","):
            proc = subprocess.run([sys.executable, __file__, "--measure", mode, "--workdir", str(workdir),
                                   "--chunk", str(args.chunk), "--block", str(args.block)],
                                  capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))

        # the streamed scores equal an in-memory pass (sample: the first and last 2,000 examples)
        task, p, s = lazy_task(workdir)
        check = {}
        for mode in args.modes.split(","):
            scores = np.load(workdir / f"scores-{mode}.npy", mmap_mode="r")
            diffs = []
            for sl in (slice(0, 2000), slice(task.m - 2000, task.m)):
                small = digits_task("cpu", torch.float32)        # in-memory tensors of the sample rows
                small.pretrain_x, small.pretrain_y = task.pretrain_x[sl], task.pretrain_y[sl]
                # scores divide by m: score the sample with S scaled by len/m (see precompute.distributed)
                sample = score_pretraining(small, p, s * ((sl.stop - sl.start) / task.m), 1000, progress=False)
                diffs.append(float(np.abs(scores[:, sl] - sample).max() / np.abs(sample).max()))
            check[mode] = max(diffs)
        print(json.dumps({"m": args.m, "chunk": args.chunk, "block": args.block, "threads": 1, **setup,
                          "results": results, "max_rel_diff_vs_in_memory": check}, indent=1))
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
