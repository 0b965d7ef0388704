"""Multi-stage influence explorer: the Streamlit entry point.

    python -m explorer [--runs DIR]              the safe way: 127.0.0.1 only, usage statistics off
    python explorer/app.py [--runs DIR]          the same
    streamlit run explorer/app.py [-- --runs DIR]   binds 127.0.0.1 too (explorer/.streamlit/config.toml
                                                 sits beside this script, so it applies from any folder)

Runs are read from ``--runs DIR`` (after ``--``), else $EXPLORER_RUNS_DIR, else ./runs. This script
draws the sidebar (run and scenario), opens the run, and hands over to the current page.
"""

from __future__ import annotations

import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

if __name__ == "__main__":
    from streamlit import runtime as _runtime

    if not _runtime.exists():                # `python explorer/app.py`: start the server the safe way
        from explorer.__main__ import main as _launch

        sys.exit(_launch(sys.argv[1:]))

import streamlit as st  # noqa: E402

from explorer import state  # noqa: E402
from explorer.state import SEL_RUN, SEL_SCENARIO  # noqa: E402

_PAGES = Path(__file__).resolve().parent / "pages_"
_SCENARIO_HELP = {
    "fixed": "embedding frozen while the new head is finetuned",
    "updated": "embedding finetuned too, tied to its pretrained value by a proximal term",
}


def _empty_state(root: Path) -> None:
    st.title("Multi-stage influence explorer")
    st.info(f"No runs found in {state.literal(root)}. A run is made offline by the precompute step; make one with:")
    st.code(state.DEMO_COMMAND, language="bash")
    st.markdown("then reload this page. To read runs from another folder, start the app with:")
    st.code(state.EXPLORER_COMMAND.replace("runs runs", "runs DIR"), language="bash")


def _sidebar(root: Path, runs: list[str]):
    """Run and scenario pickers; returns (ctx or None, error message or None)."""
    if st.session_state.get(SEL_RUN) not in runs:
        asked = st.session_state.get(SEL_RUN)
        if asked is not None and state.link_value("run") == asked:
            state.notice(f"Run {state.literal(asked)} was not found in {state.literal(root)}; showing "
                         f"{state.literal(state.default_run(runs))}.")
        st.session_state[SEL_RUN] = state.default_run(runs)
    with st.sidebar:
        state.bind("w_run", SEL_RUN)
        st.selectbox("Run", runs, key="w_run", on_change=state.on_run_change,
                     help=f"Runs found in {root}")
        try:
            run, key = state.get_run(root, st.session_state[SEL_RUN])
        except state.RunStoreError as exc:
            return None, str(exc)
        state.ensure_valid(run)
        state.bind("w_scenario", SEL_SCENARIO)
        st.radio(
            "Finetuning scenario", run.scenarios, key="w_scenario", horizontal=True,
            on_change=state.copy_to_selection, args=("w_scenario", SEL_SCENARIO),
            format_func=lambda s: s,
            help="; ".join(f"{s}: {_SCENARIO_HELP.get(s, s)}" for s in run.scenarios),
        )
        scenario = st.session_state[SEL_SCENARIO]
        m = run.manifest
        acc = (m.get("finetune_accuracy") or {}).get(scenario)
        st.caption(
            f"{m.get('preset', '?')} · {run.modality} · {run.n_pretrain:,} pretraining examples · "
            f"{len(run.test_points)} scored test points"
            + (f" · finetune accuracy {acc:.0%}" if isinstance(acc, (int, float)) else "")
        )
        st.caption(_SCENARIO_HELP.get(scenario, ""))
    return state.Ctx(root=root, run=run, key=key, scenario=scenario), None


def main() -> None:
    st.set_page_config(
        page_title="Multi-stage influence explorer",
        page_icon=str(state.ASSETS / "logo.svg"),
        layout="wide",
    )
    st.html(state.ASSETS / "style.css")
    st.logo(str(state.ASSETS / "logo-wordmark.svg"), icon_image=str(state.ASSETS / "logo.svg"), size="large")

    pages = [
        st.Page(_PAGES / "overview.py", title="Overview", icon=":material/auto_stories:", url_path="home",
                default=True),
        # the default page is served at "/"; this hidden twin makes its own URL, /overview, work as a deep link
        st.Page(_PAGES / "overview.py", title="Overview", url_path="overview", visibility="hidden"),
        st.Page(_PAGES / "test_point.py", title="Test point", icon=":material/target:", url_path="test-point"),
        st.Page(_PAGES / "validation.py", title="Validation", icon=":material/scatter_plot:", url_path="validation"),
        st.Page(_PAGES / "pretrain_example.py", title="Pretraining example", icon=":material/image_search:",
                url_path="pretraining-example"),
        st.Page(_PAGES / "data_cleaning.py", title="Data cleaning", icon=":material/cleaning_services:",
                url_path="data-cleaning"),
        st.Page(_PAGES / "run_info.py", title="Run", icon=":material/info:", url_path="run"),
    ]
    page = st.navigation(pages)

    root = state.resolve_runs_root()
    state.init_from_query_params()
    runs = state.list_runs(root)
    if not runs:
        state.set_context(None)
        _empty_state(root)
        return

    ctx, error = _sidebar(root, runs)
    state.set_context(ctx)
    for text in state.pop_notices():
        st.warning(text)                      # values inside are literal() code spans
    if ctx is None:
        _broken_run(root, error)
        state.sync_query_params()
        return
    try:
        page.run()
    except state.RunStoreError as exc:            # a table or array of the run is damaged
        _broken_run(root, str(exc))
    state.sync_query_params(include_pretrain=page.url_path == "pretraining-example")


def _broken_run(root: Path, error: str) -> None:
    """The notice for a run that cannot be shown (instead of a traceback)."""
    st.title("Multi-stage influence explorer")
    st.error(state.literal(error))
    st.markdown("The run directory is incomplete or damaged. Pick another run in the sidebar, or move "
                "the damaged folder away and re-create the runs with the precompute step:")
    st.code(state.DEMO_COMMAND, language="bash")


main()
