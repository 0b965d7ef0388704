"""Issue 11, items 6-8 in a real server: the explorer binds 127.0.0.1 however it is started, sends
no usage statistics, shows deep-link values as plain text (no link, no image fetched), and a
damaged run shows the broken-run notice. Chromium as in test_explorer_browser.py."""

from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from run_factory import write_synthetic_run  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) that listen on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.rsplit(":", 1)
            if state == "0A" and int(p, 16) == port:
                found.add(addr)
    return found


class Server:
    """A streamlit server started by ``cmd`` in ``cwd`` (its own session: stopped as a group)."""

    def __init__(self, cmd: list[str], cwd: Path, port: int, log: Path):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMLIT_", "EXPLORER_"))}
        self.port, self.log = port, log
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert self.proc.poll() is None, log.read_text(errors="replace")[-2000:]
            assert time.monotonic() < deadline, "streamlit did not become healthy"
            try:
                with urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.3)

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    write_synthetic_run(root, "digits", m=60, n_test=20, T=4)
    broken = write_synthetic_run(root, "zz-broken", m=60, n_test=20, T=4, seed=1)
    text = (broken / "manifest.json").read_text().replace('"n_pretrain": 60', '"n_pretrain": "60"')
    (broken / "manifest.json").write_text(text)
    return root


@pytest.fixture(scope="module")
def launched(runs_root, tmp_path_factory):
    """`python <repo>/explorer/app.py --runs ROOT`, started from another folder, no address flag."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    port = _free_port()
    server = Server([sys.executable, str(REPO / "explorer" / "app.py"), "--runs", str(runs_root),
                     "--port", str(port), "--server.fileWatcherType", "none"], elsewhere, port,
                    elsewhere / "streamlit.log")
    yield server
    server.stop()


LOOPBACK = {"0100007F"}                                   # 127.0.0.1 in /proc/net/tcp byte order


def test_the_launcher_binds_loopback_from_another_folder(launched):
    assert _listening(launched.port) == LOOPBACK


def test_streamlit_run_without_the_flag_binds_loopback_from_another_folder(runs_root, tmp_path):
    port = _free_port()
    server = Server([sys.executable, "-m", "streamlit", "run", str(REPO / "explorer" / "app.py"),
                     "--server.port", str(port), "--server.headless", "true", "--server.fileWatcherType", "none",
                     "--", "--runs", str(runs_root)], tmp_path, port, tmp_path / "streamlit.log")
    try:
        assert _listening(port) == LOOPBACK
    finally:
        server.stop()


def test_the_launcher_passes_safe_flags_first():
    from explorer.__main__ import streamlit_argv

    argv = streamlit_argv(["--runs", "R", "--port", "9000", "--server.fileWatcherType", "none"])
    assert argv[:3] == ["streamlit", "run", str(REPO / "explorer" / "app.py")]
    flags = argv[3:argv.index("--")]
    assert flags[:4] == ["--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"]
    assert argv[argv.index("--") + 1:] == ["--runs", "R"] and "--server.port" in flags


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists() and not os.environ.get("CI"):
        pytest.skip(f"{CHROMIUM} not found (install chromium with apt; under CI=true this test must run)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                                    "--disable-component-update", "--disable-sync"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def pixel_server():
    """A local HTTP server that records every request (the target of an injected image)."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", hits
    httpd.shutdown()


def _settle(page) -> None:
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=60_000)
    time.sleep(2.0)


def test_deep_link_values_are_plain_text(launched, browser, pixel_server):
    pixel_url, hits = pixel_server
    link = "[text](https://example.invalid/x)"
    image = f"![x]({pixel_url}/pixel.png)"
    page = browser.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    query = urllib.parse.urlencode({"run": link, "scenario": image})
    page.goto(f"{launched.url}/?{query}")
    page.wait_for_selector("[data-testid='stAlert']", timeout=60_000)
    _settle(page)
    alerts = page.locator("[data-testid='stAlert']").all_inner_texts()
    assert any(link in a for a in alerts) and any(image in a for a in alerts), alerts    # shown literally
    assert page.locator("a[href*='example.invalid']").count() == 0
    assert page.locator("img[src*='pixel.png']").count() == 0
    assert hits == []
    foreign = [u for u in requests if urllib.parse.urlsplit(u).hostname not in ("127.0.0.1", None)]
    assert foreign == [], foreign                  # no usage statistics, no injected fetches
    page.close()


def test_a_damaged_run_shows_the_notice_in_the_browser(launched, browser):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{launched.url}/?run=zz-broken")
    page.wait_for_selector("[data-testid='stAlert']", timeout=60_000)
    _settle(page)
    content = page.content()
    assert "n_pretrain must be an integer" in content and "incomplete or damaged" in content
    assert "Traceback" not in content and page.locator("[data-testid='stException']").count() == 0
    assert not errors, errors
    page.close()
