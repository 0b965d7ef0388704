"""Explorer speed: re-render time after switching test point on a large synthetic run.

    python benchmarks/bench_explorer.py [--m 100000] [--T 100] [--switches 10] [--run ROOT/NAME]

Writes a synthetic image run (m pretraining examples, T scored test points) to a temporary directory
(or, with ``--run``, uses an existing run, e.g. one from ``bench_pipeline_large.py``), loads the app headless with streamlit.testing.v1.AppTest, then switches to ``--switches`` test points
it has not shown before (nothing cached) and times each full script re-run. Prints one JSON object:
{first_load_s, switch_median_s, switch_max_s, m, T}. Target: switch_median_s < 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=100_000, help="pretraining examples")
    ap.add_argument("--T", type=int, default=100, help="scored test points")
    ap.add_argument("--n-test", type=int, default=300, help="finetune test points in the run")
    ap.add_argument("--switches", type=int, default=10)
    ap.add_argument("--run", help="an existing run directory ROOT/NAME instead of a synthetic run")
    args = ap.parse_args(argv)

    import logging

    logging.getLogger("streamlit").setLevel(logging.ERROR)
    from streamlit.testing.v1 import AppTest

    from precompute.runstore import open_run
    from run_factory import write_synthetic_run

    with tempfile.TemporaryDirectory(prefix="bench-explorer-") as tmp:
        t0 = time.perf_counter()
        if args.run:
            root, name = str(Path(args.run).parent), Path(args.run).name
        else:
            root, name = tmp, "bench"
            write_synthetic_run(tmp, "bench", modality="image", m=args.m, n_test=max(args.n_test, args.T), T=args.T,
                                noisy=True)
        write_s = time.perf_counter() - t0
        os.environ["EXPLORER_RUNS_DIR"] = root

        at = AppTest.from_file(str(REPO / "explorer" / "app.py"), default_timeout=120)
        at.query_params["run"] = name
        t0 = time.perf_counter()
        at.run()
        first_load = time.perf_counter() - t0
        if at.exception:
            raise SystemExit(f"app raised: {at.exception[0].value}")

        run = open_run(root, name)
        ids = run.test_points
        times = []
        for i in range(1, min(args.switches, len(ids) - 1) + 1):
            t0 = time.perf_counter()
            at.selectbox(key="w_test").select(ids[i]).run()
            times.append(time.perf_counter() - t0)
            if at.exception:
                raise SystemExit(f"app raised: {at.exception[0].value}")
            assert at.selectbox(key="w_test").value == ids[i]

    result = {
        "first_load_s": round(first_load, 3),
        "switch_median_s": round(statistics.median(times), 3),
        "switch_max_s": round(max(times), 3),
        "m": run.n_pretrain,
        "T": len(ids),
    }
    print(json.dumps(result))
    made = f"run {args.run}" if args.run else f"synthetic run written in {write_s:.1f} s"
    print(f"({made}; {len(times)} switches)", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
