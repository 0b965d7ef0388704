"""Scale-out: data-parallel scoring and Hessian-vector products over shards of the pretraining set.

Under ``torchrun --nproc-per-node N`` (or ``run_on_ranks`` in tests) every rank holds the task and
the trained parameters, and owns one contiguous, balanced shard of the m pretraining examples
(``shard_range``). The work splits as design.md §2 orders it:

    test-side vectors  S [P, T]   computed once on rank 0 (``rank_zero_compute``) and broadcast
                                  (``broadcast_vectors``); or, when the pretraining Hessian itself is
                                  too big for one device, solved by every rank in lockstep with a
                                  data-parallel HVP (``distributed_hvp``, ``distributed_test_vectors``)
    scores       [T, m]           each rank streams its shard (``precompute.influence.score_pretraining``
                                  on a shallow view of the task, ``shard_task``); shards are gathered
                                  to rank 0, or written straight into one memory-mapped .npy
                                  (``sharded_score_pretraining(out_path=...)``)

The denominator m. ``score_pretraining`` divides by ``task.m``, which for a shard view is the
shard's length m_r, not the full m. Scores are linear in the test-side vectors, so a shard is scored
with ``vectors · (m_r / m)``: ∇ℓ(z) · (S m_r/m) / m_r = ∇ℓ(z) · S / m, in the task's dtype, before the
float32 conversion (no extra rounding of the stored scores).

The pretraining objective L_P = (1/m) Σ_i w_i ℓ_i + (λ_P/2)‖p‖² splits over ranks as
Σ_r [(1/m) Σ_{i∈shard r} w_i ℓ_i] + (λ_P/2)‖p‖²: each rank's HVP covers its shard's part (with the
full m), the parts are all-reduced (sum), and the L2 term λ_P·v is added once, after the reduction.
Every rank must call the resulting ``hvp`` the same number of times with the same vectors (the
solvers in ``precompute.solvers`` are deterministic functions of the HVP results, which the
all-reduce makes identical on every rank, so a solve with the same right-hand side runs in lockstep).

Failures and the run directory. Only rank 0 owns a ``RunWriter`` (``rank_zero_writer``); it writes
to a temporary sibling and is committed by ``commit_after_barrier`` only after every rank has
reported success at a barrier. Each collective step here is an *agreement*: every rank reports
None or its error message (``all_gather_object``), and if any rank failed, every rank raises
(``DistributedError`` naming the failed ranks; the failed rank re-raises its own exception), so
rank 0 leaves its ``with`` block by an exception and the writer deletes the temporary directory.
A rank that dies without reaching an agreement (an uncaught error, a crash) closes its sockets:
gloo raises "Connection closed by peer" on the others, which then unwind the same way (under nccl
they wait for the process-group timeout instead). torchrun SIGTERMs the survivors when a rank
fails; ``raise_on_sigterm`` (installed by ``init_distributed``) aborts the registered writer in the
signal handler and raises ``SystemExit``, so that cleanup runs too. Only a SIGKILL of rank 0 (or an
nccl watchdog abort) can leave the temporary ``.<name>.tmp-*`` sibling, which is never a run (no
manifest; names starting with '.' are not listed by ``list_runs``), as for a single process.

Memory for huge m: ``write_scores_memmap`` opens the [T, m] float32 output as a .npy memory map,
``LazyRows`` (``precompute.streaming``, re-exported here) turns rows of a memory-mapped input array
into tensors one chunk at a time, and the scoring loop releases both maps' pages after every block
(``release_pages``), so resident memory stays bounded by the block size, not by m. On a task whose
inputs are ``LazyRows`` the data-parallel HVP streams each shard too (``pretrain_shard_objective``
returns a ``StreamedPretrainObjective``: one chunked pass per product, memory O(chunk)), as do
single-process training and the pretraining solve (see ``precompute.streaming``).

Measured (``benchmarks/bench_large.py``, m = 1,000,000 digits-sized examples, P = 1,125, T = 64,
chunk 1,024, one CPU thread): with the outer-product scoring path, 0.52 s per 100,000 examples
and peak RSS 429 MiB (370 MiB before the pass, mostly imports); two ranks 0.26 s per 100,000.
Before that path: 1.1 s, and peak RSS 527 MiB with page release vs 978 MiB without.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import pickle
import re
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from .config import InfluenceConfig, SolverConfig
from .errors import PrecomputeError
from .influence import (add_precision_check, batched_hvp, counted, embedding_sensitivity_fixed,
                        embedding_sensitivity_updated, score_pretraining, solve_progress, stacked_test_vectors)
from .runstore import RunWriter
from .solvers import BatchedHVP, InverseHVP, make_solver
from .streaming import DEFAULT_CHUNK, LazyRows, StreamedPretrainObjective, is_lazy, release_pages
from .task import TaskError, TwoStageTask
from .training import TrainedStages

__all__ = [
    "DistEnv", "DistributedError", "LazyRows", "torchrun_env", "init_distributed", "close_distributed",
    "is_distributed", "get_rank", "get_world_size", "default_backend", "collective_device", "shard_range", "shard_task",
    "agree", "agreed", "broadcast_object", "broadcast_vectors", "rank_zero_compute", "distributed_hvp",
    "pretrain_shard_objective", "distributed_pretrain_hvp", "distributed_pretrain_solver",
    "distributed_test_vectors", "write_scores_memmap", "release_pages", "score_in_blocks",
    "sharded_score_pretraining", "sharded_multi_stage_scores", "rank_zero_writer", "commit_after_barrier",
    "raise_on_sigterm", "find_free_port", "run_on_ranks", "RanksFailed",
]


class DistributedError(PrecomputeError, RuntimeError):
    """A step failed on one or more ranks; ``errors`` maps rank -> "ExceptionType: message"."""

    def __init__(self, message: str, errors: dict[int, str] | None = None):
        super().__init__(message)
        self.errors = dict(errors or {})


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
        raise ValueError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {err}") from err
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}")
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
            raise ValueError(f"device {device}: CUDA is not available on this machine; use cpu")
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


def raise_on_sigterm() -> None:
    """On SIGTERM: run the registered cleanups (``rank_zero_writer`` registers its writer's
    abort), then raise SystemExit(143) so ``with``/``finally`` blocks unwind too.

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
        raise ValueError(f"rank {rank} is not in a world of {world}")
    if m < 0:
        raise ValueError(f"m must be >= 0, got {m}")
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
            raise ValueError(f"broadcast_vectors: the source rank {src} has no vectors")
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


# ---- data-parallel Hessian-vector products ------------------------------------------------------------

def _all_reduce_sum(t: Tensor) -> Tensor:
    cdev = collective_device()
    buf = t.to(cdev).contiguous()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def distributed_hvp(objective_per_shard: Callable[[Tensor], Tensor] | None, x: Tensor, l2: float = 0.0,
                    rhs_block: int = 64) -> BatchedHVP:
    """V [D, k] -> (Σ_ranks ∇²objective_r(x) + l2·I) V, for ``make_solver(hvp, dim, config, ...)``.

    ``objective_per_shard``: this rank's share of the objective, already divided by the FULL
    denominator (e.g. (1/m) Σ_{i∈shard} w_i ℓ_i), without the L2 term; None for an empty shard.
    A ``StreamedPretrainObjective`` (``rows`` = the shard) makes each product one chunked pass.
    ``l2``: coefficient of a (l2/2)‖x‖² term, added once after the all-reduce. Every rank must call
    the returned function in lockstep with identical V (each call is one all-reduce).
    """
    local = None if objective_per_shard is None else batched_hvp(objective_per_shard, x, rhs_block)

    def apply(v: Tensor) -> Tensor:
        hv = local(v) if local is not None else torch.zeros_like(v)
        if is_distributed():
            hv = _all_reduce_sum(hv)
        return hv + l2 * v if l2 else hv

    return apply


def pretrain_shard_objective(task: TwoStageTask, rank: int | None = None, world: int | None = None,
                             weights: Tensor | None = None,
                             chunk_size: int = 0) -> Callable[[Tensor], Tensor] | None:
    """p -> (1/m) Σ_{i∈shard} w_i ℓ_P(z_i; p) over this rank's shard (no L2); None if it is empty.

    ``weights``: the full [m] example weights (default 1); the denominator is the full m.
    Streamed (a ``StreamedPretrainObjective`` over the shard, ``chunk_size`` examples at a time,
    default ``DEFAULT_CHUNK``) when ``chunk_size`` > 0 or the task's inputs are ``LazyRows``;
    otherwise the shard's tensors are held and its HVP graph is built once.
    """
    rank = get_rank() if rank is None else rank
    world = get_world_size() if world is None else world
    sl = shard_range(task.m, rank, world)
    if sl.stop == sl.start:
        return None
    if chunk_size > 0 or is_lazy(task):
        return StreamedPretrainObjective(task, weights, chunk_size or DEFAULT_CHUNK, rows=sl)
    x, y = task.pretrain_x[sl], task.pretrain_y[sl]
    w = None if weights is None else weights[sl]
    m = task.m

    def objective(p: Tensor) -> Tensor:
        losses = task.pretrain_losses(p, x, y)
        return (losses if w is None else w * losses).sum() / m

    return objective


def distributed_pretrain_hvp(task: TwoStageTask, p: Tensor, weights: Tensor | None = None,
                             rhs_block: int = 64, chunk_size: int = 0) -> BatchedHVP:
    """Data-parallel ∇²L_P(p) V over (θ, W): shard parts all-reduced, λ_P V added once.

    Each shard's part is streamed in chunks when ``chunk_size`` > 0 or the inputs are ``LazyRows``
    (see ``pretrain_shard_objective``)."""
    return distributed_hvp(pretrain_shard_objective(task, weights=weights, chunk_size=chunk_size), p,
                           task.pretrain_l2, rhs_block)


def distributed_pretrain_solver(task: TwoStageTask, p: Tensor, config: SolverConfig,
                                on_product: Callable[[int], object] | None = None) -> InverseHVP:
    """(H_P + λI)⁻¹ with a data-parallel HVP; call ``solve`` on every rank with the same rhs."""
    return make_solver(counted(distributed_pretrain_hvp(task, p), on_product), task.n_pretrain_params, config,
                       p.dtype, p.device)


def _finetune_side(task: TwoStageTask, trained: TrainedStages, ids: Tensor,
                   config: InfluenceConfig) -> tuple[Tensor, dict]:
    g, diag = [], {}
    for scenario in config.scenarios:
        q = trained.q(scenario)
        if scenario == "fixed":
            side = embedding_sensitivity_fixed(task, q, ids, config.finetune_solver)
        else:
            side = embedding_sensitivity_updated(task, q, task.theta_of(trained.p), trained.alpha, ids,
                                                 config.finetune_solver)
        g.append(side.g)
        diag[scenario] = side.diagnostics
    return torch.cat(g, dim=1), diag


def distributed_test_vectors(task: TwoStageTask, trained: TrainedStages, test_ids, config: InfluenceConfig,
                             solver: InverseHVP | None = None,
                             progress: bool = False) -> tuple[dict[str, Tensor], dict[str, dict]]:
    """``stacked_test_vectors`` with the pretraining solve on a data-parallel HVP (all ranks).

    The finetune side (small: finetune data only) runs on rank 0 and is broadcast; every rank then
    solves H_P⁻¹ [g; 0] in lockstep; the result is broadcast from rank 0 so all ranks hold
    bit-identical vectors. Same return value as ``stacked_test_vectors``.
    """
    ids = task.check_test_ids(test_ids)
    device = trained.p.device
    g_all, side_diag = rank_zero_compute(_finetune_side, task, trained, ids, config, device=device,
                                         what="finetune-side solves")
    p = broadcast_vectors(trained.p, device=device)         # every rank linearises at rank 0's p
    rhs = torch.cat([g_all, torch.zeros(task.w_layout.size, g_all.shape[1], dtype=g_all.dtype, device=device)])
    result, error = None, None
    try:
        with solve_progress(progress and solver is None and get_rank() == 0) as bar:
            result = (solver or distributed_pretrain_solver(task, p, config.pretrain_solver, bar.update)).solve(rhs)
    except Exception as err:     # noqa: BLE001 (all ranks see the same numbers, so all fail alike)
        error = err
    agree(error, "pretraining solve")
    s_all, diag = result
    s_all = broadcast_vectors(s_all, device=device)
    vectors = dict(zip(config.scenarios, torch.split(s_all, len(ids), dim=1)))
    diagnostics = {s: {**side_diag[s], "pretrain_solve": diag.as_dict(), "world_size": get_world_size()}
                   for s in config.scenarios}
    return vectors, diagnostics


# ---- memory-mapped output and block-wise scoring ------------------------------------------------------

def write_scores_memmap(path: str | Path, shape: tuple[int, int], mode: str = "w+") -> np.memmap:
    """A float32 .npy memory map of ``shape`` (created, or opened with mode "r+"), for
    ``score_pretraining(..., out=...)``: scores go to disk chunk by chunk. The file is a normal
    .npy (no pickle); readers can ``np.load(path, mmap_mode="r")``."""
    path = Path(path)
    if mode == "w+":
        path.parent.mkdir(parents=True, exist_ok=True)
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=tuple(shape))
    arr = np.load(path, mmap_mode=mode)
    if arr.shape != tuple(shape) or arr.dtype != np.float32:
        raise ValueError(f"{path}: holds {arr.dtype} {arr.shape}, expected float32 {tuple(shape)}")
    return arr


class _RowSplit:
    """``score_pretraining``'s ``out`` spread over several [T_i, n] arrays (rows stacked);
    ``release_pages`` releases each of its ``parts``."""

    def __init__(self, parts: Sequence[np.ndarray]):
        self.parts = list(parts)
        self.rows = [p.shape[0] for p in self.parts]

    def columns(self, sl: slice) -> "_RowSplit":
        return _RowSplit([p[:, sl] for p in self.parts])

    def __setitem__(self, key, value) -> None:
        rows_key, cols_key = key
        if rows_key != slice(None):
            raise IndexError("_RowSplit only supports out[:, columns] = value")
        start = 0
        for part, n in zip(self.parts, self.rows):
            part[:, cols_key] = value[start: start + n]
            start += n


def _columns(out, sl: slice):
    return out.columns(sl) if isinstance(out, _RowSplit) else out[:, sl]


_EXAMPLE_RE = re.compile(r"pretraining example (\d+)")


def score_in_blocks(task: TwoStageTask, p: Tensor, vectors: Tensor, rows: slice, out, chunk_size: int = 256,
                    block_size: int | None = None, progress: bool = False, m: int | None = None,
                    precision: str = "full") -> None:
    """Scores pretraining examples ``rows`` (global ids) into ``out[:, 0:len(rows)]`` with the full
    denominator m (default ``task.m``), ``block_size`` examples at a time (default: all at once),
    releasing memory-mapped input and output pages after each block. Errors name global ids."""
    m = task.m if m is None else m
    start, stop, _ = rows.indices(task.m)
    n = stop - start
    block = max(1, block_size or n or 1)
    for b0 in range(0, n, block):
        b = slice(start + b0, min(start + b0 + block, stop))
        size = b.stop - b.start
        view = shard_task(task, b)
        try:
            score_pretraining(view, p, vectors * (size / m), chunk_size, out=_columns(out, slice(b0, b0 + size)),
                              progress=progress, precision=precision)
        except TaskError as err:
            text = _EXAMPLE_RE.sub(lambda g: f"pretraining example {int(g.group(1)) + b.start}", str(err))
            raise TaskError(text) from err
        if block_size:
            release_pages(out)
            release_pages(task.pretrain_x)
            release_pages(task.pretrain_y)


def _out_paths(out_path) -> list[Path] | None:
    if out_path is None:
        return None
    if isinstance(out_path, (str, os.PathLike)):
        return [Path(out_path)]
    return [Path(p) for p in out_path]


def sharded_score_pretraining(task: TwoStageTask, p: Tensor | None, vectors: Tensor | None, chunk_size: int = 256,
                              out_path=None, progress: bool = False, block_size: int | None = None,
                              precision: str = "full"):
    """Data-parallel ``score_pretraining``: scores[t, i] = ∇ℓ_P(z_i) · vectors[:, t] / m (full m).

    Collective: every rank calls it. ``p`` and ``vectors`` [P, T] are taken from rank 0 and broadcast
    (other ranks may pass None). Each rank scores ``shard_range(m, rank, world)``.

    out_path None: shards are gathered (padded float32 tensors, ``dist.gather``) and rank 0 returns
        the [T, m] float32 array; other ranks return None.
    out_path a path (rank 0's value is used; every rank must see the same filesystem: one node or a
        shared one): rank 0 creates the [T, m] .npy memory map, every rank writes its columns into
        it ``block_size`` examples at a time (default 65,536), and rank 0 returns it opened
        read-only. A sequence of paths splits the T rows evenly over the files (one per scenario,
        one pass); rank 0 then returns a list of maps.
    Any rank's error is raised on every rank (see ``agree``).
    """
    rank, world = get_rank(), get_world_size()
    device = task.device
    p = broadcast_vectors(p if rank == 0 else None, device=device) if world > 1 else p
    vectors = broadcast_vectors(vectors if rank == 0 else None, device=device) if world > 1 else vectors
    paths = broadcast_object(_out_paths(out_path) if rank == 0 else None)
    m, t = task.m, vectors.shape[1]
    mine = shard_range(m, rank, world)
    show = progress and rank == 0

    if paths is not None:
        if t % len(paths):
            raise ValueError(f"{t} score rows cannot be split evenly over {len(paths)} files")
        rows_each = t // len(paths)
        error = None
        if rank == 0:
            try:
                for path in paths:
                    write_scores_memmap(path, (rows_each, m)).flush()
            except Exception as err:    # noqa: BLE001
                error = err
        agree(error, "creating the score files")
        error = None
        try:
            maps = [write_scores_memmap(path, (rows_each, m), mode="r+") for path in paths]
            out = _RowSplit([mm[:, mine] for mm in maps])
            score_in_blocks(task, p, vectors, mine, out, chunk_size, block_size or 65536, show, m, precision)
            for mm in maps:
                mm.flush()
            del maps, out
        except Exception as err:        # noqa: BLE001
            error = err
        agree(error, "scoring")
        if rank != 0:
            return None
        loaded = [np.load(path, mmap_mode="r") for path in paths]
        return loaded[0] if isinstance(out_path, (str, os.PathLike)) else loaded

    local, error = None, None
    try:
        local = np.empty((t, mine.stop - mine.start), dtype=np.float32)
        score_in_blocks(task, p, vectors, mine, local, chunk_size, block_size, show, m, precision)
    except Exception as err:            # noqa: BLE001
        error = err
    agree(error, "scoring")
    if world == 1:
        return local
    width = max(s.stop - s.start for s in (shard_range(m, r, world) for r in range(world)))
    cdev = collective_device()
    send = torch.zeros(t, width, dtype=torch.float32, device=cdev)
    send[:, : local.shape[1]] = torch.from_numpy(local).to(cdev)
    gathered = [torch.empty_like(send) for _ in range(world)] if rank == 0 else None
    dist.gather(send, gather_list=gathered, dst=0)
    if rank != 0:
        return None
    parts = [gathered[r][:, : shard_range(m, r, world).stop - shard_range(m, r, world).start].cpu().numpy()
             for r in range(world)]
    return np.ascontiguousarray(np.concatenate(parts, axis=1))


def sharded_multi_stage_scores(task: TwoStageTask, trained: TrainedStages, test_ids, config: InfluenceConfig,
                               out_dir: str | Path | None = None, distributed_solve: bool = False,
                               progress: bool = False) -> tuple[dict[str, np.ndarray] | None, dict[str, dict]]:
    """Data-parallel ``multi_stage_scores``. Collective.

    Test-side vectors: on rank 0 (``stacked_test_vectors``, broadcast) or, with
    ``distributed_solve``, by every rank with the data-parallel HVP. One streamed pass over the
    shards for all scenarios. ``out_dir`` (rank 0's value; e.g. ``writer.path`` of a
    ``rank_zero_writer``): scores go straight to ``out_dir/scores/<scenario>.npy`` memory maps.
    Returns ({scenario: [T, m] float32} on rank 0, None elsewhere; diagnostics on every rank).
    """
    ids = task.check_test_ids(test_ids)
    if distributed_solve:
        vectors, diagnostics = distributed_test_vectors(task, trained, ids, config, progress=progress)
    else:
        vectors, diagnostics = rank_zero_compute(stacked_test_vectors, task, trained, ids, config,
                                                 progress=progress, device=trained.p.device,
                                                 what="test-side vectors")
    stacked = torch.cat([vectors[s] for s in config.scenarios], dim=1)
    out_dir = broadcast_object(None if out_dir is None else Path(out_dir))
    paths = None if out_dir is None else [out_dir / "scores" / f"{s}.npy" for s in config.scenarios]
    scores = sharded_score_pretraining(task, trained.p, stacked, config.chunk_size, out_path=paths,
                                       progress=progress, precision=config.score_precision)
    if scores is None:
        return None, diagnostics
    t = len(ids)
    split = (dict(zip(config.scenarios, scores)) if paths is not None
             else {s: scores[i * t: (i + 1) * t] for i, s in enumerate(config.scenarios)})
    add_precision_check(diagnostics, task, trained.p, vectors, split, config)      # rank 0: it holds the scores
    return split, diagnostics


# ---- the run directory ---------------------------------------------------------------------------------

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
            abort = lambda: writer._committed or writer.abort()      # noqa: E731
            _SIGTERM_CLEANUPS.append(abort)
            stack.callback(_SIGTERM_CLEANUPS.remove, abort)
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
                raise ValueError("commit_after_barrier: rank 0 has no RunWriter")
            path = writer.commit(manifest)
        except Exception as err:      # noqa: BLE001
            error = err
    agree(error, "committing the run directory")
    return broadcast_object(path)


# ---- local multi-process runs (tests, benchmarks) -------------------------------------------------------

def find_free_port() -> int:
    """A TCP port free on 127.0.0.1 at the time of asking (loopback only)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RanksFailed(PrecomputeError, RuntimeError):
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
        import traceback
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
