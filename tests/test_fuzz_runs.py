"""Fuzz: randomly damaged runs never make the run reader or the explorer raise a traceback.

Each case copies a small contract-valid run and damages one file at random: the manifest (a value
replaced by junk of another type or by deep nesting, a key deleted, the text truncated, bytes
flipped) or a table or array (bytes flipped, truncated, emptied; rewritten with a column dropped,
retyped or shuffled, rows dropped). The reader may only open the run and read every part, or
raise RunStoreError; every explorer page must render either normally or the broken-run notice.
Seeded: a failure names its case and can be replayed.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from streamlit.testing.v1 import AppTest  # noqa: E402

from explorer import state  # noqa: E402
from precompute.run_schema import RunStoreError  # noqa: E402
from precompute.runstore import Run, open_run  # noqa: E402
from run_factory import write_synthetic_run  # noqa: E402

N_READER_CASES = 300
N_APP_CASES = 100
PAGES = ("pages_/test_point.py", "pages_/validation.py", "pages_/pretrain_example.py", "pages_/run_info.py",
         "pages_/data_cleaning.py")
TABLES = ("pretrain.parquet", "finetune_test.parquet", "validation/pairs.parquet", "validation/group.parquet",
          "cleaning/signals.parquet", "cleaning/retrain.parquet")
ARRAYS = ("scores/fixed.npy", "scores/updated.npy", "images/pretrain.npy", "images/finetune_test.npy")


@pytest.fixture(scope="module")
def base_runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("base")
    return {"image": write_synthetic_run(root, "image", m=60, n_test=20, T=4, noisy=True, cleaning=True, seed=3),
            "text": write_synthetic_run(root, "text", modality="text", m=60, n_test=20, T=4, seed=4)}


def _junk(rng: np.random.Generator):
    choices = [
        lambda: "x", lambda: "", lambda: -1, lambda: 10 ** 30, lambda: 0.5, lambda: None, lambda: True,
        lambda: [], lambda: {}, lambda: [[1, [2]], "a"], lambda: {"a": {"b": [1]}}, lambda: ["fixed", 3],
        lambda: json.loads("[" * 40 + "]" * 40), lambda: float("nan"), lambda: [0, 0, 0],
        lambda: {"fixed": "0.9"}, lambda: {"fixed": {"pearson": "high"}},
    ]
    return choices[rng.integers(len(choices))]()


def _paths(obj, prefix=()):
    """Every (path) into a JSON document, for picking a value to damage."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:5]):
            yield from _paths(v, prefix + (i,))


def _damage_manifest(run: Path, rng: np.random.Generator) -> str:
    path = run / "manifest.json"
    text = path.read_text()
    kind = rng.integers(5)
    if kind == 0:                                  # truncated
        path.write_text(text[: rng.integers(len(text))])
        return "manifest truncated"
    if kind == 1:                                  # bytes flipped
        data = bytearray(text.encode())
        for i in rng.integers(len(data), size=rng.integers(1, 8)):
            data[i] = int(rng.integers(256))
        path.write_bytes(bytes(data))
        return "manifest bytes flipped"
    manifest = json.loads(text)
    paths = [p for p in _paths(manifest) if p]
    target = paths[rng.integers(len(paths))]
    parent = manifest
    for key in target[:-1]:
        parent = parent[key]
    if kind == 2 and isinstance(parent, dict):     # a key deleted
        del parent[target[-1]]
        what = f"deleted {target}"
    else:                                          # a value of another type
        parent[target[-1]] = _junk(rng)
        what = f"{target} = {str(parent[target[-1]])[:40]}"
    path.write_text(json.dumps(manifest, allow_nan=True))
    return f"manifest {what}"


def _damage_table(run: Path, rng: np.random.Generator) -> str:
    present = [t for t in TABLES if (run / t).is_file()]
    rel = present[rng.integers(len(present))]
    path = run / rel
    kind = rng.integers(7)
    if kind <= 2:
        data = bytearray(path.read_bytes())
        if kind == 0:
            for i in rng.integers(len(data), size=rng.integers(1, 32)):
                data[i] ^= 0xFF
        elif kind == 1:
            data = data[: rng.integers(len(data))]
        else:
            data = bytearray(b'{"not": "parquet"}')
        path.write_bytes(bytes(data))
        return f"{rel} bytes ({kind})"
    table = pd.read_parquet(path)
    col = table.columns[rng.integers(len(table.columns))]
    if kind == 3:
        table = table.drop(columns=[col])
    elif kind == 4:
        table[col] = table[col].astype(str)
    elif kind == 5:
        table = table.iloc[: rng.integers(len(table))]
    else:
        table[col] = rng.permutation(table[col].to_numpy())
    table.to_parquet(path, index=False)
    return f"{rel} column {col} ({kind})"


def _damage_array(run: Path, rng: np.random.Generator) -> str:
    present = [a for a in ARRAYS if (run / a).is_file()]
    rel = present[rng.integers(len(present))]
    path = run / rel
    data = bytearray(path.read_bytes())
    kind = rng.integers(3)
    if kind == 0:
        data = data[: rng.integers(len(data))]
    elif kind == 1:
        for i in rng.integers(min(len(data), 128), size=4):       # the header
            data[i] = int(rng.integers(256))
    else:
        arr = np.load(path)
        np.save(path, arr.astype(np.float64) if arr.dtype != np.float64 else arr[:-1])
        return f"{rel} rewritten"
    path.write_bytes(bytes(data))
    return f"{rel} bytes ({kind})"


def make_case(base_runs, root: Path, seed: int) -> tuple[str, str]:
    """Copy a base run to ``root/case<seed>`` and damage it; (run name, what was done)."""
    rng = np.random.default_rng(seed)
    modality = ("image", "text")[seed % 2]
    name = f"case{seed}"
    shutil.copytree(base_runs[modality], root / name)
    damage = (_damage_manifest, _damage_manifest, _damage_table, _damage_array)[rng.integers(4)]
    what = damage(root / name, rng)
    return name, f"{modality} {what}"


def read_everything(run: Run) -> None:
    run.pretrain_table(), run.test_table(), run.pairs(), run.group(), run.cleaning_signals()
    run.cleaning_retrain(), run.vectorizer_vocabulary(), run.pretrain_images(), run.test_images()
    for s in run.scenarios:
        run.top_k(s, run.test_points[0], 5)
        run.score_column(s, 0)


def test_the_reader_survives_damaged_runs(base_runs, tmp_path):
    outcomes = {"refused": 0, "opened": 0}
    for seed in range(N_READER_CASES):
        name, what = make_case(base_runs, tmp_path, seed)
        try:
            read_everything(open_run(tmp_path, name))
            outcomes["opened"] += 1
        except RunStoreError as exc:
            assert "\n" not in str(exc), (seed, what, str(exc))
            outcomes["refused"] += 1
        except Exception as exc:         # noqa: BLE001 (the point of the test)
            pytest.fail(f"case {seed} ({what}): {type(exc).__name__}: {exc}")
        shutil.rmtree(tmp_path / name)
    assert outcomes["refused"] > N_READER_CASES // 2, outcomes      # the damage is real


@pytest.mark.usefixtures("clear_streamlit_caches")
def test_every_page_survives_damaged_runs(base_runs, tmp_path, monkeypatch):
    monkeypatch.setenv(state.RUNS_ENV, str(tmp_path))
    app = REPO / "explorer" / "app.py"
    notices = 0
    for seed in range(N_APP_CASES):
        name, what = make_case(base_runs, tmp_path, 10_000 + seed)
        at = AppTest.from_file(str(app), default_timeout=60)
        at.query_params["run"] = name
        at.run()
        page = PAGES[seed % len(PAGES)]
        if not at.exception:
            at.switch_page(page).run()
        assert not at.exception, f"case {10_000 + seed} ({what}) on {page}: {[e.value for e in at.exception]}"
        notices += any("incomplete or damaged" in str(m.value) for m in at.markdown)
        shutil.rmtree(tmp_path / name)
    assert notices > N_APP_CASES // 3, notices
