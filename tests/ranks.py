"""Two (or more) gloo processes on 127.0.0.1 for tests and benchmarks: ``run_on_ranks``.

``run_on_ranks(fn, world_size, *args)`` runs ``fn(rank, world_size, *args)`` in fresh spawned
processes joined by a gloo process group that listens on the loopback device only, and returns the
ranks' results; the code under test then sees ``precompute.distributed.is_distributed()`` as under
torchrun. Not part of the package: it starts processes and binds sockets, which only tests and
benchmarks do.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from precompute.distributed import raise_on_sigterm


def find_free_port() -> int:
    """A TCP port free on 127.0.0.1 at the time of asking (loopback only)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RanksFailed(RuntimeError):
    """``run_on_ranks``: one or more ranks failed; ``errors`` maps rank -> its traceback (or exit code)."""

    def __init__(self, errors: dict[int, str]):
        text = "\n".join(f"-- rank {r}:\n{e}" for r, e in sorted(errors.items()))
        super().__init__(f"rank(s) {', '.join(map(str, sorted(errors)))} failed:\n{text}")
        self.errors = errors


_LISTENERS: list[socket.socket] = []


def _loopback_store(rank: int, world_size: int, port: int, timeout_s: float) -> dist.TCPStore:
    """The rendezvous store, listening on 127.0.0.1 only (TCPStore alone would listen on every
    interface): rank 0 binds the socket itself and hands it over; gloo's own connections stay on
    the loopback device through GLOO_SOCKET_IFNAME=lo."""
    timeout = timedelta(seconds=timeout_s)
    if rank != 0:
        return dist.TCPStore("127.0.0.1", port, world_size, False, timeout)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(world_size)
    store = dist.TCPStore("127.0.0.1", port, world_size, True, timeout, master_listen_fd=listener.fileno())
    _LISTENERS.append(listener)              # keep the socket open as long as the process lives
    return store


def _rank_entry(rank: int, fn, world_size: int, port: int, result_dir: str, timeout_s: float, threads: int,
                args: tuple) -> None:
    torch.set_num_threads(threads)
    raise_on_sigterm()
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world_size),
                       "GLOO_SOCKET_IFNAME": "lo"})
    try:
        dist.init_process_group("gloo", store=_loopback_store(rank, world_size, port, timeout_s), rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout_s))
        try:
            result = fn(rank, world_size, *args)
            with open(Path(result_dir) / f"rank{rank}.pkl", "wb") as fh:
                pickle.dump(result, fh)
            dist.barrier()          # every rank is done before rank 0's store goes away
        finally:
            dist.destroy_process_group()
    except BaseException:
        (Path(result_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    # Skip interpreter teardown: destroying gloo's and the store's C++ threads at exit has
    # occasionally aborted a finished rank ("terminate called without an active exception").
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args, timeout_s: float = 120.0, threads: int = 1) -> list:
    """Runs ``fn(rank, world_size, *args)`` in ``world_size`` fresh (spawned) processes joined by a
    gloo process group on 127.0.0.1 (a free port; GLOO_SOCKET_IFNAME=lo), CPU only, ``threads``
    torch threads each. Returns the ranks' return values (pickled through a temporary directory).
    ``fn`` must be importable (module level).

    Every rank is left to finish on its own (a rank that failed in an agreed step exits after its
    cleanup; gloo errors out the peers of a crashed one); one still running ``timeout_s`` + 30 s
    after the start is SIGTERMed. If any rank failed, ``RanksFailed`` carries every failed
    rank's traceback.
    """
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="ranks-") as tmp:
        context = mp.start_processes(_rank_entry, args=(fn, world_size, find_free_port(), tmp, timeout_s, threads,
                                                        args), nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s + 30
        for process in context.processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in context.processes:
            if process.is_alive():
                process.terminate()
        for process in context.processes:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join()
        errors = {}
        for r, process in enumerate(context.processes):
            err = Path(tmp) / f"rank{r}.err"
            if err.exists():
                errors[r] = err.read_text()
            elif process.exitcode != 0:
                errors[r] = f"exited with code {process.exitcode} (no Python traceback)"
        if errors:
            raise RanksFailed(errors)
        results = []
        for r in range(world_size):
            with open(Path(tmp) / f"rank{r}.pkl", "rb") as fh:
                results.append(pickle.load(fh))
    return results
