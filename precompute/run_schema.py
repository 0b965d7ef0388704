"""The run-directory schema: the contract between ``precompute`` (writer) and ``explorer`` (reader).

A run is a directory ``ROOT/<name>/`` written atomically (``precompute.run_writer``): every file goes
into a temporary sibling ``ROOT/.<name>.tmp-<pid>-<rand>``, ``manifest.json`` is written last, and the
directory is renamed into place only when everything succeeded. A directory without ``manifest.json``
is not a run. This module holds what both sides check: the format constants, safe names and paths
inside a run, strict JSON, the manifest's keys and types (``check_manifest_types``) and every file's
presence, shape and column types (``validate_run``). It must not import torch (the explorer loads it
at start-up); numpy, pandas, pyarrow and json only.

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

Nothing unpickles anything: arrays are read with ``allow_pickle=False``, tables are Parquet,
metadata is JSON, weights are safetensors.
"""

from __future__ import annotations

import json
import math
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .contract import GROUP_COLUMNS, NOISE_COLUMNS, PAIRS_COLUMNS, PRETRAIN_COLUMNS, TEST_COLUMNS
from .errors import PrecomputeError

__all__ = [
    "FORMAT_VERSION", "REQUIRED_MANIFEST_KEYS", "MODALITIES", "MANIFEST_SCHEMA", "MAX_JSON_DEPTH",
    "RunStoreError", "RunFormatError", "now_iso", "validate_run_name", "check_relpath", "is_inside",
    "json_safe", "dump_json", "load_json", "check_manifest_types", "validate_run",
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


class RunFormatError(RunStoreError, ValueError):
    """A JSON document of a run has a value of the wrong type, or is nested too deeply. Also a
    ``ValueError``: ``json.loads`` failures and these are caught together."""


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


def check_relpath(relpath: str) -> Path:
    """A relative path inside a run (``scores/fixed.npy``); refuses absolute paths and ``..``."""
    p = Path(relpath)
    if not relpath or p.is_absolute() or any(part in ("..", "") for part in p.parts) or "\\" in relpath:
        raise RunStoreError(f"invalid path inside a run: {relpath!r}")
    return p


def is_inside(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------------
# JSON


def json_safe(obj: Any) -> Any:
    """numpy scalars/arrays -> Python; non-finite floats -> None (strict JSON); Paths -> str."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    raise RunStoreError(f"value of type {type(obj).__name__} cannot be stored in JSON: {obj!r}")


def dump_json(path: Path, obj: Any) -> None:
    text = json.dumps(json_safe(obj), indent=2, sort_keys=False, allow_nan=False, ensure_ascii=False)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)


def load_json(path: Path) -> Any:
    """Parse a JSON file; RecursionError (absurdly deep nesting) is reported as RunFormatError."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise RunFormatError("JSON nested too deeply") from None


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
# Each checker raises RunFormatError naming the key path; extra keys are allowed (forward compatible).
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
        raise RunFormatError(f"{path} must be {what}")


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
    "solver_agreement": _optional(_dict_of(_dict_of(_any_json))),
}


def check_manifest_types(manifest: Any) -> None:
    """Raise RunFormatError naming the first value of the wrong type (see MANIFEST_SCHEMA)."""
    _check(isinstance(manifest, dict), "manifest.json", "a JSON object")
    _check(_json_depth(manifest) <= MAX_JSON_DEPTH, "manifest.json", f"nested at most {MAX_JSON_DEPTH} levels deep")
    for key, checker in MANIFEST_SCHEMA.items():
        if key in manifest:
            checker(manifest[key], key)


def validate_run(run_dir: Path, manifest: dict, label: str) -> None:
    """Check manifest keys and every required file's presence and shape.

    ``label`` is the run's name as users know it; every error starts with ``run '<label>':``.
    """

    def fail(msg: str) -> None:
        raise RunStoreError(f"run '{label}': {msg}")

    def rel_exists(rel: str) -> Path:
        p = run_dir / rel
        if not p.is_file():
            fail(f"missing {rel}; re-run precompute")
        if not is_inside(p, run_dir):
            fail(f"{rel} points outside the run directory")
        return p

    if not isinstance(manifest, dict):
        fail("manifest.json is not a JSON object; re-run precompute")
    missing = [k for k in REQUIRED_MANIFEST_KEYS if k not in manifest]
    if missing:
        fail(f"manifest.json lacks {', '.join(missing)}; re-run precompute")
    try:
        check_manifest_types(manifest)
    except RunFormatError as exc:
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
