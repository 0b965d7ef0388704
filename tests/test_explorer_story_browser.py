"""Overview, evidence beside the examples, label placement and hints, in a real Chromium.

Synthetic contract-valid runs (tests/run_factory.py: a clean digits run and its noisy sibling), a
Streamlit server on loopback, Playwright on Debian's chromium. Skipped like test_explorer_browser.py
when chromium is missing outside CI. Screenshots go to test-artifacts/ (the README's come from a
real run: assets/make_screenshots.py).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_explorer_browser import (IMG, _open, _save, _settle, explorer_server,  # noqa: E402
                                   browser)  # noqa: F401  (the fixture)

from precompute.runstore import open_run  # noqa: E402
from run_factory import write_synthetic_run  # noqa: E402


@pytest.fixture(scope="module")
def story_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("story-browser-runs")
    write_synthetic_run(root, "digits", m=300, n_test=60, T=8)
    write_synthetic_run(root, "digits-noisy", m=300, n_test=60, T=8, noisy=True, cleaning=True)
    return root


@pytest.fixture(scope="module")
def story_server(story_root, tmp_path_factory):
    with explorer_server(story_root, tmp_path_factory.mktemp("story-streamlit-log") / "streamlit.log") as url:
        yield url


def _box(page, selector: str) -> dict:
    el = page.locator(selector).first
    el.wait_for(timeout=30_000)
    return el.bounding_box()


def _overlap(a: dict, b: dict) -> bool:
    return not (a["x"] + a["width"] <= b["x"] or b["x"] + b["width"] <= a["x"]
                or a["y"] + a["height"] <= b["y"] or b["y"] + b["height"] <= a["y"])


def test_overview_opens_first_and_tells_the_story(story_server, browser):
    page, errors = _open(browser, f"{story_server}/", 1900)
    page.wait_for_selector(".js-plotly-plot .scatterlayer .point", timeout=60_000)
    page.wait_for_selector(IMG, timeout=30_000)
    _settle(page)
    nav = page.locator("[data-testid='stSidebarNav'] a").all_inner_texts()
    assert nav and nav[0].strip().endswith("Overview")
    body = page.inner_text("[data-testid='stMain']")
    for part in ("1 · Pretraining", "2 · Finetuning", "3 · Do the scores predict", "matter most",
                 "One mistake, traced back"):
        assert part in body, part
    assert page.locator(".mi-answer").inner_text() in ("Yes", "Mostly", "Only weakly", "No")
    assert page.locator(".js-plotly-plot .scatterlayer .point").count() >= 8
    assert page.eval_on_selector_all(IMG, "els => els.length >= 16 && els.every(e => e.complete && e.naturalWidth > 0)")
    _save(page, "screenshot-overview.png")
    # its own URL is a deep link too, and the trace-back button opens the test point
    page.get_by_role("button", name="Open test point #").click()
    page.wait_for_selector(".st-key-helpful_examples img", timeout=30_000)
    assert "/test-point" in page.url
    assert not errors, errors
    page.close()
    page, errors = _open(browser, f"{story_server}/overview?run=digits-noisy", 900)
    page.wait_for_selector("h2", timeout=60_000)
    _settle(page, 0.5)
    assert "What run digits-noisy shows" in page.inner_text("h2") and "Page not found" not in page.content()
    page.close()


def test_scatter_beside_the_examples_and_retrained_marks(story_server, browser, story_root):
    run = open_run(story_root, "digits")
    t = run.validation_test_points[0]
    page, errors = _open(browser, f"{story_server}/test-point?run=digits&scenario=fixed&test={t}", 1500)
    page.wait_for_selector(".st-key-tp_evidence .js-plotly-plot .scatterlayer .point", timeout=60_000)
    _settle(page)
    helpful, harmful = _box(page, ".st-key-helpful_examples"), _box(page, ".st-key-harmful_examples")
    scatter = _box(page, ".st-key-tp_evidence .js-plotly-plot")
    assert helpful["x"] < harmful["x"] < scatter["x"], "scatter is not to the right of the examples"
    assert scatter["y"] < helpful["y"] + helpful["height"] and helpful["y"] < scatter["y"] + scatter["height"]
    assert page.locator(".st-key-helpful_examples .mi-retrained, .st-key-harmful_examples .mi-retrained").count() >= 1
    _save(page, "screenshot-test-point.png")
    # clicking a dot picks that example (shown under the scatter)
    before = page.locator(".st-key-tp_evidence .mi-facts").inner_text()
    points = page.locator(".st-key-tp_evidence .scatterlayer .point")   # the last one is the "picked" ring
    box = points.nth(points.count() - 2).bounding_box()
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and page.locator(".st-key-tp_evidence .mi-facts").inner_text() == before:
        time.sleep(0.3)
    assert page.locator(".st-key-tp_evidence .mi-facts").inner_text() != before, "a click on a dot picked nothing"
    assert not errors, errors
    page.close()


@pytest.mark.parametrize("width", [1024, 1280, 1920])
def test_histogram_labels_do_not_overlap_and_button_fits(story_server, browser, story_root, width):
    run = open_run(story_root, "digits")
    wrong = run.test_table().set_index("id").loc[run.test_points]
    t = int(wrong.index[~wrong["correct_fixed"].astype(bool)][0])
    page, errors = _open(browser, f"{story_server}/test-point?run=digits&scenario=fixed&test={t}", 1000)
    page.set_viewport_size({"width": width, "height": 1000})
    page.wait_for_selector(".stPlotlyChart .annotation-text", timeout=60_000)
    _settle(page, 1.0)
    helpful = _box(page, ".stPlotlyChart .annotation-text:text('shown helpful')")
    harmful = _box(page, ".stPlotlyChart .annotation-text:text('shown harmful')")
    assert not _overlap(helpful, harmful), (helpful, harmful)
    for name in ("Check labels", "Previous", "Next"):       # no label cut off with an ellipsis
        button = page.get_by_role("button", name=name)
        assert button.evaluate("b => [b, ...b.querySelectorAll('*')].every(e => e.scrollWidth <= e.clientWidth + 1)"), name
    assert not errors, errors
    page.close()


def test_data_cleaning_hint_opens_the_noisy_sibling(story_server, browser):
    page, errors = _open(browser, f"{story_server}/data-cleaning?run=digits", 1100)
    page.wait_for_selector("[data-testid='stAlert']", timeout=60_000)
    _settle(page, 0.5)
    assert "digits-noisy" in page.inner_text("[data-testid='stAlert']")
    assert "python -m precompute" not in page.inner_text("[data-testid='stMain']")
    page.get_by_role("button", name="Open 'digits-noisy'").click()
    page.wait_for_url("**/data-cleaning?run=digits-noisy*", timeout=30_000)
    _settle(page, 1.0)
    assert "run=digits-noisy" in page.url and "/data-cleaning" in page.url
    assert "has no cleaning data" not in page.inner_text("[data-testid='stMain']")
    assert not errors, errors
    page.close()
