"""Explorer speed in a real browser: click "Next" on the Test point page, time until the page has settled.

    python benchmarks/bench_explorer.py [--m 100000] [--T 100] [--clicks 12] [--run ROOT/NAME]

Writes a synthetic image run (m pretraining examples, T scored test points; tests/run_factory.py)
to a temporary directory, or uses ``--run``; starts Streamlit on loopback, opens /test-point in
Debian's chromium (Playwright, headless) and clicks "Next ▶" ``--clicks`` times. One click is
timed from the click until the page has settled: the helpful images show the new test point and
have all loaded, the URL names it, no element is stale (Streamlit marks elements of the previous
run until they are replaced) and the app reports no running script. Test points are new each
click (nothing cached). Prints one JSON object:
{first_load_s, click_median_s, click_max_s, clicks, m, T}. Target: click_median_s < 0.3.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
HELPFUL = ".st-key-helpful_examples img"
SETTLED = """([sel, before, test]) => {
    const imgs = [...document.querySelectorAll(sel)];
    return imgs.length > 0 && imgs[0].getAttribute('src') !== before
        && imgs.every(e => e.complete && e.naturalWidth > 0)
        && new URLSearchParams(location.search).get('test') === String(test)
        && !document.querySelector('[data-stale="true"]')
        && !document.querySelector('[data-testid="stStatusWidget"]');
}"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_explorer(root: str) -> tuple[subprocess.Popen, str]:
    """The explorer over runs root ``root`` on a free loopback port: (process group leader, URL)."""
    port = _port()
    cmd = [sys.executable, "-m", "streamlit", "run", str(REPO / "explorer" / "app.py"), "--server.address", "127.0.0.1",
           "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--server.fileWatcherType", "none", "--", "--runs", root]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGTERM)
    raise SystemExit("streamlit did not start")


def measure(url: str, name: str, test_points: list[int], clicks: int) -> tuple[float, list[float]]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 1200})
        t0 = time.perf_counter()
        page.goto(f"{url}/test-point?run={name}&test={test_points[0]}")
        page.wait_for_selector(HELPFUL, timeout=120_000)
        page.wait_for_function(SETTLED, arg=[HELPFUL, "", test_points[0]], timeout=120_000, polling="raf")
        first = time.perf_counter() - t0
        time.sleep(1.0)
        times = []
        for i in range(1, min(clicks, len(test_points) - 1) + 1):
            before = page.eval_on_selector(HELPFUL, "e => e.getAttribute('src')")
            button = page.get_by_role("button", name="Next ▶")
            t0 = time.perf_counter()
            button.click()
            page.wait_for_function(SETTLED, arg=[HELPFUL, before, test_points[i]], timeout=60_000, polling="raf")
            times.append(time.perf_counter() - t0)
            time.sleep(0.3)
        browser.close()
    return first, times


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=100_000, help="pretraining examples of the synthetic run")
    ap.add_argument("--T", type=int, default=100, help="scored test points of the synthetic run")
    ap.add_argument("--clicks", type=int, default=12)
    ap.add_argument("--run", help="an existing run directory ROOT/NAME instead of a synthetic run")
    args = ap.parse_args(argv)

    from precompute.runstore import open_run
    from run_factory import write_synthetic_run

    with tempfile.TemporaryDirectory(prefix="bench-explorer-") as tmp:
        if args.run:
            root, name = str(Path(args.run).parent), Path(args.run).name
        else:
            root, name = tmp, "bench"
            write_synthetic_run(tmp, "bench", modality="image", m=args.m, n_test=max(300, args.T), T=args.T, noisy=True)
        run = open_run(root, name)
        proc, url = serve_explorer(root)
        try:
            first, times = measure(url, name, run.test_points, args.clicks)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
    result = {"first_load_s": round(first, 3), "click_median_s": round(statistics.median(times), 3),
              "click_max_s": round(max(times), 3), "clicks": len(times), "m": run.n_pretrain,
              "T": len(run.test_points)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
