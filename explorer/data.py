"""Cached slices of a run, keyed by the run key (root, name, manifest mtime) and plain values.

Each function reads only what it needs: one score row (memory-mapped), the k rows of the tables
that are shown, the few images on screen. Results go through st.cache_data, so switching back to a
test point costs nothing.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import streamlit as st

from explorer import render
from explorer.state import RunKey, run_from_key
from precompute.contract import NON_SIGNAL_COLUMNS
from precompute.metrics import detection_curve

THUMB = 48


def _label_names(key: RunKey, which: str) -> list[str]:
    m = run_from_key(key).manifest
    return list(m["pretrain_class_names" if which == "pretrain" else "finetune_class_names"])


@st.cache_data(show_spinner=False, max_entries=256)
def ranking(key: RunKey, scenario: str, test_id: int, k: int) -> pd.DataFrame:
    """Top-k helpful then top-k harmful pretraining examples for one test point, with their metadata.

    Columns: side ("helpful"/"harmful"), rank (1 = strongest), pretrain_id, score, label, label_name,
    source, pretrain_loss [, flipped, original_label_name] [, text].
    """
    run = run_from_key(key)
    h_ids, h_sc, x_ids, x_sc = run.top_k(scenario, test_id, k)
    table = run.pretrain_table()
    names = _label_names(key, "pretrain")
    frames = []
    for side, ids, sc in (("helpful", h_ids, h_sc), ("harmful", x_ids, x_sc)):
        rows = table.iloc[ids]
        df = pd.DataFrame({
            "side": side,
            "rank": np.arange(1, len(ids) + 1),
            "pretrain_id": ids.astype(np.int64),
            "score": sc.astype(np.float64),
            "label": rows["label"].to_numpy(),
            "label_name": rows["label_name"].astype(str).to_numpy(),
            "source": rows["source"].astype(str).to_numpy(),
            "pretrain_loss": rows["pretrain_loss"].to_numpy(),
        })
        if "flipped" in rows:
            df["flipped"] = rows["flipped"].astype(bool).to_numpy()
            orig = rows["original_label"].to_numpy()
            df["original_label_name"] = [names[int(o)] if 0 <= int(o) < len(names) else str(o) for o in orig]
        if "text" in rows:
            df["text"] = rows["text"].astype(str).to_numpy()
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


@st.cache_data(show_spinner=False, max_entries=256)
def score_histogram(key: RunKey, scenario: str, test_id: int, bins: int = 60):
    from explorer.charts import histogram_counts

    return histogram_counts(run_from_key(key).score_row(scenario, test_id), bins)


@st.cache_data(show_spinner=False, max_entries=256)
def score_summary(key: RunKey, scenario: str, test_id: int) -> dict:
    row = run_from_key(key).score_row(scenario, test_id)
    return {
        "n": int(row.size),
        "n_helpful": int((row > 0).sum()),
        "n_harmful": int((row < 0).sum()),
        "sum": float(np.nansum(row, dtype=np.float64)),
        "max": float(np.nanmax(row)),
        "min": float(np.nanmin(row)),
    }


def full_ranking_csv(key: RunKey, scenario: str, test_id: int) -> bytes:
    """Every pretraining example ranked by score for one test point, as CSV (built on click only)."""
    run = run_from_key(key)
    row = run.score_row(scenario, test_id).astype(np.float64)
    order = np.argsort(-row, kind="stable")
    table = run.pretrain_table()
    cols = [c for c in ("label", "label_name", "source", "pretrain_loss", "flipped") if c in table]
    out = table.iloc[order][cols].reset_index(drop=True)
    out.insert(0, "score", row[order])
    out.insert(0, "pretrain_id", order)
    out.insert(0, "rank", np.arange(1, len(order) + 1))
    out.insert(0, "test_id", int(test_id))
    out.insert(1, "scenario", scenario)
    buf = io.StringIO()
    out.to_csv(buf, index=False)
    return buf.getvalue().encode("utf-8")


@st.cache_data(show_spinner=False, max_entries=4096)
def image_png(key: RunKey, which: str, idx: int, size: int = 96, border: str | None = None) -> bytes | None:
    """PNG of pretraining (which='pretrain') or finetune test (which='test') image ``idx``."""
    run = run_from_key(key)
    images = run.pretrain_images() if which == "pretrain" else run.test_images()
    if images is None:
        return None
    return render.png_bytes(np.asarray(images[int(idx)]), size=size, border=border)


@st.cache_data(show_spinner=False, max_entries=64)
def test_overview(key: RunKey, scenario: str) -> pd.DataFrame:
    """One row per scored test point: id, true/predicted label, correct, loss (+ thumbnail or text)."""
    run = run_from_key(key)
    t = run.test_table()
    names = _label_names(key, "finetune")
    rows = t.set_index("id").loc[run.test_points]
    df = pd.DataFrame({
        "test_id": np.asarray(run.test_points, np.int64),
        "true": rows["label_name"].astype(str).to_numpy(),
        "predicted": [names[int(p)] if 0 <= int(p) < len(names) else str(p) for p in rows[f"pred_{scenario}"]],
        "correct": rows[f"correct_{scenario}"].astype(bool).to_numpy(),
        "loss": rows[f"loss_{scenario}"].astype(float).to_numpy(),
        "validated": [t_ in set(run.validation_test_points) for t_ in run.test_points],
    })
    if run.modality == "image":
        df.insert(0, "image", [render.data_url(image_png(key, "test", int(i), THUMB)) for i in run.test_points])
    else:
        df["text"] = rows["text"].astype(str).str.slice(0, 160).to_numpy()
    return df


def test_info(key: RunKey, scenario: str, test_id: int) -> dict:
    """Labels, loss, correctness and source of one finetune test point."""
    run = run_from_key(key)
    t = run.test_table()
    r = t.iloc[int(test_id)]  # the contract: ids are 0..n-1 in row order
    names = _label_names(key, "finetune")
    pred = int(r[f"pred_{scenario}"])
    return {
        "test_id": int(test_id),
        "label": int(r["label"]),
        "label_name": str(r["label_name"]),
        "pred": pred,
        "pred_name": names[pred] if 0 <= pred < len(names) else str(pred),
        "loss": float(r[f"loss_{scenario}"]),
        "correct": bool(r[f"correct_{scenario}"]),
        "source": str(r["source"]),
        "text": str(r["text"]) if "text" in r else None,
    }


def pretrain_info(key: RunKey, pretrain_id: int) -> dict:
    run = run_from_key(key)
    t = run.pretrain_table()
    r = t.iloc[int(pretrain_id)]
    names = _label_names(key, "pretrain")
    pl = int(r["predicted_label"])
    info = {
        "pretrain_id": int(pretrain_id),
        "label": int(r["label"]),
        "label_name": str(r["label_name"]),
        "predicted_name": names[pl] if 0 <= pl < len(names) else str(pl),
        "pretrain_loss": float(r["pretrain_loss"]),
        "source": str(r["source"]),
        "text": str(r["text"]) if "text" in r else None,
        "flipped": bool(r["flipped"]) if "flipped" in r else False,
    }
    if "original_label" in r:
        o = int(r["original_label"])
        info["original_name"] = names[o] if 0 <= o < len(names) else str(o)
    return info


@st.cache_data(show_spinner=False, max_entries=256)
def column(key: RunKey, scenario: str, pretrain_id: int) -> pd.DataFrame:
    """One pretraining example's score for every scored test point (test_id, score), sorted high to low."""
    run = run_from_key(key)
    col = run.score_column(scenario, pretrain_id).astype(np.float64)
    df = pd.DataFrame({"test_id": np.asarray(run.test_points, np.int64), "score": col})
    return df.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)


@st.cache_data(show_spinner=False, max_entries=64)
def pairs(key: RunKey, scenario: str, test_id: int | None = None) -> pd.DataFrame | None:
    """Leave-one-out pairs of one scenario (and one test point), or None if the run has none."""
    p = run_from_key(key).pairs()
    if p is None:
        return None
    p = p[p["scenario"] == scenario]
    if test_id is not None:
        p = p[p["test_id"] == int(test_id)]
    return p.reset_index(drop=True)


@st.cache_data(show_spinner=False, max_entries=64)
def group_curve(key: RunKey, scenario: str, test_id: int | None = None) -> pd.DataFrame | None:
    """Group-removal rows (kind, percent, predicted, actual, accuracy_change) of the retrainings that converged
    (an unconverged one measures nothing); averaged over test points if ``test_id`` is None."""
    g = run_from_key(key).group()
    if g is None:
        return None
    g = g[g["scenario"] == scenario]
    if "converged" in g.columns:
        g = g[g["converged"].astype(bool)]
    if test_id is not None:
        g = g[g["test_id"] == int(test_id)]
    if g.empty:
        return g
    return (g.groupby(["kind", "percent"], as_index=False)[["predicted", "actual", "accuracy_change", "n_removed"]]
            .mean().sort_values(["kind", "percent"]))


@st.cache_data(show_spinner=False, max_entries=64)
def group_counts(key: RunKey, scenario: str) -> tuple[int, int]:
    """(group removals retrained in ``scenario``, how many of them converged); (0, 0) without a group table."""
    g = run_from_key(key).group()
    if g is None:
        return 0, 0
    g = g[g["scenario"] == scenario]
    converged = int(g["converged"].astype(bool).sum()) if "converged" in g.columns else len(g)
    return len(g), converged


@st.cache_data(show_spinner=False, max_entries=16)
def vocabulary(key: RunKey) -> frozenset[str] | None:
    v = run_from_key(key).vectorizer_vocabulary()
    return frozenset(w.lower() for w in v) if v is not None else None


# ------------------------------------------------------------------------------------------------
# data cleaning (cleaning/signals.parquet, cleaning/retrain.parquet)

RANK_BY_TEST = "test"  # rank_by value: harm to one test point (−its score row) instead of a stored signal


def cleaning_signal_names(key: RunKey) -> list[str]:
    """Float columns of cleaning/signals.parquet (higher = more suspicious); [] when the run has none."""
    sig = run_from_key(key).cleaning_signals()
    if sig is None:
        return []
    return [c for c in sig.columns if c not in NON_SIGNAL_COLUMNS and pd.api.types.is_float_dtype(sig[c])]


@st.cache_data(show_spinner=False, max_entries=64)
def suspects(key: RunKey, rank_by: str, scenario: str, test_id: int | None, k: int) -> pd.DataFrame:
    """The k most suspicious pretraining examples, most suspicious first.

    rank_by: a signal column, or RANK_BY_TEST (harm to ``test_id`` in ``scenario`` = −score).
    Columns: rank, pretrain_id, suspicion (the ranking value), label, label_name, suggested_label,
    suggested_name, suggested_from ("out-of-sample" | "in-sample"), source, every signal,
    test_harm (when ranked by a test point) [, flipped, original_label_name] [, text].
    """
    run = run_from_key(key)
    table = run.pretrain_table()
    names = _label_names(key, "pretrain")
    sig = run.cleaning_signals()
    if rank_by == RANK_BY_TEST:
        values = -run.score_row(scenario, int(test_id)).astype(np.float64)
    else:
        values = sig[rank_by].to_numpy(np.float64)
    values = np.where(np.isfinite(values), values, -np.inf)
    order = np.lexsort((np.arange(len(values)), -values))[: max(0, int(k))]
    rows = table.iloc[order]
    if sig is not None and "suggested_label" in sig:
        suggested, origin = sig["suggested_label"].to_numpy()[order], "out-of-sample"
    else:
        suggested, origin = rows["predicted_label"].to_numpy(), "in-sample"
    df = pd.DataFrame({
        "rank": np.arange(1, len(order) + 1),
        "pretrain_id": order.astype(np.int64),
        "suspicion": values[order],
        "label": rows["label"].to_numpy(),
        "label_name": rows["label_name"].astype(str).to_numpy(),
        "suggested_label": suggested.astype(np.int64),
        "suggested_name": [names[int(s)] if 0 <= int(s) < len(names) else str(s) for s in suggested],
        "suggested_from": origin,
        "source": rows["source"].astype(str).to_numpy(),
    })
    if sig is not None:
        for c in cleaning_signal_names(key):
            df[c] = sig[c].to_numpy(np.float64)[order]
    if rank_by == RANK_BY_TEST:
        df["test_harm"] = values[order]
    if "flipped" in rows:
        df["flipped"] = rows["flipped"].astype(bool).to_numpy()
        df["original_label_name"] = [names[int(o)] if 0 <= int(o) < len(names) else str(o)
                                     for o in rows["original_label"]]
    if "text" in rows:
        df["text"] = rows["text"].astype(str).to_numpy()
    return df


def flagged_csv(key: RunKey, ids: list[int], rank_by: str, scenario: str, test_id: int | None) -> bytes:
    """Flagged pretraining examples as CSV: id, given and suggested label, source, every signal score."""
    df = suspects(key, rank_by, scenario, test_id, run_from_key(key).n_pretrain)
    df = df[df["pretrain_id"].isin([int(i) for i in ids])].sort_values("pretrain_id")
    out = df.drop(columns=[c for c in ("rank", "suspicion", "text", "flipped", "original_label_name") if c in df])
    out = out.rename(columns={"pretrain_id": "id", "label": "given_label", "label_name": "given_label_name",
                              "suggested_name": "suggested_label_name"})
    buf = io.StringIO()
    out.to_csv(buf, index=False)
    return buf.getvalue().encode("utf-8")


@st.cache_data(show_spinner=False, max_entries=16)
def detection_curves(key: RunKey, points: int = 201) -> dict[str, tuple[list[float], list[float]]] | None:
    """{signal: (fraction inspected, fraction of flipped found)}; None without signals or ground truth."""
    run = run_from_key(key)
    sig, table = run.cleaning_signals(), run.pretrain_table()
    if sig is None or "flipped" not in table or not table["flipped"].any():
        return None
    flipped = table["flipped"].astype(bool).to_numpy()
    return {c: tuple(a.tolist() for a in detection_curve(sig[c].to_numpy(np.float64), flipped, points))
            for c in cleaning_signal_names(key)}


def cleaning_retrain(key: RunKey, scenario: str) -> pd.DataFrame | None:
    """Rows of cleaning/retrain.parquet for one scenario (None when the run has none)."""
    r = run_from_key(key).cleaning_retrain()
    if r is None:
        return None
    return r[r["scenario"] == scenario].reset_index(drop=True)
