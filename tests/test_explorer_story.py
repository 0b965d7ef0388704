"""The Overview page, the evidence beside the examples, hints that fit the run, readable numbers.

AppTest on synthetic contract-valid runs (tests/run_factory.py) plus the pure helpers. The browser
checks of the same features are in tests/test_explorer_browser.py.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from streamlit.testing.v1 import AppTest  # noqa: E402

from explorer import readable, render, state, story  # noqa: E402
from precompute.runstore import open_run  # noqa: E402
from run_factory import write_synthetic_run  # noqa: E402

APP = REPO / "explorer" / "app.py"
pytestmark = pytest.mark.usefixtures("clear_streamlit_caches")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """digits (clean, validated), digits-noisy (its sibling), news (text, no sibling)."""
    root = tmp_path_factory.mktemp("story-runs")
    write_synthetic_run(root, "digits", m=120, n_test=30, T=6)
    write_synthetic_run(root, "digits-noisy", m=120, n_test=30, T=6, noisy=True, cleaning=True)
    write_synthetic_run(root, "news", modality="text", m=90, n_test=20, T=4, with_validation=False)
    return root


def app(monkeypatch, root: Path, page: str | None = None, **query) -> AppTest:
    monkeypatch.setenv(state.RUNS_ENV, str(root))
    at = AppTest.from_file(str(APP), default_timeout=60)
    for k, v in query.items():
        at.query_params[k] = str(v)
    at.run()
    if page:
        at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def texts(at: AppTest) -> str:
    return "\n".join(str(e.value) for kind in ("markdown", "caption", "info", "warning", "code")
                     for e in getattr(at, kind))


def figs(at: AppTest) -> dict[str, dict]:
    return {el.key: json.loads(el.proto.spec) for el in at.get("plotly_chart")}


# ------------------------------------------------------------------------------------------------
# Overview


def test_overview_is_the_landing_page_and_tells_the_story(monkeypatch, runs):
    at = app(monkeypatch, runs, run="digits")
    body = texts(at)
    assert "What run `digits` shows" in body
    assert "1 · Pretraining" in body and "2 · Finetuning" in body
    assert len(at.image) >= 10 + 6                      # task examples, the most influential examples
    assert "Finetune test accuracy:" in body
    m = open_run(runs, "digits").manifest
    head = story.headline(m, "fixed")
    assert head["sentence"] in body and f"Pearson {m['validation']['fixed']['pearson']:.2f}" in body
    scatter = figs(at)["overview_scatter"]
    n_points = sum(len(t["x"]) for t in scatter["data"] if t.get("mode") == "markers")
    assert n_points == m["validation"]["fixed"]["n_pairs"]
    assert "The pretraining images that matter most" in body and "One mistake, traced back" in body
    labels = [b.label for b in at.button]
    assert sum(lbl.startswith("Open #") for lbl in labels) == 6
    mistake = next(lbl for lbl in labels if lbl.startswith("Open test point #"))
    at.button(key="ov_to_test").click().run()
    assert int(re.search(r"#(\d+)", mistake).group(1)) == at.session_state[state.SEL_TEST]


def test_overview_of_an_unvalidated_text_run_says_so_in_one_line(monkeypatch, runs):
    at = app(monkeypatch, runs, run="news")
    assert sum("without validation" in i.value for i in at.info) == 1
    assert "overview_scatter" not in figs(at)
    assert "mi-card" in texts(at)


# ------------------------------------------------------------------------------------------------
# Test point: the evidence beside the examples


def test_validated_point_shows_its_scatter_and_marks_retrained_examples(monkeypatch, runs):
    run = open_run(runs, "digits")
    t = run.validation_test_points[0]
    at = app(monkeypatch, runs, "pages_/test_point.py", run="digits", scenario="fixed", test=t)
    pairs = run.pairs()
    own = pairs[(pairs["scenario"] == "fixed") & (pairs["test_id"] == t)]
    scatter = figs(at)[f"tp_scatter_fixed_{t}"]
    dots = [(int(cd[0]), y) for tr in scatter["data"] if tr.get("meta", {}).get("kind") in ("helpful", "harmful", "random")
            for cd, y in zip(tr["customdata"], tr["y"])]
    assert sorted(p for p, _ in dots) == sorted(own["pretrain_id"].astype(int))
    # every shown example that was retrained carries its actual change
    h, _, x, _ = run.top_k("fixed", t, 12)
    actual = own.drop_duplicates("pretrain_id").set_index("pretrain_id")["actual"]
    retrained = [p for p in np.r_[h, x] if p in actual.index]
    assert retrained
    cells = [c for c in texts(at).split('<div class="mi-cell">') if "mi-cap" in c]
    for p in retrained:
        cell = next(c for c in cells if f"id {p} ·" in c)
        assert f"↻ actual {render.format_score(actual[p])}" in cell
    assert sum("↻ actual" in c for c in cells) == len(retrained)
    # the widget twin of a click on a dot picks that example
    other = at.selectbox(key="w_tp_pick").options[-1]
    pid = int(re.match(r"id (\d+)", other).group(1))
    at.selectbox(key="w_tp_pick").set_value(pid).run()
    assert f"#{pid} (" in texts(at)
    at.button(key="tp_open_pick").click().run()
    assert at.session_state[state.SEL_PRETRAIN] == pid


def test_point_without_validation_says_so_in_one_line(monkeypatch, runs):
    run = open_run(runs, "digits")
    t = next(t for t in run.test_points if t not in run.validation_test_points)
    at = app(monkeypatch, runs, "pages_/test_point.py", run="digits", test=t)
    assert not any(k.startswith("tp_scatter") for k in figs(at))
    assert sum("was not checked by retraining" in c.value for c in at.caption) == 1


def test_histogram_labels_sit_outside_their_cuts():
    from explorer import charts

    edges, counts = charts.histogram_counts(np.linspace(-1, 1, 101))
    fig = charts.score_histogram(edges, counts, helpful_cut=0.01, harmful_cut=-0.01)
    notes = {a.name: a for a in fig.layout.annotations}
    assert notes["cut-helpful"].x == 0.01 and notes["cut-harmful"].x == -0.01
    assert notes["cut-helpful"].yshift != notes["cut-harmful"].yshift          # separate rows
    near_right = charts.score_histogram(edges, counts, helpful_cut=0.9, harmful_cut=-0.9).layout.annotations
    assert {a.name: a.xanchor for a in near_right} == {"cut-helpful": "right", "cut-harmful": "left"}


# ------------------------------------------------------------------------------------------------
# hints and words that fit the run


def test_data_cleaning_hint_links_the_noisy_sibling(monkeypatch, runs):
    at = app(monkeypatch, runs, "pages_/data_cleaning.py", run="digits")
    assert "digits-noisy" in texts(at) and not at.code
    at.button(key="to_noisy_sibling").click().run()
    assert at.session_state[state.SEL_RUN] == "digits-noisy"
    assert "has no cleaning data" not in texts(at)


def test_data_cleaning_hint_on_a_run_without_sibling_gives_its_own_preset():
    m = {"preset": "news"}
    assert story.cleaning_command(m, "news") == "python -m precompute --preset news --label-noise 0.1 --out runs/news-noisy"
    assert story.noisy_sibling("news", ["digits", "digits-noisy", "news"], m) is None
    assert story.noisy_sibling("digits", ["digits", "digits-noisy"], {"preset": "digits"}) == "digits-noisy"
    assert story.noisy_sibling("digits-noisy", ["digits-noisy"], {"label_noise": {"rate": 0.1}}) is None


def test_flipped_is_the_one_word(monkeypatch, runs):
    run = open_run(runs, "digits-noisy")
    flipped = run.pretrain_table()["flipped"].to_numpy()
    t = next(t for t in run.test_points if flipped[run.top_k("fixed", t, 12)[0]].any())
    at = app(monkeypatch, runs, "pages_/test_point.py", run="digits-noisy", test=t)
    body = texts(at)
    assert "⚑ flipped (true " in body and story.FLIPPED_EXPLAINED in body
    for page in ("pages_/overview.py", "pages_/run_info.py", "pages_/data_cleaning.py", "pages_/validation.py"):
        at.switch_page(page).run()
        assert "noisy label" not in texts(at).lower() and "⚑ noisy" not in texts(at)


def test_run_page_shows_no_raw_floats(monkeypatch, runs):
    at = app(monkeypatch, runs, "pages_/run_info.py", run="digits-noisy")
    raw = re.compile(r"\d\.\d{6,}")
    for df in at.dataframe:
        cells = df.value.astype(str).to_numpy().ravel().tolist() + [str(c) for c in df.value.columns]
        assert not [c for c in cells if raw.search(c)], df.value
    assert "Technical details" in [e.label for e in at.expander][0]


def test_readable_tables():
    v = readable.validation_table({"fixed": {"pearson": 0.961234, "n_pairs": 192, "n_left_basin": 3}})
    assert v.loc["Pearson", "fixed"] == "0.961" and v.loc["Removals retrained", "fixed"] == "192"
    d = readable.diagnostics_table({"fixed": {"pretrain_solve": {"relative_residual": 4.9938141498806614e-14,
                                                                  "solver": "exact"}}})
    assert d.loc["Pretraining solve · relative residual ‖(H+λI)x − b‖/‖b‖", "fixed"] == "5.0e-14"
    g = readable.group_table({"fixed": {"helpful_5": 1.2476, "harmful_5": -0.85, "random_5": 0.06,
                                        "fraction_helpful5_raises_loss": 1.0}})
    assert g.iloc[0]["removed"] == "top 5%" and g.iloc[0]["helpful: loss change"] == "+1.248"
    # a kind whose retrainings all missed the tolerance has a null mean (the fashion quick run): a note,
    # not a crash of the Run info page
    g = readable.group_table({"fixed": {"helpful_5": None, "harmful_5": None, "random_5": 0.14,
                                        "fraction_helpful5_raises_loss": None}})
    assert g.iloc[0]["helpful: loss change"] == "n/a (not converged)" and g.iloc[0]["random: loss change"] == "+0.140"
    assert render.format_score(6.04e-4) == "+6.04e-04" and render.format_score(-0.00189) == "-1.89e-03"


def test_story_helpers():
    s = np.array([[1.0, -3.0, 0.1], [1.0, 1.0, -0.1]])
    top = story.most_influential(s, 2)
    assert list(top["pretrain_id"]) == [1, 0] and list(top["n_hurt"]) == [1, 0]
    table = pd.DataFrame({"id": [0, 1, 2], "correct_fixed": [False, True, False], "loss_fixed": [0.5, 0.1, 2.0]})
    assert story.traced_mistake(table, [0, 1, 2], [0], "fixed") == 0          # a validated mistake first
    assert story.traced_mistake(table, [0, 1, 2], [], "fixed") == 2           # else the largest loss
    assert story.examples_per_class(np.array([1, 0, 1, 0, 2]), 1) == [1, 0, 4]


def test_hollow_reasons_count_why_retrainings_do_not_count():
    import pandas as pd

    from explorer import story

    pairs = pd.DataFrame({"converged": [True, False, False, False, True],
                          "reason": ["", "lost the minimum", "iteration cap", "lost the minimum", "left the basin"]})
    assert story.hollow_reasons(pairs) == "2 lost the minimum, 1 iteration cap"
    assert story.hollow_reasons(pairs.drop(columns="reason")) == ""           # runs written before the reasons
    assert story.hollow_reasons(pairs[pairs.converged]) == ""


def test_a_run_checked_by_solver_agreement_says_which_evidence_it_has(monkeypatch, tmp_path):
    """A run too large to retrain (fashion-all) records ekfac vs pcg agreement: the Overview says plainly
    that this is its only evidence, with the figures, and draws no retraining scatter."""
    path = write_synthetic_run(tmp_path, "fashion-all", m=150, n_test=20, T=4, with_validation=False)
    manifest = json.loads((path / "manifest.json").read_text())
    agreement = {"pearson": 0.812, "spearman": 0.64, "top_k": 100, "top_helpful_overlap": 0.57,
                 "top_harmful_overlap": 0.61, "n_test_points": 4, "solver": "ekfac", "reference": "pcg",
                 "test_points": manifest["test_points"][:4], "seconds": 12.0}
    manifest["solver_agreement"] = {s: agreement for s in manifest["scenarios"]}
    (path / "manifest.json").write_text(json.dumps(manifest))
    proof = story.evidence(manifest, "fixed")
    assert proof["kind"] == "agreement" and "no retraining" in proof["label"]
    assert "Pearson 0.81" in proof["sentence"] and "57%" in proof["sentence"] and "61%" in proof["sentence"]
    at = app(monkeypatch, tmp_path)
    shown = [i.value for i in at.info]
    assert any("solver agreement only" in v and "ekfac" in v and "pcg" in v and "Pearson 0.81" in v for v in shown)
    assert "overview_scatter" not in figs(at)
    at.switch_page("pages_/validation.py").run()
    assert any("solver agreement only" in i.value for i in at.info)
    # the other kinds, from the same helper
    assert story.evidence({}, "fixed")["kind"] == "none"
    failed = {"solver_agreement": {"fixed": {"solver": "ekfac", "reference": "pcg", "error": "pcg: did not converge"}}}
    assert story.evidence(failed, "fixed")["kind"] == "none" and "did not converge" in story.evidence(failed, "fixed")["sentence"]
    validated = {"validation": {"fixed": {"pearson": 0.9, "spearman": 0.8, "slope": 1.0, "n_pairs": 24}}}
    assert story.evidence(validated, "fixed")["kind"] == "retraining"
