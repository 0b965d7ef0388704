"""Scoring-pass benchmark: is scoring every pretraining example close to one pass over the data?

Prints one JSON object:
    epoch_s                 one pretraining epoch (forward + backward of the mean loss over all m examples)
    scoring_s               the streamed scoring pass for T test points (per-example gradients · S / m)
    scoring_over_epoch      scoring_s / epoch_s                              (target <= 3)
    loop_speedup            per-example backward loop time / streamed time, per example (target >= 20)
    test_side_s             the test-side solves (finetune + pretraining inverse HVPs, both scenarios)
    scaling                 scoring time and peak memory as the pretraining set grows (digits shifted
                            copies: 1x, 10x, 50x), each size in a fresh process

Usage: python benchmarks/bench_scoring.py [--device cpu|cuda] [--dtype float32|float64] [--tests 32]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from precompute.config import DataConfig, InfluenceConfig, TrainConfig  # noqa: E402
from precompute.influence import stacked_test_vectors  # noqa: E402
from precompute.scoring import per_example_gradients, score_pretraining  # noqa: E402
from precompute.presets import PRESET_MODELS, build_task, load_task_data  # noqa: E402
from precompute.training import train_stages  # noqa: E402


def shifted_copies(images: np.ndarray, labels: np.ndarray, copies: int) -> tuple[np.ndarray, np.ndarray]:
    """``copies`` versions of every image, shifted by up to 3 pixels (zero fill); copy 0 is unshifted."""
    shifts = [(0, 0)] + [(dy, dx) for r in (1, 2, 3) for dy in range(-r, r + 1) for dx in range(-r, r + 1)
                         if max(abs(dy), abs(dx)) == r]
    out = []
    for dy, dx in shifts[:copies]:
        moved = np.roll(np.roll(images, dy, axis=-2), dx, axis=-1)
        if dy > 0: moved[..., :dy, :] = 0
        if dy < 0: moved[..., dy:, :] = 0
        if dx > 0: moved[..., :, :dx] = 0
        if dx < 0: moved[..., :, dx:] = 0
        out.append(moved)
    return np.concatenate(out), np.tile(labels, len(out))


def build(copies: int, device: str, dtype: torch.dtype):
    model = PRESET_MODELS["digits"]
    data = load_task_data(DataConfig(preset="digits"), model)
    task = build_task(data, model).to(device, dtype)
    if copies > 1:
        x, y = shifted_copies(task.pretrain_x.cpu().numpy(), task.pretrain_y.cpu().numpy(), copies)
        task.pretrain_x = torch.from_numpy(x).to(device, dtype)
        task.pretrain_y = torch.from_numpy(y).to(device)
    return task


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int = 3) -> float:
    fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def epoch(task, p: torch.Tensor) -> None:
    leaf = p.detach().clone().requires_grad_(True)
    task.pretrain_losses(leaf, task.pretrain_x, task.pretrain_y).mean().backward()


def measure_size(copies: int, device: str, dtype: torch.dtype, tests: int, chunk: int) -> dict:
    """Scoring time and peak memory for one pretraining-set size (random test-side vectors suffice)."""
    task = build(copies, device, dtype)
    p = task.initial_pretrain_params()
    vectors = torch.randn(task.n_pretrain_params, tests, dtype=dtype, device=device)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = timed(lambda: score_pretraining(task, p, vectors, chunk, progress=False), device, repeats=1)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"copies": copies, "m": task.m, "scoring_s": round(seconds, 4),
            "us_per_example": round(1e6 * seconds / task.m, 2), "peak_rss_mb": round(peak_mb, 1),
            "rss_growth_mb": round((peak_mb * 1024 - before) / 1024, 1),
            "cuda_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.startswith("cuda") else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--tests", type=int, default=32, help="test points T")
    parser.add_argument("--chunk", type=int, default=1024, help="scoring chunk size")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sizes", default="1,10,50", help="pretraining-set multiples for the scaling run")
    parser.add_argument("--one-size", type=int, help=argparse.SUPPRESS)   # internal: child process
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.one_size:
        print(json.dumps(measure_size(args.one_size, args.device, dtype, args.tests, args.chunk)))
        return

    task = build(1, args.device, dtype)
    trained = train_stages(task, TrainConfig(max_iter=300, lbfgs_tol=1e-4, grad_tol=1e-4, newton_polish=0,
                                               alpha=1.0), progress=False)
    p = trained.p
    test_ids = list(range(args.tests))
    config = InfluenceConfig(chunk_size=args.chunk)
    test_side_s = timed(lambda: stacked_test_vectors(task, trained, test_ids, config), args.device, repeats=1)
    vectors, _ = stacked_test_vectors(task, trained, test_ids, config)
    s = vectors["fixed"]
    epoch_s = timed(lambda: epoch(task, p), args.device, repeats=5)
    scoring_s = timed(lambda: score_pretraining(task, p, s, args.chunk, progress=False), args.device)

    n_loop = min(200, task.m)

    def loop() -> None:
        for i in range(n_loop):
            leaf = p.detach().clone().requires_grad_(True)
            task.pretrain_losses(leaf, task.pretrain_x[i:i + 1], task.pretrain_y[i:i + 1]).sum().backward()
            _ = leaf.grad @ s

    loop_per_example = timed(loop, args.device, repeats=1) / n_loop
    check = per_example_gradients(task, p, task.pretrain_x[:1], task.pretrain_y[:1])   # same math, batched
    assert check.shape == (1, task.n_pretrain_params)

    scaling = []
    for copies in (int(c) for c in args.sizes.split(",")):
        out = subprocess.run([sys.executable, __file__, "--one-size", str(copies), "--device", args.device,
                              "--dtype", args.dtype, "--tests", str(args.tests), "--chunk", str(args.chunk),
                              "--threads", str(args.threads)], capture_output=True, text=True, check=True)
        scaling.append(json.loads(out.stdout.strip().splitlines()[-1]))

    print(json.dumps({
        "device": args.device, "dtype": args.dtype, "threads": args.threads, "m": task.m,
        "n_params": task.n_pretrain_params, "tests": args.tests, "chunk": args.chunk,
        "epoch_s": round(epoch_s, 5), "scoring_s": round(scoring_s, 5),
        "scoring_over_epoch": round(scoring_s / epoch_s, 2),
        "loop_speedup": round(loop_per_example / (scoring_s / task.m), 1),
        "test_side_s": round(test_side_s, 3), "scaling": scaling,
    }, indent=1))


if __name__ == "__main__":
    main()
