"""Reading run directories: the explorer's side of the run contract (``precompute.run_schema``).

``list_runs`` names the committed runs under a root; ``open_run`` checks a run's manifest and files
against the schema before returning a read-only ``Run``, whose tables are loaded once and whose
score matrices are memory-mapped; ``top_k_of_row`` picks a row's most helpful and harmful examples.
Nothing is unpickled (``allow_pickle=False``, Parquet, JSON). This module must not import torch:
the explorer imports it at start-up.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .run_schema import RunStoreError, check_relpath, is_inside, load_json, validate_run, validate_run_name

__all__ = ["Run", "list_runs", "open_run", "top_k_of_row"]




def list_runs(root: str | Path) -> list[str]:
    """Names of committed runs under ``root`` (subdirs holding manifest.json), sorted.

    Temporary and other dot-prefixed directories, directories without a manifest, names that
    ``open_run`` would refuse and symlinks leading outside ``root`` are skipped.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    names = []
    for entry in root.iterdir():
        try:
            validate_run_name(entry.name)
        except RunStoreError:
            continue
        if entry.is_dir() and (entry / "manifest.json").is_file() and is_inside(entry, root):
            names.append(entry.name)
    return sorted(names)


def open_run(root: str | Path, name: str) -> Run:
    """Open run ``name`` under ``root`` after checking its manifest and files (RunStoreError if not)."""
    validate_run_name(name)
    root_path = Path(root)
    if not root_path.is_dir():
        raise RunStoreError(f"runs directory {root} does not exist")
    path = root_path / name
    resolved = path.resolve()
    if resolved.parent != root_path.resolve():
        raise RunStoreError(f"run '{name}': refusing a path that leads outside {root}")
    if not resolved.is_dir():
        raise RunStoreError(f"run '{name}' not found under {root}")
    mpath = resolved / "manifest.json"
    if os.path.lexists(mpath) and not is_inside(mpath, resolved):
        raise RunStoreError(f"run '{name}': manifest.json points outside the run directory; refusing to read it")
    if not mpath.is_file():
        raise RunStoreError(f"run '{name}': missing manifest.json; re-run precompute")
    try:
        manifest = load_json(mpath)
    except (OSError, ValueError) as exc:
        raise RunStoreError(f"run '{name}': manifest.json is not valid JSON ({exc}); re-run precompute") from exc
    validate_run(resolved, manifest, name)
    return Run(name, resolved, manifest)


class Run:
    """A validated, read-only run. Tables are loaded once and kept; score matrices are memory-mapped."""

    def __init__(self, name: str, path: Path, manifest: dict) -> None:
        self.name = name
        self.path = Path(path)
        self.manifest = manifest
        self.test_points: list[int] = [int(t) for t in manifest["test_points"]]
        self._row_of = {t: i for i, t in enumerate(self.test_points)}
        self._lock = threading.Lock()
        self._cache: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"Run({self.name!r}, modality={self.modality!r}, m={self.n_pretrain}, T={len(self.test_points)})"

    # manifest shortcuts ---------------------------------------------------------------------------
    @property
    def modality(self) -> str:
        return self.manifest["modality"]

    @property
    def scenarios(self) -> list[str]:
        return list(self.manifest["scenarios"])

    @property
    def n_pretrain(self) -> int:
        return int(self.manifest["n_pretrain"])

    @property
    def validation_test_points(self) -> list[int]:
        return [int(t) for t in self.manifest["validation_test_points"]]

    def row_of(self, test_id: int) -> int:
        """Row of ``test_id`` in the score matrices."""
        try:
            return self._row_of[int(test_id)]
        except (KeyError, ValueError, TypeError):
            raise RunStoreError(f"run '{self.name}': test point {test_id!r} was not scored") from None

    def _file(self, rel: str) -> Path:
        p = self.path / check_relpath(rel)
        if os.path.lexists(p) and not is_inside(p, self.path):
            raise RunStoreError(f"run '{self.name}': {rel} points outside the run directory; refusing to read it")
        return p

    def _read_table(self, rel: str) -> pd.DataFrame:
        """A Parquet table of the run; a damaged file raises RunStoreError (the explorer's notice)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = self._file(rel)
        try:
            # Damaged string pages can decode lazily (at the first sort or conversion, inside a page of
            # the explorer), so check every string column's UTF-8 here, while it can still be refused.
            text = [f.name for f in pq.read_schema(path) if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
            if text:
                pq.read_table(path, columns=text).validate(full=True)
            return pd.read_parquet(path)
        except Exception as exc:       # noqa: BLE001 (pyarrow raises many kinds on damaged files)
            raise RunStoreError(f"run '{self.name}': {rel} is damaged ({type(exc).__name__}); re-run precompute") from exc

    def _cached(self, key: str, load):
        with self._lock:
            if key not in self._cache:
                self._cache[key] = load()
            return self._cache[key]

    # scores ---------------------------------------------------------------------------------------
    def scores(self, scenario: str) -> np.ndarray:
        """Memory-mapped float32 [T, m] score matrix of ``scenario``."""
        if scenario not in self.scenarios:
            raise RunStoreError(f"run '{self.name}': no scenario {scenario!r} (has {', '.join(self.scenarios)})")
        return self._cached(
            f"scores/{scenario}",
            lambda: np.load(self._file(f"scores/{scenario}.npy"), mmap_mode="r", allow_pickle=False),
        )

    def score_row(self, scenario: str, test_id: int) -> np.ndarray:
        """Scores of every pretraining example for one finetune test id (float32 [m], a copy)."""
        return np.array(self.scores(scenario)[self.row_of(test_id)])

    def score_column(self, scenario: str, pretrain_id: int) -> np.ndarray:
        """Scores of one pretraining example for every scored test point (float32 [T], row order)."""
        pid = int(pretrain_id)
        if not 0 <= pid < self.n_pretrain:
            raise RunStoreError(f"run '{self.name}': pretraining id {pretrain_id!r} out of range 0..{self.n_pretrain - 1}")
        return np.array(self.scores(scenario)[:, pid])

    def top_k(self, scenario: str, test_id: int, k: int):
        """(helpful_ids, helpful_scores, harmful_ids, harmful_scores) for one test point.

        Helpful: the k highest scores, descending. Harmful: the k lowest scores, ascending (most
        harmful first). Uses argpartition on the one row (O(m)); ties are broken by id.
        """
        row = self.score_row(scenario, test_id)
        return top_k_of_row(row, k)

    # tables ---------------------------------------------------------------------------------------
    def pretrain_table(self) -> pd.DataFrame:
        return self._cached("pretrain", lambda: self._read_table("pretrain.parquet"))

    def test_table(self) -> pd.DataFrame:
        return self._cached("test", lambda: self._read_table("finetune_test.parquet"))

    def _optional_table(self, rel: str) -> pd.DataFrame | None:
        def load():
            p = self._file(rel)
            return self._read_table(rel) if p.is_file() else None

        return self._cached(rel, load)

    def pairs(self) -> pd.DataFrame | None:
        """validation/pairs.parquet, or None when the run has no leave-one-out validation."""
        return self._optional_table("validation/pairs.parquet")

    def group(self) -> pd.DataFrame | None:
        """validation/group.parquet, or None when the run has no group-removal validation."""
        return self._optional_table("validation/group.parquet")

    def cleaning_signals(self) -> pd.DataFrame | None:
        return self._optional_table("cleaning/signals.parquet")

    def cleaning_retrain(self) -> pd.DataFrame | None:
        return self._optional_table("cleaning/retrain.parquet")

    @property
    def has_noise(self) -> bool:
        return self.manifest.get("label_noise") is not None

    # images and text ------------------------------------------------------------------------------
    def _images(self, which: str) -> np.ndarray | None:
        if self.modality != "image":
            return None
        return self._cached(
            f"images/{which}",
            lambda: np.load(self._file(f"images/{which}.npy"), mmap_mode="r", allow_pickle=False),
        )

    def pretrain_images(self) -> np.ndarray | None:
        return self._images("pretrain")

    def test_images(self) -> np.ndarray | None:
        return self._images("finetune_test")

    def vectorizer_vocabulary(self) -> list[str] | None:
        def load():
            p = self._file("text/vectorizer.json")
            if not p.is_file():
                return None
            try:
                doc = load_json(p)
            except (OSError, ValueError) as exc:
                raise RunStoreError(f"run '{self.name}': text/vectorizer.json is damaged ({exc}); re-run precompute") from exc
            vocab = doc.get("vocabulary") if isinstance(doc, dict) else None
            if isinstance(vocab, dict) and all(isinstance(i, int) and not isinstance(i, bool)
                                               for i in vocab.values()):          # {word: index}
                vocab = sorted(vocab, key=vocab.get)
            return [str(w) for w in vocab] if isinstance(vocab, list) else None

        return self._cached("vocabulary", load)

    def files(self) -> list[str]:
        """Relative paths of every file in the run (for display)."""
        return sorted(str(p.relative_to(self.path)) for p in self.path.rglob("*") if p.is_file())


def top_k_of_row(row: np.ndarray, k: int):
    """Top-k helpful (highest) and harmful (lowest) entries of one score row, via argpartition."""
    row = np.asarray(row)
    m = row.shape[0]
    k = max(0, min(int(k), m))
    if k == 0:
        empty_i, empty_s = np.empty(0, np.int64), np.empty(0, row.dtype)
        return empty_i, empty_s, empty_i, empty_s
    filled_hi = np.where(np.isnan(row), -np.inf, row)
    filled_lo = np.where(np.isnan(row), np.inf, row)
    hi = np.argpartition(-filled_hi, k - 1)[:k] if k < m else np.arange(m)
    hi = hi[np.lexsort((hi, -filled_hi[hi]))]
    lo = np.argpartition(filled_lo, k - 1)[:k] if k < m else np.arange(m)
    lo = lo[np.lexsort((lo, filled_lo[lo]))]
    return hi.astype(np.int64), row[hi], lo.astype(np.int64), row[lo]
