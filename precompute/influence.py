"""Multi-stage influence (Chen et al. 2020): test-side vectors first, then one streamed pass.

For finetune test points t (loss f_t) and pretraining examples z (design.md §2):

    fixed:    g_t = ∇_θ f − H_θU H_UU⁻¹ ∇_U f                    (blocks of ∇²L_F at (θ*, U*))
    updated:  g_t = α [(H_F + αD)⁻¹ ∇_(θ,U) f]_θ                (∇²L_F at (θ_ft, U*), D = diag(I_θ, 0))
    s_t       = H_P⁻¹ [g_t; 0_W]                                 (H_P over θ and W together)
    score(z, t) = ∇_p ℓ_P(z) · s_t / m = −I_up(z, t) / m

score > 0: removing z is predicted to RAISE the test loss (z helpful); score < 0: z harmful.
The test-side matrix S = [s_1 … s_T] is [P, T]; scoring streams the pretraining set in chunks, so
memory is O(chunk_size · P + P · T), never O(m · P). For models whose parameters all sit in
nn.Linear layers (the presets), each chunk costs one forward and one backward plus B·T·P
multiply-adds (``linear_layer_scores``: per-example gradients are outer products, never formed);
other models use forward mode or vmapped per-example gradients. When the pretraining inputs are
memory-mapped (``precompute.streaming.LazyRows``), the H_P products of the solve stream too.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from torch.func import grad, jacrev, jvp, vmap

from . import progress as progress_report
from .config import AUTO_EXACT_MAX_DIM, InfluenceConfig, SolverConfig
from .runstore import SCORE_DEFINITION
from .solvers import BatchedHVP, InverseHVP, SolverError, make_solver
from .curvature import batched_hvp
from .streaming import pretraining_objective
from .task import TaskError, TwoStageTask
from .training import TrainedStages



def counted(hvp: BatchedHVP, on_product: Callable[[int], object] | None) -> BatchedHVP:
    """``hvp`` that reports the number of columns of each product (for a progress bar)."""
    if on_product is None:
        return hvp

    def apply(v: Tensor) -> Tensor:
        out = hvp(v)
        on_product(v.shape[1])
        return out

    return apply


def pretrain_solver(task: TwoStageTask, p: Tensor, config: SolverConfig,
                    on_product: Callable[[int], object] | None = None) -> InverseHVP:
    """(H_P + λI)⁻¹ at p*, over all of (θ, W); reusable for every test point and scenario.

    On a task whose pretraining inputs are ``LazyRows`` every Hessian-vector product is a chunked
    pass over them (``precompute.streaming``), so memory does not grow with m."""
    return make_solver(counted(batched_hvp(pretraining_objective(task), p), on_product), task.n_pretrain_params,
                       config, p.dtype, p.device)


def gradients_at_test_points(task: TwoStageTask, q: Tensor, test_ids: Tensor) -> Tensor:
    """∇_q f_t for each test id, [Q, T]; raises if a test loss is not finite."""
    losses = task.test_loss(q, test_ids)
    if not torch.isfinite(losses).all():
        raise TaskError("finetune_loss is non-finite on test id(s) "
                        f"{test_ids[~torch.isfinite(losses)].tolist()}; check those inputs")
    return jacrev(lambda qq: task.test_loss(qq, test_ids))(q.detach()).T


@dataclass
class EmbeddingSensitivity:
    """g_t for one scenario and the diagnostics of the finetune-side solve."""

    g: Tensor                      # [Pθ, T]
    diagnostics: dict = field(default_factory=dict)


def embedding_sensitivity_fixed(task: TwoStageTask, q: Tensor, test_ids: Tensor,
                                config: SolverConfig) -> EmbeddingSensitivity:
    """g_t = ∇_θ f − H_θU H_UU⁻¹ ∇_U f at (θ*, U*): the total derivative of f w.r.t. θ* when U re-optimises."""
    nt = task.n_theta
    grads = gradients_at_test_points(task, q, test_ids)                      # [Q, T]
    theta = q[:nt].detach()
    full_hvp = batched_hvp(task.finetune_objective, q)            # over (θ, U), no proximal term

    uu_hvp = batched_hvp(lambda u: task.finetune_objective(torch.cat([theta, u])), q[nt:])
    solver = make_solver(uu_hvp, task.u_layout.size, config, q.dtype, q.device)
    v, diag = solver.solve(grads[nt:])                             # H_UU⁻¹ ∇_U f, [PU, T]
    cross = full_hvp(torch.cat([torch.zeros(nt, v.shape[1], dtype=v.dtype, device=v.device), v]))[:nt]
    return EmbeddingSensitivity(grads[:nt] - cross, {"finetune_solve": diag.as_dict()})


def embedding_sensitivity_updated(task: TwoStageTask, q: Tensor, anchor: Tensor, alpha: float,
                                  test_ids: Tensor, config: SolverConfig) -> EmbeddingSensitivity:
    """g_t = α [(H_F + αD)⁻¹ ∇f]_θ at (θ_ft, U*): d f / d θ* through the proximal anchor."""
    grads = gradients_at_test_points(task, q, test_ids)
    hvp = batched_hvp(lambda qq: task.finetune_objective(qq, anchor.detach(), alpha), q)
    solver = make_solver(hvp, task.n_finetune_params, config, q.dtype, q.device)
    u, diag = solver.solve(grads)
    return EmbeddingSensitivity(alpha * u[: task.n_theta], {"finetune_solve": diag.as_dict()})


def stacked_test_vectors(task: TwoStageTask, trained: TrainedStages, test_ids, config: InfluenceConfig,
                         solver: InverseHVP | None = None,
                         progress: bool = False) -> tuple[dict[str, Tensor], dict[str, dict]]:
    """S_scenario = H_P⁻¹ [g; 0_W], [P, T] per scenario, with one pretraining solve for all scenarios.

    Returns ({scenario: S}, {scenario: diagnostics}). ``solver`` lets a caller reuse a factorised
    pretraining solver (exact/arnoldi) across calls. ``progress``: count the Hessian-vector
    products of the pretraining solve (each a pass over the set when it streams from disk).
    """
    ids = task.check_test_ids(test_ids)
    p = trained.p
    sides: dict[str, EmbeddingSensitivity] = {}
    for scenario in config.scenarios:
        q = trained.q(scenario)
        if scenario == "fixed":
            sides[scenario] = embedding_sensitivity_fixed(task, q, ids, config.finetune_solver)
        else:
            sides[scenario] = embedding_sensitivity_updated(task, q, task.theta_of(p), trained.alpha, ids,
                                                            config.finetune_solver)
    g_all = torch.cat([sides[s].g for s in config.scenarios], dim=1)
    rhs = torch.cat([g_all, torch.zeros(task.w_layout.size, g_all.shape[1], dtype=g_all.dtype,
                                        device=g_all.device)])
    name, dim = config.pretrain_solver.name, task.n_pretrain_params
    exact = name == "exact" or (name == "auto" and dim <= AUTO_EXACT_MAX_DIM)
    with solve_progress(progress and solver is None, task.n_pretrain_params if exact else None) as bar:
        s_all, diag = (solver or pretrain_solver(task, p, config.pretrain_solver, bar.update)).solve(rhs)
    vectors = dict(zip(config.scenarios, torch.split(s_all, len(ids), dim=1)))
    diagnostics = {s: {**sides[s].diagnostics, "pretrain_solve": diag.as_dict()} for s in config.scenarios}
    return vectors, diagnostics


def solve_progress(enabled: bool, total: int | None = None) -> progress_report.Bar:
    """Progress of a pretraining solve, in Hessian columns (use as a context manager); ``total``:
    the columns an exact solve needs (P), for an ETA."""
    return progress_report.bar("pretraining solve", total=total, unit="Hessian columns", enabled=enabled)


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


@dataclass(frozen=True)
class LinearSlot:
    """One ``nn.Linear`` of the pretraining model and where its parameters sit in p."""

    module: torch.nn.Linear
    weight: slice               # [out · in] entries of p, row-major like ``module.weight``
    bias: slice | None


def linear_slots(task: TwoStageTask) -> list[LinearSlot] | None:
    """The Linear layers holding every pretraining parameter, or None if any parameter lives
    elsewhere (then ``score_pretraining`` uses the generic per-example paths)."""
    slots: dict[int, dict] = {}
    offset = 0
    for root, layout in ((task.embedding, task.theta_layout), (task.pretrain_head, task.w_layout)):
        modules = dict(root.named_modules())
        for name, size in zip(layout.names, layout.sizes):
            owner, _, kind = name.rpartition(".")
            module = modules.get(owner)
            if not isinstance(module, torch.nn.Linear) or kind not in ("weight", "bias"):
                return None
            slots.setdefault(id(module), {"module": module, "bias": None})[kind] = slice(offset, offset + size)
            offset += size
    return [LinearSlot(**entry) for entry in slots.values()]


def linear_layer_scores(task: TwoStageTask, p: Tensor, x: Tensor, y: Tensor, vectors: Tensor,
                        slots: list[LinearSlot]) -> Tensor | None:
    """∇_p ℓ_P(z_i) · vectors[:, t] for a chunk, [B, T], from one forward and one backward.

    For a Linear layer with input a_i and output gradient δ_i = ∂ℓ_i/∂(output_i), the per-example
    weight gradient is the outer product δ_i a_iᵀ, so its inner product with the matching block
    S_t [out, in] of a test-side vector is δ_iᵀ S_t a_i, and with the bias block b_t it is δ_i · b_t.
    One backward of Σ_i ℓ_i gives every δ_i (examples do not interact), so per-example gradients
    are never formed: the cost is about one training step plus B·T·P multiply-adds. Returns None
    (use the generic paths) if a layer sees inputs that are not [B, in] or runs more than once.
    """
    seen: dict[int, list[tuple[Tensor, Tensor]]] = {id(s.module): [] for s in slots}

    def record(module, inputs, output):
        seen[id(module)].append((inputs[0], output))

    handles = [s.module.register_forward_hook(record) for s in slots]
    try:
        with torch.enable_grad():
            leaf = p.detach().requires_grad_(True)
            total = task.pretrain_losses(leaf, x, y).sum()
            calls = [seen[id(s.module)] for s in slots]
            if any(len(c) != 1 or c[0][0].dim() != 2 for c in calls):
                return None
            deltas = torch.autograd.grad(total, [c[0][1] for c in calls])
    finally:
        for handle in handles:
            handle.remove()
    b, t = len(x), vectors.shape[1]
    out = torch.zeros(b, t, dtype=vectors.dtype, device=vectors.device)
    for slot, call, delta in zip(slots, calls, deltas):
        a = call[0][0].detach()
        n_out, n_in = slot.module.weight.shape
        block = vectors[slot.weight].reshape(n_out, n_in, t)                    # S_t stacked: [out, in, T]
        # δᵀ S_t a as one GEMM that contracts the wider side, then a batched contraction of the other
        if n_in >= n_out:
            projected = (a @ block.permute(1, 0, 2).reshape(n_in, n_out * t)).view(b, n_out, t)
            out += torch.bmm(delta[:, None, :], projected)[:, 0]
        else:
            projected = (delta @ block.reshape(n_out, n_in * t)).view(b, n_in, t)
            out += torch.bmm(a[:, None, :], projected)[:, 0]
        if slot.bias is not None:
            out += delta @ vectors[slot.bias]
    return out


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
    method: "auto" uses ``linear_layer_scores`` when every parameter belongs to an nn.Linear, else
    forward mode (``directional_derivatives``) up to ``JVP_MAX_COLUMNS`` columns, else per-example
    gradients and one GEMM; "linear", "jvp" or "grad" force one (all give the same numbers).
    """
    if method not in SCORING_METHODS:
        raise ValueError(f"unknown scoring method {method!r}; choose from {', '.join(SCORING_METHODS)}")
    autocast = AUTOCAST_DTYPES[precision]
    if autocast is not None and task.dtype != torch.float32:
        raise TaskError(f"score precision {precision} needs a float32 model (autocast leaves "
                        f"{str(task.dtype).removeprefix('torch.')} untouched); use --dtype float32")
    m, t = task.m, vectors.shape[1]
    if vectors.shape[0] != task.n_pretrain_params:
        raise TaskError(f"test-side vectors have {vectors.shape[0]} rows, the pretraining model has "
                        f"{task.n_pretrain_params} parameters")
    scores = np.empty((t, m), dtype=np.float32) if out is None else out
    slots = linear_slots(task) if method in ("auto", "linear") else None
    if method == "linear" and slots is None:
        raise TaskError("method 'linear' needs a model whose parameters all belong to nn.Linear layers")
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
                          slots: list[LinearSlot] | None) -> tuple[Tensor, list[LinearSlot] | None]:
    """∇ℓ_P(z_i) · vectors for one chunk, [B, T], and the Linear slots to try on the next chunk."""
    if slots is not None:
        chunk = linear_layer_scores(task, p, x, y, vectors, slots)
        if chunk is not None:
            return chunk, slots
    # the model does not fit the outer-product path (or it was not asked for): stop trying it
    if method == "jvp" or (method != "grad" and vectors.shape[1] <= JVP_MAX_COLUMNS):
        return directional_derivatives(task, p, x, y, vectors), None
    return per_example_gradients(task, p, x, y) @ vectors, None


def multi_stage_scores(task: TwoStageTask, trained: TrainedStages, test_ids, config: InfluenceConfig,
                       progress: bool = True) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """Scores [T, m] per scenario for the given finetune test ids, with solver diagnostics.

    All scenarios share one streamed pass: their test-side vectors are stacked column-wise.
    """
    vectors, diagnostics = stacked_test_vectors(task, trained, test_ids, config, progress=progress)
    stacked = torch.cat([vectors[s] for s in config.scenarios], dim=1)
    scores = score_pretraining(task, trained.p, stacked, config.chunk_size, progress=progress,
                               precision=config.score_precision)
    t = len(task.check_test_ids(test_ids))
    split = {s: scores[i * t: (i + 1) * t] for i, s in enumerate(config.scenarios)}
    add_precision_check(diagnostics, task, trained.p, vectors, split, config)
    return split, diagnostics


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


__all__ = ["SCORE_DEFINITION", "SolverError", "EmbeddingSensitivity", "LinearSlot", "add_precision_check", "batched_hvp",
           "directional_derivatives", "embedding_sensitivity_fixed", "embedding_sensitivity_updated",
           "gradients_at_test_points", "linear_layer_scores", "linear_slots", "multi_stage_scores",
           "per_example_gradients", "precision_check", "pretrain_solver", "score_pretraining", "stacked_test_vectors"]
