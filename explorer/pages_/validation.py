"""Validation: predicted score against the actual loss change after removing and retraining."""

from __future__ import annotations

import functools

import pandas as pd
import streamlit as st

from precompute.metrics import fit_summary
from explorer import charts, components as ui, data, render, state, story
from explorer.state import SEL_TEST

ctx = state.context()
run, key, scenario = ctx.run, ctx.key, ctx.scenario
m = run.manifest

st.markdown("## Do the scores predict actual retraining?")
st.markdown(
    "Each dot is one pretraining example that was **actually removed**, after which both stages were "
    "retrained. Its x position is the predicted loss change (the score), its y position the loss change "
    "that retraining produced. Dots on the dashed line y = x are predicted perfectly."
)

all_pairs = data.pairs(key, scenario)
if all_pairs is not None and not (set(int(t) for t in all_pairs["test_id"]) & set(run.test_points)):
    all_pairs = None  # pairs for test points that were not scored cannot be shown
if all_pairs is None or all_pairs.empty:
    proof = story.evidence(m, scenario)
    st.info(f"Run '{run.name}' has no retraining pairs to compare here. **{proof['label']}.** {proof['sentence']}"
            if proof["kind"] == "agreement" else
            f"Run '{run.name}' was made without validation by retraining (`--no-validate`), so there is nothing to "
            "compare here. Runs made with the default settings include it.")
else:
    with_pairs = set(int(t) for t in all_pairs["test_id"]) & set(run.test_points)
    val_tests = [t for t in run.validation_test_points if t in with_pairs] or sorted(with_pairs)
    if ctx.test_id not in val_tests:
        st.caption(f"Test point #{ctx.test_id} was not validated by retraining; showing a validated one.")
        st.session_state[SEL_TEST] = val_tests[0]
    overview = data.test_overview(key, scenario).set_index("test_id")

    def _label(t: int) -> str:
        r = overview.loc[int(t)]
        return f"#{int(t)} · true {r.true} · predicted {r.predicted} {'✓' if r.correct else '✗'}"

    c_sel, c_metrics = st.columns([2, 3], vertical_alignment="bottom")
    with c_sel:
        state.bind("w_val_test", SEL_TEST)
        st.selectbox(f"Validated test point ({len(val_tests)})", val_tests, key="w_val_test", format_func=_label,
                     on_change=state.copy_to_selection, args=("w_val_test", SEL_TEST))
    test_id = ctx.test_id
    overall = (m.get("validation") or {}).get(scenario) or fit_summary(all_pairs["predicted"], all_pairs["actual"])
    with c_metrics:
        cols = st.columns(4)
        cols[0].metric("Pearson (all)", charts.fmt_stat(overall.get("pearson")))
        cols[1].metric("Spearman (all)", charts.fmt_stat(overall.get("spearman")))
        cols[2].metric("Slope (all)", charts.fmt_stat(overall.get("slope")),
                       help="Least-squares slope of actual on predicted; 1 means the scale is right too.")
        cols[3].metric("Pairs (all)", f"{int(overall.get('n_pairs') or len(all_pairs)):,}")

    tp_pairs = data.pairs(key, scenario, test_id)
    # the manifest's figures count converged retrainings only; so do the charts' (the rest are hollow)
    tp_counted, all_counted = story.converged_pairs(tp_pairs), story.converged_pairs(all_pairs)
    tp_stats = fit_summary(tp_counted["predicted"], tp_counted["actual"])
    all_stats = fit_summary(all_counted["predicted"], all_counted["actual"])

    def _title(text: str, pairs: pd.DataFrame, counted: pd.DataFrame) -> str:
        hollow = len(pairs) - len(counted)
        why = story.hollow_reasons(pairs)
        return text + (f" ({hollow} hollow, not counted: {why or 'not converged'})" if hollow else "")

    def _pick_from_chart(chart_key: str) -> None:
        event = st.session_state.get(chart_key)
        points = (event or {}).get("selection", {}).get("points", []) if event else []
        for p in points:
            cd = p.get("customdata", p.get("custom_data"))
            if cd is not None:
                pid = int(cd[0] if isinstance(cd, (list, tuple)) else cd)
                st.session_state["sel_val_pick"] = pid
                if isinstance(cd, (list, tuple)) and len(cd) > 1 and int(cd[1]) in val_tests:
                    st.session_state[SEL_TEST] = int(cd[1])
                return

    plotted = tp_pairs.sort_values("predicted", ascending=False)
    options = list(dict.fromkeys(int(p) for p in plotted["pretrain_id"]))
    if st.session_state.get("sel_val_pick") not in options:
        st.session_state["sel_val_pick"] = options[0] if options else None
    by_id = plotted.drop_duplicates("pretrain_id").set_index("pretrain_id")

    c_one, c_all = st.columns(2, gap="large")
    with c_one:
        k1 = f"scatter_test_{scenario}_{test_id}"
        st.plotly_chart(
            charts.validation_scatter(tp_pairs, title=_title(f"Test point #{test_id}", tp_pairs, tp_counted), stats=tp_stats,
                                      highlight=st.session_state.get("sel_val_pick")),
            key=k1, on_select=functools.partial(_pick_from_chart, k1), selection_mode="points",
        )
    with c_all:
        k2 = f"scatter_all_{scenario}"
        st.plotly_chart(
            charts.validation_scatter(all_pairs, title=_title(f"All {len(val_tests)} validated test points",
                                                                all_pairs, all_counted),
                                      stats=all_stats),
            key=k2, on_select=functools.partial(_pick_from_chart, k2), selection_mode="points",
        )
    st.caption("Click a dot (or pick it below) to see that pretraining example.")

    # --- widget twin of the chart selection ------------------------------------------------------------
    if options:
        c_pick, c_show, c_facts = st.columns([2, 1, 2] if ctx.is_image else [2, 3, 2], gap="medium")
        with c_pick:
            state.bind("w_val_pick", "sel_val_pick")
            st.selectbox(
                f"Pretraining example plotted for test point #{test_id}", options, key="w_val_pick",
                format_func=lambda p: f"id {p} · {by_id.loc[p, 'kind']} · predicted "
                                      f"{render.format_score(by_id.loc[p, 'predicted'])}",
                on_change=state.copy_to_selection, args=("w_val_pick", "sel_val_pick"),
            )
            pid = int(st.session_state["sel_val_pick"])
            row = by_id.loc[pid]
            ui.facts([
                ("Kind", str(row["kind"])),
                ("Predicted", render.format_score(row["predicted"])),
                ("Actual", render.format_score(row["actual"])),
                ("Retraining converged", "yes" if bool(row["converged"]) else "NO"),
                ("Final gradient norm", f"{float(row['grad_norm']):.2e}"),
                *([("Smallest curvature (sign-faithful)", f"{float(row['eig_min']):.2e}")]
                  if "eig_min" in row and pd.notna(row["eig_min"]) else []),
                *([("Why not counted", str(row["reason"]))] if str(row.get("reason") or "") else []),
            ])
        info = data.pretrain_info(key, pid)
        with c_show:
            ui.big_pretrain_example(ctx, info, size=160, highlight_with=data.test_info(key, scenario, test_id)["text"])
        with c_facts:
            ui.facts([
                ("Pretraining id", str(pid)),
                ("Label", info["label_name"] + (f"  ⚑ flipped (true: {info.get('original_name')})" if info["flipped"] else "")),
                ("Pretraining loss", f"{info['pretrain_loss']:.4g}"),
                ("Source", info["source"]),
            ])
            if st.button("Open on the Pretraining example page", key="open_pretrain"):
                state.select(state.SEL_PRETRAIN, pid)
                st.switch_page("pages_/pretrain_example.py")

# --- group removal -------------------------------------------------------------------------------------
validated_run = bool(m.get("validation"))
group_all = data.group_curve(key, scenario)
if validated_run:
    st.divider()
    st.markdown("### Removing groups of examples")
if not validated_run:
    pass
elif (counts := data.group_counts(key, scenario))[0] == 0:
    st.info(f"Run '{run.name}' retrained no groups of examples (`--group-percents 5,10` adds them; quick "
            "fashion leaves them out because none converged at m = 300).")
elif group_all is None or group_all.empty:
    st.info(f"None of the {counts[0]} group removals of scenario '{scenario}' reached a certified minimum within "
            "the retraining cap, so there is no group figure (they are listed in validation/group.parquet).")
else:
    st.markdown(
        "Removing the top p% most helpful pretraining examples (by score) and retraining should raise the "
        "test loss; removing the most harmful should lower it; removing a random p% should do little."
        + (f" {counts[0] - counts[1]} of the {counts[0]} group removals did not converge and are left out."
           if counts[1] < counts[0] else "")
    )
    which = st.radio("Curves for", ["this test point", "average over validated test points"], horizontal=True,
                     key="group_which")
    g = data.group_curve(key, scenario, ctx.test_id) if which == "this test point" else group_all
    if g is None or g.empty:
        st.caption(f"No group-removal results for test point #{ctx.test_id}.")
    else:
        title = f"Test point #{ctx.test_id}" if which == "this test point" else "Average over validated test points"
        st.plotly_chart(charts.group_curves(g, title=title), key="group_curves")

# --- baselines ---------------------------------------------------------------------------------------------
if validated_run:
    st.divider()
    st.markdown("### Compared with baselines")
    c_bars, c_text = st.columns([3, 2], gap="large")
    with c_bars:
        st.plotly_chart(charts.baseline_bars(m.get("validation"), m.get("baselines")), key="baseline_bars")
    with c_text:
        st.markdown(
            "Spearman rank correlation between each method's predicted loss change and the actual loss "
            "change after retraining, per finetuning scenario (higher is better; 1 = perfect ranking)."
        )
        st.info(charts.PAPER_NOTE)
        if m.get("validation_protocol"):
            with st.expander("How the retraining was done"):
                st.markdown(m["validation_protocol"])
