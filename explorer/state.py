"""Where runs live, the cached run handle, the current selection and its sync with the URL.

The selection (run, scenario, test point, pretraining example) lives in ``st.session_state`` under
``sel_*`` keys that no widget owns, so it survives page switches (Streamlit drops the state of
widgets that a page does not draw). Widgets get their own keys and are bound to the selection with
``bind`` (selection -> widget, before the widget is drawn) and ``on_change`` callbacks
(widget -> selection). The URL (``?run=..&scenario=..&test=..``) is read once per session and
rewritten at the end of every script run.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import streamlit as st

from precompute.run_schema import RunStoreError
from precompute.runstore import Run, list_runs, open_run

RUNS_ENV = "EXPLORER_RUNS_DIR"
DEFAULT_RUNS_DIR = "runs"
ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEMO_COMMAND = "python -m precompute --preset demo"
# The safe way to start the app (binds 127.0.0.1, usage statistics off): every hint shows it.
EXPLORER_COMMAND = "python -m explorer --runs runs"

# The explorer opens on the first of these that exists: the demo's lead run (precompute.cli.demo_runs).
LEAD_RUNS = ("fashion", "digits")

SEL_RUN, SEL_SCENARIO, SEL_TEST, SEL_PRETRAIN = "sel_run", "sel_scenario", "sel_test", "sel_pretrain"
_QP_KEYS = {"run": SEL_RUN, "scenario": SEL_SCENARIO, "test": SEL_TEST, "pretrain": SEL_PRETRAIN}
_CTX = "_ctx"


def default_run(runs: list[str]) -> str:
    """The run shown when none is chosen: a lead run (``LEAD_RUNS``) if present, else the first name."""
    return next((name for name in LEAD_RUNS if name in runs), runs[0])


# ------------------------------------------------------------------------------------------------
# runs root


def resolve_runs_root(argv: list[str] | None = None, environ: dict | None = None, cwd: str | Path | None = None) -> Path:
    """``--runs DIR`` after ``--`` on the command line, else $EXPLORER_RUNS_DIR, else ./runs."""
    argv = list(sys.argv if argv is None else argv)
    environ = os.environ if environ is None else environ
    base = Path.cwd() if cwd is None else Path(cwd)
    args = argv[argv.index("--") + 1:] if "--" in argv else argv[1:]
    chosen = None
    for i, a in enumerate(args):
        if a == "--runs" and i + 1 < len(args):
            chosen = args[i + 1]
        elif a.startswith("--runs="):
            chosen = a.split("=", 1)[1]
    if not chosen:
        chosen = environ.get(RUNS_ENV) or DEFAULT_RUNS_DIR
    p = Path(chosen).expanduser()
    return p if p.is_absolute() else (base / p)


def parse_int(value: Any) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------
# run handle


def manifest_stamp(root: str | Path, name: str) -> int:
    """Modification time of the run's manifest: part of every cache key, so a re-run is picked up."""
    try:
        return (Path(root) / name / "manifest.json").stat().st_mtime_ns
    except (OSError, ValueError):
        return 0


@st.cache_resource(show_spinner=False, max_entries=16)
def _cached_run(root: str, name: str, stamp: int) -> Run:
    return open_run(root, name)


RunKey = tuple  # (root: str, name: str, stamp: int) - hashable, used by st.cache_data slices


def run_from_key(key: RunKey) -> Run:
    return _cached_run(*key)


def get_run(root: str | Path, name: str) -> tuple[Run, RunKey]:
    key = (str(root), name, manifest_stamp(root, name))
    return _cached_run(*key), key


@dataclass
class Ctx:
    """What every page needs: the open run, its cache key and the current selection."""

    root: Path
    run: Run
    key: RunKey
    scenario: str

    @property
    def name(self) -> str:
        return self.run.name

    @property
    def test_id(self) -> int:
        return int(st.session_state[SEL_TEST])

    @property
    def pretrain_id(self) -> int:
        return int(st.session_state[SEL_PRETRAIN])

    @property
    def is_image(self) -> bool:
        return self.run.modality == "image"


def context() -> Ctx:
    """The context that app.py prepared for this script run."""
    return st.session_state[_CTX]


# ------------------------------------------------------------------------------------------------
# selection


def init_from_query_params() -> None:
    """Copy ?run=..&scenario=..&test=..&pretrain=.. into the selection, once per session."""
    if st.session_state.get("_qp_loaded"):
        return
    st.session_state["_qp_loaded"] = True
    qp = st.query_params
    for param, sel in _QP_KEYS.items():
        if param in qp:
            value = qp.get(param)
            st.session_state[sel] = parse_int(value) if param in ("test", "pretrain") else value
            st.session_state[f"_link_{param}"] = value


def link_value(param: str) -> str | None:
    """The value a deep link asked for (to explain why it could not be honoured)."""
    return st.session_state.get(f"_link_{param}")


def notice(text: str) -> None:
    """Queue a one-off warning for this script run (e.g. a deep link that could not be honoured)."""
    st.session_state.setdefault("_notices", []).append(text)


def pop_notices() -> list[str]:
    return st.session_state.pop("_notices", [])


def literal(value: Any) -> str:
    """``value`` as a Markdown code span, shown exactly as written: a value from a deep link or a
    folder name never becomes a link, an image (a request to any host), HTML, math or a directive.
    (Backslash escapes are not enough: Streamlit links bare URLs found in the text after parsing.)"""
    text = " ".join(str(value).split())
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}"


def select(sel_key: str, value: Any) -> None:
    st.session_state[sel_key] = value


def bind(widget_key: str, sel_key: str) -> None:
    """Make a widget show the current selection (call just before drawing the widget)."""
    if sel_key in st.session_state and st.session_state.get(widget_key) != st.session_state[sel_key]:
        st.session_state[widget_key] = st.session_state[sel_key]


def copy_to_selection(widget_key: str, sel_key: str) -> None:
    """on_change callback: widget -> selection."""
    st.session_state[sel_key] = st.session_state[widget_key]


def ensure_valid(ctx_run: Run, scenario_default: str | None = None) -> None:
    """Repair the selection for the open run (unknown scenario, unscored test point, bad id)."""
    run = ctx_run
    if st.session_state.get(SEL_SCENARIO) not in run.scenarios:
        asked = st.session_state.get(SEL_SCENARIO)
        if asked is not None and link_value("scenario") == asked:
            notice(f"Scenario {literal(asked)} is not in run {literal(run.name)}; showing "
                   f"{literal(run.scenarios[0])}.")
        st.session_state[SEL_SCENARIO] = scenario_default or run.scenarios[0]
    test = st.session_state.get(SEL_TEST)
    if test not in run.test_points:
        if test is not None and link_value("test") is not None and parse_int(link_value("test")) == test:
            notice(f"Test point {test} was not scored in run {literal(run.name)}; showing test point "
                   f"{run.test_points[0]}.")
        st.session_state[SEL_TEST] = run.test_points[0]
    pid = st.session_state.get(SEL_PRETRAIN)
    if not isinstance(pid, int) or not 0 <= pid < run.n_pretrain:
        st.session_state[SEL_PRETRAIN] = 0


def on_run_change() -> None:
    """Switching runs: keep nothing that belongs to the previous run."""
    st.session_state[SEL_RUN] = st.session_state["w_run"]
    for k in (SEL_TEST, SEL_PRETRAIN):
        st.session_state.pop(k, None)
    for k in ("_link_test", "_link_pretrain", "_link_scenario"):
        st.session_state.pop(k, None)


def sync_query_params(include_pretrain: bool = False) -> None:
    """Rewrite the URL so that it deep-links the current view (only when it changed)."""
    want: dict[str, str] = {}
    for param in ("run", "scenario", "test"):
        v = st.session_state.get(_QP_KEYS[param])
        if v is not None:
            want[param] = str(v)
    if include_pretrain and st.session_state.get(SEL_PRETRAIN) is not None:
        want["pretrain"] = str(st.session_state[SEL_PRETRAIN])
    if st.query_params.to_dict() != want:
        st.query_params.from_dict(want)


def set_context(ctx: Ctx | None) -> None:
    st.session_state[_CTX] = ctx


__all__ = [
    "ASSETS", "Ctx", "DEMO_COMMAND", "EXPLORER_COMMAND", "LEAD_RUNS", "RUNS_ENV", "RunStoreError", "SEL_PRETRAIN", "SEL_RUN", "SEL_SCENARIO",
    "SEL_TEST", "bind", "context", "copy_to_selection", "default_run", "ensure_valid", "get_run", "init_from_query_params",
    "list_runs", "literal", "on_run_change", "parse_int", "resolve_runs_root", "run_from_key", "select", "set_context",
    "sync_query_params",
]
