"""Scoring a pretraining set that lives on disk: memory and time for m = 1,000,000 (CPU).

The digits preset's 901 pretraining images are augmented (``bench_gpu.augmented_blocks``: shifted
copies, then dimmed and noisy rounds of them) to ``--m`` examples and written block by block to
``x.npy`` (float32 [m, 1, 8, 8]) and ``y.npy`` (int64 [m]). The small preset model (P = 1,125) is
trained on the originals, and the test-side vectors (``--tests`` test points x both scenarios,
exact solves) are saved. Then each measurement runs in a fresh process that opens the features
with ``np.load(mmap_mode="r")`` (``precompute.streaming.LazyRows``: chunks become tensors on the
fly) and streams the scores into a ``write_scores_memmap`` .npy:

    bounded     ``score_in_blocks`` with ``--block`` examples per block; after each block the input
                and output maps' pages are dropped from the resident set (``release_pages``)
    unbounded   the same pass without releasing pages (every page touched stays resident)
    ranks2      two gloo ranks on this machine (``sharded_score_pretraining(out_path=...)``), each
                scoring half into the same memory-mapped file
    train       pretraining on the memory-mapped set, chunk by chunk
                (``precompute.streaming.StreamedPretrainObjective``, ``--train-chunk`` examples per
                chunk): one value+gradient pass, one Hessian-vector pass with ``--hvp-cols``
                columns, then L-BFGS warm-started at the p trained on the originals
                (``precompute.training.minimize``, ``--train-iters`` iterations; L-BFGS takes up
                to 20 per step, so the count can exceed it), counting the passes over the data
    train_in_memory  the baseline: the whole set loaded as tensors, one gradient and one HVP (same
                columns) by autograd over a single graph (``task.pretrain_objective``), as training
                does without streaming; memory grows with m

Prints one JSON object: per mode, wall seconds of the scoring pass, seconds per 100,000 examples,
CPU seconds of the pass (per rank for ranks2: on a busy machine the fairer measure of the work),
peak RSS (VmHWM: anonymous + file-backed pages) and RSS before the pass (imports of torch, numpy,
pandas, sklearn and the task take about 370 MiB), per rank for ranks2; plus the
largest difference of the streamed scores from an in-memory ``score_pretraining`` on a sample.
For train: seconds per pass per 100,000 examples (gradient, and HVP), the L-BFGS run (objective and
gradient norm before and after, passes), peak RSS, and the largest relative difference of the
streamed gradient and HVP from in-memory autograd on a sample of rows.

Usage: python benchmarks/bench_large.py [--m 1000000] [--tests 32] [--chunk 1024] [--block 65536]
                                        [--modes bounded,unbounded,ranks2,train] [--workdir DIR]
                                        [--train-iters 5] [--train-chunk 4096] [--hvp-cols 8]
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
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench_gpu import augmented_blocks, digits_task  # noqa: E402
from ranks import run_on_ranks  # noqa: E402
from precompute.config import InfluenceConfig, SolverConfig, TrainConfig  # noqa: E402
from precompute.curvature import batched_hvp  # noqa: E402
from precompute.influence import stacked_test_vectors  # noqa: E402
from precompute.scoring import (score_in_blocks, score_pretraining, sharded_score_pretraining,  # noqa: E402
                                write_scores_memmap)
from precompute.streaming import LazyRows  # noqa: E402
from precompute.streaming import StreamedPretrainObjective  # noqa: E402
from precompute.training import minimize, train_stages  # noqa: E402


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
    trained = train_stages(task, TrainConfig(max_iter=300, lbfgs_tol=1e-4, grad_tol=1e-4, newton_polish=0,
                                               alpha=0.1), progress=False)
    config = InfluenceConfig(pretrain_solver=SolverConfig("exact", damping=1e-3),
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


def _per_100k(seconds: float, m: int) -> float:
    return round(seconds / m * 1e5, 3)


def measure_train(workdir: Path, chunk: int, iters: int, hvp_cols: int) -> dict:
    """One process: a gradient pass, an HVP pass and ``iters`` L-BFGS iterations, all streamed."""
    task, p, _ = lazy_task(workdir)
    objective = StreamedPretrainObjective(task, chunk_size=chunk)
    v = torch.randn(task.n_pretrain_params, hvp_cols, generator=torch.Generator().manual_seed(0))
    warm_up = StreamedPretrainObjective(task, chunk_size=chunk, rows=slice(0, chunk))   # first-call costs
    warm_up.value_and_grad(p), warm_up.hvp(p)(v)
    before = memory_mb()
    start = time.perf_counter()
    value, gradient = objective.value_and_grad(p)
    grad_s = time.perf_counter() - start
    start = time.perf_counter()
    objective.hvp(p)(v)
    hvp_s = time.perf_counter() - start
    passes, start = objective.passes, time.perf_counter()
    config = TrainConfig(max_iter=iters, lbfgs_tol=0.0, grad_tol=0.0, newton_polish=0, stream_chunk=chunk)
    result = minimize(objective, p, config)
    train_s = time.perf_counter() - start
    passes = objective.passes - passes
    m = task.m
    return {"mode": "train", "m": m, "train_chunk": chunk, "grad_pass_s": round(grad_s, 2),
            "grad_s_per_100k": _per_100k(grad_s, m), "hvp_cols": hvp_cols, "hvp_pass_s": round(hvp_s, 2),
            "hvp_s_per_100k": _per_100k(hvp_s, m),
            "lbfgs": {"iterations": result.iterations, "passes": passes, "seconds": round(train_s, 2),
                      "s_per_pass_per_100k": _per_100k(train_s / passes, m),
                      "objective_before": float(value), "objective_after": result.objective,
                      "grad_norm_before": float(gradient.norm()), "grad_norm_after": result.grad_norm},
            **_memory_fields(before)}


def measure_train_in_memory(workdir: Path, hvp_cols: int) -> dict:
    """One process: the unstreamed gradient and HVP over the whole set, held in memory."""
    task = digits_task("cpu", torch.float32)
    state = torch.load(workdir / "state.pt", weights_only=True)
    p = state["p"]
    v = torch.randn(task.n_pretrain_params, hvp_cols, generator=torch.Generator().manual_seed(0))
    torch.func.grad(task.pretrain_objective)(p), batched_hvp(task.pretrain_objective, p)(v)    # first-call costs
    before = memory_mb()
    task.pretrain_x = torch.from_numpy(np.load(workdir / "x.npy"))
    task.pretrain_y = torch.from_numpy(np.load(workdir / "y.npy"))
    start = time.perf_counter()
    torch.func.grad(task.pretrain_objective)(p)
    grad_s = time.perf_counter() - start
    start = time.perf_counter()
    batched_hvp(task.pretrain_objective, p)(v)
    hvp_s = time.perf_counter() - start
    m = task.m
    return {"mode": "train_in_memory", "m": m, "grad_pass_s": round(grad_s, 2), "grad_s_per_100k": _per_100k(grad_s, m),
            "hvp_cols": hvp_cols, "hvp_pass_s": round(hvp_s, 2), "hvp_s_per_100k": _per_100k(hvp_s, m),
            **_memory_fields(before)}


def train_check(task, p: torch.Tensor, rows: slice, hvp_cols: int) -> dict:
    """Largest relative difference of the streamed gradient and HVP of the data term over ``rows``
    from autograd over the same rows held in memory (float32)."""
    small = digits_task("cpu", torch.float32)
    small.pretrain_x, small.pretrain_y = task.pretrain_x[rows], task.pretrain_y[rows]
    share = (rows.stop - rows.start) / task.m           # the streamed part divides by the full m

    def in_memory(pp: torch.Tensor) -> torch.Tensor:
        return share * (small.pretrain_objective(pp) - 0.5 * small.pretrain_l2 * (pp * pp).sum())

    streamed = StreamedPretrainObjective(task, chunk_size=1000, rows=rows)
    v = torch.randn(task.n_pretrain_params, hvp_cols, generator=torch.Generator().manual_seed(1))
    g_ref, hv_ref = torch.func.grad(in_memory)(p), batched_hvp(in_memory, p)(v)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())
    return {"grad": rel(streamed.value_and_grad(p)[1], g_ref), "hvp": rel(streamed.hvp(p)(v), hv_ref)}


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
    parser.add_argument("--train-iters", type=int, default=5, help="train: L-BFGS iterations (budget)")
    parser.add_argument("--train-chunk", type=int, default=4096, help="train: examples per chunk")
    parser.add_argument("--hvp-cols", type=int, default=8, help="train: columns of the timed HVP")
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
        elif args.measure == "train_in_memory":
            result = measure_train_in_memory(workdir, args.hvp_cols)
        elif args.measure == "train":
            result = measure_train(workdir, args.train_chunk, args.train_iters, args.hvp_cols)
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
                                   "--chunk", str(args.chunk), "--block", str(args.block),
                                   "--train-iters", str(args.train_iters), "--train-chunk", str(args.train_chunk),
                                   "--hvp-cols", str(args.hvp_cols)],
                                  capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))

        # the streamed scores equal an in-memory pass (sample: the first and last 2,000 examples)
        task, p, s = lazy_task(workdir)
        check = {}
        for mode in args.modes.split(","):
            if mode == "train_in_memory":
                continue
            if mode == "train":      # the first and last 20,000 rows
                diffs = [train_check(task, p, sl, args.hvp_cols)
                         for sl in (slice(0, 20000), slice(task.m - 20000, task.m))]
                check[mode] = {k: max(d[k] for d in diffs) for k in ("grad", "hvp")}
                continue
            scores = np.load(workdir / f"scores-{mode}.npy", mmap_mode="r")
            diffs = []
            for sl in (slice(0, 2000), slice(task.m - 2000, task.m)):
                small = digits_task("cpu", torch.float32)        # in-memory tensors of the sample rows
                small.pretrain_x, small.pretrain_y = task.pretrain_x[sl], task.pretrain_y[sl]
                # scores divide by m: score the sample with S scaled by len/m (see precompute.scoring)
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
