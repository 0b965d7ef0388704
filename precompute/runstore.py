"""Run directories: the contract between ``precompute`` (writer) and ``explorer`` (reader).

A run is a directory ``ROOT/<name>/`` written atomically: every file goes into a temporary sibling
``ROOT/.<name>.tmp-<pid>-<rand>``, ``manifest.json`` is written last, and the directory is renamed
into place only when everything succeeded. A directory without ``manifest.json`` is not a run.

Layout (format_version 1)::

    manifest.json                 see REQUIRED_MANIFEST_KEYS
    scores/<scenario>.npy         float32 [len(test_points), n_pretrain]; row i is test_points[i]
    pretrain.parquet              id, label, label_name, source, pretrain_loss, predicted_label
                                  (+ text for text runs; + original_label, flipped for noisy runs)
    finetune_test.parquet         id, label, label_name, source, pred_<s>, loss_<s>, correct_<s>
                                  (+ text for text runs)
    images/pretrain.npy           uint8 [m, H, W] or [m, H, W, 3]   (image runs)
    images/finetune_test.npy      uint8 [n, ...]                    (image runs)
    validation/pairs.parquet      leave-one-out pairs (optional)
    validation/group.parquet      group removal (optional)
    cleaning/signals.parquet      id + one float column per signal (optional)
    cleaning/retrain.parquet      (optional)
    weights/*.safetensors         (optional)
    text/vectorizer.json          {"vocabulary": [...], ...} (text runs, optional)

Nothing here unpickles anything: arrays are read with ``allow_pickle=False``, tables are Parquet,
metadata is JSON, weights are safetensors. This module must not import torch (the explorer imports
it at start-up); numpy, pandas, pyarrow and json only.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .contract import (GROUP_COLUMNS, NOISE_COLUMNS, PAIRS_COLUMNS, PRETRAIN_COLUMNS, SCORE_DEFINITION,
                       TEST_COLUMNS)
from .errors import PrecomputeError
from .memmaps import release_mapped_pages

__all__ = [
    "FORMAT_VERSION",
    "SCORE_DEFINITION",
    "REQUIRED_MANIFEST_KEYS",
    "RunStoreError",
    "RunWriter",
    "Run",
    "list_runs",
    "open_run",
    "validate_run_name",
    "now_iso",
]

FORMAT_VERSION = 1

REQUIRED_MANIFEST_KEYS: tuple[str, ...] = (
    "format_version",
    "name",
    "created",
    "preset",
    "modality",
    "n_pretrain",
    "n_finetune_test",
    "test_points",
    "validation_test_points",
    "scenarios",
    "score_definition",
    "pretrain_class_names",
    "finetune_class_names",
    "pretrain_accuracy",
    "finetune_accuracy",
    "validation",
    "baselines",
    "group_removal",
    "validation_protocol",
    "timings_s",
    "diagnostics",
    "config",
    "label_noise",
    "mislabel_detection",
    "image_shape",
)

MODALITIES = ("image", "text")

_SCENARIO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class RunStoreError(PrecomputeError):
    """A run directory cannot be written or read. The message names the run and what is wrong."""


def now_iso() -> str:
    """The current time as an ISO 8601 string with time zone (for ``manifest["created"]``)."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


# --------------------------------------------------------------------------------------------------
# names and paths


def validate_run_name(name: Any) -> str:
    """Return ``name`` if it is a plain directory name, else raise RunStoreError.

    Refused: empty names, ``.``/``..``, names starting with ``.`` (temporary dirs are dot-prefixed),
    path separators, absolute paths, NUL and other control characters.
    """
    if not isinstance(name, str) or not name:
        raise RunStoreError(f"invalid run name {name!r}: expected a non-empty directory name")
    if name in (".", "..") or name.startswith("."):
        raise RunStoreError(f"invalid run name {name!r}: names may not start with '.'")
    if "/" in name or "\\" in name or (os.sep in name) or (os.altsep and os.altsep in name):
        raise RunStoreError(f"invalid run name {name!r}: names may not contain path separators")
    if os.path.isabs(name) or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise RunStoreError(f"invalid run name {name!r}: not a plain directory name")
    return name


def _check_relpath(relpath: str) -> Path:
    """A relative path inside a run (``scores/fixed.npy``); refuses absolute paths and ``..``."""
    p = Path(relpath)
    if not relpath or p.is_absolute() or any(part in ("..", "") for part in p.parts) or "\\" in relpath:
        raise RunStoreError(f"invalid path inside a run: {relpath!r}")
    return p


def _is_inside(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------------
# JSON


def _json_safe(obj: Any) -> Any:
    """numpy scalars/arrays -> Python; non-finite floats -> None (strict JSON); Paths -> str."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    raise RunStoreError(f"value of type {type(obj).__name__} cannot be stored in JSON: {obj!r}")


def _dump_json(path: Path, obj: Any) -> None:
    text = json.dumps(_json_safe(obj), indent=2, sort_keys=False, allow_nan=False, ensure_ascii=False)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------------
# validation shared by writer and reader


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a .npy file from its header only; refuses object arrays."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:  # object arrays need pickle
        raise RunStoreError(f"{path.name}: cannot be read without pickle ({exc})") from exc
    except Exception as exc:
        raise RunStoreError(f"{path.name}: not a readable .npy file ({exc})") from exc
    return tuple(arr.shape), arr.dtype


def _parquet_meta(path: Path) -> tuple[int, list[str]]:
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(path)
        schema = pq.read_schema(path)
    except Exception as exc:
        raise RunStoreError(f"{path.name}: not a readable Parquet file ({exc})") from exc
    return int(meta.num_rows), list(schema.names)


def _validate(run_dir: Path, manifest: dict, label: str) -> None:
    """Check manifest keys and every required file's presence and shape.

    ``label`` is the run's name as users know it; every error starts with ``run '<label>':``.
    """

    def fail(msg: str) -> None:
        raise RunStoreError(f"run '{label}': {msg}")

    def rel_exists(rel: str) -> Path:
        p = run_dir / rel
        if not p.is_file():
            fail(f"missing {rel}; re-run precompute")
        if not _is_inside(p, run_dir):
            fail(f"{rel} points outside the run directory")
        return p

    if not isinstance(manifest, dict):
        fail("manifest.json is not a JSON object; re-run precompute")
    missing = [k for k in REQUIRED_MANIFEST_KEYS if k not in manifest]
    if missing:
        fail(f"manifest.json lacks {', '.join(missing)}; re-run precompute")
    if manifest["format_version"] != FORMAT_VERSION:
        fail(f"format_version {manifest['format_version']!r} is not supported (expected {FORMAT_VERSION})")
    modality = manifest["modality"]
    if modality not in MODALITIES:
        fail(f"modality must be 'image' or 'text', got {modality!r}")
    m, n = manifest["n_pretrain"], manifest["n_finetune_test"]
    if not (isinstance(m, int) and m > 0 and isinstance(n, int) and n > 0):
        fail(f"n_pretrain and n_finetune_test must be positive integers, got {m!r}, {n!r}")
    tps = manifest["test_points"]
    if not (isinstance(tps, list) and tps and all(isinstance(t, int) and 0 <= t < n for t in tps)):
        fail(f"test_points must be a non-empty list of finetune test ids in 0..{n - 1}")
    if len(set(tps)) != len(tps):
        fail("test_points has duplicates")
    vtps = manifest["validation_test_points"]
    if not isinstance(vtps, list) or not set(vtps) <= set(tps):
        fail("validation_test_points must be a subset of test_points")
    scenarios = manifest["scenarios"]
    if not (isinstance(scenarios, list) and scenarios and all(isinstance(s, str) for s in scenarios)):
        fail("scenarios must be a non-empty list of names")
    for s in scenarios:
        if not _SCENARIO_RE.match(s):
            fail(f"invalid scenario name {s!r}")

    for s in scenarios:
        rel = f"scores/{s}.npy"
        shape, dtype = _npy_header(rel_exists(rel))
        if shape != (len(tps), m):
            fail(f"{rel} has shape {list(shape)}, expected [{len(tps)}, {m}] (test points x pretraining examples)")
        if dtype != np.float32:
            fail(f"{rel} has dtype {dtype}, expected float32")

    rows, cols = _parquet_meta(rel_exists("pretrain.parquet"))
    need = list(PRETRAIN_COLUMNS) + (["text"] if modality == "text" else [])
    if rows != m:
        fail(f"pretrain.parquet has {rows} rows, expected n_pretrain = {m}")
    if lacking := [c for c in need if c not in cols]:
        fail(f"pretrain.parquet lacks column(s) {', '.join(lacking)}")
    if manifest["label_noise"] is not None and (lacking := [c for c in NOISE_COLUMNS if c not in cols]):
        fail(f"pretrain.parquet lacks column(s) {', '.join(lacking)} (the run has label noise)")

    rows, cols = _parquet_meta(rel_exists("finetune_test.parquet"))
    need = list(TEST_COLUMNS) + (["text"] if modality == "text" else [])
    need += [f"{p}_{s}" for s in scenarios for p in ("pred", "loss", "correct")]
    if rows != n:
        fail(f"finetune_test.parquet has {rows} rows, expected n_finetune_test = {n}")
    if lacking := [c for c in need if c not in cols]:
        fail(f"finetune_test.parquet lacks column(s) {', '.join(lacking)}")

    if modality == "image":
        for rel, count in (("images/pretrain.npy", m), ("images/finetune_test.npy", n)):
            shape, dtype = _npy_header(rel_exists(rel))
            ok_rank = len(shape) == 3 or (len(shape) == 4 and shape[-1] == 3)
            if not ok_rank or shape[0] != count or dtype != np.uint8:
                fail(f"{rel} has shape {list(shape)} dtype {dtype}, expected uint8 [{count}, H, W] or [{count}, H, W, 3]")

    for rel, need_cols in (("validation/pairs.parquet", PAIRS_COLUMNS), ("validation/group.parquet", GROUP_COLUMNS)):
        p = run_dir / rel
        if p.exists():
            _, cols = _parquet_meta(rel_exists(rel))
            if lacking := [c for c in need_cols if c not in cols]:
                fail(f"{rel} lacks column(s) {', '.join(lacking)}")
    p = run_dir / "cleaning/signals.parquet"
    if p.exists():
        _, cols = _parquet_meta(rel_exists("cleaning/signals.parquet"))
        if "id" not in cols:
            fail("cleaning/signals.parquet lacks column id")


# --------------------------------------------------------------------------------------------------
# writer


class RunWriter:
    """Write a run atomically.

    >>> with RunWriter("runs/demo") as w:
    ...     w.save_array("scores/fixed.npy", scores)
    ...     w.save_table("pretrain.parquet", pretrain_df)
    ...     w.commit(manifest)

    Files go to a temporary sibling ``ROOT/.<name>.tmp-<pid>-<rand>`` (``self.path``). ``commit``
    validates the manifest and the files, writes ``manifest.json`` last and renames the temporary
    directory to ``out_dir`` (replacing an old run only after that succeeded). Leaving the ``with``
    block by an exception (KeyboardInterrupt included) or without ``commit`` deletes the temporary
    directory and leaves any old run untouched.
    """

    def __init__(self, out_dir: str | Path, overwrite: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.overwrite = bool(overwrite)
        validate_run_name(self.out_dir.name)
        if self.out_dir.exists() and not self.overwrite:
            raise RunStoreError(f"{out_dir} exists; pass --overwrite or choose another --out")
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        suffix = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.path = self.out_dir.parent / f".{self.out_dir.name}.tmp-{suffix}"
        self.path.mkdir()
        self._committed = False
        self._closed = False

    # context manager ----------------------------------------------------------------------------
    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self._committed:
            self.abort()
        return False

    def abort(self) -> None:
        """Delete the temporary directory (nothing is committed)."""
        self._closed = True
        shutil.rmtree(self.path, ignore_errors=True)

    # file writers ---------------------------------------------------------------------------------
    def _target(self, relpath: str) -> Path:
        if self._closed or self._committed:
            raise RunStoreError("this RunWriter is closed")
        p = self.path / _check_relpath(relpath)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def save_array(self, relpath: str, array: np.ndarray, block_rows: int = 65536) -> None:
        """Save a numeric array as .npy (no pickle; object arrays are refused).

        A memory-mapped array (larger than memory) is copied ``block_rows`` rows at a time, and the
        pages read and written are dropped from the resident set after each block.
        """
        if isinstance(array, np.memmap):
            if array.dtype.hasobject:
                raise RunStoreError(f"{relpath}: object arrays cannot be stored (they would need pickle)")
            out = np.lib.format.open_memmap(self._target(relpath), mode="w+", dtype=array.dtype, shape=array.shape)
            for start in range(0, len(array), block_rows):
                out[start: start + block_rows] = array[start: start + block_rows]
                release_mapped_pages(out)
                release_mapped_pages(array)
            out.flush()
            del out
            return
        arr = np.asarray(array)
        if arr.dtype.hasobject:
            raise RunStoreError(f"{relpath}: object arrays cannot be stored (they would need pickle)")
        with open(self._target(relpath), "wb") as fh:
            np.save(fh, arr, allow_pickle=False)

    def save_table(self, relpath: str, table: pd.DataFrame) -> None:
        """Save a DataFrame as Parquet (index dropped)."""
        table.to_parquet(self._target(relpath), index=False)

    def save_json(self, relpath: str, obj: Any) -> None:
        """Save a JSON document (numpy values converted, NaN/inf written as null)."""
        _dump_json(self._target(relpath), obj)

    def save_tensors(self, relpath: str, tensors: dict[str, np.ndarray]) -> None:
        """Save named numpy arrays as safetensors."""
        from safetensors.numpy import save_file

        arrays = {str(k): np.ascontiguousarray(np.asarray(v)) for k, v in tensors.items()}
        save_file(arrays, str(self._target(relpath)))

    # commit ---------------------------------------------------------------------------------------
    def commit(self, manifest: dict) -> Path:
        """Validate, write manifest.json last, rename into place; return the final path."""
        if self._committed or self._closed:
            raise RunStoreError("this RunWriter is closed")
        manifest = dict(manifest)
        manifest.setdefault("format_version", FORMAT_VERSION)
        manifest.setdefault("name", self.out_dir.name)
        manifest.setdefault("created", now_iso())
        manifest.setdefault("score_definition", SCORE_DEFINITION)
        manifest = _json_safe(manifest)
        _validate(self.path, manifest, self.out_dir.name)
        _dump_json(self.path / "manifest.json", manifest)

        old: Path | None = None
        if self.out_dir.exists():
            if not self.overwrite:
                raise RunStoreError(f"{self.out_dir} exists; pass --overwrite or choose another --out")
            old = self.out_dir.parent / f".{self.out_dir.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(self.out_dir, old)
        try:
            os.rename(self.path, self.out_dir)
        except BaseException:
            if old is not None:
                os.rename(old, self.out_dir)
            raise
        self._committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out_dir


# --------------------------------------------------------------------------------------------------
# reader


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
        if entry.is_dir() and (entry / "manifest.json").is_file() and _is_inside(entry, root):
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
    if not mpath.is_file():
        raise RunStoreError(f"run '{name}': missing manifest.json; re-run precompute")
    try:
        manifest = _load_json(mpath)
    except (OSError, ValueError) as exc:
        raise RunStoreError(f"run '{name}': manifest.json is not valid JSON ({exc}); re-run precompute") from exc
    _validate(resolved, manifest, name)
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
        return self.path / _check_relpath(rel)

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
        return self._cached("pretrain", lambda: pd.read_parquet(self._file("pretrain.parquet")))

    def test_table(self) -> pd.DataFrame:
        return self._cached("test", lambda: pd.read_parquet(self._file("finetune_test.parquet")))

    def _optional_table(self, rel: str) -> pd.DataFrame | None:
        def load():
            p = self._file(rel)
            return pd.read_parquet(p) if p.is_file() else None

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
            vocab = _load_json(p).get("vocabulary")
            if isinstance(vocab, dict):  # {word: index}
                vocab = sorted(vocab, key=vocab.get)
            return [str(w) for w in vocab] if vocab is not None else None

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
