"""The README's lead screenshots, taken in a real browser from a real run (the demo's lead run).

    python -m precompute --preset demo                  # runs/fashion where Fashion-MNIST is installed
    python assets/make_screenshots.py --runs runs --run fashion

Starts the explorer on 127.0.0.1 over ``--runs``, opens the Overview, the Test point page (a validation
test point: its examples beside their retraining check) and the Validation page of ``--run``, and
writes assets/screenshot-{overview,test-point,validation}.png (``--cleaning NAME``: only the Data cleaning
page, to assets/screenshot-NAME.png, for a run with mislabel checks). Needs Debian's chromium and
Playwright for Python (the test suite's browser setup; no browser download).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_explorer import ARGS as CHROMIUM_ARGS, CHROMIUM, serve_explorer  # noqa: E402


def shoot(page, url: str, wait_for: str, out: Path) -> None:
    page.goto(url)
    page.wait_for_selector(wait_for, timeout=120_000)
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=60_000)
    time.sleep(2)                    # images and plotly transitions
    page.screenshot(path=str(out))
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs", help="runs root")
    parser.add_argument("--run", default="fashion", help="run name under --runs")
    parser.add_argument("--scenario", help="fixed or updated (default: the explorer's first)")
    parser.add_argument("--test", type=int, help="test point of the Test point page (default: the first validated)")
    parser.add_argument("--out", default=str(REPO / "assets"))
    parser.add_argument("--cleaning", metavar="NAME",
                        help="instead, shoot only the Data cleaning page of --run (a run made with --clean or "
                             "--label-noise) to assets/screenshot-NAME.png")
    parser.add_argument("--rank", help="with --cleaning: the signal the page ranks by (default: the page's own)")
    args = parser.parse_args()
    manifest_path = Path(args.runs) / args.run / "manifest.json"
    if not manifest_path.is_file():
        raise SystemExit(f"error: {manifest_path} not found; make the run first (python -m precompute --preset demo)")
    manifest = json.loads(manifest_path.read_text())
    if args.cleaning:
        if not isinstance(manifest.get("cleaning"), dict):
            raise SystemExit(f"error: {args.run} has no mislabel checks; make it with --clean or --label-noise")
        shoot_cleaning(args)
        return
    test = args.test if args.test is not None else manifest["validation_test_points"][0]
    out = Path(args.out)
    proc, url = serve_explorer(str(Path(args.runs).resolve()))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            query = f"run={args.run}" + (f"&scenario={args.scenario}" if args.scenario else "")
            shoot(browser.new_page(viewport={"width": 1440, "height": 1900}), f"{url}/?{query}",
                  ".js-plotly-plot .scatterlayer .point", out / "screenshot-overview.png")
            shoot(browser.new_page(viewport={"width": 1440, "height": 1500}), f"{url}/test-point?{query}&test={test}",
                  ".st-key-tp_evidence .js-plotly-plot .scatterlayer .point", out / "screenshot-test-point.png")
            shoot(browser.new_page(viewport={"width": 1440, "height": 1500}), f"{url}/validation?{query}",
                  ".js-plotly-plot .scatterlayer .point", out / "screenshot-validation.png")
            browser.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)


def shoot_cleaning(args: argparse.Namespace) -> None:
    """The Data cleaning page of ``args.run``, ranked by its default signal, to screenshot-<args.cleaning>.png."""
    proc, url = serve_explorer(str(Path(args.runs).resolve()))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            query = f"run={args.run}" + (f"&scenario={args.scenario}" if args.scenario else "") + (
                f"&rank={args.rank}" if args.rank else "")
            shoot(browser.new_page(viewport={"width": 1440, "height": 1700}), f"{url}/data-cleaning?{query}",
                  "[data-testid='stImage'] img", Path(args.out) / f"screenshot-{args.cleaning}.png")
            browser.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)


if __name__ == "__main__":
    main()
