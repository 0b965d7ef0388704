"""Overview: one run's story for someone who has never heard of influence functions."""

from __future__ import annotations

import streamlit as st

from explorer import charts, components as ui, data, render, slices, state, story
from explorer.state import SEL_PRETRAIN, SEL_TEST

ctx = state.context()
run, key, scenario = ctx.run, ctx.key, ctx.scenario
m = run.manifest
pre_names, fin_names = m.get("pretrain_class_names", []), m.get("finetune_class_names", [])
what = "images" if ctx.is_image else "articles"


def _open(page: str, sel: str | None = None, value: int | None = None) -> None:
    if sel is not None:
        state.select(sel, int(value))
    st.switch_page(page)


def _gallery(which: str, per_class: int) -> None:
    rows = slices.class_examples(key, which, per_class)
    if ctx.is_image:
        src = "pretrain" if which == "pretrain" else "test"
        cols = st.columns(min(len(rows), 10), gap="small")
        for col, r in zip(cols * 2, rows.itertuples()):
            with col:
                st.image(data.image_png(key, src, int(r.id), 64, render.NEUTRAL), width=56)
                ui.md(f'<div class="mi-gallery-cap">{render.html.escape(str(r.label_name))}</div>')
    else:      # one line per article: its topic and headline
        ui.md("<ul class='mi-headlines'>" + "".join(
            f"<li><b>{render.html.escape(str(r.label_name))}</b> · "
            f"{render.html.escape(str(r.text).splitlines()[0][:110] if str(r.text) else '')}</li>"
            for r in rows.itertuples()) + "</ul>")


st.markdown(f"## What run `{run.name}` shows")
st.markdown(
    f"A small network was first **pretrained** on one task, then the part that turns {what} into features "
    f"(the *embedding*) was reused and a new output layer was **finetuned** on a second task. For each test "
    f"point of the second task, this explorer answers: **which pretraining {what} made its prediction better, "
    f"and which made it worse?** Each pretraining example gets a *score*: the predicted change of that test "
    f"point's loss if the example were removed and both stages retrained (> 0 helpful, < 0 harmful)."
)

# --- the two tasks -------------------------------------------------------------------------------------
c_pre, c_fin = st.columns(2, gap="large")
with c_pre:
    st.markdown(f"#### 1 · Pretraining: {', '.join(map(str, pre_names))}")
    st.caption(f"{run.n_pretrain:,} labelled {what}; pretraining accuracy "
               f"{render.format_fraction(m.get('pretrain_accuracy'))}."
               + (f" {m['label_noise']['n_flipped']} labels were deliberately {story.FLIPPED_WORD} (label noise)."
                  if m.get("label_noise") else ""))
    _gallery("pretrain", 1 if len(pre_names) > 5 else 2)
with c_fin:
    st.markdown(f"#### 2 · Finetuning: {', '.join(map(str, fin_names))}")
    st.caption(f"{int(m.get('n_finetune_test', 0)):,} test {what}, {len(run.test_points)} of them scored. "
               + story.accuracy_sentence(m))
    _gallery("test", 1 if len(fin_names) > 5 else 2)

# --- the headline --------------------------------------------------------------------------------------
st.divider()
st.markdown("#### 3 · Do the scores predict what retraining actually does?")
head = story.headline(m, scenario)
pairs = data.pairs(key, scenario)
if head is None or pairs is None or pairs.empty:
    proof = story.evidence(m, scenario)
    st.info(f"**{proof['label']}.** {proof['sentence']}")
else:
    c_fig, c_text = st.columns([3, 2], gap="large")
    with c_fig:
        st.plotly_chart(charts.validation_scatter(pairs, stats=head), key="overview_scatter",
                        config={"displayModeBar": False})
    with c_text:
        ui.md(f'<div class="mi-answer">{render.html.escape(head["verdict"])}</div>')
        st.markdown(head["sentence"])
        st.caption("Each dot is one pretraining example that was actually removed before retraining both "
                   "stages: x is the score (predicted), y the change that retraining produced. On the dashed "
                   f"line the prediction is exact. {charts.PAPER_NOTE}")
        if st.button("See the evidence per test point →", key="ov_to_validation"):
            _open("pages_/validation.py")

# --- examples that matter most -------------------------------------------------------------------------
st.divider()
st.markdown(f"#### 4 · The pretraining {what} that matter most")
st.caption(f"Largest average |score| over all {len(run.test_points)} scored test points ('{scenario}' scenario); "
           "net > 0: helps on average.")
top = slices.influential(key, scenario, 6)
cols = st.columns(len(top), gap="small") if ctx.is_image else [st.container() for _ in range(len(top))]
for col, r in zip(cols, top.itertuples()):
    with col:
        kind = render.kind_of_score(r.net)
        lines = [f"net {render.format_score(r.net)}", f"id {r.pretrain_id} · label {r.label_name}",
                 f"helps {r.n_helped} · hurts {r.n_hurt}"]
        flag = story.FLIPPED_WORD if getattr(r, "flipped", False) else None
        if ctx.is_image:
            st.image(data.image_png(key, "pretrain", int(r.pretrain_id), 96, render.KIND_COLORS.get(kind)), width=96)
            ui.md(render.caption_html(lines, kind=kind, flag=flag))
        else:
            ui.md(render.text_card_html(str(r.text), title=" · ".join(lines), kind=kind, max_chars=160,
                                        badges=[f"⚑ {flag}"] if flag else ()))
        if st.button(f"Open #{r.pretrain_id}", key=f"ov_pre_{r.pretrain_id}", help="Open on the Pretraining example page"):
            _open("pages_/pretrain_example.py", SEL_PRETRAIN, r.pretrain_id)
if "flipped" in top and top["flipped"].any():
    st.caption(story.FLIPPED_EXPLAINED)

# --- one mistake, traced back --------------------------------------------------------------------------
st.divider()
st.markdown("#### 5 · One mistake, traced back")
mistake = story.traced_mistake(run.test_table(), run.test_points, run.validation_test_points, scenario)
if mistake is None:
    st.info(f"Every scored test point is classified correctly in the '{scenario}' scenario.")
else:
    info = data.test_info(key, scenario, mistake)
    ranking = data.ranking(key, scenario, mistake, 4)
    harmful = ranking[ranking["side"] == "harmful"]
    c_test, c_harm = st.columns([1, 3] if ctx.is_image else [2, 3], gap="large")
    with c_test:
        ui.big_test_example(ctx, info, size=128)
        st.markdown(f"Test point **#{mistake}** is a **{info['label_name']}**, but the finetuned model says "
                    f"**{info['pred_name']}**.")
        if st.button(f"Open test point #{mistake} →", key="ov_to_test"):
            _open("pages_/test_point.py", SEL_TEST, mistake)
    with c_harm:
        st.markdown(f"The pretraining {what} that hurt it most (removing them would lower its loss):")
        ui.examples(ctx, harmful, "harmful", info["text"], per_row=6)
