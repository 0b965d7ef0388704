"""Run: what was computed, how well, how fast, and what the score means."""

from __future__ import annotations

import streamlit as st

from explorer import charts, components as ui, readable, render, state
from precompute.contract import SCORE_DEFINITION

ctx = state.context()
run = ctx.run
m = run.manifest

st.markdown(f"## Run `{run.name}`")
st.caption(f"{run.path} · created {m.get('created', '?')} · format version {m.get('format_version')} · "
           f"computed on {m.get('device', '?')} in {m.get('dtype', '?')}, {m.get('world_size', 1)} process(es)")

st.markdown("### What the score means")
c_def, c_sign = st.columns([3, 2], gap="large")
with c_def:
    st.markdown(
        "For a finetune test point *x* and a pretraining example *z*, the **score** is the predicted change "
        "of *x*'s test loss if *z* were removed from the pretraining data and both stages (pretraining, then "
        "finetuning) were retrained. It is computed with the multi-stage influence function of Chen et al. "
        "(2020), without retraining; the Validation page compares it with actual retraining."
    )
    st.caption(f"Definition stored in the run: {m.get('score_definition') or SCORE_DEFINITION}")
with c_sign:
    ui.md(
        '<div class="mi-card mi-helpful"><div class="mi-card-title">score &gt; 0 · helpful</div>'
        '<div class="mi-card-text">Removing the example would <b>raise</b> the test loss: it helped.</div></div>'
        '<div class="mi-card mi-harmful"><div class="mi-card-title">score &lt; 0 · harmful</div>'
        '<div class="mi-card-text">Removing the example would <b>lower</b> the test loss: it hurt.</div></div>'
    )

st.markdown("### Data and accuracy")
cols = st.columns(4)
cols[0].metric("Preset", str(m.get("preset")))
cols[1].metric("Pretraining examples", f"{int(m['n_pretrain']):,}")
cols[2].metric("Finetune test points", f"{int(m['n_finetune_test']):,}", help=f"{len(run.test_points)} scored")
pa = m.get("pretrain_accuracy")
cols[3].metric("Pretraining accuracy", render.format_fraction(pa))
acc = m.get("finetune_accuracy") or {}
if acc:
    cols = st.columns(max(4, len(acc)))
    for c, (s, a) in zip(cols, acc.items()):
        c.metric(f"Finetune accuracy ({s})", render.format_fraction(a))
st.markdown(
    f"**Pretraining classes:** {', '.join(map(str, m.get('pretrain_class_names', [])))}  \n"
    f"**Finetuning classes:** {', '.join(map(str, m.get('finetune_class_names', [])))}"
)
if m.get("label_noise"):
    ln = m["label_noise"]
    st.warning(f"{ln.get('n_flipped')} pretraining labels ({render.format_fraction(ln.get('rate'))}) were "
               f"deliberately flipped to a wrong class (label noise, seed {ln.get('seed')}), to test the Data "
               "cleaning page. Flipped examples carry a ⚑ flipped flag.")
if m.get("mislabel_detection"):
    st.markdown("**Mislabel detection**: how well each signal ranks the flipped labels first")
    st.dataframe(readable.detection_table(m["mislabel_detection"]), hide_index=True, width="stretch")

st.markdown("### Do the scores predict retraining?")
if m.get("validation"):
    st.markdown("Correlation between each score (the predicted loss change) and the loss change measured by "
                "removing that pretraining example and retraining both stages; the Validation page shows the dots.")
    st.dataframe(readable.validation_table(m["validation"]), width="stretch")
    if m.get("group_removal"):
        st.markdown("**Removing groups** (the top p% by score at once, then retraining), mean change of the "
                    "test loss:")
        st.dataframe(readable.group_table(m["group_removal"]), hide_index=True, width="stretch")
else:
    st.caption("This run was made without validation by retraining.")

st.markdown("### Time per step")
if m.get("timings_s"):
    st.plotly_chart(charts.timings_bars(m["timings_s"]), key="timings", config={"displayModeBar": False})
else:
    st.caption("No timings recorded.")

with st.expander("Technical details: solver diagnostics, retraining protocol, configuration, files"):
    diag = m.get("diagnostics") or {}
    st.markdown("**Solver and training diagnostics** (damping, eigenvalue estimates, residuals of the "
                "inverse-Hessian solves, final gradient norms)")
    if diag:
        st.dataframe(readable.diagnostics_table(diag), width="stretch")
    else:
        st.caption("No diagnostics recorded.")
    if m.get("validation_protocol"):
        st.markdown(f"**Retraining protocol.** {m['validation_protocol']}")
    config = render.flatten(m.get("config") or {})
    if config:
        st.markdown("**Configuration** (every setting the precompute step ran with)")
        st.dataframe(readable.config_table(config), hide_index=True, width="stretch")
    st.markdown(f"**Files** ({len(run.files())})")
    st.code("\n".join(run.files()), language=None)
