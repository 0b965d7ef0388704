"""The whole precompute run on a pretraining set kept on disk: time per step and peak memory vs m.

Writes the digits preset's pretraining images (classes 0-4), augmented to ``--m`` examples
(``bench_gpu.augmented_blocks``: shifted copies, then dimmed and noisy rounds, stored as uint8),
block by block to ``pretrain_x.npy`` / ``pretrain_y.npy``, and the finetuning images (classes
5-9, the originals) to ``finetune_x.npy`` / ``finetune_y.npy``. Then runs, in a child process,

    python -m precompute --preset custom --pretrain-data pretrain_x.npy,pretrain_y.npy
        --finetune-data finetune_x.npy,finetune_y.npy --no-validate --dtype float32 ...

which memory-maps the pretraining images (``precompute.data.load_npy_images``), trains, solves and
scores them a chunk at a time and streams the scores into the run directory. Prints one JSON
object per m: the child's peak RSS (ru_maxrss), wall time, the run's time per step and per 100,000
examples, and the run's training summary.

Usage: python benchmarks/bench_pipeline_large.py [--m 250000,1000000] [--n-test 16] [--workdir DIR]
                                                 [-- extra precompute flags]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gpu import augmented_blocks  # noqa: E402
from precompute.data import load_digits_examples, select_classes  # noqa: E402


def write_dataset(workdir: Path, m: int) -> dict[str, str]:
    digits = load_digits_examples()
    pre = select_classes(digits, ["0", "1", "2", "3", "4"])
    fine = select_classes(digits, ["5", "6", "7", "8", "9"])
    x = np.lib.format.open_memmap(workdir / "pretrain_x.npy", mode="w+", dtype=np.uint8, shape=(m, 8, 8))
    y = np.lib.format.open_memmap(workdir / "pretrain_y.npy", mode="w+", dtype=np.int64, shape=(m,))
    done = 0
    pixels = pre.images[:, None].astype(np.float32) / 255
    for xb, yb in augmented_blocks(pixels, pre.labels, m):
        x[done: done + len(xb)] = np.rint(xb[:, 0] * 255).astype(np.uint8)
        y[done: done + len(xb)] = yb
        done += len(xb)
    x.flush(), y.flush()
    del x, y
    np.save(workdir / "finetune_x.npy", fine.images)
    np.save(workdir / "finetune_y.npy", fine.labels + 5)
    return {"pretrain": f"{workdir / 'pretrain_x.npy'},{workdir / 'pretrain_y.npy'}",
            "finetune": f"{workdir / 'finetune_x.npy'},{workdir / 'finetune_y.npy'}"}


def run_once(workdir: Path, m: int, n_test: int, extra: list[str]) -> dict:
    start = time.perf_counter()
    sources = write_dataset(workdir, m)
    write_s = time.perf_counter() - start
    out = workdir / "runs" / f"large-{m}"
    command = [sys.executable, "-m", "precompute", "--preset", "custom", "--pretrain-data", sources["pretrain"],
               "--finetune-data", sources["finetune"], "--no-validate", "--dtype", "float32",
               "--n-test", str(n_test), "--out", str(out), *extra]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"precompute failed:\n{proc.stderr[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    timings = manifest["timings_s"]
    return {"m": m, "write_dataset_s": round(write_s, 1), "precompute_wall_s": round(wall, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
            "timings_s": timings, "s_per_100k": {k: round(v / m * 1e5, 3) for k, v in timings.items()},
            "training": manifest["diagnostics"][manifest["scenarios"][0]]["training"]["pretrain"],
            "pretrain_solve": manifest["diagnostics"][manifest["scenarios"][0]]["pretrain_solve"],
            "run_mb": round(sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20, 1),
            "summary": proc.stdout.strip().splitlines()[-5:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", default="250000,1000000", help="comma-separated sizes; each runs in a fresh child")
    parser.add_argument("--n-test", type=int, default=16)
    parser.add_argument("--workdir", help="where the data and runs go (default: a temporary directory, removed)")
    args, extra = parser.parse_known_args()
    extra = [e for e in extra if e != "--"]
    results = []
    for m in (int(v) for v in args.m.split(",")):
        workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-pipeline-")) / f"m{m}"
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            # ru_maxrss of RUSAGE_CHILDREN is the largest child so far: run each size in its own process
            proc = subprocess.run([sys.executable, __file__, "--one", str(m), "--n-test", str(args.n_test),
                                   "--workdir", str(workdir), *extra], capture_output=True, text=True) \
                if len(args.m.split(",")) > 1 else None
            if proc is None:
                results.append(run_once(workdir, m, args.n_test, extra))
            elif proc.returncode:
                raise SystemExit(proc.stderr[-3000:])
            else:
                results.append(json.loads(proc.stdout))
        finally:
            if not args.workdir:
                shutil.rmtree(workdir.parent, ignore_errors=True)
    print(json.dumps(results if len(results) > 1 else results[0], indent=1))


if __name__ == "__main__":
    if "--one" in sys.argv:
        i = sys.argv.index("--one")
        m = int(sys.argv[i + 1])
        rest = sys.argv[1:i] + sys.argv[i + 2:]
        p = argparse.ArgumentParser()
        p.add_argument("--n-test", type=int, default=16)
        p.add_argument("--workdir")
        a, extra = p.parse_known_args(rest)
        print(json.dumps(run_once(Path(a.workdir), m, a.n_test, [e for e in extra if e != "--"])))
    else:
        main()
