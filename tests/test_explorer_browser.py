"""Explorer in a real browser: a Streamlit server driven by Playwright with the system Chromium.

Skipped (with a reason) only when /usr/bin/chromium is absent and $CI is not set; under CI it runs.
Screenshots go to test-artifacts/ (the README's come from a real run: assets/make_screenshots.py).
Never run `playwright install`: the system Chromium is used.
"""

from __future__ import annotations

from contextlib import contextmanager

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
ARTIFACTS = REPO / "test-artifacts"
IMG = "[data-testid='stImage'] img, .mi-grid img"
HELPFUL_IMG = ".st-key-helpful_examples .mi-grid img"

if not CHROMIUM.exists() and not os.environ.get("CI"):
    pytest.skip(f"{CHROMIUM} not found (install chromium with apt; under CI=true this test must run)",
                allow_module_level=True)

if not os.environ.get("CI"):
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
from playwright.sync_api import sync_playwright  # noqa: E402


@pytest.fixture(scope="module")
def browser_runs(quick_runs) -> tuple[Path, str]:
    """(runs root, image run name): the real quick digits run (see conftest)."""
    root, names = quick_runs
    return root, names["image"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited early with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"streamlit did not become healthy at {url} within {timeout}s")


@contextmanager
def explorer_server(root: Path, log: Path):
    """A Streamlit server of the explorer over the runs root ``root`` on a free loopback port; yields its
    URL and stops the whole process group afterwards (its output goes to ``log``)."""
    port = _free_port()
    cmd = [
        sys.executable, "-m", "streamlit", "run", str(REPO / "explorer" / "app.py"),
        "--server.address", "127.0.0.1", "--server.port", str(port), "--server.headless", "true",
        "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
        "--", "--runs", str(root),
    ]
    env = {k: v for k, v in os.environ.items() if k != "EXPLORER_RUNS_DIR"}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        if proc.returncode not in (0, -signal.SIGTERM, None):
            print(log.read_text(errors="replace")[-3000:])


@pytest.fixture(scope="module")
def server(browser_runs, tmp_path_factory):
    root, _ = browser_runs
    with explorer_server(root, tmp_path_factory.mktemp("streamlit-log") / "streamlit.log") as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def _srcs(page, selector: str) -> list[str]:
    return page.eval_on_selector_all(selector, "els => els.map(e => e.getAttribute('src'))")


def _settle(page, seconds: float = 1.5) -> None:
    """Wait until Streamlit reports no running script, then a moment for images and charts."""
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=30_000
    )
    time.sleep(seconds)


def _save(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    out = ARTIFACTS / name
    page.screenshot(path=str(out))
    return out


def _open(browser, url: str, height: int) -> tuple[object, list[str]]:
    """A fresh page at ``url`` that records uncaught page errors."""
    page = browser.new_page(viewport={"width": 1440, "height": height})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    return page, errors


def test_test_point_page_images_and_next(server, browser, browser_runs):
    _, name = browser_runs
    page, errors = _open(browser, f"{server}/test-point?run={name}&scenario=fixed", 1500)
    page.wait_for_selector(HELPFUL_IMG, timeout=60_000)
    _settle(page)
    assert page.locator(IMG).count() >= 1 + 2 * 12
    # images really decoded (natural size > 0), not broken links
    assert page.eval_on_selector_all(IMG, "els => els.every(e => e.complete && e.naturalWidth > 0)")
    page.wait_for_selector(".js-plotly-plot", timeout=30_000)
    assert "Most helpful" in page.content() and "Most harmful" in page.content()
    assert "test=" in page.url
    _save(page, "screenshot-test-point.png")

    before = _srcs(page, HELPFUL_IMG)
    first_test = page.url.split("test=")[1].split("&")[0]
    page.get_by_role("button", name="Next ▶").click()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _srcs(page, HELPFUL_IMG) == before:
        time.sleep(0.3)
    after = _srcs(page, HELPFUL_IMG)
    assert after and after != before, "the helpful examples did not change after 'Next'"
    _settle(page, 0.5)
    assert "test=" in page.url and page.url.split("test=")[1].split("&")[0] != first_test
    assert not errors, errors
    page.close()


def test_validation_page_scatter(server, browser, browser_runs):
    _, name = browser_runs
    page, errors = _open(browser, f"{server}/validation?run={name}&scenario=fixed", 1300)
    page.wait_for_selector(".js-plotly-plot", timeout=60_000)
    _settle(page, 2.0)
    # two scatters with their points drawn (SVG markers), plus group curves and baseline bars
    assert page.locator(".js-plotly-plot").count() >= 3
    assert page.locator(".js-plotly-plot .scatterlayer .point").count() >= 24
    assert "Do the scores predict actual retraining?" in page.content()
    _save(page, "screenshot-validation.png")
    assert not errors, errors
    page.close()


def test_data_cleaning_page(server, browser, browser_runs):
    """The noisy quick run's suspects render as images, with the detection curves."""
    _, name = browser_runs
    page, errors = _open(browser, f"{server}/data-cleaning?run={name}&scenario=fixed", 1500)
    page.wait_for_selector(IMG, timeout=60_000)
    page.wait_for_selector(".js-plotly-plot", timeout=30_000)
    _settle(page)
    assert "Which pretraining labels look wrong?" in page.content()
    assert page.locator(IMG).count() >= 8
    assert page.eval_on_selector_all(IMG, "els => els.every(e => e.complete && e.naturalWidth > 0)")
    _save(page, "screenshot-data-cleaning.png")
    assert not errors, errors
    page.close()
