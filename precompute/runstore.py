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

import ctypes
import errno
import functools
import json
import math
import os
import re
import secrets
import shutil
import threading
import weakref
from contextlib import contextmanager
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
    """Parse a JSON file; RecursionError (absurdly deep nesting) is reported as ValueError."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


# --------------------------------------------------------------------------------------------------
# validation shared by writer and reader


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a .npy file from its header only; refuses object arrays."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:  # object arrays need pickle
        raise RunStoreError(f"{path.name}: cannot be read without pickle ({exc})") from exc
    except Exception as exc:
        raise RunStoreError(f"{path.name}: not a readable .npy file ({' '.join(str(exc).split())}); "
                            "re-run precompute") from exc
    return tuple(arr.shape), arr.dtype


def _parquet_meta(path: Path) -> tuple[int, list[str]]:
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(path)
        schema = pq.read_schema(path)
    except Exception as exc:
        raise RunStoreError(f"{path.name}: not a readable Parquet file ({' '.join(str(exc).split())}); "
                            "re-run precompute") from exc
    return int(meta.num_rows), list(schema.names)


# A schema of the manifest's types (not only its keys): the explorer formats these values without
# further checks, so a string where a number belongs must be refused on read, not crash a page.
# Each checker raises ValueError naming the key path; extra keys are allowed (forward compatible).
MAX_JSON_DEPTH = 32


def _json_depth(obj: Any) -> int:
    """Nesting depth of a JSON value, iteratively (a deep document must not exhaust the stack)."""
    depth, stack = 0, [(obj, 1)]
    while stack:
        value, d = stack.pop()
        depth = max(depth, d)
        if isinstance(value, dict):
            stack.extend((v, d + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, d + 1) for v in value)
    return depth


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _check(ok: bool, path: str, what: str) -> None:
    if not ok:
        raise ValueError(f"{path} must be {what}")


def _str(v, path):
    _check(isinstance(v, str), path, "a string")


def _int(v, path):
    _check(_is_int(v), path, "an integer")


def _num_or_null(v, path):
    _check(v is None or _is_num(v), path, "a finite number or null")


def _optional(checker):
    def check(v, path):
        if v is not None:
            checker(v, path)
    return check


def _list_of(checker):
    def check(v, path):
        _check(isinstance(v, list), path, "a list")
        for i, x in enumerate(v):
            checker(x, f"{path}[{i}]")
    return check


def _dict_of(checker):
    def check(v, path):
        _check(isinstance(v, dict), path, "an object")
        for k, x in v.items():
            checker(x, f"{path}.{k}")
    return check


def _record(fields: dict):
    """An object whose listed keys, where present, have the listed types (other keys: any)."""
    def check(v, path):
        _check(isinstance(v, dict), path, "an object")
        for k, checker in fields.items():
            if k in v:
                checker(v[k], f"{path}.{k}")
    return check


def _any_json(v, path):
    pass


def _stat(v, path):
    """A statistic (number or null) or one level of them ({"per_test_point": {"12": 0.9, ...}})."""
    (_dict_of(_num_or_null) if isinstance(v, dict) else _num_or_null)(v, path)


_STATS = _dict_of(_stat)                        # {"pearson": 0.9, "n_pairs": 24, "per_test_point": {...}}
MANIFEST_SCHEMA: dict[str, Any] = {
    "format_version": _int, "name": _str, "created": _str, "preset": _str, "modality": _str,
    "n_pretrain": _int, "n_finetune_test": _int,
    "test_points": _list_of(_int), "validation_test_points": _list_of(_int), "scenarios": _list_of(_str),
    "score_definition": _str,
    "pretrain_class_names": _list_of(_str), "finetune_class_names": _list_of(_str),
    "pretrain_accuracy": _num_or_null, "finetune_accuracy": _dict_of(_num_or_null),
    "validation": _dict_of(_STATS), "baselines": _dict_of(_dict_of(_STATS)),
    "group_removal": _dict_of(_STATS), "validation_protocol": _str,
    "timings_s": _dict_of(_num_or_null), "diagnostics": _dict_of(_dict_of(_any_json)),
    "config": _dict_of(_any_json),
    "label_noise": _optional(_record({"rate": _num_or_null, "seed": _int, "n_flipped": _int})),
    "mislabel_detection": _optional(_dict_of(_STATS)),
    "image_shape": _optional(_list_of(_int)),
    # optional keys
    "device": _str, "dtype": _str, "world_size": _int, "n_pretrain_params": _int, "n_finetune_params": _int,
    "lds": _optional(_dict_of(_any_json)), "cleaning": _optional(_dict_of(_any_json)),
}


def check_manifest_types(manifest: Any) -> None:
    """Raise ValueError naming the first value of the wrong type (see MANIFEST_SCHEMA)."""
    _check(isinstance(manifest, dict), "manifest.json", "a JSON object")
    _check(_json_depth(manifest) <= MAX_JSON_DEPTH, "manifest.json", f"nested at most {MAX_JSON_DEPTH} levels deep")
    for key, checker in MANIFEST_SCHEMA.items():
        if key in manifest:
            checker(manifest[key], key)


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
    try:
        check_manifest_types(manifest)
    except ValueError as exc:
        fail(f"manifest.json: {exc}; re-run precompute")
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
    _check_tables(run_dir, manifest, fail)


# Column kinds the explorer relies on ("int", "num" = int or float, "bool", "str"); columns not
# listed may have any type.
_PRETRAIN_KINDS = {"id": "int", "label": "int", "label_name": "str", "source": "str", "pretrain_loss": "num",
                   "predicted_label": "int", "text": "str", "original_label": "int", "flipped": "bool"}
_TEST_KINDS = {"id": "int", "label": "int", "label_name": "str", "source": "str", "text": "str",
               "pred_": "int", "loss_": "num", "correct_": "bool"}
_PAIRS_KINDS = {"scenario": "str", "test_id": "int", "pretrain_id": "int", "kind": "str", "predicted": "num",
                "actual": "num", "grad_norm": "num", "converged": "bool"}
_GROUP_KINDS = {"scenario": "str", "test_id": "int", "kind": "str", "percent": "num", "n_removed": "int",
                "predicted": "num", "actual": "num", "accuracy_change": "num"}


def _kind_ok(kind: str, dtype) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(dtype):
        dtype = dtype.value_type
    if kind == "int":
        return pa.types.is_integer(dtype)
    if kind == "num":
        return pa.types.is_integer(dtype) or pa.types.is_floating(dtype)
    if kind == "bool":
        return pa.types.is_boolean(dtype)
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or \
        (hasattr(pa.types, "is_string_view") and pa.types.is_string_view(dtype)) or pa.types.is_null(dtype)


def _check_tables(run_dir: Path, manifest: dict, fail) -> None:
    """Column types of every table, and the id columns of the two main tables (0..n-1 in order:
    the explorer looks rows up by position). Reads schemas and the id columns only."""
    import pyarrow.parquet as pq

    for rel, kinds in (("pretrain.parquet", _PRETRAIN_KINDS), ("finetune_test.parquet", _TEST_KINDS),
                       ("validation/pairs.parquet", _PAIRS_KINDS), ("validation/group.parquet", _GROUP_KINDS),
                       ("cleaning/signals.parquet", {"id": "int"})):
        path = run_dir / rel
        if not path.is_file():
            continue
        try:
            schema = pq.read_schema(path)
            for field in schema:
                kind = kinds.get(field.name) or next((k for prefix, k in kinds.items()
                                                      if prefix.endswith("_") and field.name.startswith(prefix)), None)
                if kind and not _kind_ok(kind, field.type):
                    fail(f"{rel}: column {field.name} has type {field.type}, expected {kind}; re-run precompute")
            if rel in ("pretrain.parquet", "finetune_test.parquet"):
                ids = pq.read_table(path, columns=["id"]).column("id").to_numpy(zero_copy_only=False)
                if not np.array_equal(ids, np.arange(len(ids))):
                    fail(f"{rel}: column id must be 0, 1, 2, ... in order; re-run precompute")
        except RunStoreError:
            raise
        except Exception as exc:       # noqa: BLE001 (pyarrow raises many kinds on damaged files)
            fail(f"{rel} is damaged ({type(exc).__name__}); re-run precompute")


# --------------------------------------------------------------------------------------------------
# writer


def _write_error(out_dir: Path, exc: OSError) -> RunStoreError:
    """One line: which run could not be written, why, and what to do."""
    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    why = (exc.strerror or str(exc) or type(exc).__name__).replace("\n", " ")
    # numpy reports a short write ("N requested and M written") without an errno; on a regular file
    # that happens only when the disk is full or the file-size limit is reached.
    short_write = exc.errno is None and re.search(r"requested and \d+ written", str(exc))
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or short_write:
        why = "disk full or file size limit reached" if short_write else why
        fix = "free disk space or choose an --out on another disk"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "choose an --out in a folder you can write"
    else:
        fix = "choose another --out"
    return RunStoreError(f"cannot write run {out_dir}: {why}{where}; {fix}")


def _reports_io_errors(method):
    """Writer methods raise RunStoreError (one line, with the fix) instead of a bare OSError."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except OSError as exc:
            raise _write_error(self.out_dir, exc) from exc
    return wrapper


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
        if os.path.lexists(self.out_dir):
            if not self.overwrite:
                raise RunStoreError(f"{out_dir} exists; pass --overwrite or choose another --out")
            check_replaceable(self.out_dir)
        self._committed = False
        self._closed = False
        made: list[Path] = []
        try:
            made = _make_parents(self.out_dir.parent)
            remove_stale_temporaries(self.out_dir.parent)
            suffix = f"{os.getpid()}-{secrets.token_hex(4)}"
            self.path = self.out_dir.parent / f".{self.out_dir.name}.tmp-{suffix}"
            self.path.mkdir()
        except OSError as exc:
            _remove_empty(made)
            raise _write_error(self.out_dir, exc) from exc
        # Whatever way this writer is lost without a commit (an exception before the ``with`` block
        # is entered, garbage collection, interpreter exit on SIGTERM), the temporary directory and
        # the parents it created go too.
        self._finalizer = weakref.finalize(self, _discard, self.path, made)
        _OPEN_WRITERS.add(self)

    # context manager ----------------------------------------------------------------------------
    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self._committed:
            self.abort()
        return False

    def abort(self) -> None:
        """Delete the temporary directory and the parent folders this writer created."""
        self._closed = True
        _OPEN_WRITERS.discard(self)
        if not self._committed:
            self._finalizer()

    # file writers ---------------------------------------------------------------------------------
    def _target(self, relpath: str) -> Path:
        if self._closed or self._committed:
            raise RunStoreError("this RunWriter is closed")
        p = self.path / _check_relpath(relpath)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    @_reports_io_errors
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

    @_reports_io_errors
    def save_table(self, relpath: str, table: pd.DataFrame) -> None:
        """Save a DataFrame as Parquet (index dropped)."""
        table.to_parquet(self._target(relpath), index=False)

    @_reports_io_errors
    def save_json(self, relpath: str, obj: Any) -> None:
        """Save a JSON document (numpy values converted, NaN/inf written as null)."""
        _dump_json(self._target(relpath), obj)

    @_reports_io_errors
    def save_tensors(self, relpath: str, tensors: dict[str, np.ndarray]) -> None:
        """Save named numpy arrays as safetensors."""
        from safetensors.numpy import save_file

        arrays = {str(k): np.ascontiguousarray(np.asarray(v)) for k, v in tensors.items()}
        save_file(arrays, str(self._target(relpath)))

    # commit ---------------------------------------------------------------------------------------
    @_reports_io_errors
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

        with _signals_deferred():
            return self._swap_in()

    def _swap_in(self) -> Path:
        old: Path | None = None
        if os.path.lexists(self.out_dir):
            if not self.overwrite:
                raise RunStoreError(f"{self.out_dir} exists; pass --overwrite or choose another --out")
            check_replaceable(self.out_dir)          # it may have changed while this run was computed
            if _exchange(self.path, self.out_dir):   # one atomic step: readers see the old or the new run
                old = self.path
            else:
                old = self.out_dir.parent / f".{self.out_dir.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
                os.rename(self.out_dir, old)
        if old is None or old != self.path:
            try:
                os.rename(self.path, self.out_dir)
            except BaseException:
                if old is not None:
                    os.rename(old, self.out_dir)
                raise
        self._committed = True
        _OPEN_WRITERS.discard(self)
        self._finalizer.detach()
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out_dir


_OPEN_WRITERS: weakref.WeakSet = weakref.WeakSet()


def abort_open_writers() -> list[Path]:
    """Abort every uncommitted writer of this process (a SIGTERM handler calls it before exiting);
    returns the run directories they would have written."""
    aborted = []
    for writer in list(_OPEN_WRITERS):
        writer.abort()
        aborted.append(writer.out_dir)
    return aborted


@contextmanager
def _signals_deferred():
    """SIGINT and SIGTERM wait until the block is done: the renames that swap a run in must not
    be cut in half (the old run moved aside, the new one not yet in place)."""
    import signal

    try:
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    except (AttributeError, ValueError, OSError):
        blocked = None
    try:
        yield
    finally:
        if blocked is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def check_replaceable(out_dir: Path) -> None:
    """Raise RunStoreError unless ``out_dir`` is a complete run of this project (its manifest and
    files validate): ``--overwrite`` must never delete a folder of other files, or a runs root."""
    out_dir = Path(out_dir)
    reason = None
    if out_dir.is_symlink():
        reason = "it is a symbolic link"
    elif not out_dir.is_dir():
        reason = "it is not a directory"
    else:
        try:
            open_run(out_dir.parent, out_dir.name)
        except RunStoreError as exc:
            reason = str(exc).replace(f"run '{out_dir.name}': ", "")
    if reason:
        raise RunStoreError(f"--overwrite refused: {out_dir} is not a complete run written by this project "
                            f"({reason}); nothing was deleted; choose another --out, or move that folder "
                            f"away yourself")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the
    system or file system does not offer it (the caller then renames twice)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and missing ancestors; return those created, deepest first."""
    missing = []
    for d in [folder, *folder.parents]:
        if os.path.lexists(d):
            break
        missing.append(d)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        _remove_empty([d for d in missing if d.is_dir()])       # those made before the failure
        raise
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for d in folders:                 # deepest first; stops at the first that is not empty
        try:
            os.rmdir(d)
        except OSError:
            break


def _discard(path: Path, made_parents: list[Path]) -> None:
    shutil.rmtree(path, ignore_errors=True)
    _remove_empty(made_parents)


_TEMP_NAME = re.compile(r"^\..+\.(?:tmp|old)-(\d+)-[0-9a-f]{8}$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True                   # someone else's process, or not a PID: keep its folder
    return True


def remove_stale_temporaries(root: str | Path) -> list[Path]:
    """Delete ``ROOT/.<name>.tmp-<pid>-<hex>`` (and ``.old-``) folders whose process is gone: a run
    killed with SIGKILL cannot clean up after itself. Assumes the runs root is not shared between
    machines (PIDs are per machine); a folder of a live PID is kept."""
    removed = []
    try:
        entries = list(Path(root).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if not match or entry.is_symlink() or not entry.is_dir() or _pid_alive(int(match.group(1))):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


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
    if os.path.lexists(mpath) and not _is_inside(mpath, resolved):
        raise RunStoreError(f"run '{name}': manifest.json points outside the run directory; refusing to read it")
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
        p = self.path / _check_relpath(rel)
        if os.path.lexists(p) and not _is_inside(p, self.path):
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
                doc = _load_json(p)
            except (OSError, ValueError) as exc:
                raise RunStoreError(f"run '{self.name}': text/vectorizer.json is damaged ({exc}); re-run precompute") from exc
            vocab = doc.get("vocabulary") if isinstance(doc, dict) else None
            if isinstance(vocab, dict) and all(_is_int(i) for i in vocab.values()):  # {word: index}
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
