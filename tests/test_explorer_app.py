"""Explorer app, headless (streamlit.testing.v1.AppTest), plus its pure helpers.

The runs come from the ``explorer_runs`` fixture: swap it for real quick pipeline runs by returning
(root, {"image": name, "text": name}) of runs that follow the run-directory contract.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from streamlit.testing.v1 import AppTest  # noqa: E402

from explorer import charts, render, state  # noqa: E402
from precompute.metrics import fit_summary  # noqa: E402
from precompute.runstore import open_run  # noqa: E402
from run_factory import write_synthetic_run  # noqa: E402

APP = REPO / "explorer" / "app.py"
PAGES = {
    "overview": "pages_/overview.py",
    "test_point": "pages_/test_point.py",
    "validation": "pages_/validation.py",
    "pretrain_example": "pages_/pretrain_example.py",
    "run_info": "pages_/run_info.py",
    "data_cleaning": "pages_/data_cleaning.py",
}
PAGE_MARKERS = {
    "overview": "What run",
    "test_point": "Which pretraining examples shaped this prediction?",
    "validation": "Do the scores predict actual retraining?",
    "pretrain_example": "Pretraining example",
    "run_info": "What the score means",
    "data_cleaning": "Which pretraining labels look wrong?",
}


@pytest.fixture(scope="module")
def explorer_runs(quick_runs) -> tuple[Path, dict[str, str]]:
    """(runs root, {"image": run name, "text": run name}): real quick pipeline runs (see conftest)."""
    return quick_runs


# AppTest shares Streamlit's caches across tests: start each test from empty caches.
pytestmark = pytest.mark.usefixtures("clear_streamlit_caches")


def make_app(monkeypatch, root: Path, page: str | None = "test_point", **query) -> AppTest:
    """The app opened with ``query`` as its URL parameters (it lands on the Overview), then switched to
    ``page`` (None: stay on the Overview)."""
    monkeypatch.setenv(state.RUNS_ENV, str(root))
    at = AppTest.from_file(str(APP), default_timeout=60)
    for k, v in query.items():
        at.query_params[k] = str(v)
    at.run()
    return at.switch_page(PAGES[page]).run() if page and not at.exception else at


def texts(at: AppTest) -> str:
    """All markdown, captions, titles and info/error/warning texts of the current page."""
    parts = []
    for kind in ("markdown", "caption", "title", "header", "subheader", "info", "error", "warning", "code"):
        parts += [str(e.value) for e in getattr(at, kind)]
    return "\n".join(parts)


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def ranking_df(at: AppTest):
    for df in at.dataframe:
        if "side" in df.value.columns:
            return df.value
    raise AssertionError("no ranking table on the page")


def shown_ids(at: AppTest, kind: str) -> list[int]:
    """Pretraining ids in screen order from the image captions or text cards of one kind."""
    ids = []
    for e in at.markdown:
        v = str(e.value)
        if f"mi-cap mi-cap-{kind}" in v:
            ids += [int(i) for i in re.findall(r"id (\d+) ·", v)]
        elif f"mi-card mi-{kind}" in v:
            ids += [int(i) for i in re.findall(r"· id (\d+)<", v)]
    return ids


def plotly_figs(at: AppTest) -> dict[str, dict]:
    """Plotly figures on the page by key (json of the element's spec)."""
    return {el.key: json.loads(el.proto.spec) for el in at.get("plotly_chart")}


# ------------------------------------------------------------------------------------------------
# every page, both modalities


@pytest.mark.parametrize("modality", ["image", "text"])
def test_every_page_renders(monkeypatch, explorer_runs, modality):
    root, names = explorer_runs
    at = make_app(monkeypatch, root, run=names[modality])
    assert_clean(at)
    for page, path in PAGES.items():
        at.switch_page(path).run()
        assert_clean(at)
        assert PAGE_MARKERS[page] in texts(at), page
    # image runs show images, text runs text cards
    at.switch_page(PAGES["test_point"]).run()
    if modality == "image":
        grid_images = sum(str(e.value).count("<img ") for e in at.markdown if "mi-grid" in str(e.value))
        assert len(at.image) >= 1 and grid_images >= 2 * 12      # the test point; the two example grids
    else:
        assert "mi-card" in texts(at)
        assert "<mark>" in texts(at), "shared words should be highlighted"


# ------------------------------------------------------------------------------------------------
# deep links and URL sync


def test_deep_link_restores_the_view(monkeypatch, explorer_runs):
    root, names = explorer_runs
    run = open_run(root, names["image"])
    t = run.test_points[3]
    at = make_app(monkeypatch, root, run=names["image"], scenario="updated", test=t)
    assert_clean(at)
    assert at.selectbox(key="w_run").value == names["image"]
    assert at.radio(key="w_scenario").value == "updated"
    assert at.selectbox(key="w_test").value == t
    assert f"Test point #{t}" in texts(at)
    assert at.query_params["test"] == [str(t)] or at.query_params["test"] == str(t)


def test_deep_link_to_other_pages(monkeypatch, explorer_runs):
    root, names = explorer_runs
    at = make_app(monkeypatch, root, run=names["text"], pretrain=17)
    at.switch_page(PAGES["pretrain_example"]).run()
    assert_clean(at)
    assert at.number_input(key="w_pretrain").value == 17
    assert "Pretraining example #17" in texts(at)


def _qp(at: AppTest, key: str) -> str:
    v = at.query_params.get(key)
    return v[0] if isinstance(v, list) else v


def test_changing_the_view_updates_query_params(monkeypatch, explorer_runs):
    root, names = explorer_runs
    run = open_run(root, names["image"])
    at = make_app(monkeypatch, root, run=names["image"])
    assert _qp(at, "run") == names["image"] and _qp(at, "test") == str(run.test_points[0])
    at.selectbox(key="w_test").select(run.test_points[4]).run()
    assert _qp(at, "test") == str(run.test_points[4])
    at.radio(key="w_scenario").set_value("updated").run()
    assert _qp(at, "scenario") == "updated"
    at.selectbox(key="w_run").select(names["text"]).run()
    assert_clean(at)
    assert _qp(at, "run") == names["text"]
    assert _qp(at, "test") == str(open_run(root, names["text"]).test_points[0])


def test_bad_deep_link_falls_back_with_a_notice(monkeypatch, explorer_runs):
    root, names = explorer_runs
    at = make_app(monkeypatch, root, page=None, run="no-such-run", test=99999)
    assert not at.exception
    assert "no-such-run" in texts(at)
    assert at.selectbox(key="w_run").value in names.values()


def test_prev_next_buttons(monkeypatch, explorer_runs):
    root, names = explorer_runs
    run = open_run(root, names["image"])
    at = make_app(monkeypatch, root, run=names["image"])
    first = ranking_df(at)
    at.button(key="next_test").click().run()
    assert at.selectbox(key="w_test").value == run.test_points[1]
    assert not ranking_df(at)["pretrain_id"].equals(first["pretrain_id"])
    at.button(key="prev_test").click().run()
    at.button(key="prev_test").click().run()
    assert at.selectbox(key="w_test").value == run.test_points[-1]


# ------------------------------------------------------------------------------------------------
# content equals the run


@pytest.mark.parametrize("modality", ["image", "text"])
def test_helpful_and_harmful_lists_equal_top_k(monkeypatch, explorer_runs, modality):
    root, names = explorer_runs
    run = open_run(root, names[modality])
    t = run.test_points[2]
    at = make_app(monkeypatch, root, run=names[modality], scenario="fixed", test=t)
    df = ranking_df(at)
    k = at.slider(key="k_examples").value
    assert k == 12
    h_ids, h_sc, x_ids, x_sc = run.top_k("fixed", t, k)
    helpful = df[df["side"] == "helpful"]
    harmful = df[df["side"] == "harmful"]
    assert list(helpful["pretrain_id"]) == list(h_ids)
    assert np.all(np.diff(helpful["score"].to_numpy()) <= 0), "helpful must be in descending score order"
    assert np.allclose(helpful["score"], h_sc)
    assert list(harmful["pretrain_id"]) == list(x_ids)
    assert np.all(np.diff(harmful["score"].to_numpy()) >= 0), "most harmful first"
    # the cards / captions on screen follow the same order
    assert shown_ids(at, "helpful") == list(h_ids)
    assert shown_ids(at, "harmful") == list(x_ids)
    # the slider changes how many are shown
    at.slider(key="k_examples").set_value(6).run()
    df = ranking_df(at)
    assert (df["side"] == "helpful").sum() == 6


def test_noise_flag_is_shown(monkeypatch, explorer_runs):
    root, names = explorer_runs
    run = open_run(root, names["image"])
    flipped = run.pretrain_table()["flipped"].to_numpy()
    for t in run.test_points:
        h, _, x, _ = run.top_k("fixed", t, 12)
        if flipped[np.r_[h, x]].any():
            break
    else:
        pytest.skip("no flipped example among the top-k of any test point")
    at = make_app(monkeypatch, root, run=names["image"], test=t)
    assert "⚑ flipped (true " in texts(at)
    assert ranking_df(at)["flipped"].any()


def test_validation_scatter_points_equal_stored_pairs(monkeypatch, explorer_runs):
    root, names = explorer_runs
    run = open_run(root, names["image"])
    pairs = run.pairs()
    for scenario in run.scenarios:
        t = run.validation_test_points[1]
        at = make_app(monkeypatch, root, run=names["image"], scenario=scenario, test=t)
        at.switch_page(PAGES["validation"]).run()
        assert_clean(at)
        figs = plotly_figs(at)
        for fig_key, expected in (
            (f"scatter_test_{scenario}_{t}", pairs[(pairs.scenario == scenario) & (pairs.test_id == t)]),
            (f"scatter_all_{scenario}", pairs[pairs.scenario == scenario]),
        ):
            fig = figs[fig_key]
            got = set()
            for trace in fig["data"]:
                if trace.get("mode") != "markers" or trace["meta"]["kind"] == "selected":
                    continue
                kind = trace["meta"]["kind"]
                for x, y, cd in zip(trace["x"], trace["y"], trace["customdata"]):
                    got.add((kind, int(cd[0]), int(cd[1]), round(x, 12), round(y, 12)))
            want = {(r.kind, int(r.pretrain_id), int(r.test_id), round(r.predicted, 12), round(r.actual, 12))
                    for r in expected.itertuples()}
            assert got == want and len(want) == len(expected)
            # the y = x reference line is there
            assert any(tr.get("mode") == "lines" and tr["x"] == tr["y"] for tr in fig["data"])


def test_validation_widget_twin_shows_the_picked_example(monkeypatch, explorer_runs):
    root, names = explorer_runs
    run = open_run(root, names["image"])
    t = run.validation_test_points[0]
    at = make_app(monkeypatch, root, run=names["image"], test=t)
    at.switch_page(PAGES["validation"]).run()
    twin = at.selectbox(key="w_val_pick")
    pairs = run.pairs()
    plotted = set(pairs[(pairs.scenario == "fixed") & (pairs.test_id == t)]["pretrain_id"])
    assert set(twin.options) == {twin.format_func(p) for p in plotted} or len(twin.options) == len(plotted)
    pick = sorted(plotted)[0]
    twin.select(pick).run()
    assert_clean(at)
    assert f"<dt>Pretraining id</dt><dd>{pick}</dd>" in texts(at)
    assert len(at.image) >= 1
    # the validated-test-point selector drives both scatters
    t2 = run.validation_test_points[2]
    at.selectbox(key="w_val_test").select(t2).run()
    assert f"scatter_test_fixed_{t2}" in plotly_figs(at)
    assert _qp(at, "test") == str(t2)


def test_validation_page_baselines_and_paper_context(monkeypatch, explorer_runs):
    root, names = explorer_runs
    at = make_app(monkeypatch, root, run=names["text"])
    at.switch_page(PAGES["validation"]).run()
    figs = plotly_figs(at)
    bars = figs["baseline_bars"]
    names_in_chart = {tr["name"] for tr in bars["data"]}
    assert "multi-stage influence" in names_in_chart and "embedding similarity" in names_in_chart
    assert "Chen et al. (2020)" in texts(at) and "0.4–0.6" in texts(at)
    assert "group_curves" in figs


@pytest.mark.parametrize("groups", ["none retrained", "none converged", "some converged"])
def test_validation_page_says_why_a_group_figure_is_missing_or_partial(monkeypatch, tmp_path, groups):
    """Group curves average converged retrainings only; with none retrained (quick fashion) or none converged
    the page says which, instead of plotting what retraining did not measure."""
    import pandas as pd

    path = write_synthetic_run(tmp_path, "g", m=120, n_test=30, T=4)
    table = pd.read_parquet(path / "validation/group.parquet")
    if groups == "none retrained":
        table = table.iloc[:0]
    elif groups == "none converged":
        table["converged"] = False
    else:
        table["converged"] = table["percent"] <= 2.0
        table.loc[~table["converged"], "actual"] = 1e6          # an unconverged value must not reach the curve
    table.to_parquet(path / "validation/group.parquet", index=False)
    at = make_app(monkeypatch, tmp_path, run="g")
    at.switch_page(PAGES["validation"]).run()
    assert_clean(at)
    figs, shown = plotly_figs(at), texts(at)
    if groups == "some converged":
        def values(arr):            # plotly's JSON holds numpy arrays as {"dtype", "bdata": base64}
            if isinstance(arr, dict):
                import base64
                return np.frombuffer(base64.b64decode(arr["bdata"]), dtype=np.dtype(arr["dtype"])).tolist()
            return list(arr)

        curve = figs["group_curves"]["data"]
        assert curve and max(abs(y) for tr in curve for y in values(tr["y"])) < 1e3
        assert {x for tr in curve for x in values(tr["x"])} == {1.0, 2.0}
        assert "did not converge and are left out" in shown
    else:
        assert "group_curves" not in figs
        assert ("retrained no groups" in shown) == (groups == "none retrained")
        assert ("reached a certified minimum" in shown) == (groups == "none converged")


def test_pretrain_example_page_shows_its_column(monkeypatch, explorer_runs):
    root, names = explorer_runs
    run = open_run(root, names["image"])
    pid = int(run.top_k("fixed", run.test_points[0], 1)[0][0])
    at = make_app(monkeypatch, root, run=names["image"], pretrain=pid)
    at.switch_page(PAGES["pretrain_example"]).run()
    assert_clean(at)
    fig = plotly_figs(at)["column_bars"]
    got = dict(zip(fig["data"][0]["customdata"], fig["data"][0]["y"]))
    col = run.score_column("fixed", pid)
    assert got == pytest.approx({t: float(v) for t, v in zip(run.test_points, col)})
    at.button(key="jump_harmful").click().run()
    assert at.number_input(key="w_pretrain").value == int(run.top_k("fixed", run.test_points[0], 1)[2][0])


# ------------------------------------------------------------------------------------------------
# empty, broken and partial runs


def test_empty_state(monkeypatch, tmp_path):
    at = make_app(monkeypatch, tmp_path / "no-runs-here")
    assert not at.exception and not at.error
    assert "python -m precompute --preset demo" in texts(at)
    assert "No runs found" in texts(at)
    for path in PAGES.values():
        at.switch_page(path).run()
        assert not at.exception
        assert "python -m precompute --preset demo" in texts(at)


def test_broken_run_shows_an_error_naming_run_and_file(monkeypatch, explorer_runs, tmp_path):
    root, names = explorer_runs
    broken_root = tmp_path / "runs"
    shutil.copytree(root / names["image"], broken_root / "broken")
    (broken_root / "broken" / "scores" / "fixed.npy").unlink()
    at = make_app(monkeypatch, broken_root, run="broken")
    assert not at.exception
    assert at.error, "a broken run must show st.error"
    msg = at.error[0].value
    assert "broken" in msg and "scores/fixed.npy" in msg


def test_run_without_validation_says_so(monkeypatch, tmp_path):
    write_synthetic_run(tmp_path, "noval", m=80, n_test=15, T=4, with_validation=False, scenarios=("fixed",))
    at = make_app(monkeypatch, tmp_path, run="noval")
    for path in PAGES.values():
        at.switch_page(path).run()
        assert_clean(at)
    at.switch_page(PAGES["validation"]).run()
    assert "without validation by retraining" in texts(at)


def test_runs_root_from_argv(tmp_path):
    env = {state.RUNS_ENV: "/from/env"}
    assert state.resolve_runs_root(["app.py", "--runs", "/x/runs"], env) == Path("/x/runs")
    assert state.resolve_runs_root(["app.py", "--", "--runs=/y"], env) == Path("/y")
    assert state.resolve_runs_root(["pytest", "-q", "tests"], env) == Path("/from/env")
    assert state.resolve_runs_root(["app.py"], {}, cwd=tmp_path) == tmp_path / "runs"
    assert state.resolve_runs_root(["app.py", "--runs", "rel"], {}, cwd=tmp_path) == tmp_path / "rel"


# ------------------------------------------------------------------------------------------------
# pure helpers


def test_upscale_is_nearest_neighbour():
    img = np.arange(64, dtype=np.uint8).reshape(8, 8)
    big = render.upscale(img, 96)
    assert big.shape == (96, 96) and np.array_equal(big[::12, ::12], img)
    rgb = np.zeros((8, 8, 3), np.uint8)
    assert render.upscale(rgb, 96).shape == (96, 96, 3)
    png = render.png_bytes(img, 96, border=render.HELPFUL)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    framed = render.add_border(render.upscale(rgb, 96), render.HARMFUL, width=4)
    assert framed.shape == (104, 104, 3) and tuple(framed[0, 0]) == (0xD5, 0x5E, 0x00)


def test_text_cards_escape_html_and_highlight_shared_words():
    html_text = render.text_card_html(
        "<script>alert('x')</script> Broadband prices & speeds", title="<b>t</b>", kind="helpful",
        words=render.shared_words("broadband speeds", "Broadband prices & speeds"), badges=["<i>"],
    )
    assert "<script>" not in html_text and "&lt;script&gt;" in html_text
    assert "<b>t</b>" not in html_text and "&lt;i&gt;" in html_text
    assert "<mark>Broadband</mark>" in html_text and "<mark>speeds</mark>" in html_text
    assert "&amp;" in html_text
    assert render.shared_words("the cat and the dog", "the dog", None) == {"dog"}
    assert render.shared_words("cat dog", "cat dog", {"dog"}) == {"dog"}
    assert render.highlight_html("word " * 200, set(), max_chars=50).endswith("…")


def test_fit_stats():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    s = fit_summary(x, 2 * x + 1)
    assert s["pearson"] == pytest.approx(1) and s["spearman"] == pytest.approx(1) and s["slope"] == pytest.approx(2)
    assert np.isnan(fit_summary([1.0], [2.0])["pearson"])


def test_histogram_splits_at_zero():
    edges, counts = charts.histogram_counts(np.array([-1.0, -0.5, 0.2, 0.9, 1.0]), bins=10)
    assert 0.0 in set(np.round(edges, 12)) and counts.sum() == 5


def test_buttons_that_switch_pages(monkeypatch, explorer_runs):
    root, names = explorer_runs
    run = open_run(root, names["image"])
    t = run.validation_test_points[0]
    at = make_app(monkeypatch, root, run=names["image"], test=t)
    at.switch_page(PAGES["validation"]).run()
    pid = at.selectbox(key="w_val_pick").value
    at.button(key="open_pretrain").click().run()
    assert_clean(at)
    assert f"Pretraining example #{pid}" in texts(at)
    assert _qp(at, "pretrain") == str(pid)
    # from the pretraining example back to a test point it helps
    col = run.score_column("fixed", pid)
    best = run.test_points[int(np.argmax(col))]
    assert col.max() > 0
    # AppTest keeps re-running the page it was last switched to by the test, not by st.switch_page
    at.switch_page(PAGES["pretrain_example"]).run()
    at.button(key=f"open_helpful_{best}").click().run()
    assert_clean(at)
    assert at.selectbox(key="w_test").value == best
    assert PAGE_MARKERS["test_point"] in texts(at)


def test_opens_on_the_demo_lead_run(monkeypatch, explorer_runs, tmp_path):
    """With no run in the URL the app shows the demo's lead ('fashion', else 'digits'), not the first name."""
    root, names = explorer_runs
    for name in ("apparel", "fashion"):
        shutil.copytree(root / names["image"], tmp_path / name)
    at = make_app(monkeypatch, tmp_path, page=None)
    assert not at.exception and at.selectbox(key="w_run").value == "fashion"
    shutil.rmtree(tmp_path / "fashion")
    at = make_app(monkeypatch, tmp_path, page=None)
    assert not at.exception and at.selectbox(key="w_run").value == "apparel"


def test_unconverged_retrainings_are_hollow_and_not_counted(monkeypatch, tmp_path):
    """The Validation and Test point pages count what the manifest counts: converged retrainings only."""
    write_synthetic_run(tmp_path, "run", m=200, T=6, unconverged=3)
    run = open_run(tmp_path, "run")
    scenario, t = "fixed", run.validation_test_points[0]
    pairs = run.pairs()
    mine = pairs[(pairs.scenario == scenario) & (pairs.test_id == t)]
    counted = mine[mine.converged]
    assert len(mine) - len(counted) == 3
    at = make_app(monkeypatch, tmp_path, run="run", scenario=scenario, test=t)
    at.switch_page(PAGES["validation"]).run()
    assert_clean(at)
    figs = plotly_figs(at)
    one, every = figs[f"scatter_test_{scenario}_{t}"], figs[f"scatter_all_{scenario}"]
    assert "(3 hollow, not counted: 3 iteration cap)" in one["layout"]["title"]["text"]
    note = one["layout"]["annotations"][0]["text"]
    assert f"n = {len(counted)}" in note
    assert f"Pearson {charts.fmt_stat(np.corrcoef(counted.predicted, counted.actual)[0, 1])}" in note
    overall = run.manifest["validation"][scenario]
    assert f"n = {overall['n_pairs']}" in every["layout"]["annotations"][0]["text"]
    assert f"Pearson {charts.fmt_stat(overall['pearson'])}" in every["layout"]["annotations"][0]["text"]
    hollow = [sym for tr in one["data"] if tr.get("mode") == "markers" and isinstance(tr["marker"].get("symbol"), list)
              for sym in tr["marker"]["symbol"] if sym.endswith("-open")]
    assert len(hollow) == 3


def test_baseline_bars_never_share_the_multi_stage_colour():
    """With eight or more methods (the single-stage EK-FAC baseline made eight) a palette that cycles gave a
    baseline the multi-stage score's colour."""
    validation = {"fixed": {"spearman": 0.9}}
    baselines = {f"method_{i}": {"fixed": {"spearman": 0.1 * i}} for i in range(12)}
    fig = charts.baseline_bars(validation, baselines)
    colours = [trace.marker.color for trace in fig.data]
    assert fig.data[0].name == "multi-stage influence"
    assert colours[0] not in colours[1:]
    assert len(set(colours[1:10])) == 9                      # distinct while the palette lasts
    assert charts.method_label("single_stage_ekfac") == "single stage (EK-FAC, as kronfluence)"
