"""Run: what was computed, how well, how fast, and what the score means."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from explorer import charts, components as ui, render, state
from precompute.runstore import SCORE_DEFINITION

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
cols[3].metric("Pretraining accuracy", f"{pa:.1%}" if isinstance(pa, (int, float)) else "n/a")
acc = m.get("finetune_accuracy") or {}
if acc:
    cols = st.columns(max(4, len(acc)))
    for c, (s, a) in zip(cols, acc.items()):
        c.metric(f"Finetune accuracy ({s})", f"{a:.1%}" if isinstance(a, (int, float)) else "n/a")
st.markdown(
    f"**Pretraining classes:** {', '.join(map(str, m.get('pretrain_class_names', [])))}  \n"
    f"**Finetuning classes:** {', '.join(map(str, m.get('finetune_class_names', [])))}"
)
if m.get("label_noise"):
    ln = m["label_noise"]
    st.warning(f"Label noise was injected into the pretraining labels: rate {ln.get('rate')}, "
               f"{ln.get('n_flipped')} labels flipped (seed {ln.get('seed')}). Flipped examples carry a ⚑ flag.")
if m.get("mislabel_detection"):
    st.markdown("**Mislabel detection** (how well each signal ranks the flipped examples first)")
    st.dataframe(pd.DataFrame(m["mislabel_detection"]).T, width="stretch")

st.markdown("### Validation summary")
if m.get("validation"):
    st.dataframe(pd.DataFrame(m["validation"]).T, width="stretch")
else:
    st.caption("No validation in this run.")
if m.get("group_removal"):
    with st.expander("Group removal summary"):
        st.json(m["group_removal"])
if m.get("validation_protocol"):
    st.markdown(f"**Protocol.** {m['validation_protocol']}")

c_t, c_d = st.columns(2, gap="large")
with c_t:
    st.markdown("### Timings")
    if m.get("timings_s"):
        st.plotly_chart(charts.timings_bars(m["timings_s"]), key="timings", config={"displayModeBar": False})
    else:
        st.caption("No timings recorded.")
with c_d:
    st.markdown("### Solver diagnostics")
    st.caption("Damping, eigenvalue estimates and residuals ‖(H+λI)x − b‖/‖b‖ of the inverse-Hessian solves.")
    diag = m.get("diagnostics") or {}
    if diag:
        table = pd.DataFrame({s: render.flatten(d) for s, d in diag.items()})
        table.index.name = "quantity"
        st.dataframe(table.astype(str), width="stretch")
    else:
        st.caption("No diagnostics recorded.")

st.markdown("### Configuration")
config = render.flatten(m.get("config") or {})
if config:
    st.caption("Every setting the precompute step ran with.")
    st.dataframe(pd.DataFrame({"setting": list(config), "value": [str(v) for v in config.values()]}),
                 hide_index=True, width="stretch")
else:
    st.caption("No configuration recorded.")
with st.expander(f"Files in this run ({len(run.files())})"):
    st.code("\n".join(run.files()), language=None)
