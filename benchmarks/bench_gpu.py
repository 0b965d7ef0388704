"""Scoring throughput on one device (a lent GPU; runs on CPU too, smaller), float32 and bfloat16.

The digits preset's pretraining set (901 real images) is augmented to ``--m`` examples: the 49
shifted copies of ``bench_scoring.shifted_copies`` (up to 3 pixels), then further rounds of those
with dimmed contrast and a little seeded noise. The model is trained on the 901 originals (float32,
on the device), the test-side vectors come from ``stacked_test_vectors`` (exact solves, both
scenarios, ``--tests`` test points each), and the streamed pass scores all m examples.

Prints one JSON object:
    device, m, n_params, chunk                  the setup
    epoch_fullbatch_s                           forward + backward of the mean loss over all m at once
    epoch_minibatch_s                           one SGD epoch in batches of --batch (forward, backward, step)
    runs: per number of test-side vectors T (2 x tests: both scenarios; and 2 x that):
        path                                    "jvp" (T <= 48: forward-mode directional derivatives)
                                                or "grad" (vmap(grad) per-example gradients @ S)
        float32: scoring_s, examples_per_s, over_epoch_fullbatch, over_epoch_minibatch
        bf16:    the same, with torch.autocast(bfloat16) around the per-example part, plus
                 pearson (all scores vs float32), min_row_pearson (worst test point),
                 top100_overlap (mean share of each row's 100 largest |score| kept)
    cuda_peak_mb                                peak CUDA memory (None on CPU)

Usage: python benchmarks/bench_gpu.py [--device cuda|cpu] [--m 100000] [--tests 32] [--chunk 16384]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scoring import shifted_copies  # noqa: E402
from precompute.config import DataConfig, InfluenceConfig, SolverConfig, TrainConfig  # noqa: E402
from precompute.influence import stacked_test_vectors  # noqa: E402
from precompute.scoring import JVP_MAX_COLUMNS, score_pretraining  # noqa: E402
from precompute.presets import PRESET_MODELS, build_task, load_task_data  # noqa: E402
from precompute.training import train_stages  # noqa: E402

SHIFTS = 49


def augmented_blocks(images: np.ndarray, labels: np.ndarray, m: int, seed: int = 0):
    """Yields (images, labels) blocks totalling ``m`` rows: round 0 is the 49 shifted copies, round
    r > 0 the same with contrast 1 - 0.02 r (floor 0.4) and N(0, 0.02²) noise (seed + r), clipped
    to [0, 1]. Deterministic; float32 images [B, C, H, W]."""
    shifted, shifted_labels = shifted_copies(images, labels, SHIFTS)
    done, r = 0, 0
    while done < m:
        block = shifted
        if r > 0:
            rng = np.random.default_rng(seed + r)
            block = np.clip(shifted * max(0.4, 1 - 0.02 * r)
                            + rng.normal(0, 0.02, shifted.shape).astype(np.float32), 0, 1).astype(np.float32)
        take = min(len(block), m - done)
        yield block[:take], shifted_labels[:take]
        done += take
        r += 1


def digits_task(device: str, dtype: torch.dtype, hidden: int | None = None):
    model = PRESET_MODELS["digits"]
    if hidden:
        from dataclasses import replace
        model = replace(model, hidden=hidden)
    data = load_task_data(DataConfig(preset="digits"), model)
    return build_task(data, model).to(device, dtype)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> tuple[float, object]:
    """(best wall seconds over ``repeats`` after one warm-up call, last result)."""
    out = fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best, out


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


def top_overlap(a: np.ndarray, b: np.ndarray, k: int = 100) -> float:
    k = min(k, a.shape[1])
    shares = [len(set(np.argsort(-np.abs(x))[:k]) & set(np.argsort(-np.abs(y))[:k])) / k for x, y in zip(a, b)]
    return float(np.mean(shares))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--m", type=int, help="pretraining examples after augmentation (default 100,000 on "
                                              "cuda, 20,000 on cpu)")
    parser.add_argument("--tests", type=int, default=16, help="test points per scenario (default 16: T = 32 "
                                                               "vectors, the jvp path; T = 64 is also run)")
    parser.add_argument("--chunk", type=int, help="scoring chunk size (default 16384 cuda, 2048 cpu)")
    parser.add_argument("--batch", type=int, default=512, help="mini-batch size of the SGD epoch")
    parser.add_argument("--hidden", type=int, help="embedding width (default: the preset's 16)")
    parser.add_argument("--repeats", type=int, help="timed repeats (default 3 cuda, 1 cpu)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = args.device
    cuda = device.startswith("cuda")
    m = args.m or (100_000 if cuda else 20_000)
    chunk = args.chunk or (16384 if cuda else 2048)
    repeats = args.repeats or (3 if cuda else 1)
    autocast_device = "cuda" if cuda else "cpu"

    task = digits_task(device, torch.float32, args.hidden)
    trained = train_stages(task, TrainConfig(max_iter=300, lbfgs_tol=1e-4, grad_tol=1e-4, newton_polish=0,
                                               alpha=0.1), progress=False)
    p = trained.p
    config = InfluenceConfig(pretrain_solver=SolverConfig("exact", damping=1e-3),
                             finetune_solver=SolverConfig("exact", damping=1e-3))
    vectors, _ = stacked_test_vectors(task, trained, list(range(args.tests)), config)
    s = torch.cat([vectors["fixed"], vectors["updated"]], dim=1)

    blocks = list(augmented_blocks(task.pretrain_x.cpu().numpy(), task.pretrain_y.cpu().numpy(), m))
    task.pretrain_x = torch.from_numpy(np.concatenate([b[0] for b in blocks])).to(device)
    task.pretrain_y = torch.from_numpy(np.concatenate([b[1] for b in blocks])).to(device)
    del blocks
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def epoch_full() -> None:
        leaf = p.detach().clone().requires_grad_(True)
        task.pretrain_losses(leaf, task.pretrain_x, task.pretrain_y).mean().backward()

    def epoch_mini() -> None:
        leaf = p.detach().clone().requires_grad_(True)
        opt = torch.optim.SGD([leaf], lr=1e-3)
        for i in range(0, task.m, args.batch):
            opt.zero_grad()
            task.pretrain_losses(leaf, task.pretrain_x[i:i + args.batch], task.pretrain_y[i:i + args.batch]).mean().backward()
            opt.step()

    full_s, _ = timed(epoch_full, device, max(repeats, 3))
    mini_s, _ = timed(epoch_mini, device, repeats)

    runs = []
    for vecs in (s, torch.cat([s, s.flip(1)], dim=1)):      # T = 2·tests, then twice that
        t = vecs.shape[1]
        f32_s, f32 = timed(lambda: score_pretraining(task, p, vecs, chunk, progress=False), device, repeats)

        def mixed():
            with torch.autocast(autocast_device, dtype=torch.bfloat16):
                return score_pretraining(task, p, vecs, chunk, progress=False)

        bf_s, bf = timed(mixed, device, repeats)
        row_r = [pearson(a, b) for a, b in zip(f32, bf)]

        def figures(seconds: float) -> dict:
            return {"scoring_s": round(seconds, 4), "examples_per_s": round(task.m / seconds),
                    "over_epoch_fullbatch": round(seconds / full_s, 2), "over_epoch_minibatch": round(seconds / mini_s, 2)}

        runs.append({"T": t, "path": "jvp" if t <= JVP_MAX_COLUMNS else "grad", "float32": figures(f32_s),
                     "bf16": {**figures(bf_s), "pearson": round(pearson(f32, bf), 6),
                              "min_row_pearson": round(min(row_r), 6), "top100_overlap": round(top_overlap(f32, bf), 3)},
                     "bf16_speedup": round(f32_s / bf_s, 2)})

    print(json.dumps({
        "device": device if not cuda else torch.cuda.get_device_name(), "torch": torch.__version__,
        "threads": args.threads, "m": task.m, "n_params": task.n_pretrain_params, "chunk": chunk,
        "epoch_fullbatch_s": round(full_s, 5), "epoch_minibatch_s": round(mini_s, 5), "batch": args.batch,
        "runs": runs,
        "cuda_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
    }, indent=1))


if __name__ == "__main__":
    main()
