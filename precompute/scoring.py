"""The scoring pass: scores[t, i] = ∇ℓ_P(z_i) · S[:, t] / m for every pretraining example, streamed.

S [P, T] holds the test-side vectors (``precompute.influence``). Per chunk of pretraining examples
the inner products come from one of three paths that give the same numbers (``score_pretraining``):

    linear  every parameter in an nn.Linear or nn.Conv2d: one forward and one backward, per-example
            gradients never formed (outer products, unfolded patches; ``precompute.layer_scores``)
    jvp     forward mode, one product per column of S (``directional_derivatives``)
    grad    vmapped per-example gradients [B, P], then one GEMM (``per_example_gradients``)

Memory is O(chunk_size · P + P · T), never O(m · P). Sign: score > 0 means removing z_i is
predicted to raise the test measurement (z_i helpful); score < 0, harmful.

Processes. ``sharded_score_pretraining`` runs the pass over this process's shard of the examples
(``precompute.distributed.shard_range``; a single process owns them all) and either gathers the
[T, m] float32 matrix on rank 0 or writes it straight into .npy memory maps (``out_path``),
``block_size`` examples at a time, releasing mapped pages after each block.

The denominator m. ``score_pretraining`` divides by ``task.m``, which for a shard view is the
shard's length m_r, not the full m. Scores are linear in the test-side vectors, so a shard is
scored with ``vectors · (m_r / m)``: ∇ℓ(z) · (S m_r/m) / m_r = ∇ℓ(z) · S / m, in the task's dtype,
before the float32 conversion (no extra rounding of the stored scores; for one process the factor
is exactly 1).
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from . import progress as progress_report
from .config import InfluenceConfig
from .distributed import (agree, broadcast_object, broadcast_vectors, gather_columns, get_rank, get_world_size,
                          shard_range, shard_task)
from .errors import ConfigError
from .layer_scores import layer_scores, layer_slots
from .layers import LayerBlock
from .solvers import ArnoldiSolver, ExactSolver, InverseHVP
from .streaming import release_pages
from .task import TaskError, TwoStageTask


def per_example_gradients(task: TwoStageTask, p: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """∇_p ℓ_P(z_i) for a chunk, [B, P] (vmap over examples of grad of the single-example loss)."""
    def single(pp: Tensor, xi: Tensor, yi: Tensor) -> Tensor:
        return task.pretrain_losses(pp, xi[None], yi[None])[0]
    return vmap(grad(single), in_dims=(None, 0, 0))(p.detach(), x, y)


def directional_derivatives(task: TwoStageTask, p: Tensor, x: Tensor, y: Tensor, vectors: Tensor) -> Tensor:
    """∇_p ℓ_P(z_i) · vectors[:, t] for a chunk, [B, T]: one forward-mode pass per column, vmapped.

    Cheaper than materialising per-example gradients when T is small (measured crossover on the
    digits MLP: T ≈ 50); the result is the same number.
    """
    def losses(pp: Tensor) -> Tensor:
        return task.pretrain_losses(pp, x, y)
    return vmap(lambda v: jvp(losses, (p.detach(),), (v,))[1], in_dims=1, out_dims=1)(vectors)


JVP_MAX_COLUMNS = 48   # above this many test-side vectors, per-example gradients + one GEMM are faster
SCORING_METHODS = ("auto", "linear", "jvp", "grad")
AUTOCAST_DTYPES = {"full": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRECISION_SAMPLE = 2048  # pretraining examples re-scored at full precision by ``precision_check``


def score_pretraining(task: TwoStageTask, p: Tensor, vectors: Tensor, chunk_size: int = 256,
                      out: np.ndarray | None = None, progress: bool = True,
                      precision: str = "full", method: str = "auto") -> np.ndarray:
    """scores[t, i] = ∇ℓ_P(z_i) · vectors[:, t] / m for every pretraining example, streamed in chunks.

    vectors: [P, T] test-side vectors. Returns (or fills ``out``) a float32 array [T, m]. Memory per
    chunk: chunk_size × T × the widest Linear layer (outer products), chunk_size × P (gradients)
    or chunk_size × T × activations (forward mode).
    precision: "full" (the task's dtype) or "bfloat16"/"float16": the per-example part runs under
    ``torch.autocast`` (float32 tasks only; see ``precision_check`` for what it costs in accuracy).
    method: "auto" uses ``layer_scores`` when every parameter belongs to an nn.Linear or nn.Conv2d, else
    forward mode (``directional_derivatives``) up to ``JVP_MAX_COLUMNS`` columns, else per-example
    gradients and one GEMM; "linear", "jvp" or "grad" force one (all give the same numbers).
    """
    if method not in SCORING_METHODS:
        raise ConfigError(f"unknown scoring method {method!r}; choose from {', '.join(SCORING_METHODS)}")
    autocast = AUTOCAST_DTYPES[precision]
    if autocast is not None and task.dtype != torch.float32:
        raise TaskError(f"score precision {precision} needs a float32 model (autocast leaves "
                        f"{str(task.dtype).removeprefix('torch.')} untouched); use --dtype float32")
    m, t = task.m, vectors.shape[1]
    if vectors.shape[0] != task.n_pretrain_params:
        raise TaskError(f"test-side vectors have {vectors.shape[0]} rows, the pretraining model has "
                        f"{task.n_pretrain_params} parameters")
    scores = np.empty((t, m), dtype=np.float32) if out is None else out
    slots = layer_slots(task) if method in ("auto", "linear") else None       # Linear and Conv2d
    if method == "linear" and slots is None:
        raise TaskError("method 'linear' needs a model whose parameters all belong to nn.Linear/nn.Conv2d layers")
    bar = progress_report.bar("scoring pretraining examples", total=m, unit="examples", enabled=progress)
    with torch.no_grad():
        for start in range(0, m, chunk_size):
            sl = slice(start, min(start + chunk_size, m))
            x, y = task.pretrain_x[sl], task.pretrain_y[sl]
            with torch.autocast(task.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                chunk, slots = _chunk_inner_products(task, p, x, y, vectors, method, slots)
            chunk = (chunk / m).to(task.dtype)                                      # [B, T]
            if not torch.isfinite(chunk).all():
                bad = sl.start + int((~torch.isfinite(chunk)).any(1).nonzero()[0])
                raise TaskError(f"non-finite gradient for pretraining example {bad}; check its input and label")
            scores[:, sl] = chunk.T.float().cpu().numpy()
            bar.update(sl.stop - sl.start)
    bar.close()
    return scores


def _chunk_inner_products(task: TwoStageTask, p: Tensor, x: Tensor, y: Tensor, vectors: Tensor, method: str,
                          slots: list[LayerBlock] | None) -> tuple[Tensor, list[LayerBlock] | None]:
    """∇ℓ_P(z_i) · vectors for one chunk, [B, T], and the Linear slots to try on the next chunk."""
    if slots is not None:
        chunk = layer_scores(task, p, x, y, vectors, slots)
        if chunk is not None:
            return chunk, slots
    # the model does not fit the outer-product path (or it was not asked for): stop trying it
    if method == "jvp" or (method != "grad" and vectors.shape[1] <= JVP_MAX_COLUMNS):
        return directional_derivatives(task, p, x, y, vectors), None
    return per_example_gradients(task, p, x, y) @ vectors, None


def add_precision_check(diagnostics: dict[str, dict], task: TwoStageTask, p: Tensor, vectors: dict[str, Tensor],
                        scores: dict[str, np.ndarray], config: InfluenceConfig) -> None:
    """With a reduced score precision, put ``precision_check``'s figures in each scenario's
    diagnostics (key "score_precision"); no-op at full precision."""
    if config.score_precision != "full":
        for s, check in precision_check(task, p, vectors, scores, config.chunk_size).items():
            diagnostics[s]["score_precision"] = check


def precision_check(task: TwoStageTask, p: Tensor, vectors: dict[str, Tensor], scores: dict[str, np.ndarray],
                    chunk_size: int = 256, n_sample: int = PRECISION_SAMPLE) -> dict[str, dict]:
    """How far reduced-precision scores are from full precision, per scenario.

    Re-scores ``n_sample`` evenly spaced pretraining examples at the task's precision and returns
    {scenario: {"pearson_vs_full": r over all sampled scores, "max_rel_error": max |Δ| / max |full|,
    "n_sample": n}}. ``scores``: the reduced-precision [T, m] matrices (arrays or memory maps).
    """
    ids = np.unique(np.linspace(0, task.m - 1, min(n_sample, task.m)).round().astype(np.int64))
    sample = copy.copy(task)
    sample.pretrain_x, sample.pretrain_y = task.pretrain_x[ids], task.pretrain_y[ids]
    out = {}
    for s, vecs in vectors.items():
        # the sample's own denominator is len(ids): rescale so scores keep the full-set 1/m
        full = score_pretraining(sample, p, vecs * (len(ids) / task.m), chunk_size, progress=False)
        reduced = np.asarray(scores[s][:, ids], dtype=np.float64)
        full = full.astype(np.float64)
        out[s] = {"pearson_vs_full": float(np.corrcoef(full.ravel(), reduced.ravel())[0, 1]),
                  "max_rel_error": float(np.abs(reduced - full).max() / max(np.abs(full).max(), 1e-30)),
                  "n_sample": int(len(ids))}
    return out


def self_influence(task: TwoStageTask, p: Tensor, solver: InverseHVP, chunk_size: int = 256) -> np.ndarray:
    """g_zᵀ (H_P + λI)⁻¹ g_z for every pretraining example, float64 [m], streamed in chunks.

    exact:   H = V Λ Vᵀ once, then ‖(Λ + λ)^{-1/2} Vᵀ g‖² per example (exact).
    arnoldi: the same on the kept rank-r eigenpairs: the part of g outside the top-r subspace is
             dropped (an underestimate, as for the scores).
    cg/lissa: one batched solve per chunk, g · solve(g) (chunk_size right-hand sides per solve).
    ekfac:   the same with its factored inverse, without a residual per chunk (``InverseHVP.apply``).
    """
    if isinstance(solver, ExactSolver):
        evals, evecs = solver.eigh()
    elif isinstance(solver, ArnoldiSolver):
        evals, evecs = solver.factorise()
    else:
        evals = evecs = None
    if evecs is not None:
        scale = (evals + solver.damping).rsqrt()
    out = np.empty(task.m)
    with torch.no_grad():
        for start in range(0, task.m, chunk_size):
            sl = slice(start, min(start + chunk_size, task.m))
            g = per_example_gradients(task, p, task.pretrain_x[sl], task.pretrain_y[sl])       # [B, P]
            if evecs is not None:
                value = ((g @ evecs) * scale).square().sum(1)
            else:
                value = (g * solver.apply(g.T).T).sum(1)
            out[sl] = value.cpu().numpy()
    return out


# ---- memory-mapped output, blocks and shards ----------------------------------------------------------

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
        raise ConfigError(f"{path}: holds {arr.dtype} {arr.shape}, expected float32 {tuple(shape)}")
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
    """``score_pretraining`` over this process's shard: scores[t, i] = ∇ℓ_P(z_i) · vectors[:, t] / m (full m).

    Collective under a process group: every rank calls it. ``p`` and ``vectors`` [P, T] are taken
    from rank 0 and broadcast (other ranks may pass None). Each rank scores
    ``shard_range(m, rank, world)``; a single process scores all m examples.

    out_path None: rank 0 returns the [T, m] float32 array (shards gathered by
        ``precompute.distributed.gather_columns``); other ranks return None.
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
            raise ConfigError(f"{t} score rows cannot be split evenly over {len(paths)} files")
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
    return gather_columns(local, m)


__all__ = ["AUTOCAST_DTYPES", "JVP_MAX_COLUMNS", "PRECISION_SAMPLE", "SCORING_METHODS",
           "add_precision_check", "directional_derivatives",
           "per_example_gradients", "precision_check", "score_in_blocks", "score_pretraining", "self_influence",
           "sharded_score_pretraining", "write_scores_memmap"]
