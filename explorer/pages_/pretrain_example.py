"""One pretraining example: what it is and which scored test points it helps and hurts most."""

from __future__ import annotations

import streamlit as st

from explorer import charts, components as ui, data, render, state
from explorer.state import SEL_PRETRAIN, SEL_TEST

ctx = state.context()
run, key, scenario = ctx.run, ctx.key, ctx.scenario


def _open_test(test_id: int) -> None:
    st.session_state[SEL_TEST] = int(test_id)


st.markdown("## Pretraining example")
st.markdown(
    "Pick a pretraining example to see which of the scored finetune test points it helps most "
    "(positive score: removing it would raise their loss) and hurts most (negative score)."
)

c_pick, c_jump = st.columns([2, 3], vertical_alignment="bottom")
with c_pick:
    state.bind("w_pretrain", SEL_PRETRAIN)
    st.number_input(f"Pretraining id (0 to {run.n_pretrain - 1:,})", min_value=0, max_value=run.n_pretrain - 1,
                    step=1, key="w_pretrain", on_change=state.copy_to_selection, args=("w_pretrain", SEL_PRETRAIN))
with c_jump:
    top = data.ranking(key, scenario, ctx.test_id, 1)
    b1, b2 = st.columns(2)
    h = top[top["side"] == "helpful"]
    x = top[top["side"] == "harmful"]
    if len(h):
        b1.button(f"Most helpful for test #{ctx.test_id} (id {int(h['pretrain_id'].iloc[0])})", key="jump_helpful",
                  on_click=state.select, args=(SEL_PRETRAIN, int(h["pretrain_id"].iloc[0])), width="stretch")
    if len(x):
        b2.button(f"Most harmful for test #{ctx.test_id} (id {int(x['pretrain_id'].iloc[0])})", key="jump_harmful",
                  on_click=state.select, args=(SEL_PRETRAIN, int(x["pretrain_id"].iloc[0])), width="stretch")

pid = ctx.pretrain_id
info = data.pretrain_info(key, pid)
test_info = data.test_info(key, scenario, ctx.test_id)

c_img, c_facts = st.columns([1, 3] if ctx.is_image else [3, 2], gap="medium")
with c_img:
    ui.big_pretrain_example(ctx, info, size=192, highlight_with=test_info["text"])
with c_facts:
    st.markdown(f"### Pretraining example #{pid}")
    if info["flipped"]:
        ui.md(f'<span class="mi-flag">⚑ label flipped by the run\'s label noise (true label: '
              f'{render.html.escape(str(info.get("original_name")))})</span>')
    ui.facts([
        ("Training label", info["label_name"]),
        ("Pretrained model predicts", info["predicted_name"]),
        ("Pretraining loss", f"{info['pretrain_loss']:.4g}"),
        ("Source", info["source"]),
    ])
    if not ctx.is_image:
        st.caption(f"Highlighted: words shared with the current test point #{ctx.test_id}.")

col = data.column(key, scenario, pid)
st.markdown(f"**Its score for each of the {len(col)} scored test points** (scenario '{scenario}')")
st.plotly_chart(charts.column_bars(col["test_id"], col["score"], highlight=ctx.test_id), key="column_bars",
                config={"displayModeBar": False})

n = min(6, len(col))
c_help, c_hurt = st.columns(2, gap="large")
for container, kind, rows, title, sub in (
    (c_help, "helpful", col[col["score"] > 0].head(n), "Helps most",
     "Test points whose loss would rise most without it (score > 0)."),
    (c_hurt, "harmful", col[col["score"] < 0].iloc[::-1].head(n), "Hurts most",
     "Test points whose loss would fall most without it (score < 0)."),
):
    with container:
        ui.section_header(title, kind, sub)
        if rows.empty:
            st.caption("None of the scored test points.")
        for r in rows.itertuples():
            t = data.test_info(key, scenario, int(r.test_id))
            head = (f"Test #{int(r.test_id)} · score {render.format_score(r.score)} · true {t['label_name']}"
                    f" · predicted {t['pred_name']} {'✓' if t['correct'] else '✗'}")
            if ctx.is_image:
                c1, c2 = st.columns([1, 4], vertical_alignment="center")
                with c1:
                    st.image(data.image_png(key, "test", int(r.test_id), 64, render.KIND_COLORS[kind]), width=64)
                with c2:
                    st.markdown(f"**{head}**")
                    clicked = st.button(f"Open test point #{int(r.test_id)} →", key=f"open_{kind}_{int(r.test_id)}",
                                        type="tertiary")
            else:
                words = render.shared_words(info["text"], t["text"], data.vocabulary(key))
                ui.md(render.text_card_html(t["text"] or "", title=head, kind=kind, words=words, max_chars=300))
                clicked = st.button(f"Open test point #{int(r.test_id)} →", key=f"open_{kind}_{int(r.test_id)}",
                                    type="tertiary")
            if clicked:
                _open_test(int(r.test_id))
                st.switch_page("pages_/test_point.py")
