"""Atomic writes of run directories: a run appears at its path complete, or not at all.

``RunWriter`` puts every file into a temporary sibling ``ROOT/.<name>.tmp-<pid>-<rand>``, validates
the manifest and the files against the schema (``precompute.run_schema``), writes ``manifest.json``
last and renames the directory into place, SIGINT and SIGTERM deferred during the swap (one atomic
``renameat2`` exchange where Linux offers it). ``--overwrite`` replaces only a complete run of this
project (``check_replaceable``). An uncommitted writer deletes its temporary directory and the
parent folders it created however it is lost (an exception, garbage collection, ``abort_open_writers``
from a SIGTERM handler); ``remove_stale_temporaries`` removes those a SIGKILL left behind. Torch-free.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
import secrets
import shutil
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .contract import SCORE_DEFINITION
from .memmaps import release_mapped_pages
from .manifest import Manifest
from .run_schema import (FORMAT_VERSION, RunStoreError, check_relpath, dump_json, json_safe, now_iso,
                         validate_run, validate_run_name)
from .runstore import open_run

__all__ = ["RunWriter", "abort_open_writers", "check_replaceable", "remove_stale_temporaries"]


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
        p = self.path / check_relpath(relpath)
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
        dump_json(self._target(relpath), obj)

    @_reports_io_errors
    def save_tensors(self, relpath: str, tensors: dict[str, np.ndarray]) -> None:
        """Save named numpy arrays as safetensors."""
        from safetensors.numpy import save_file

        arrays = {str(k): np.ascontiguousarray(np.asarray(v)) for k, v in tensors.items()}
        save_file(arrays, str(self._target(relpath)))

    # commit ---------------------------------------------------------------------------------------
    @_reports_io_errors
    def commit(self, manifest: Manifest | dict) -> Path:
        """Validate, write manifest.json last, rename into place; return the final path."""
        if self._committed or self._closed:
            raise RunStoreError("this RunWriter is closed")
        manifest = manifest.as_dict() if isinstance(manifest, Manifest) else dict(manifest)
        manifest.setdefault("format_version", FORMAT_VERSION)
        manifest.setdefault("name", self.out_dir.name)
        manifest.setdefault("created", now_iso())
        manifest.setdefault("score_definition", SCORE_DEFINITION)
        manifest = json_safe(manifest)
        validate_run(self.path, manifest, self.out_dir.name)
        dump_json(self.path / "manifest.json", manifest)

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
