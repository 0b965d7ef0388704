"""Pretraining sets larger than memory: rows read a chunk at a time, objective evaluated chunk by chunk.

``LazyRows`` puts a (memory-mapped) numpy array in ``task.pretrain_x`` / ``pretrain_y``: a slice of
it becomes a tensor only when read, and ``release_pages`` drops the pages already read from the
resident set. The scoring pass (``precompute.scoring.score_pretraining``) reads chunks of it.

Training and the pretraining-side Hessian need the whole objective

    L_P(p) = (1/m) Σ_i w_i ℓ_P(z_i; p) + (λ_P/2)‖p‖²,

which ``TwoStageTask.pretrain_objective`` evaluates as one autograd graph over all m examples
(memory O(m)). ``StreamedPretrainObjective`` evaluates the same sum ``chunk_size`` examples at a
time: the value, the gradient (one forward + backward per chunk, summed) and batched
Hessian-vector products (per chunk: one forward + backward with ``create_graph``, then one batched
double-backward per block of columns; the chunk's graph is freed before the next chunk). Memory is
O(chunk_size), independent of m; each call is one pass over the data. The denominator is always
the full m, and the L2 term is added once. With ``rows`` (a shard, for the data-parallel HVP of
``precompute.curvature``) it is that shard's part of the data term only, without the L2 term:
whoever sums the shards adds it once.

``pretraining_objective`` picks it automatically for a task whose ``pretrain_x`` is ``LazyRows``;
``precompute.training.minimize`` and ``precompute.curvature.batched_hvp`` accept it in place of a
plain ``p -> L_P(p)`` callable.

Measured (``benchmarks/bench_large.py --modes train,train_in_memory``, memory-mapped augmented
digits, P = 1,125, float32, chunk 4,096, one CPU thread): a value+gradient pass 0.045 s and an HVP
pass with 8 columns 0.39 s per 100,000 examples (in memory, one graph: 0.042 s and 0.88 s); peak
RSS 466 MiB at m = 250,000 and 464 MiB at m = 1,000,000 (in memory: 1,182 and 3,008 MiB), of which
about 430 MiB is the imports and the task.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError
from .memmaps import release_mapped_pages
from .task import TwoStageTask

DEFAULT_CHUNK = 4096
"""Examples per chunk of a streamed pass when none is configured."""


class LazyRows:
    """Rows of a (memory-mapped) numpy array that become tensors only a slice at a time.

    Put one in ``task.pretrain_x`` (and/or ``pretrain_y``): ``len()`` gives m and ``rows[a:b]``
    returns a tensor of ``dtype`` on ``device``, which is all the scoring pass and
    ``StreamedPretrainObjective`` read. ``view(slice)`` is a lazy sub-range (for shards and blocks).
    ``transform`` maps each block read (numpy, rows first) to the model's inputs, e.g. uint8 images
    to float pixels (``precompute.data.image_features``). Floating results take ``dtype``; integer
    arrays (labels) become int64. ``to(device, dtype)`` mirrors ``Tensor.to`` for
    ``TwoStageTask.to``. ``release_pages(rows)`` drops the mapped pages already read from this
    process's resident set (they stay in the page cache).
    """

    def __init__(self, array: np.ndarray, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", rows: slice | None = None,
                 transform: Callable[[np.ndarray], np.ndarray] | None = None):
        self.array, self.dtype, self.device = array, dtype, torch.device(device)
        self.transform = transform
        start, stop, step = (rows or slice(0, len(array))).indices(len(array))
        if step != 1:
            raise ConfigError("LazyRows views must be contiguous (step 1)")
        self.start, self.stop = start, max(start, stop)
        self._row_shape = tuple(array.shape[1:]) if transform is None else tuple(transform(array[:1]).shape[1:])

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self._row_shape)

    def is_floating_point(self) -> bool:
        """Whether rows read become floating tensors (then ``to`` applies ``dtype``)."""
        sample = self.array[:1] if self.transform is None else self.transform(self.array[:1])
        return np.issubdtype(np.asarray(sample).dtype, np.floating)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "LazyRows":
        return LazyRows(self.array, dtype or self.dtype, device or self.device, slice(self.start, self.stop),
                        self.transform)

    def view(self, rows: slice) -> "LazyRows":
        start, stop, _ = rows.indices(len(self))
        return LazyRows(self.array, self.dtype, self.device, slice(self.start + start, self.start + stop),
                        self.transform)

    def __getitem__(self, key) -> Tensor:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            block = self.array[self.start + start: self.start + stop: step]
        else:
            idx = np.arange(len(self))[np.asarray(key)]
            block = self.array[self.start + idx]
        block = np.array(block if self.transform is None else self.transform(block))   # owns its memory
        t = torch.from_numpy(block)
        if t.is_floating_point():
            return t.to(self.device, self.dtype)
        return t.to(self.device, torch.int64)


def release_pages(array) -> None:
    """Drop a memory map's pages from this process's resident set (MADV_DONTNEED).

    Accepts np.memmap (or views), LazyRows, and objects holding several of them in ``parts``;
    ignores anything else (in-memory tensors and arrays). See ``release_mapped_pages``.
    """
    if isinstance(array, LazyRows):
        release_pages(array.array)
        return
    parts = getattr(array, "parts", None)
    if parts is not None:
        for part in parts:
            release_pages(part)
        return
    release_mapped_pages(array)


def is_lazy(task: TwoStageTask) -> bool:
    """Whether the task's pretraining inputs are read from disk a chunk at a time."""
    return isinstance(task.pretrain_x, LazyRows)


def batched_double_backward(gradient: Tensor, leaf: Tensor, v: Tensor, rhs_block: int,
                            keep_graph: bool = True) -> Tensor:
    """∂(gradient · V)/∂leaf for V [D, k]: one batched backward per ``rhs_block`` columns, [D, k].

    ``gradient`` must have been built from ``leaf`` with ``create_graph=True``; ``keep_graph=False``
    frees the graph with the last block.
    """
    k = v.shape[1]
    cols = [torch.autograd.grad(gradient, leaf, v[:, i: i + rhs_block].T, is_grads_batched=True,
                                retain_graph=keep_graph or i + rhs_block < k)[0].T
            for i in range(0, k, rhs_block)]
    return torch.cat(cols, dim=1).detach()


class StreamedPretrainObjective:
    """L_P(p) over the whole pretraining set (or the data term over ``rows``), chunk by chunk.

    task:       the task; its ``pretrain_x``/``pretrain_y`` may be tensors or ``LazyRows``.
    weights:    example weights [m] over the FULL set (default 1); the denominator stays m.
    chunk_size: examples per chunk; memory of a pass is O(chunk_size), not O(m).
    rows:       a contiguous range of examples (a shard). Given, the objective is
                (1/m) Σ_{i∈rows} w_i ℓ_P(z_i) with no L2 term; None: all m examples + (λ_P/2)‖p‖².

    Calling it gives the value (no autograd graph). ``value_and_grad`` and ``hvp`` are what
    ``precompute.training.minimize`` and ``precompute.curvature.batched_hvp`` use. ``passes``
    counts the passes over the data made so far (each value, gradient or HVP call is one).
    """

    def __init__(self, task: TwoStageTask, weights: Tensor | None = None, chunk_size: int = DEFAULT_CHUNK,
                 rows: slice | None = None):
        if chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
        self.task, self.weights, self.chunk_size = task, weights, int(chunk_size)
        self.m = task.m
        start, stop, _ = (rows or slice(0, self.m)).indices(self.m)
        self.rows = slice(start, max(start, stop))
        self.l2 = task.pretrain_l2 if rows is None else 0.0
        self.passes = 0

    def _data_terms(self, p: Tensor, grad_mode: bool = False) -> Iterator[Tensor]:
        """(1/m) Σ_{i∈chunk} w_i ℓ_P(z_i; p) for each chunk in turn (one pass over the data)."""
        self.passes += 1
        task = self.task
        for start in range(self.rows.start, self.rows.stop, self.chunk_size):
            sl = slice(start, min(start + self.chunk_size, self.rows.stop))
            x, y = task.pretrain_x[sl], task.pretrain_y[sl]
            with torch.set_grad_enabled(grad_mode):
                losses = task.pretrain_losses(p, x, y)
                if self.weights is not None:
                    losses = self.weights[sl] * losses
                part = losses.sum() / self.m
            release_pages(task.pretrain_x)
            release_pages(task.pretrain_y)
            yield part

    def _l2_value(self, p: Tensor) -> Tensor:
        return 0.5 * self.l2 * (p * p).sum()

    def __call__(self, p: Tensor) -> Tensor:
        return self.value(p)

    def value(self, p: Tensor) -> Tensor:
        """L_P(p), a 0-dim tensor without an autograd graph."""
        p = p.detach()
        total = torch.zeros((), dtype=p.dtype, device=p.device)
        for part in self._data_terms(p):
            total += part
        return total + self._l2_value(p) if self.l2 else total

    def value_and_grad(self, p: Tensor) -> tuple[Tensor, Tensor]:
        """(L_P(p), ∇L_P(p) [P]): one forward and backward per chunk, summed."""
        p = p.detach()
        leaf = p.clone().requires_grad_(True)
        total = torch.zeros((), dtype=p.dtype, device=p.device)
        gradient = torch.zeros_like(p)
        for part in self._data_terms(leaf, grad_mode=True):
            gradient += torch.autograd.grad(part, leaf)[0]
            total += part.detach()
        if self.l2:
            return total + self._l2_value(p), gradient + self.l2 * p
        return total, gradient

    def hvp(self, p: Tensor, rhs_block: int = 64) -> Callable[[Tensor], Tensor]:
        """V [P, k] -> ∇²L_P(p) V, one pass over the data per call (a ``BatchedHVP``)."""
        point = p.detach().clone()

        def apply(v: Tensor) -> Tensor:
            out = torch.zeros_like(v)
            leaf = point.clone().requires_grad_(True)
            for part in self._data_terms(leaf, grad_mode=True):
                gradient = torch.autograd.grad(part, leaf, create_graph=True)[0]
                out += batched_double_backward(gradient, leaf, v, rhs_block, keep_graph=False)
            return out + self.l2 * v if self.l2 else out

        return apply


def pretraining_objective(task: TwoStageTask, weights: Tensor | None = None,
                          chunk_size: int = 0) -> Callable[[Tensor], Tensor]:
    """p -> L_P(p) as training and the pretraining-side solve should evaluate it.

    Streamed (``StreamedPretrainObjective``) when ``chunk_size`` > 0 or the task's pretraining
    inputs are ``LazyRows`` (in chunks of ``chunk_size or DEFAULT_CHUNK``); otherwise the in-memory
    ``task.pretrain_objective`` (one autograd graph over all m examples).
    """
    if chunk_size > 0 or is_lazy(task):
        return StreamedPretrainObjective(task, weights, chunk_size or DEFAULT_CHUNK)
    return lambda p: task.pretrain_objective(p, weights)


__all__ = ["DEFAULT_CHUNK", "LazyRows", "StreamedPretrainObjective", "batched_double_backward", "is_lazy",
           "pretraining_objective", "release_pages"]
