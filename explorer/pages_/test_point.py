"""Landing page: one finetune test point and the pretraining examples that helped or hurt it most."""

from __future__ import annotations

import functools

import streamlit as st

from explorer import charts, components as ui, data, render, state
from explorer.state import SEL_TEST

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


overview = data.test_overview(key, scenario)
labels = {
    int(r.test_id): f"#{int(r.test_id)} · true {r.true} · predicted {r.predicted} {'✓' if r.correct else '✗'}"
    for r in overview.itertuples()
}

st.markdown("## Which pretraining examples shaped this prediction?")
ui.score_legend()

# --- test point picker -----------------------------------------------------------------------------
c_prev, c_sel, c_next, _ = st.columns([1.4, 5, 1.4, 2.2], vertical_alignment="bottom")
with c_prev:
    st.button("◀ Previous", key="prev_test", on_click=_step, args=(-1,), width="stretch")
with c_sel:
    state.bind("w_test", SEL_TEST)
    st.selectbox(
        f"Finetune test point ({len(tests)} scored; type to search)", tests, key="w_test",
        format_func=lambda t: labels.get(int(t), f"#{t}"),
        on_change=state.copy_to_selection, args=("w_test", SEL_TEST),
    )
with c_next:
    st.button("Next ▶", key="next_test", on_click=_step, args=(1,), width="stretch")

test_id = ctx.test_id
info = data.test_info(key, scenario, test_id)

# --- the test point --------------------------------------------------------------------------------
c_img, c_facts, c_hist = st.columns([2, 3, 5] if ctx.is_image else [5, 3, 4], gap="medium")
with c_img:
    ui.big_test_example(ctx, info)
with c_facts:
    st.markdown(f"### Test point #{test_id}")
    ui.md(ui.verdict_html(info["correct"]))
    ui.facts([
        ("True label", info["label_name"]),
        ("Predicted", info["pred_name"]),
        ("Test loss", f"{info['loss']:.4g}"),
        ("Scenario", scenario),
        ("Source", info["source"]),
    ])
    if not info["correct"]:
        if st.button("Find mislabeled pretraining examples behind this error →", key="to_cleaning",
                     help="Open the Data cleaning page ranked by the harm to this test point"):
            st.session_state["sel_clean_rank"] = "test"
            st.switch_page("pages_/data_cleaning.py")
    summary = data.score_summary(key, scenario, test_id)
    st.caption(
        f"{summary['n_helpful']:,} of {summary['n']:,} pretraining examples have a positive score "
        f"(helpful), {summary['n_harmful']:,} a negative one (harmful)."
    )
with c_hist:
    k = st.session_state.get("k_examples", 12)
    ranking = data.ranking(key, scenario, test_id, int(k))
    helpful = ranking[ranking["side"] == "helpful"]
    harmful = ranking[ranking["side"] == "harmful"]
    edges, counts = data.score_histogram(key, scenario, test_id)
    fig = charts.score_histogram(
        edges, counts,
        helpful_cut=float(helpful["score"].min()) if len(helpful) else None,
        harmful_cut=float(harmful["score"].max()) if len(harmful) else None,
    )
    st.markdown("**Scores of all pretraining examples for this test point**")
    st.plotly_chart(fig, key="score_hist", config={"displayModeBar": False})

st.slider("Examples per side", min_value=3, max_value=48, value=12, step=3, key="k_examples",
          help="How many of the most helpful and most harmful pretraining examples to show.")

# --- helpful / harmful ---------------------------------------------------------------------------
c_help, c_harm = st.columns(2, gap="large")
per_row = 4
with c_help:
    ui.section_header("Most helpful", "helpful",
                      "Removing one of these would raise this test point's loss (score > 0).")
    with st.container(key="helpful_examples"):
        ui.examples(ctx, helpful, "helpful", info["text"], per_row=per_row)
with c_harm:
    ui.section_header("Most harmful", "harmful",
                      "Removing one of these would lower this test point's loss (score < 0).")
    with st.container(key="harmful_examples"):
        ui.examples(ctx, harmful, "harmful", info["text"], per_row=per_row)

# --- table, download, gallery ----------------------------------------------------------------------
st.divider()
tab_table, tab_gallery = st.tabs(["Ranking table", f"All {len(tests)} scored test points"])
with tab_table:
    shown = ranking.drop(columns=[c for c in ("text",) if c in ranking]).copy()
    if ctx.is_image:
        shown.insert(0, "image", [render.data_url(data.image_png(key, "pretrain", int(i), data.THUMB))
                                  for i in shown["pretrain_id"]])
    elif "text" in ranking:
        shown["text"] = ranking["text"].str.slice(0, 160)
    st.dataframe(
        shown, key="ranking_table", hide_index=True, width="stretch",
        column_config={
            "image": st.column_config.ImageColumn("image", width="small"),
            "side": st.column_config.TextColumn("side", help="helpful: score > 0; harmful: score < 0"),
            "pretrain_id": st.column_config.NumberColumn("pretraining id", format="%d"),
            "score": st.column_config.NumberColumn("score", format="%.3e",
                                                   help="predicted change of the test loss if removed"),
            "label": None,
            "label_name": st.column_config.TextColumn("label"),
            "pretrain_loss": st.column_config.NumberColumn("pretraining loss", format="%.3f"),
            "original_label_name": st.column_config.TextColumn("true label (before noise)"),
        },
    )
    st.download_button(
        "Download the full ranking (CSV)",
        data=lambda: data.full_ranking_csv(key, scenario, test_id),
        file_name=f"{run.name}-{scenario}-test{test_id}-ranking.csv",
        mime="text/csv", on_click="ignore", key="download_ranking",
        help=f"All {run.n_pretrain:,} pretraining examples ranked by score for this test point.",
    )
with tab_gallery:
    st.caption("Click a row to open that test point. ✓ = the finetuned model classifies it correctly.")
    gallery = overview.copy()
    gallery["correct"] = gallery["correct"].map({True: "✓", False: "✗"})
    gkey = f"gallery_{scenario}_{test_id}"
    st.dataframe(
        gallery, key=gkey, hide_index=True, width="stretch", height=min(38 * len(gallery) + 40, 520),
        on_select=functools.partial(_from_gallery, gkey), selection_mode="single-row",
        selection_default={"selection": {"rows": [tests.index(test_id)]}},
        row_height=52 if ctx.is_image else None,
        column_config={
            "image": st.column_config.ImageColumn("image", width="small"),
            "test_id": st.column_config.NumberColumn("test point", format="%d"),
            "correct": st.column_config.TextColumn("✓/✗", width="small"),
            "loss": st.column_config.NumberColumn("test loss", format="%.4f"),
            "validated": st.column_config.CheckboxColumn("retrained", help="checked against actual retraining"),
        },
    )
