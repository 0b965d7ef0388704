"""Data cleaning: rank pretraining examples by how suspicious their labels look, flag, export, evaluate.

Ranks by a stored signal of ``cleaning/signals.parquet`` (higher = more suspicious) or by the harm
to one finetune test point (−its score row). Deep links: ``?test=T`` ranks by the harm to test
point T when the session starts on it; ``?rank=SIGNAL`` (or ``?rank=test``) picks the ranking.
"""

from __future__ import annotations

import html

import pandas as pd
import streamlit as st

from explorer import charts, components as ui, data, render, state, story
from explorer.state import SEL_TEST

SEL_RANK = "sel_clean_rank"
FLAGS = "clean_flags"
RANK_BY_TEST = data.RANK_BY_TEST
PREFERRED = ("self_influence", "multi_stage_total_harm", "pretrain_loss")

ctx = state.context()
run, key, scenario = ctx.run, ctx.key, ctx.scenario
m = run.manifest
signals = data.cleaning_signal_names(key)
detection = {k: v for k, v in (m.get("mislabel_detection") or {}).items() if isinstance(v, dict)}
cleaning_info = m.get("cleaning") if isinstance(m.get("cleaning"), dict) else {}
options = signals + [RANK_BY_TEST]


def _flags() -> set[int]:
    """Flagged pretraining ids of this run (kept in st.session_state across pages and reruns)."""
    return st.session_state.setdefault(FLAGS, {}).setdefault(run.name, set())


def _toggle(pid: int) -> None:
    (_flags().add if st.session_state[f"flag_{pid}"] else _flags().discard)(pid)


def _flag_all(ids: list[int]) -> None:
    _flags().update(int(i) for i in ids)


def _initial_rank() -> str:
    asked = st.query_params.get("rank")
    if asked in options:
        return asked
    if asked in ("harm", "harmful") or state.link_value("test") is not None:
        return RANK_BY_TEST
    ranked = sorted((s for s in signals if "auc" in detection.get(s, {})),
                    key=lambda s: -(detection[s].get("recall_top_20") or 0))
    return next(iter(ranked), None) or next((s for s in PREFERRED if s in signals), options[0])


def _rank_label(option: str) -> str:
    if option == RANK_BY_TEST:
        return "harm to one finetune test point (−its score)"
    auc = detection.get(option, {}).get("auc")
    return charts.method_label(option) + (f"  (AUC {auc:.2f})" if isinstance(auc, (int, float)) else "")


st.markdown("## Which pretraining labels look wrong?")
st.markdown(
    "Pretraining examples ranked from most to least suspicious. Flag the ones whose label is wrong and "
    "export them. Every signal is oriented so that **higher = more suspicious**; *suggested* is the label "
    + ("models trained without the example predict (cleanlab's out-of-fold probabilities)." if signals else
       "the pretraining model predicts for the example.")
)


def _switch_run(name: str) -> None:
    st.session_state["w_run"] = name
    state.on_run_change()


if not signals:
    sibling = story.noisy_sibling(run.name, state.list_runs(ctx.root), m)
    if sibling:
        st.info(f"Run '{run.name}' has no cleaning data, so only the harm to single test points can rank examples "
                f"here. Its sibling '{sibling}' was made with {story.FLIPPED_WORD} labels and the cleaning step.")
        st.button(f"Open '{sibling}' →", key="to_noisy_sibling", on_click=_switch_run, args=(sibling,),
                  type="primary")
    else:
        st.info(f"Run '{run.name}' has no cleaning data, so only the harm to single test points can rank examples "
                "here. Make a run with 10% of its pretraining labels flipped and the cleaning step with:")
        st.code(story.cleaning_command(m, run.name), language="bash")

if st.session_state.get(SEL_RANK) not in options:
    st.session_state[SEL_RANK] = _initial_rank()

# --- controls ----------------------------------------------------------------------------------
c_rank, c_test, c_k = st.columns([3, 3, 2], vertical_alignment="bottom")
with c_rank:
    state.bind("w_clean_rank", SEL_RANK)
    st.selectbox("Rank by", options, key="w_clean_rank", format_func=_rank_label,
                 on_change=state.copy_to_selection, args=("w_clean_rank", SEL_RANK))
rank_by = st.session_state[SEL_RANK]
test_id = ctx.test_id if rank_by == RANK_BY_TEST else None
with c_test:
    if rank_by == RANK_BY_TEST:
        overview = data.test_overview(key, scenario).set_index("test_id")
        order = sorted(run.test_points, key=lambda t: (bool(overview.loc[t, "correct"]), run.test_points.index(t)))
        state.bind("w_clean_test", SEL_TEST)
        st.selectbox(
            "Test point (misclassified first)", order, key="w_clean_test",
            format_func=lambda t: f"#{t} · true {overview.loc[t, 'true']} · predicted "
                                  f"{overview.loc[t, 'predicted']} {'✓' if overview.loc[t, 'correct'] else '✗'}",
            on_change=state.copy_to_selection, args=("w_clean_test", SEL_TEST))
        test_id = ctx.test_id
    elif cleaning_info.get("scenario") and rank_by.startswith("multi_stage"):
        st.caption(f"Multi-stage signals were computed for the '{cleaning_info['scenario']}' scenario, from "
                   f"{len(cleaning_info.get('suspect_test_ids') or [])} misclassified finetune test points.")
with c_k:
    k = st.slider("Suspects shown", min_value=6, max_value=96, value=24, step=6, key="clean_k")

ranked = data.suspects(key, rank_by, scenario, test_id, int(k))
if rank_by == RANK_BY_TEST:
    info = data.test_info(key, scenario, test_id)
    st.caption(f"Ranked by the predicted drop of test point #{test_id}'s loss if the example is removed "
               f"(true {info['label_name']}, predicted {info['pred_name']}, "
               f"{'correct' if info['correct'] else 'misclassified'}; scenario {scenario}).")
if len(ranked) and ranked["suggested_from"].iloc[0] == "in-sample":
    st.caption("Suggested labels are the pretraining model's in-sample predictions (the run has no "
               "out-of-sample ones).")

# --- gallery -----------------------------------------------------------------------------------
flags = _flags()
tab_gallery, tab_table = st.tabs(["Suspects", "Ranking table"])
with tab_gallery:
    records = ranked.to_dict("records")
    per_row = 6 if ctx.is_image else 2
    for start in range(0, len(records), per_row):
        cols = st.columns(per_row, gap="small")
        for col, r in zip(cols, records[start:start + per_row]):
            pid = int(r["pretrain_id"])
            truth = f"flipped (true {r['original_label_name']})" if r.get("flipped") else None
            head = f"#{r['rank']} · {render.format_score(r['suspicion'])}"
            with col:
                if ctx.is_image:
                    st.image(data.image_png(key, "pretrain", pid, ui.GRID_SIZE, render.HARMFUL), width="stretch")
                    ui.md(render.caption_html(
                        [head, f"id {pid} · given {r['label_name']}", f"suggested {r['suggested_name']}"],
                        kind="harmful", flag=truth))
                else:
                    badges = [f"given {r['label_name']}", f"suggested {r['suggested_name']}"]
                    ui.md(render.text_card_html(r.get("text", ""), title=f"{head} · id {pid}", kind="harmful",
                                                max_chars=280, badges=badges + (["⚑ " + truth] if truth else []),
                                                footer=r["source"]))
                st.session_state[f"flag_{pid}"] = pid in flags
                st.checkbox("flag", key=f"flag_{pid}", on_change=_toggle, args=(pid,))
with tab_table:
    shown = ranked.drop(columns=[c for c in ("text", "label", "suggested_label", "suggested_from") if c in ranked])
    if ctx.is_image:
        shown.insert(0, "image", [render.data_url(data.image_png(key, "pretrain", int(i), data.THUMB))
                                  for i in shown["pretrain_id"]])
    shown.insert(1, "flagged", shown["pretrain_id"].isin(flags))
    st.dataframe(shown, key="suspects_table", hide_index=True, width="stretch", column_config={
        "image": st.column_config.ImageColumn("image", width="small"),
        "pretrain_id": st.column_config.NumberColumn("pretraining id", format="%d"),
        "suspicion": st.column_config.NumberColumn("ranked by", format=render.SCORE_FORMAT),
        "label_name": st.column_config.TextColumn("given label"),
        "suggested_name": st.column_config.TextColumn("suggested label"),
        "original_label_name": st.column_config.TextColumn("true label (before noise)"),
        **{s: st.column_config.NumberColumn(charts.method_label(s), format=render.SCORE_FORMAT) for s in signals},
    })

# --- flagged examples and export -----------------------------------------------------------------
st.divider()
c_info, c_all, c_clear, c_dl = st.columns([3, 2, 2, 3], vertical_alignment="center")
c_info.markdown(f"**{len(flags)} flagged** example{'s' if len(flags) != 1 else ''} in run '{html.escape(run.name)}'")
c_all.button("Flag all shown", key="flag_all_shown", on_click=_flag_all, args=(ranked["pretrain_id"].tolist(),),
             width="stretch")
c_clear.button("Clear flags", key="clear_flags", on_click=flags.clear, width="stretch", disabled=not flags)
c_dl.download_button(
    "Download flagged (CSV)", key="download_flagged", mime="text/csv", on_click="ignore", disabled=not flags,
    data=data.flagged_csv(key, sorted(flags), rank_by, scenario, test_id) if flags else b"",
    file_name=f"{run.name}-flagged.csv", width="stretch",
    help="id, given and suggested label, source and every signal's score of each flagged example")

# --- evaluation against the injected noise ---------------------------------------------------------
curves = data.detection_curves(key)
if curves:
    st.markdown("### How quickly does each signal find the flipped labels?")
    flipped = run.pretrain_table()["flipped"].astype(bool)
    st.caption(f"The run flipped {int(flipped.sum()):,} of {run.n_pretrain:,} pretraining labels "
               f"({flipped.mean():.1%}). Inspecting examples in each signal's order, how many of them are found?")
    c_curve, c_table = st.columns([5, 4], gap="medium")
    with c_curve:
        st.plotly_chart(charts.detection_curves_figure(curves, float(flipped.mean())), key="detection_curves",
                        config={"displayModeBar": False})
    with c_table:
        metrics = pd.DataFrame({s: v for s, v in detection.items() if "auc" in v}).T
        if len(metrics):
            metrics.index = [charts.method_label(s) for s in metrics.index]
            labels = {c: ("AUC" if c == "auc" else c.replace("recall_top_", "top ") + "%") for c in metrics.columns}
            st.dataframe(metrics, key="detection_table", width="stretch", column_config={
                c: st.column_config.NumberColumn(label, format="%.2f", help=(
                    "P(a flipped example outranks a clean one)" if c == "auc"
                    else f"fraction of the flipped examples in the {label} most suspicious"))
                for c, label in labels.items()})
        for name, v in detection.items():
            if "base_rate" in v:
                share = next((x for k_, x in v.items() if k_.startswith("flipped_in_top")), None)
                if isinstance(share, (int, float)):
                    st.markdown(
                        f"Among the 20 most harmful pretraining examples of each of {v.get('n_test_points', '?')} "
                        f"misclassified test points, **{share:.0%}** are flipped (base rate {v['base_rate']:.0%}).")

retrained = data.cleaning_retrain(key, scenario)
if retrained is not None and len(retrained):
    st.markdown(f"### Clean and retrain ({scenario})")
    metric_names = {"test_accuracy": "finetune test accuracy", "test_loss": "finetune test loss",
                    "heldout_accuracy": "held-out test accuracy", "heldout_loss": "held-out test loss"}
    available = [c for c in metric_names if c in retrained and retrained[c].notna().any()]
    metric = st.radio("Measure", available, key="clean_metric", horizontal=True, format_func=metric_names.get)
    st.plotly_chart(charts.cleaning_retrain_figure(retrained, metric), key="cleaning_retrain",
                    config={"displayModeBar": False})
    st.caption(cleaning_info.get("protocol") or (
        "The top x% of each signal were removed and both stages retrained; 'random' removes x% at random, "
        "'oracle' exactly the flipped examples. Held-out: finetune test points not used to pick the suspects "
        "behind the multi-stage signals."))
    if "converged" in retrained and not retrained["converged"].all():
        st.caption(f"{int((~retrained['converged'].astype(bool)).sum())} of {len(retrained)} retrainings stopped "
                   "at the iteration cap before the gradient tolerance.")
