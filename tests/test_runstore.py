"""Run store: atomic writes, validation on open, safe names, top-k, no pickle."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from precompute import runstore  # noqa: E402
from precompute.contract import SCORE_DEFINITION  # noqa: E402
from precompute.run_schema import REQUIRED_MANIFEST_KEYS, RunStoreError  # noqa: E402
from precompute.run_writer import RunWriter  # noqa: E402
from precompute.runstore import list_runs, open_run, top_k_of_row  # noqa: E402
from run_factory import write_synthetic_run  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    write_synthetic_run(root, "img", modality="image", m=150, n_test=30, T=6, noisy=True)
    write_synthetic_run(root, "txt", modality="text", m=120, n_test=25, T=5)
    return root


def _copy_run(store: Path, tmp_path: Path, name: str = "img") -> Path:
    root = tmp_path / "runs"
    root.mkdir(exist_ok=True)
    shutil.copytree(store / name, root / name)
    return root


def _no_temp_dirs(root: Path) -> bool:
    return not any(p.name.startswith(".") for p in root.iterdir())


# ------------------------------------------------------------------------------------------------
# writing


def test_commit_is_atomic_and_leaves_no_temp_dir(tmp_path):
    path = write_synthetic_run(tmp_path, "a", m=60, n_test=12, T=4)
    assert path == tmp_path / "a"
    assert (path / "manifest.json").is_file()
    assert _no_temp_dirs(tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(REQUIRED_MANIFEST_KEYS) <= set(manifest)
    assert manifest["score_definition"] == SCORE_DEFINITION
    assert list_runs(tmp_path) == ["a"]


def test_temp_dir_is_a_hidden_sibling_until_commit(tmp_path):
    with RunWriter(tmp_path / "b") as w:
        assert w.path.parent == tmp_path
        assert w.path.name.startswith(".b.tmp-")
        w.save_array("scores/fixed.npy", np.zeros((1, 2), np.float32))
        assert not (tmp_path / "b").exists()
        assert list_runs(tmp_path) == []
    # left without commit: nothing remains
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_exception_inside_with_leaves_no_run_and_no_temp_dir(tmp_path, exc):
    with pytest.raises(type(exc)):
        with RunWriter(tmp_path / "c") as w:
            w.save_array("scores/fixed.npy", np.zeros((2, 3), np.float32))
            w.save_json("x.json", {"a": 1})
            raise exc
    assert list(tmp_path.iterdir()) == []


def test_existing_run_needs_overwrite(tmp_path):
    write_synthetic_run(tmp_path, "d", m=50, n_test=10, T=3)
    with pytest.raises(RunStoreError, match="exists; pass --overwrite or choose another --out"):
        RunWriter(tmp_path / "d")
    before = json.loads((tmp_path / "d" / "manifest.json").read_text())["created"]
    write_synthetic_run(tmp_path, "d", m=50, n_test=10, T=3, seed=1, overwrite=True)
    assert open_run(tmp_path, "d").manifest["config"]["seed"] == 1
    assert before is not None
    assert _no_temp_dirs(tmp_path)


def test_failed_overwrite_keeps_the_old_run(tmp_path):
    write_synthetic_run(tmp_path, "e", m=50, n_test=10, T=3)
    with pytest.raises(RunStoreError, match="manifest.json lacks"):
        with RunWriter(tmp_path / "e", overwrite=True) as w:
            w.commit({"modality": "image"})
    assert open_run(tmp_path, "e").n_pretrain == 50
    assert _no_temp_dirs(tmp_path)


def test_commit_validates_score_shapes(store, tmp_path):
    src = open_run(store, "img")
    manifest = dict(src.manifest)
    with pytest.raises(RunStoreError, match=r"scores/fixed.npy has shape \[6, 149\], expected \[6, 150\]"):
        with RunWriter(tmp_path / "f") as w:
            for s in src.scenarios:
                w.save_array(f"scores/{s}.npy", np.zeros((6, 149), np.float32))
            w.commit(manifest)
    assert not (tmp_path / "f").exists() and _no_temp_dirs(tmp_path)


def test_object_arrays_are_refused(tmp_path):
    with RunWriter(tmp_path / "g") as w:
        with pytest.raises(RunStoreError, match="pickle"):
            w.save_array("bad.npy", np.array([{"a": 1}], dtype=object))


def test_relpaths_cannot_escape_the_run(tmp_path):
    with RunWriter(tmp_path / "h") as w:
        for bad in ("../x.npy", "/tmp/x.npy", "a/../../x.npy"):
            with pytest.raises(RunStoreError):
                w.save_array(bad, np.zeros(2))


def test_json_values_are_sanitised(tmp_path):
    with RunWriter(tmp_path / "i") as w:
        w.save_json("x.json", {"a": np.float32(1.5), "b": float("nan"), "c": np.arange(3), "d": np.int64(2)})
        assert json.loads((w.path / "x.json").read_text()) == {"a": 1.5, "b": None, "c": [0, 1, 2], "d": 2}


def test_safetensors_roundtrip(store):
    from safetensors.numpy import load_file

    t = load_file(str(store / "img" / "weights" / "pretrain.safetensors"))
    assert t["theta"].shape == (4, 3)


# ------------------------------------------------------------------------------------------------
# listing and opening


def test_list_runs_ignores_temp_dirs_and_dirs_without_manifest(store, tmp_path):
    root = _copy_run(store, tmp_path)
    (root / ".img.tmp-123-abcd").mkdir()
    (root / ".img.tmp-123-abcd" / "manifest.json").write_text("{}")
    (root / "half").mkdir()
    (root / "half" / "scores").mkdir()
    (root / "file.txt").write_text("x")
    assert list_runs(root) == ["img"]
    assert list_runs(tmp_path / "nope") == []


@pytest.mark.parametrize("name", ["../img", "..", ".", "", "a/b", "/etc", "img/../img", ".img.tmp-1-2", "a\\b"])
def test_open_run_rejects_names_that_escape_root(store, name):
    with pytest.raises(RunStoreError):
        open_run(store, name)


def test_open_run_rejects_absolute_paths(store):
    with pytest.raises(RunStoreError):
        open_run(store, str(store / "img"))


def test_open_run_rejects_symlink_escaping_root(store, tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    os.symlink(store / "img", root / "outside")
    with pytest.raises(RunStoreError, match="outside"):
        open_run(root, "outside")
    assert list_runs(root) == []


def test_symlinked_file_escaping_the_run_is_refused(store, tmp_path):
    root = _copy_run(store, tmp_path)
    target = root / "img" / "scores" / "fixed.npy"
    outside = tmp_path / "elsewhere.npy"
    shutil.move(target, outside)
    os.symlink(outside, target)
    with pytest.raises(RunStoreError, match="outside the run"):
        open_run(root, "img")


def test_missing_score_file_names_run_and_file(store, tmp_path):
    root = _copy_run(store, tmp_path)
    (root / "img" / "scores" / "fixed.npy").unlink()
    with pytest.raises(RunStoreError, match=r"run 'img': missing scores/fixed.npy; re-run precompute"):
        open_run(root, "img")


def test_wrong_score_shape_names_the_file(store, tmp_path):
    root = _copy_run(store, tmp_path)
    np.save(root / "img" / "scores" / "updated.npy", np.zeros((6, 10), np.float32))
    with pytest.raises(RunStoreError, match=r"run 'img': scores/updated.npy has shape \[6, 10\]"):
        open_run(root, "img")


def test_wrong_score_dtype_is_refused(store, tmp_path):
    root = _copy_run(store, tmp_path)
    np.save(root / "img" / "scores" / "fixed.npy", np.zeros((6, 150), np.float64))
    with pytest.raises(RunStoreError, match="float32"):
        open_run(root, "img")


def test_object_array_in_run_is_refused_without_unpickling(store, tmp_path):
    root = _copy_run(store, tmp_path)
    np.save(root / "img" / "images" / "pretrain.npy", np.array([object()] * 150, dtype=object), allow_pickle=True)
    with pytest.raises(RunStoreError, match="without pickle"):
        open_run(root, "img")


@pytest.mark.parametrize("rel, pattern", [
    ("pretrain.parquet", "missing pretrain.parquet"),
    ("finetune_test.parquet", "missing finetune_test.parquet"),
    ("images/pretrain.npy", "missing images/pretrain.npy"),
    ("manifest.json", "missing manifest.json"),
])
def test_missing_required_file(store, tmp_path, rel, pattern):
    root = _copy_run(store, tmp_path)
    (root / "img" / rel).unlink()
    if rel == "manifest.json":
        assert list_runs(root) == []
    with pytest.raises(RunStoreError, match=f"run 'img': {pattern}"):
        open_run(root, "img")


def test_missing_manifest_key_and_bad_json(store, tmp_path):
    root = _copy_run(store, tmp_path)
    mpath = root / "img" / "manifest.json"
    manifest = json.loads(mpath.read_text())
    del manifest["test_points"]
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(RunStoreError, match="manifest.json lacks test_points"):
        open_run(root, "img")
    mpath.write_text("{not json")
    with pytest.raises(RunStoreError, match="not valid JSON"):
        open_run(root, "img")


def test_table_row_count_and_columns_are_checked(store, tmp_path):
    root = _copy_run(store, tmp_path)
    t = pd.read_parquet(root / "img" / "finetune_test.parquet")
    t.drop(columns=["loss_updated"]).to_parquet(root / "img" / "finetune_test.parquet")
    with pytest.raises(RunStoreError, match="finetune_test.parquet lacks column.*loss_updated"):
        open_run(root, "img")
    p = pd.read_parquet(root / "img" / "pretrain.parquet")
    p.iloc[:-1].to_parquet(root / "img" / "pretrain.parquet")
    with pytest.raises(RunStoreError, match="pretrain.parquet has 149 rows"):
        open_run(root, "img")


# ------------------------------------------------------------------------------------------------
# reading


def test_run_accessors(store):
    run = open_run(store, "img")
    m, tps = run.n_pretrain, run.test_points
    s = run.scores("fixed")
    assert isinstance(s, np.memmap) and s.shape == (len(tps), m) and s.dtype == np.float32
    assert np.array_equal(run.score_row("fixed", tps[2]), s[2])
    assert np.array_equal(run.score_column("updated", 7), run.scores("updated")[:, 7])
    assert len(run.pretrain_table()) == m and {"flipped", "original_label"} <= set(run.pretrain_table())
    assert len(run.test_table()) == run.manifest["n_finetune_test"]
    assert run.pretrain_images().shape[0] == m and run.test_images().dtype == np.uint8
    assert set(run.pairs()["kind"]) == {"helpful", "harmful", "random"}
    assert run.group() is not None
    assert run.cleaning_signals() is not None and "self_influence" in run.cleaning_signals()
    assert run.vectorizer_vocabulary() is None
    with pytest.raises(RunStoreError, match="not scored"):
        run.score_row("fixed", max(tps) + 1000)
    with pytest.raises(RunStoreError, match="no scenario"):
        run.scores("nope")

    txt = open_run(store, "txt")
    assert txt.pretrain_images() is None and txt.test_images() is None
    assert "text" in txt.pretrain_table() and len(txt.vectorizer_vocabulary()) > 10
    assert txt.cleaning_signals() is None


def test_top_k_matches_brute_force_argsort(store):
    run = open_run(store, "img")
    for scenario in run.scenarios:
        for t in run.test_points:
            row = run.score_row(scenario, t)
            for k in (1, 5, 17, run.n_pretrain, run.n_pretrain + 5):
                h_ids, h_sc, x_ids, x_sc = run.top_k(scenario, t, k)
                kk = min(k, run.n_pretrain)
                order = np.argsort(-row, kind="stable")
                assert np.array_equal(h_ids, order[:kk])
                assert np.array_equal(h_sc, row[order[:kk]])
                order = np.argsort(row, kind="stable")
                assert np.array_equal(x_ids, order[:kk])
                assert np.all(np.diff(h_sc) <= 0) and np.all(np.diff(x_sc) >= 0)


def test_top_k_does_not_sort_the_whole_row(monkeypatch):
    row = np.random.default_rng(0).standard_normal(10_000).astype(np.float32)
    calls = []
    real_argsort = np.argsort
    monkeypatch.setattr(runstore.np, "argsort", lambda *a, **k: calls.append(1) or real_argsort(*a, **k))
    h_ids, _, x_ids, _ = top_k_of_row(row, 10)
    assert not calls
    assert set(h_ids) == set(real_argsort(-row)[:10]) and set(x_ids) == set(real_argsort(row)[:10])


def test_top_k_handles_nan_and_ties():
    row = np.array([np.nan, 1.0, 1.0, -2.0, 0.5], np.float32)
    h_ids, h_sc, x_ids, _ = top_k_of_row(row, 2)
    assert list(h_ids) == [1, 2] and list(h_sc) == [1.0, 1.0]
    assert list(x_ids) == [3, 4]
    assert [len(a) for a in top_k_of_row(row, 0)] == [0, 0, 0, 0]


def test_reader_never_needs_pickle(store, monkeypatch):
    """Every np.load in the reader passes allow_pickle=False."""
    seen = []
    real = np.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("allow_pickle"))
        return real(*args, **kwargs)

    monkeypatch.setattr(runstore.np, "load", spy)
    run = open_run(store, "img")
    run.scores("fixed"), run.pretrain_images(), run.test_images()
    assert seen and all(v is False for v in seen)


def test_runstore_does_not_import_torch():
    import subprocess

    code = "import sys, precompute.runstore; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], check=True)
    assert out.stdout.strip() == "False"
