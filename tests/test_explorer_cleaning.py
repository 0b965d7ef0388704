"""The Data cleaning page (explorer/pages_/data_cleaning.py), headless, on synthetic runs with cleaning files."""

from __future__ import annotations

import io
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

from explorer import charts, data, state  # noqa: E402
from precompute.metrics import detection_curve  # noqa: E402
from precompute.runstore import open_run  # noqa: E402
from run_factory import write_synthetic_run  # noqa: E402

APP = REPO / "explorer" / "app.py"
PAGE = "pages_/data_cleaning.py"
MARKER = "Which pretraining labels look wrong?"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("cleaning-runs")
    write_synthetic_run(root, "digits-noisy", modality="image", m=240, n_test=40, T=10, noisy=True, cleaning=True)
    write_synthetic_run(root, "news-noisy", modality="text", m=120, n_test=30, T=6, noisy=True, cleaning=True)
    write_synthetic_run(root, "plain", modality="image", m=80, n_test=20, T=5)
    return root, {"image": "digits-noisy", "text": "news-noisy", "plain": "plain"}


# AppTest shares Streamlit's caches across tests: start each test from empty caches.
pytestmark = pytest.mark.usefixtures("clear_streamlit_caches")


def open_page(monkeypatch, root: Path, rank: str | None = None, **query) -> AppTest:
    """A session opened with ``query`` in its URL, then on the Data cleaning page (with ``?rank=``).

    AppTest always starts on the default page, whose URL sync drops ``rank``; a browser opening
    /data-cleaning?rank=... runs the page with it, which setting it again before the switch mimics.
    """
    monkeypatch.setenv(state.RUNS_ENV, str(root))
    at = AppTest.from_file(str(APP), default_timeout=60)
    for k, v in query.items():
        at.query_params[k] = str(v)
    at.run()
    if rank is not None:
        at.query_params["rank"] = rank
    return at.switch_page(PAGE).run()


def texts(at: AppTest) -> str:
    parts = []
    for kind in ("markdown", "caption", "info", "error", "warning", "code"):
        parts += [str(e.value) for e in getattr(at, kind)]
    return "\n".join(parts)


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def shown_ids(at: AppTest) -> list[int]:
    """Pretraining ids of the suspects in screen order (image captions or text card titles)."""
    ids = []
    for e in at.markdown:
        v = str(e.value)
        if "mi-cap mi-cap-harmful" in v:
            ids += [int(i) for i in re.findall(r"id (\d+) · given", v)]
        elif "mi-card mi-harmful" in v:
            ids += [int(i) for i in re.findall(r"· id (\d+)<", v)]
    return ids


def table_with(at: AppTest, column: str) -> pd.DataFrame:
    """The first dataframe on the page that has ``column`` (AppTest does not expose dataframe keys)."""
    for df in at.dataframe:
        if column in df.value.columns:
            return df.value
    raise AssertionError(f"no table with a {column!r} column")


def figs(at: AppTest) -> dict[str, dict]:
    return {el.key: json.loads(el.proto.spec) for el in at.get("plotly_chart")}


def expected_order(values: np.ndarray, k: int) -> list[int]:
    return np.lexsort((np.arange(len(values)), -values))[:k].tolist()


@pytest.mark.parametrize("modality", ["image", "text"])
def test_page_ranks_by_the_chosen_signal(monkeypatch, runs, modality):
    root, names = runs
    run = open_run(root, names[modality])
    sig = run.cleaning_signals()
    at = open_page(monkeypatch, root, run=names[modality])
    assert_clean(at)
    assert MARKER in texts(at)
    k = at.slider(key="clean_k").value
    for signal in ("pretrain_loss", "multi_stage_harmfulness"):
        at.selectbox(key="w_clean_rank").select(signal).run()
        assert_clean(at)
        assert shown_ids(at) == expected_order(sig[signal].to_numpy(), k), signal
    table = table_with(at, "suspicion")
    assert list(table["pretrain_id"]) == expected_order(sig["multi_stage_harmfulness"].to_numpy(), k)
    names_ = run.manifest["pretrain_class_names"]
    first = int(table["pretrain_id"].iloc[0])
    assert table["suggested_name"].iloc[0] == names_[int(sig["suggested_label"][first])]
    assert table["label_name"].iloc[0] == run.pretrain_table()["label_name"][first]
    if modality == "image":
        assert len(at.image) == k
    assert len([c for c in at.checkbox if c.key.startswith("flag_")]) == k


def test_flags_persist_and_export(monkeypatch, runs):
    root, names = runs
    run = open_run(root, names["image"])
    at = open_page(monkeypatch, root, run=names["image"])
    ids = shown_ids(at)
    at.checkbox(key=f"flag_{ids[0]}").check().run()
    at.checkbox(key=f"flag_{ids[2]}").check().run()
    assert "2 flagged" in texts(at)
    assert not at.get("download_button")[0].proto.disabled
    # another page and back: the flags are still there
    at.switch_page("pages_/test_point.py").run()
    at.switch_page(PAGE).run()
    assert_clean(at)
    assert at.checkbox(key=f"flag_{ids[0]}").value and not at.checkbox(key=f"flag_{ids[1]}").value
    assert "2 flagged" in texts(at)
    at.checkbox(key=f"flag_{ids[0]}").uncheck().run()
    assert "1 flagged" in texts(at)
    # the export holds the flagged ids with given and suggested labels and every signal's score
    key = state.get_run(root, names["image"])[1]
    csv = pd.read_csv(io.BytesIO(data.flagged_csv(key, [ids[2], ids[5]], "self_influence", "fixed", None)))
    sig = run.cleaning_signals().set_index("id")
    assert sorted(csv["id"]) == sorted([ids[2], ids[5]])
    for col in ("given_label", "given_label_name", "suggested_label", "suggested_label_name", "self_influence",
                "cleanlab", "multi_stage_harmfulness"):
        assert col in csv, col
    row = csv.set_index("id").loc[ids[2]]
    assert row["self_influence"] == pytest.approx(sig.loc[ids[2], "self_influence"])
    assert row["suggested_label"] == sig.loc[ids[2], "suggested_label"]
    at.button(key="flag_all_shown").click().run()
    assert f"{at.slider(key='clean_k').value} flagged" in texts(at)
    at.button(key="clear_flags").click().run()
    assert "0 flagged" in texts(at)


def test_detection_curves_and_retrain_chart(monkeypatch, runs):
    root, names = runs
    run = open_run(root, names["image"])
    at = open_page(monkeypatch, root, run=names["image"])
    assert_clean(at)
    f = figs(at)
    sig, flipped = run.cleaning_signals(), run.pretrain_table()["flipped"].to_numpy()
    curves = {tr["meta"]["signal"]: tr for tr in f["detection_curves"]["data"] if tr["meta"]["kind"] == "signal"}
    assert set(curves) == set(data.cleaning_signal_names(state.get_run(root, names["image"])[1]))
    tr = curves["self_influence"]
    i = int(np.argmin(np.abs(np.array(tr["x"]) - 0.2)))
    k = int(round(tr["x"][i] * len(flipped)))
    top = expected_order(sig["self_influence"].to_numpy(), k)
    assert tr["y"][i] == pytest.approx(flipped[top].sum() / flipped.sum())
    assert "AUC" in at.selectbox(key="w_clean_rank").format_func("self_influence")
    assert table_with(at, "auc").shape[0] == len(curves)
    retrain = f["cleaning_retrain"]
    kinds = {t["meta"]["kind"] for t in retrain["data"]}
    assert kinds == {"signal", "oracle"}
    r = run.cleaning_retrain()
    r = r[(r.scenario == "fixed") & (r.signal == "margin")].sort_values("percent")
    line = next(t for t in retrain["data"] if t["meta"].get("signal") == "margin")
    assert line["y"][1:] == pytest.approx(r["test_accuracy"].tolist())
    at.radio(key="clean_metric").set_value("heldout_loss").run()
    assert_clean(at)


def test_run_without_cleaning_data_says_how_to_make_it(monkeypatch, runs):
    root, names = runs
    at = open_page(monkeypatch, root, run=names["plain"])
    assert_clean(at)
    assert "python -m precompute --preset digits --label-noise 0.1 --out runs/digits-noisy" in texts(at)
    assert at.selectbox(key="w_clean_rank").options == [at.selectbox(key="w_clean_rank").format_func("test")]


def test_one_click_from_a_misclassified_test_point(monkeypatch, runs):
    root, names = runs
    run = open_run(root, names["image"])
    tests = run.test_table().set_index("id")
    wrong = [t for t in run.test_points if not tests.loc[t, "correct_fixed"]]
    right = [t for t in run.test_points if tests.loc[t, "correct_fixed"]]
    monkeypatch.setenv(state.RUNS_ENV, str(root))
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.query_params["run"] = names["image"]
    at.run()
    at.switch_page("pages_/test_point.py").run()          # the app lands on the Overview
    at.selectbox(key="w_test").select(right[0]).run()
    assert not [b for b in at.button if b.key == "to_cleaning"], "only misclassified test points get the link"
    at.selectbox(key="w_test").select(wrong[0]).run()
    at.button(key="to_cleaning").click().run()
    assert_clean(at)
    assert MARKER in texts(at)
    assert at.selectbox(key="w_clean_rank").value == "test"
    assert at.selectbox(key="w_clean_test").value == wrong[0]
    k = at.slider(key="clean_k").value
    harmful = run.top_k("fixed", wrong[0], k)[2].tolist()
    assert shown_ids(at) == harmful
    table = table_with(at, "suspicion")
    assert table["test_harm"].tolist() == pytest.approx((-run.score_row("fixed", wrong[0])[harmful]).tolist())


def test_deep_links(monkeypatch, runs):
    root, names = runs
    run = open_run(root, names["text"])
    t = run.test_points[2]
    at = open_page(monkeypatch, root, run=names["text"], test=t)
    assert_clean(at)
    assert at.selectbox(key="w_clean_rank").value == "test" and at.selectbox(key="w_clean_test").value == t
    assert shown_ids(at)[:5] == run.top_k("fixed", t, 5)[2].tolist()
    at = open_page(monkeypatch, root, run=names["text"], test=t, rank="margin")
    assert at.selectbox(key="w_clean_rank").value == "margin"


def test_pure_chart_helpers():
    rng = np.random.default_rng(0)
    scores, pos = rng.standard_normal(500), rng.random(500) < 0.1
    x, y = detection_curve(scores, pos, points=11)
    assert x[0] == 0 and x[-1] == 1 and y[0] == 0 and y[-1] == 1 and np.all(np.diff(y) >= 0)
    top = expected_order(scores, 100)
    assert y[2] == pytest.approx(pos[top].sum() / pos.sum())
    fig = charts.detection_curves_figure({"a": (x, y)}, base_rate=0.1)
    assert [t.meta["kind"] for t in fig.data] == ["random", "oracle", "signal"]
    table = pd.DataFrame({"signal": ["none", "a", "a", "random", "oracle"], "percent": [0, 5, 10, 5, 10.2],
                          "n_removed": [0, 5, 10, 5, 10], "test_accuracy": [0.8, 0.82, 0.85, 0.79, 0.86]})
    fig = charts.cleaning_retrain_figure(table)
    lines = {t.meta.get("signal"): t for t in fig.data if t.meta["kind"] == "signal"}
    assert list(lines["a"].x) == [0.0, 5, 10] and list(lines["a"].y) == [0.8, 0.82, 0.85]
    assert lines["random"].line.dash == "dash"

