"""One finetune test point, the pretraining examples that helped or hurt it most and, for a validated
point, its predicted-vs-retrained scatter beside them.

Everything below the heading is one ``st.fragment``: switching test point reruns only this part (not
app.py's sidebar and navigation), and the fragment keeps the URL in step itself.
"""

from __future__ import annotations

import functools

import streamlit as st

from precompute.metrics import fit_summary
from explorer import charts, components as ui, data, render, slices, state, story
from explorer.state import SEL_PRETRAIN, SEL_TEST

PICK = "sel_tp_pick"      # the retrained example picked in the scatter (or in its widget twin)

ctx = state.context()
run, key, scenario = ctx.run, ctx.key, ctx.scenario
tests = run.test_points


def _step(delta: int) -> None:
    i = tests.index(st.session_state[SEL_TEST])
    st.session_state[SEL_TEST] = tests[(i + delta) % len(tests)]


def _from_gallery(widget_key: str) -> None:
    rows = st.session_state[widget_key].selection.rows
    if rows:
        st.session_state[SEL_TEST] = tests[rows[0]]


def _pick_from_chart(chart_key: str) -> None:
    """A click on a dot of the scatter picks that pretraining example."""
    event = st.session_state.get(chart_key)
    for p in ((event or {}).get("selection", {}).get("points", []) if event else []):
        cd = p.get("customdata", p.get("custom_data"))
        if cd is not None:
            st.session_state[PICK] = int(cd[0] if isinstance(cd, (list, tuple)) else cd)
            return


overview = data.test_overview(key, scenario)
labels = {
    int(r.test_id): f"#{int(r.test_id)} · true {r.true} · predicted {r.predicted} {'✓' if r.correct else '✗'}"
    for r in overview.itertuples()
}

st.markdown("## Which pretraining examples shaped this prediction?")
ui.score_legend()


def _picker() -> None:
    c_prev, c_sel, c_next, _ = st.columns([1.7, 5, 1.7, 1.2], vertical_alignment="bottom")
    with c_prev:
        st.button("◀ Previous", key="prev_test", on_click=_step, args=(-1,), width="stretch")
    with c_sel:
        state.bind("w_test", SEL_TEST)
        st.selectbox(f"Finetune test point ({len(tests)} scored; type to search)", tests, key="w_test",
                     format_func=lambda t: labels.get(int(t), f"#{t}"),
                     on_change=state.copy_to_selection, args=("w_test", SEL_TEST))
    with c_next:
        st.button("Next ▶", key="next_test", on_click=_step, args=(1,), width="stretch")


def _point(test_id: int, info: dict, helpful, harmful) -> None:
    c_img, c_facts, c_hist = st.columns([2, 3, 5] if ctx.is_image else [5, 3, 4], gap="medium")
    with c_img:
        ui.big_test_example(ctx, info)
    with c_facts:
        st.markdown(f"### Test point #{test_id}")
        ui.md(ui.verdict_html(info["correct"]))
        ui.facts([("True label", info["label_name"]), ("Predicted", info["pred_name"]),
                  ("Test loss", render.format_number(info["loss"], 4)), ("Scenario", scenario),
                  ("Source", info["source"])])
        if not info["correct"]:
            if st.button("Check labels →", key="to_cleaning",
                         help="Open the Data cleaning page, pretraining examples ranked by their harm to this "
                              "test point, to check whether wrong labels are behind this error"):
                st.session_state["sel_clean_rank"] = "test"
                st.switch_page("pages_/data_cleaning.py")
        summary = data.score_summary(key, scenario, test_id)
        st.caption(f"{summary['n_helpful']:,} of {summary['n']:,} pretraining examples have a positive score "
                   f"(helpful), {summary['n_harmful']:,} a negative one (harmful).")
    with c_hist:
        edges, counts = data.score_histogram(key, scenario, test_id)
        fig = charts.score_histogram(
            edges, counts,
            helpful_cut=float(helpful["score"].min()) if len(helpful) else None,
            harmful_cut=float(harmful["score"].max()) if len(harmful) else None)
        st.markdown("**Scores of all pretraining examples for this test point**")
        st.plotly_chart(fig, key="score_hist", config={"displayModeBar": False})


def _scatter(test_id: int, evidence) -> None:
    """The test point's own predicted-vs-retrained scatter, its widget twin and the picked example."""
    ui.section_header("Checked by retraining", "neutral",
                      "Each dot: one example actually removed, both stages retrained; dashed line = "
                      "perfect prediction. Blue helpful, orange harmful, grey random; hollow: the "
                      "retraining did not converge and is not counted.")
    # the same pairs as the manifest's figures: a retraining that missed the tolerance is not counted
    counted = story.converged_pairs(evidence)
    stats = fit_summary(counted["predicted"], counted["actual"])
    left_out = len(evidence) - len(counted)
    options = list(dict.fromkeys(int(p) for p in evidence.sort_values("predicted", ascending=False)["pretrain_id"]))
    if st.session_state.get(PICK) not in options:
        st.session_state[PICK] = options[0]
    chart_key = f"tp_scatter_{scenario}_{test_id}"
    fig = charts.validation_scatter(evidence.assign(test_id=test_id), highlight=st.session_state[PICK],
                                    title=f"Pearson {charts.fmt_stat(stats['pearson'])} · {stats['n_pairs']} removals"
                                    + (f" (+{left_out} hollow)" if left_out else ""))
    fig.update_layout(height=360, showlegend=False, margin=dict(t=40, b=10), title_font_size=14)
    st.plotly_chart(fig, key=chart_key, on_select=functools.partial(_pick_from_chart, chart_key),
                    selection_mode="points", config={"displayModeBar": False})
    by_id = evidence.drop_duplicates("pretrain_id").set_index("pretrain_id")
    state.bind("w_tp_pick", PICK)
    st.selectbox("Click a dot, or pick a retrained example", options, key="w_tp_pick",
                 format_func=lambda p: f"id {p} · {by_id.loc[p, 'kind']} · predicted "
                                       f"{render.format_score(by_id.loc[p, 'predicted'])} · actual "
                                       f"{render.format_score(by_id.loc[p, 'actual'])}",
                 on_change=state.copy_to_selection, args=("w_tp_pick", PICK))
    pid = int(st.session_state[PICK])
    row = by_id.loc[pid]
    c_img, c_txt = st.columns([1, 2], gap="small")
    with c_img:
        if ctx.is_image:
            st.image(data.image_png(key, "pretrain", pid, 96, render.KIND_COLORS.get(str(row["kind"]))), width=96)
    with c_txt:
        info = data.pretrain_info(key, pid)
        ui.facts([("Example", f"#{pid} ({row['kind']}), label {info['label_name']}"),
                  ("Predicted", render.format_score(row["predicted"])),
                  ("Actual", render.format_score(row["actual"]))])
        if st.button("Open this example →", key="tp_open_pick"):
            state.select(SEL_PRETRAIN, pid)
            st.switch_page("pages_/pretrain_example.py")


def _examples(test_id: int, info: dict, ranking, helpful, harmful) -> None:
    evidence = slices.evidence(key, scenario, test_id)
    marks = story.retrained_marks(ranking, evidence)
    validated = not evidence.empty
    if validated:
        c_help, c_harm, c_scatter = st.columns([4, 4, 4], gap="medium")
        per_row = 3
    else:
        c_help, c_harm = st.columns(2, gap="large")
        per_row = 4
    with c_help:
        ui.section_header("Most helpful", "helpful", "Removing one would raise this test point's loss (score > 0).")
        with st.container(key="helpful_examples"):
            ui.examples(ctx, helpful, "helpful", info["text"], per_row=per_row, retrained=marks)
    with c_harm:
        ui.section_header("Most harmful", "harmful", "Removing one would lower this test point's loss (score < 0).")
        with st.container(key="harmful_examples"):
            ui.examples(ctx, harmful, "harmful", info["text"], per_row=per_row, retrained=marks)
    if validated:
        with c_scatter, st.container(key="tp_evidence"):
            _scatter(test_id, evidence)
    notes = []
    if marks:
        notes.append("↻ = this example was actually removed and both stages retrained; the figure is the actual "
                     "change of the test loss (compare with its score, the predicted change).")
    if not validated:
        notes.append(f"Test point #{test_id} was not checked by retraining (this run validated "
                     f"{len(run.validation_test_points)} test points); its scores are predictions only.")
    if "flipped" in helpful and helpful["flipped"].any():
        notes.append(story.FLIPPED_EXPLAINED)
    for n in notes:
        st.caption(n)


def _tables(test_id: int, ranking) -> None:
    # lazy tabs: only the open tab's content runs (and is sent) on a rerun
    tab_table, tab_gallery = st.tabs(["Ranking table", f"All {len(tests)} scored test points"], key="tp_tabs",
                                     on_change="rerun")
    if tab_table.open is not False:          # None where lazy tabs are not supported: draw both
        with tab_table:
            _ranking_table(test_id, ranking)
    if tab_gallery.open is not False:
        with tab_gallery:
            _gallery()


def _ranking_table(test_id: int, ranking) -> None:
    shown = ranking.drop(columns=[c for c in ("text",) if c in ranking]).copy()
    if "text" in ranking:      # (images are in the grids above; a table of images costs a click ~0.2 s)
        shown["text"] = ranking["text"].str.slice(0, 160)
    st.dataframe(
        shown, key="ranking_table", hide_index=True, width="stretch",
        column_config={
            "image": st.column_config.ImageColumn("image", width="small"),
            "side": st.column_config.TextColumn("side", help="helpful: score > 0; harmful: score < 0"),
            "pretrain_id": st.column_config.NumberColumn("pretraining id", format="%d"),
            "score": st.column_config.NumberColumn("score", format=render.SCORE_FORMAT,
                                                   help="predicted change of the test loss if removed"),
            "label": None,
            "label_name": st.column_config.TextColumn("label"),
            "pretrain_loss": st.column_config.NumberColumn("pretraining loss", format="%.3f"),
            "flipped": st.column_config.CheckboxColumn(story.FLIPPED_WORD,
                                                       help="label changed by the run's label noise"),
            "original_label_name": st.column_config.TextColumn("true label (before flipping)"),
        },
    )
    st.download_button(
        "Download the full ranking (CSV)", data=lambda: data.full_ranking_csv(key, scenario, test_id),
        file_name=f"{run.name}-{scenario}-test{test_id}-ranking.csv", mime="text/csv", on_click="ignore",
        key="download_ranking",
        help=f"All {run.n_pretrain:,} pretraining examples ranked by score for this test point.")


def _gallery() -> None:
    st.caption("Click a row to open that test point. ✓ = the finetuned model classifies it correctly.")
    gallery = overview.copy()
    gallery["correct"] = gallery["correct"].map({True: "✓", False: "✗"})
    gkey = f"gallery_{scenario}"      # stable: the grid is not rebuilt when the test point changes
    st.dataframe(
        gallery, key=gkey, hide_index=True, width="stretch", height=min(38 * len(gallery) + 40, 520),
        on_select=functools.partial(_from_gallery, gkey), selection_mode="single-row",
        row_height=52 if ctx.is_image else None,
        column_config={
            "image": st.column_config.ImageColumn("image", width="small"),
            "test_id": st.column_config.NumberColumn("test point", format="%d"),
            "correct": st.column_config.TextColumn("✓/✗", width="small"),
            "loss": st.column_config.NumberColumn("test loss", format="%.4f"),
            "validated": st.column_config.CheckboxColumn("retrained", help="checked against actual retraining"),
        },
    )


@st.fragment
def body() -> None:
    """Everything that changes with the test point (a fragment: a switch reruns only this)."""
    _picker()
    test_id = ctx.test_id
    info = data.test_info(key, scenario, test_id)
    k = int(st.session_state.get("k_examples", 12))
    ranking = data.ranking(key, scenario, test_id, k)
    helpful, harmful = ranking[ranking["side"] == "helpful"], ranking[ranking["side"] == "harmful"]
    _point(test_id, info, helpful, harmful)
    st.slider("Examples per side", min_value=3, max_value=48, value=12, step=3, key="k_examples",
              help="How many of the most helpful and most harmful pretraining examples to show.")
    _examples(test_id, info, ranking, helpful, harmful)
    st.divider()
    _tables(test_id, ranking)
    state.sync_query_params()
    _prefetch(tests[(tests.index(test_id) + 1) % len(tests)], k)


def _prefetch(test_id: int, k: int) -> None:
    """Warm the caches for the test point "Next" opens (ranking, histogram, evidence and images),
    after this one is on screen: a click on Next then skips that work."""
    ranking = data.ranking(key, scenario, test_id, k)
    data.score_histogram(key, scenario, test_id)
    data.score_summary(key, scenario, test_id)
    slices.evidence(key, scenario, test_id)
    if ctx.is_image:
        data.image_png(key, "test", test_id, ui.BIG_SIZE, render.NEUTRAL)
        for pid, side in zip(ranking["pretrain_id"], ranking["side"]):
            data.image_png(key, "pretrain", int(pid), ui.GRID_SIZE, render.KIND_COLORS.get(side))


body()
