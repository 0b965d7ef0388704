"""Processes: the torchrun environment, shards of the pretraining set, collectives and agreements.
No influence math and no run directory live here (``precompute.run_commit`` commits a run after a
barrier, with the agreements below).

Under ``torchrun --nproc-per-node N`` every rank holds the task and the trained parameters and owns
one contiguous, balanced shard of the m pretraining examples (``shard_range``). The math modules
take what they need from here, and every function is the identity (or a plain call) outside a
process group, so one process is the degenerate case of N:

    precompute.curvature   ``distributed_pretrain_hvp``: each rank's shard part of H_P V,
                           summed by ``all_reduce_sum``
    precompute.ekfac       ``fit_ekfac(data_parallel=True)``: each rank's shard part of the
                           EK-FAC sums, all-reduced (ekfac/pcg with the data-parallel solve)
    precompute.influence   ``stacked_test_vectors``: the finetune side on rank 0
                           (``rank_zero_compute``), the pretraining solve on rank 0 or in lockstep
                           on every rank, the vectors broadcast (``broadcast_vectors``)
    precompute.scoring     ``sharded_score_pretraining``: each rank streams its shard
                           (``shard_task``); the [T, m] scores are gathered to rank 0
                           (``gather_columns``) or written into shared .npy memory maps

Failures. Each collective step is an *agreement*: every rank reports None or its error message
(``all_gather_object``), and if any rank failed, every rank raises (``DistributedError`` naming the
failed ranks; the failed rank re-raises its own exception), so ``with``/``finally`` blocks unwind on
every rank. A rank that dies without reaching an agreement (an uncaught error, a crash) closes its
sockets: gloo raises "Connection closed by peer" on the others, which then unwind the same way
(under nccl they wait for the process-group timeout instead). torchrun SIGTERMs the survivors when a
rank fails; ``raise_on_sigterm`` (installed by ``init_distributed``) runs the cleanups registered
with ``on_sigterm`` in the signal handler and raises ``SystemExit``, so the survivors unwind too.

Measured (``benchmarks/bench_large.py``, m = 1,000,000 digits-sized examples, P = 1,125, T = 64,
chunk 1,024, one CPU thread): with the outer-product scoring path, 0.52 s per 100,000 examples
and peak RSS 429 MiB (370 MiB before the pass, mostly imports); two ranks 0.26 s per 100,000.
Before that path: 1.1 s, and peak RSS 527 MiB with page release vs 978 MiB without.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import signal
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from .errors import PrecomputeError
from .streaming import LazyRows
from .task import TwoStageTask

__all__ = [
    "DistEnv", "DistributedError", "DistributedConfigError", "torchrun_env", "init_distributed", "close_distributed",
    "is_distributed", "get_rank", "get_world_size", "default_backend", "collective_device", "shard_range", "shard_task",
    "agree", "agreed", "broadcast_object", "broadcast_vectors", "rank_zero_compute", "all_reduce_sum",
    "gather_columns", "raise_on_sigterm", "on_sigterm",
]

class DistributedError(PrecomputeError, RuntimeError):
    """A step failed on one or more ranks; ``errors`` maps rank -> "ExceptionType: message"."""

    def __init__(self, message: str, errors: dict[int, str] | None = None):
        super().__init__(message)
        self.errors = dict(errors or {})


class DistributedConfigError(PrecomputeError, ValueError):
    """A bad process setup or argument: the torchrun environment, the device, a rank outside its
    world, a broadcast without data. Also a ``ValueError``, as these have always been."""


# ---- environment and process group -----------------------------------------------------------------

@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: global rank, number of ranks, rank on this node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def torchrun_env(environ: dict[str, str] | None = None) -> DistEnv | None:
    """The torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK), or None when not launched by it."""
    env = os.environ if environ is None else environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
    except ValueError as err:
        raise DistributedConfigError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {err}") from err
    if world < 1 or not 0 <= rank < world or local < 0:
        raise DistributedConfigError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}, "
                                     f"LOCAL_RANK={local}")
    return DistEnv(rank, world, local)


def default_backend(device: str | torch.device | None = None) -> str:
    """nccl for CUDA devices, gloo for CPU."""
    if device is None:
        return "nccl" if torch.cuda.is_available() else "gloo"
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_distributed(device: str = "auto", backend: str | None = None,
                     timeout_s: float = 1800.0) -> tuple[DistEnv, torch.device]:
    """Joins the process group torchrun set up; (DistEnv(0, 1, 0), device) when not under torchrun.

    device "auto": cuda:LOCAL_RANK when CUDA is available, else cpu. Backend: nccl on CUDA, gloo on
    CPU, unless given. Initialising twice is a no-op. Also installs ``raise_on_sigterm``.
    """
    env = torchrun_env() or DistEnv()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DistributedConfigError(f"device {device}: CUDA is not available on this machine; use cpu")
        dev = torch.device("cuda", env.local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if env.world_size > 1 and not dist.is_initialized():
        raise_on_sigterm()
        backend = backend or default_backend(dev)
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                                timeout=timedelta(seconds=timeout_s), **kwargs)
    return env, dev


def close_distributed() -> None:
    """Leaves the process group (if any); call once at the end of a torchrun job."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def collective_device() -> torch.device:
    """Where tensors must live for collectives: the current CUDA device under nccl, else cpu."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_SIGTERM_CLEANUPS: list[Callable[[], None]] = []


def on_sigterm(cleanup: Callable[[], None]) -> Callable[[], None]:
    """Registers ``cleanup`` to run first when ``raise_on_sigterm``'s handler fires; returns the
    function that unregisters it (``precompute.run_commit`` registers its writer's abort)."""
    _SIGTERM_CLEANUPS.append(cleanup)
    return lambda: _SIGTERM_CLEANUPS.remove(cleanup)


def raise_on_sigterm() -> None:
    """On SIGTERM: run the cleanups registered with ``on_sigterm``, then raise SystemExit(143) so
    ``with``/``finally`` blocks unwind too.

    torchrun and ``mp.spawn`` SIGTERM the surviving ranks when one fails; Python's default action
    would end them without unwinding, and a SystemExit alone could interrupt a cleanup already
    under way (the handler runs the cleanups itself, so it cannot). A signal arriving while a rank
    is blocked inside a C++ collective is handled when that call returns; gloo returns with an
    error once the peer is gone.
    """
    def handler(signum, frame):
        for cleanup in list(_SIGTERM_CLEANUPS):
            try:
                cleanup()
            except Exception:       # noqa: BLE001 (best effort; we are exiting)
                pass
        raise SystemExit(128 + signum)
    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:        # not the main thread: leave the default
        pass


# ---- shards -----------------------------------------------------------------------------------------

def shard_range(m: int, rank: int, world: int) -> slice:
    """Contiguous, balanced shard of range(m) for ``rank``: sizes differ by at most one, the first
    m % world ranks get the larger ones; shards tile range(m) in rank order."""
    if world < 1 or not 0 <= rank < world:
        raise DistributedConfigError(f"rank {rank} is not in a world of {world}")
    if m < 0:
        raise DistributedConfigError(f"m must be >= 0, got {m}")
    base, extra = divmod(m, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def _rows(data, sl: slice):
    return data.view(sl) if isinstance(data, LazyRows) else data[sl]


def shard_task(task: TwoStageTask, rows: slice) -> TwoStageTask:
    """A shallow copy of ``task`` whose pretraining set is ``rows`` (views, no copies of data or
    modules). Its ``m`` is the shard's length: scale vectors by len/m to keep the full denominator."""
    view = copy.copy(task)
    view.pretrain_x = _rows(task.pretrain_x, rows)
    view.pretrain_y = _rows(task.pretrain_y, rows)
    return view


# ---- agreement and broadcasts -----------------------------------------------------------------------

def agree(error: BaseException | None, what: str) -> None:
    """Collective: every rank reports success (None) or its error; if any failed, all raise.

    The failed rank re-raises its own exception; the others raise DistributedError naming it. A
    no-op (re-raising ``error`` if given) outside a process group. Also serves as a barrier.
    """
    if not is_distributed():
        if error is not None:
            raise error
        return
    mine = None if error is None else f"{type(error).__name__}: {error}"
    reports: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, mine)
    failed = {r: msg for r, msg in enumerate(reports) if msg is not None}
    if failed:
        if error is not None:
            raise error
        detail = "; ".join(f"rank {r}: {msg}" for r, msg in failed.items())
        raise DistributedError(f"{what} failed on rank {', '.join(map(str, failed))}: {detail}", failed)


@contextmanager
def agreed(what: str):
    """Collective block: it runs on every rank; if it raised on any rank, it raises on every rank
    (``agree`` after the block). Outside a process group it is a plain block."""
    error = None
    try:
        yield
    except Exception as err:      # noqa: BLE001 (reported to every rank, then re-raised)
        error = err
    agree(error, what)


def _map_tensors(obj, fn):
    if isinstance(obj, Tensor):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _map_tensors(getattr(obj, f.name), fn)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


def broadcast_object(obj: Any, src: int = 0, device: str | torch.device | None = None) -> Any:
    """Pickled broadcast of a small object from ``src``; returns ``obj`` outside a process group.

    Tensors inside travel on the cpu (a CUDA tensor of rank 0 must not land on rank 1's cuda:0);
    with ``device`` they are moved there on arrival, else they arrive on the cpu.
    """
    if not is_distributed():
        return obj
    box = [_map_tensors(obj, lambda t: t.detach().cpu()) if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=collective_device())
    out = box[0]
    if device is not None:
        out = _map_tensors(out, lambda t: t.to(device))
    return out


def broadcast_vectors(vectors: Tensor | dict[str, Tensor] | None, src: int = 0,
                      device: str | torch.device | None = None) -> Tensor | dict[str, Tensor]:
    """Test-side vectors from ``src`` to every rank: a tensor [P, T] or {scenario: tensor}.

    Other ranks may pass None. Shapes and dtypes go first (pickled, tiny), then each tensor by
    ``dist.broadcast`` (no pickling of the data). The result lands on ``device`` (default: where
    the tensors were on ``src``; the collective device, cuda:LOCAL_RANK or cpu, elsewhere).
    """
    if not is_distributed():
        return vectors
    rank = get_rank()
    if rank == src:
        if vectors is None:
            raise DistributedConfigError(f"broadcast_vectors: the source rank {src} has no vectors")
        items = vectors.items() if isinstance(vectors, dict) else [(None, vectors)]
        meta = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in items]
        tensors = [v for _, v in items]
    else:
        meta, tensors = None, None
    meta = broadcast_object(meta, src)
    cdev = collective_device()
    out = []
    for i, (key, shape, dtype) in enumerate(meta):
        if rank == src:
            buf = tensors[i].detach().to(cdev).contiguous()
            target = device or tensors[i].device
        else:
            buf = torch.empty(shape, dtype=getattr(torch, dtype), device=cdev)
            target = device or cdev
        dist.broadcast(buf, src=src)
        out.append((key, buf.to(target)))
    if len(out) == 1 and out[0][0] is None:
        return out[0][1]
    return dict(out)


def rank_zero_compute(fn: Callable[..., Any], *args, device: str | torch.device | None = None,
                      what: str = "rank-0 step", **kwargs) -> Any:
    """Runs ``fn`` on rank 0 only and broadcasts its (small, picklable) result to every rank.

    If it raises, every rank raises (``agree``). Outside a process group: just ``fn(...)``.
    """
    if not is_distributed():
        return fn(*args, **kwargs)
    result, error = None, None
    if get_rank() == 0:
        try:
            result = fn(*args, **kwargs)
        except Exception as err:     # noqa: BLE001 (reported to every rank, then re-raised)
            error = err
    agree(error, what)
    return broadcast_object(result, 0, device)


# ---- reductions --------------------------------------------------------------------------------------

def all_reduce_sum(t: Tensor) -> Tensor:
    """Σ over ranks of ``t`` (same shape on every rank), on ``t``'s device; ``t`` itself outside a
    process group."""
    if not is_distributed():
        return t
    cdev = collective_device()
    buf = t.to(cdev).contiguous()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def gather_columns(local: np.ndarray, m: int) -> np.ndarray | None:
    """Rank 0 gets [T, m]: every rank's [T, len(shard_range(m, rank, world))] block (one dtype on
    every rank), side by side in rank order; other ranks get None. Outside a process group,
    ``local`` itself.

    Shards differ in width by at most one, so each travels padded to the widest (``dist.gather``
    needs equal shapes) and is cut back on rank 0."""
    if not is_distributed():
        return local
    rank, world = get_rank(), get_world_size()
    widths = [s.stop - s.start for s in (shard_range(m, r, world) for r in range(world))]
    cdev = collective_device()
    block = torch.from_numpy(np.ascontiguousarray(local))
    send = torch.zeros(local.shape[0], max(widths), dtype=block.dtype, device=cdev)
    send[:, : local.shape[1]] = block.to(cdev)
    gathered = [torch.empty_like(send) for _ in range(world)] if rank == 0 else None
    dist.gather(send, gather_list=gathered, dst=0)
    if rank != 0:
        return None
    parts = [gathered[r][:, : widths[r]].cpu().numpy() for r in range(world)]
    return np.ascontiguousarray(np.concatenate(parts, axis=1))
