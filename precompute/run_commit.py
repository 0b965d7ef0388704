"""The run directory of a torchrun job: written by rank 0, committed only after every rank succeeded.

Only rank 0 owns a ``RunWriter`` (``rank_zero_writer``); it writes to a temporary sibling and is
committed by ``commit_after_barrier`` only after every rank has reported success at a barrier. Both
are agreements (``precompute.distributed``): if any rank failed, every rank raises, so rank 0 leaves
its ``with`` block by an exception and the writer deletes the temporary directory; on SIGTERM
(torchrun's answer to a failed rank) the writer is aborted in the signal handler (``on_sigterm``).
Only a SIGKILL of rank 0 (or an nccl watchdog abort) can leave the temporary ``.<name>.tmp-*``
sibling, which is never a run (no manifest; names starting with '.' are not listed by
``list_runs``), as for a single process. Outside a process group both are plain one-process steps.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from pathlib import Path

from .distributed import DistributedConfigError, agree, broadcast_object, get_rank, on_sigterm
from .run_writer import RunWriter

__all__ = ["rank_zero_writer", "commit_after_barrier"]


@contextmanager
def rank_zero_writer(out_dir: str | Path, overwrite: bool = False):
    """Collective context manager: a ``RunWriter`` on rank 0 (None elsewhere).

    If rank 0 cannot create it (``out_dir`` exists, bad name), every rank raises. Leaving the block
    by an exception on rank 0, or without ``commit_after_barrier``, deletes the temporary directory.
    """
    writer, error = None, None
    with ExitStack() as stack:
        if get_rank() == 0:
            try:
                writer = RunWriter(out_dir, overwrite=overwrite)
            except Exception as err:      # noqa: BLE001
                error = err
        if writer is not None:            # owned before the agreement: a peer may die during it
            stack.enter_context(writer)
            stack.callback(on_sigterm(writer.abort))       # abort() leaves a committed run alone
        agree(error, "creating the run directory")
        yield writer


def commit_after_barrier(writer: RunWriter | None, manifest: dict | None) -> Path:
    """Collective: every rank reports success (a barrier); only then rank 0 commits ``writer``.

    Returns the committed path on every rank; raises on every rank if any rank failed before the
    barrier or the commit itself failed (rank 0's ``with`` block then deletes the temporary dir).
    """
    agree(None, "the run")
    path, error = None, None
    if get_rank() == 0:
        try:
            if writer is None:
                raise DistributedConfigError("commit_after_barrier: rank 0 has no RunWriter")
            path = writer.commit(manifest)
        except Exception as err:      # noqa: BLE001
            error = err
    agree(error, "committing the run directory")
    return broadcast_object(path)
