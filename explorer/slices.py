"""Cached slices for the Overview page and the Test point evidence (see ``explorer.story``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from explorer import story
from explorer.state import RunKey, run_from_key


@st.cache_data(show_spinner=False, max_entries=32)
def influential(key: RunKey, scenario: str, k: int = 6) -> pd.DataFrame:
    """``story.most_influential`` of one scenario, with label, flipped flag and text when present."""
    run = run_from_key(key)
    top = story.most_influential(run.scores(scenario), k)
    table = run.pretrain_table().iloc[top["pretrain_id"]]
    top["label_name"] = table["label_name"].astype(str).to_numpy()
    if "flipped" in table:
        top["flipped"] = table["flipped"].astype(bool).to_numpy()
    if "text" in table:
        top["text"] = table["text"].astype(str).to_numpy()
    return top


@st.cache_data(show_spinner=False, max_entries=32)
def class_examples(key: RunKey, which: str, per_class: int = 2) -> pd.DataFrame:
    """A few examples of every class of the pretraining (which='pretrain') or finetune test set."""
    run = run_from_key(key)
    table = run.pretrain_table() if which == "pretrain" else run.test_table()
    names = run.manifest["pretrain_class_names" if which == "pretrain" else "finetune_class_names"]
    label_col = "original_label" if "original_label" in table else "label"   # show true labels
    ids = story.examples_per_class(table[label_col].to_numpy(), per_class, len(names))
    rows = table.iloc[ids]
    out = pd.DataFrame({"id": np.asarray(ids, np.int64),
                        "label_name": [str(names[int(v)]) for v in rows[label_col]]})
    if "text" in rows:
        out["text"] = rows["text"].astype(str).to_numpy()
    return out


@st.cache_data(show_spinner=False, max_entries=256)
def evidence(key: RunKey, scenario: str, test_id: int) -> pd.DataFrame:
    """Leave-one-out rows of one test point in one scenario (empty when it was not validated)."""
    pairs = run_from_key(key).pairs()
    if pairs is not None:
        pairs = pairs[pairs["scenario"] == scenario]
    return story.test_point_evidence(pairs, test_id)
