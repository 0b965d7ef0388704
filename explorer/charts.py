"""Plotly figure builders. Pure functions (no Streamlit); the statistics come from ``precompute.metrics``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from explorer.render import HARMFUL, HELPFUL, KIND_COLORS, KIND_LABELS, NEUTRAL, RANDOM

KIND_ORDER = ("helpful", "harmful", "random")
_FONT = dict(family="Source Sans, Source Sans Pro, sans-serif", size=14)
PAPER_NOTE = (
    "For context: Chen et al. (2020), “Multi-Stage Influence Function”, reported Pearson correlations "
    "of about 0.4–0.6 between predicted and actual loss changes."
)


def _layout(fig: go.Figure, *, height: int = 380, title: str | None = None, **kw) -> go.Figure:
    fig.update_layout(
        height=height,
        margin=dict(l=10, r=10, t=50 if title else 20, b=10),
        font=_FONT,
        title=dict(text=title, x=0, xanchor="left") if title else None,
        legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1),
        plot_bgcolor="white",
        **kw,
    )
    fig.update_xaxes(showgrid=True, gridcolor="#e6e6e6", zeroline=True, zerolinecolor="#bbbbbb")
    fig.update_yaxes(showgrid=True, gridcolor="#e6e6e6", zeroline=True, zerolinecolor="#bbbbbb")
    return fig


# ------------------------------------------------------------------------------------------------
# statistics


def fmt_stat(v) -> str:
    if v is None:
        return "n/a"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "n/a" if not math.isfinite(f) else f"{f:.2f}"


# ------------------------------------------------------------------------------------------------
# test-point page


def histogram_counts(scores: np.ndarray, bins: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Bin edges and counts of one score row (computed server-side: m can be 10^5 or more)."""
    s = np.asarray(scores, float)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return np.array([0.0, 1.0]), np.array([0])
    lo, hi = float(s.min()), float(s.max())
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    # make 0 a bin edge so bars are either helpful or harmful
    width = (hi - lo) / bins
    if lo < 0 < hi:
        n_neg = max(1, int(math.ceil(-lo / width)))
        n_pos = max(1, int(math.ceil(hi / width)))
        edges = np.concatenate([np.linspace(-n_neg * width, 0, n_neg + 1)[:-1], np.linspace(0, n_pos * width, n_pos + 1)])
    else:
        edges = np.linspace(lo, hi, bins + 1)
    counts, edges = np.histogram(s, bins=edges)
    return edges, counts


def score_histogram(
    edges: np.ndarray,
    counts: np.ndarray,
    *,
    helpful_cut: float | None = None,
    harmful_cut: float | None = None,
    log_y: bool = True,
) -> go.Figure:
    """Bar histogram of one test point's scores; bars right of 0 blue (helpful), left vermillion."""
    edges = np.asarray(edges, float)
    counts = np.asarray(counts)
    centers = (edges[:-1] + edges[1:]) / 2
    widths = np.diff(edges)
    colors = [HELPFUL if c > 0 else HARMFUL for c in centers]
    bar = dict(type="bar", x=centers.tolist(), y=counts.tolist(), width=widths.tolist(),
               marker=dict(color=colors, line=dict(width=0)),
               customdata=np.stack([edges[:-1], edges[1:]], axis=1).tolist(),
               hovertemplate="score %{customdata[0]:+.2e} to %{customdata[1]:+.2e}<br>%{y} examples<extra></extra>",
               name="pretraining examples")
    # The two labels sit on separate rows above the plot (harmful on top), so they never collide
    # whatever the width; each points away from the nearer edge of the axis, so none is cut off.
    lo, hi = float(edges[0]), float(edges[-1])
    shapes, notes = [], []
    for cut, color, text, row in ((harmful_cut, HARMFUL, "shown harmful", 1), (helpful_cut, HELPFUL, "shown helpful", 0)):
        if cut is not None and math.isfinite(cut):
            shapes.append(dict(type="line", x0=cut, x1=cut, xref="x", y0=0, y1=1, yref="paper",
                               line=dict(color=color, dash="dot")))
            right = (cut - lo) <= 0.5 * (hi - lo)
            notes.append(dict(x=cut, y=1.0, xref="x", yref="paper", yshift=2 + 18 * row, showarrow=False,
                              text=text, xanchor="left" if right else "right",
                              yanchor="bottom", font=dict(color=color, size=13), name=f"cut-{text.split()[1]}"))
    grid = dict(showgrid=True, gridcolor="#e6e6e6", zeroline=True, zerolinecolor="#bbbbbb")
    layout = dict(  # one dict, validated once (the figure is rebuilt on every test point switch)
        height=330, margin=dict(l=10, r=10, t=48, b=10), font=_FONT, showlegend=False, bargap=0,
        plot_bgcolor="white", shapes=shapes, annotations=notes,
        xaxis=dict(title=dict(text="score (predicted loss change if removed)"), **grid),
        yaxis=dict(title=dict(text="pretraining examples" + (" (log scale)" if log_y else "")),
                   type="log" if log_y else "linear", dtick=1 if log_y else None, **grid))
    return go.Figure(data=[bar], layout=layout)


# ------------------------------------------------------------------------------------------------
# validation page


def _symbols(part: pd.DataFrame, symbol: str) -> str | list[str]:
    """The kind's marker, hollow ("-open") for a retraining that did not converge (not in the figures)."""
    if "converged" not in part or bool(part["converged"].astype(bool).all()):
        return symbol
    return [symbol if bool(c) else f"{symbol}-open" for c in part["converged"]]


def validation_scatter(
    pairs: pd.DataFrame,
    *,
    title: str | None = None,
    stats: Mapping | None = None,
    highlight: int | None = None,
) -> go.Figure:
    """Predicted (x) against actual (y) loss change, one trace per kind, with the y = x line; rows
    with ``converged`` False are drawn hollow.

    Every point carries customdata [pretrain_id, test_id], so a selection maps back to examples.
    ``highlight``: a pretraining id to ring (an extra trace with meta kind "selected").
    """
    df = pairs
    traces = []
    if len(df):
        lo = float(min(df["predicted"].min(), df["actual"].min()))
        hi = float(max(df["predicted"].max(), df["actual"].max()))
        pad = 0.05 * (hi - lo if hi > lo else 1.0)
        traces.append(dict(type="scatter", x=[lo - pad, hi + pad], y=[lo - pad, hi + pad], mode="lines",
                           name="y = x (perfect prediction)", line=dict(color=NEUTRAL, dash="dash", width=1),
                           hoverinfo="skip"))
    symbols = {"helpful": "circle", "harmful": "diamond", "random": "square"}
    kinds = [k for k in KIND_ORDER if k in set(df["kind"])] + sorted(set(df["kind"]) - set(KIND_ORDER))
    for kind in kinds:
        part = df[df["kind"] == kind]
        traces.append(dict(
            type="scatter", x=part["predicted"].astype(float).tolist(), y=part["actual"].astype(float).tolist(),
            mode="markers", name=KIND_LABELS.get(kind, kind), legendgroup=kind,
            marker=dict(color=KIND_COLORS.get(kind, RANDOM), size=9, symbol=_symbols(part, symbols.get(kind, "circle")),
                        line=dict(width=0.5, color="white"), opacity=0.85),
            customdata=np.stack([part["pretrain_id"].astype(int), part["test_id"].astype(int)], axis=1).tolist()
            if len(part) else [],
            hovertemplate=("pretraining example %{customdata[0]}<br>test point %{customdata[1]}<br>"
                           "predicted %{x:+.2e}<br>actual %{y:+.2e}<extra>" + kind + "</extra>"),
            meta={"kind": kind}))
    if highlight is not None and len(df):
        sel = df[df["pretrain_id"] == int(highlight)]
        if len(sel):
            traces.append(dict(
                type="scatter", x=sel["predicted"].astype(float).tolist(), y=sel["actual"].astype(float).tolist(),
                mode="markers", name="picked", hoverinfo="skip", meta={"kind": "selected"},
                marker=dict(size=20, color="rgba(0,0,0,0)", line=dict(width=2.5, color="#000000"))))
    notes = []
    if stats:
        notes.append(dict(text=(f"Pearson {fmt_stat(stats.get('pearson'))} · Spearman {fmt_stat(stats.get('spearman'))}"
                                f" · slope {fmt_stat(stats.get('slope'))} · n = {stats.get('n_pairs', len(df))}"),
                          xref="paper", yref="paper", x=0, y=1.0, yanchor="bottom", showarrow=False,
                          font=dict(size=13, color="#333")))
    grid = dict(showgrid=True, gridcolor="#e6e6e6", zeroline=True, zerolinecolor="#bbbbbb")
    layout = dict(  # one dict, validated once (the Test point page rebuilds it on every switch)
        height=440, margin=dict(l=10, r=10, t=80 if title else 40, b=10), font=_FONT, plot_bgcolor="white",
        title=dict(text=title, x=0, xanchor="left") if title else None, annotations=notes,
        legend=dict(orientation="h", yanchor="top", y=-0.18, xanchor="left", x=0),
        xaxis=dict(title=dict(text="predicted loss change (score)"), **grid),
        yaxis=dict(title=dict(text="actual loss change after retraining"), **grid))
    return go.Figure(data=traces, layout=layout)


def group_curves(group: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Loss change against percent of pretraining data removed, per kind: actual solid, predicted dotted.

    ``group`` rows: kind, percent, predicted, actual (already averaged if several test points).
    """
    fig = go.Figure()
    for kind in [k for k in KIND_ORDER if k in set(group["kind"])]:
        part = group[group["kind"] == kind].sort_values("percent")
        color = KIND_COLORS[kind]
        fig.add_trace(go.Scatter(
            x=part["percent"], y=part["actual"], mode="lines+markers", name=f"remove top {kind}" if kind != "random" else "remove random",
            line=dict(color=color, width=3), marker=dict(size=8), legendgroup=kind,
            hovertemplate="%{x}% removed<br>actual %{y:.3g}<extra></extra>",
        ))
        fig.add_trace(go.Scatter(
            x=part["percent"], y=part["predicted"], mode="lines", name=f"{kind}: predicted",
            line=dict(color=color, width=1.5, dash="dot"), legendgroup=kind, showlegend=True,
            hovertemplate="%{x}% removed<br>predicted %{y:.3g}<extra></extra>",
        ))
    fig.update_xaxes(title_text="% of pretraining data removed", ticksuffix="%")
    fig.update_yaxes(title_text="test loss change")
    fig = _layout(fig, height=400, title=title)
    fig.update_layout(legend=dict(orientation="h", yanchor="top", y=-0.2, xanchor="left", x=0))
    return fig


METHOD_LABELS = {"single_stage_ekfac": "single stage (EK-FAC, as kronfluence)"}


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method.replace("_", " "))


def baseline_bars(validation: Mapping, baselines: Mapping, *, metric: str = "spearman") -> go.Figure:
    """Grouped bars: ``metric`` per scenario for multi-stage influence and every baseline."""
    rows = []
    for scenario, v in (validation or {}).items():
        rows.append(("multi-stage influence", scenario, (v or {}).get(metric)))
    for method, per in (baselines or {}).items():
        for scenario, v in (per or {}).items():
            rows.append((method_label(method), scenario, (v or {}).get(metric)))
    fig = go.Figure()
    methods = list(dict.fromkeys(r[0] for r in rows))
    # one colour per method: the first is the multi-stage score's, never reused by a baseline
    palette = [HELPFUL, "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#F0E442", RANDOM, "#882255", "#44AA99", "#117733"]
    for i, method in enumerate(methods):
        part = [r for r in rows if r[0] == method]
        ys = [float(r[2]) if r[2] is not None else None for r in part]
        fig.add_trace(go.Bar(
            x=[r[1] for r in part], y=ys, name=method, marker_color=palette[i] if i < len(palette) else
            palette[1 + (i - 1) % (len(palette) - 1)],
            text=[fmt_stat(y) for y in ys], textposition="outside",
            hovertemplate=method + "<br>%{x}: %{y:.3f}<extra></extra>",
        ))
    fig.update_xaxes(title_text="scenario")
    vals = [float(r[2]) for r in rows if r[2] is not None and math.isfinite(float(r[2]))]
    lo = min([0.0] + vals)
    fig.update_yaxes(title_text=f"{metric.capitalize()} with actual retraining",
                     range=[lo - 0.15 if lo < 0 else 0, 1.15])
    fig.update_traces(cliponaxis=False)
    fig = _layout(fig, height=380)
    fig.update_layout(barmode="group")
    return fig


# ------------------------------------------------------------------------------------------------
# pretraining-example page


def column_bars(test_ids: Sequence[int], scores: Sequence[float], *, highlight: int | None = None) -> go.Figure:
    """One pretraining example's score for every scored test point, sorted high to low."""
    ids = np.asarray(test_ids)
    s = np.asarray(scores, float)
    order = np.argsort(-s, kind="stable")
    ids, s = ids[order], s[order]
    colors = [HELPFUL if v > 0 else HARMFUL for v in s]
    line_w = [3 if (highlight is not None and int(t) == int(highlight)) else 0 for t in ids]
    fig = go.Figure(go.Bar(
        x=[f"#{int(t)}" for t in ids], y=s.tolist(), marker_color=colors,
        marker_line=dict(color="#000000", width=line_w),
        customdata=ids.astype(int).tolist(),
        hovertemplate="test point %{customdata}<br>score %{y:+.2e}<extra></extra>",
    ))
    fig.update_xaxes(title_text="scored test points (sorted)", type="category",
                     showticklabels=len(ids) <= 40)
    fig.update_yaxes(title_text="score")
    return _layout(fig, height=300, showlegend=False)


def timings_bars(timings: Mapping[str, float]) -> go.Figure:
    items = [(k, float(v)) for k, v in (timings or {}).items() if isinstance(v, (int, float))]
    fig = go.Figure(go.Bar(
        y=[k for k, _ in items], x=[v for _, v in items], orientation="h", marker_color=NEUTRAL,
        text=[f"{v:.2f} s" for _, v in items], textposition="auto",
        hovertemplate="%{y}: %{x:.3f} s<extra></extra>",
    ))
    fig.update_xaxes(title_text="seconds")
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, height=max(180, 40 * len(items) + 80), showlegend=False)


# ------------------------------------------------------------------------------------------------
# data-cleaning page

SIGNAL_COLORS = {
    "multi_stage_harmfulness": HARMFUL, "multi_stage_total_harm": "#CC79A7", "self_influence": HELPFUL,
    "pretrain_loss": "#009E73", "margin": "#E69F00", "cleanlab": "#56B4E9",
    "random": RANDOM, "oracle": "#000000", "none": NEUTRAL,
}
_EXTRA_COLORS = ("#F0E442", "#882255", "#44AA99", "#117733")


def signal_color(name: str, i: int = 0) -> str:
    return SIGNAL_COLORS.get(name, _EXTRA_COLORS[i % len(_EXTRA_COLORS)])


def detection_curves_figure(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                            base_rate: float | None = None) -> go.Figure:
    """Fraction of the flipped examples found against the fraction of the data inspected, per signal.

    Adds the random-inspection diagonal and, given the flipped base rate, the perfect ranking.
    """
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="random order", meta={"kind": "random"},
                             line=dict(color=RANDOM, dash="dash", width=1.5), hoverinfo="skip"))
    if base_rate and base_rate > 0:
        fig.add_trace(go.Scatter(x=[0, base_rate, 1], y=[0, 1, 1], mode="lines", name="perfect ranking",
                                 meta={"kind": "oracle"}, line=dict(color="#000000", dash="dot", width=1.5),
                                 hoverinfo="skip"))
    for i, (name, (x, y)) in enumerate(curves.items()):
        fig.add_trace(go.Scatter(
            x=list(x), y=list(y), mode="lines", name=method_label(name), meta={"kind": "signal", "signal": name},
            line=dict(color=signal_color(name, i), width=3 if name.startswith("multi_stage") else 2),
            hovertemplate=method_label(name) + "<br>%{x:.0%} inspected<br>%{y:.0%} of flipped found<extra></extra>",
        ))
    fig.update_xaxes(title_text="fraction of pretraining examples inspected (most suspicious first)",
                     tickformat=".0%", range=[0, 1])
    fig.update_yaxes(title_text="fraction of flipped labels found", tickformat=".0%", range=[0, 1.02])
    fig = _layout(fig, height=420)
    fig.update_layout(legend=dict(orientation="h", yanchor="top", y=-0.2, xanchor="left", x=0))
    return fig


def cleaning_retrain_figure(retrain: pd.DataFrame, metric: str = "test_accuracy") -> go.Figure:
    """``metric`` after removing the top x % of each signal and retraining, against x.

    ``retrain`` rows (one scenario): signal, percent, n_removed, <metric>. Signals and "random" are
    lines starting at the "none" value at 0 %; "none" is a dotted horizontal line; "oracle" (the
    truly flipped examples removed) a star at its percent with a dotted horizontal line.
    """
    fig = go.Figure()
    df = retrain.dropna(subset=[metric])
    none = df[df["signal"] == "none"]
    base = float(none[metric].iloc[0]) if len(none) else None
    is_acc = "accuracy" in metric
    fmt = ".1%" if is_acc else ".4f"
    if base is not None:
        fig.add_hline(y=base, line_dash="dot", line_color=NEUTRAL, annotation_text="nothing removed",
                      annotation_position="bottom right")
    oracle = df[df["signal"] == "oracle"]
    if len(oracle):
        fig.add_hline(y=float(oracle[metric].iloc[0]), line_dash="dot", line_color="#000000")
        fig.add_trace(go.Scatter(
            x=oracle["percent"].tolist(), y=oracle[metric].tolist(), mode="markers", name="oracle (flipped removed)",
            meta={"kind": "oracle"}, marker=dict(symbol="star", size=16, color="#000000"),
            customdata=oracle["n_removed"].tolist(),
            hovertemplate="oracle: %{customdata} flipped removed<br>%{y:" + fmt + "}<extra></extra>"))
    signals = [s for s in dict.fromkeys(df["signal"]) if s not in ("none", "oracle")]
    for i, name in enumerate(signals):
        part = df[df["signal"] == name].sort_values("percent")
        x, y, n = part["percent"].tolist(), part[metric].tolist(), part["n_removed"].tolist()
        if base is not None:
            x, y, n = [0.0] + x, [base] + y, [0] + n
        fig.add_trace(go.Scatter(
            x=x, y=y, mode="lines+markers", name=method_label(name), meta={"kind": "signal", "signal": name},
            customdata=n, line=dict(color=signal_color(name, i), width=3 if name.startswith("multi_stage") else 2,
                                    dash="dash" if name == "random" else "solid"),
            hovertemplate=method_label(name) + "<br>top %{x}% removed (%{customdata})<br>%{y:" + fmt
            + "}<extra></extra>"))
    fig.update_xaxes(title_text="% of pretraining data removed (most suspicious first)", ticksuffix="%")
    fig.update_yaxes(title_text=method_label(metric).replace("heldout", "held-out"),
                     tickformat=".0%" if is_acc else None)
    fig = _layout(fig, height=420)
    fig.update_layout(legend=dict(orientation="h", yanchor="top", y=-0.2, xanchor="left", x=0))
    return fig
