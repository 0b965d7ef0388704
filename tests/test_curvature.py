"""Gauss-Newton products against a dense Jᵀ H J built from torch.func Jacobians (brute force)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.func import hessian, jacrev

from precompute.curvature import batched_hvp, dense_hessian, finetune_curvature, output_hessian_sqrt, pretrain_curvature
from precompute.fd_check import build_check_task


def dense_ggn(outputs, loss_fn, point, x, y, denominator):
    """(1/n) Σ_i J_iᵀ ∇²_z ℓ_i J_i from full Jacobians and per-example output Hessians."""
    z = outputs(point, x)
    jac = jacrev(lambda pp: outputs(pp, x))(point)                                  # [B, C, D]
    total = torch.zeros(len(point), len(point), dtype=point.dtype)
    for i in range(len(x)):
        h = hessian(lambda zi: loss_fn(zi[None], y[i:i + 1])[0])(z[i].detach())
        total += jac[i].T @ h @ jac[i]
    return total / denominator


@pytest.fixture(scope="module")
def task():
    t = build_check_task(seed=2, n_pretrain=24, n_finetune=16, hidden=4)
    return t


def test_output_hessian_sqrt_of_cross_entropy():
    z = torch.randn(5, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0])
    sqrt = output_hessian_sqrt(lambda a, b: torch.nn.functional.cross_entropy(a, b, reduction="none"), z, y)
    p = z.softmax(1)
    expected = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    torch.testing.assert_close(sqrt @ sqrt.transpose(1, 2), expected)


@pytest.mark.parametrize("chunk", [0, 7])
def test_pretraining_ggn_products_equal_dense_gauss_newton(task, chunk):
    gen = torch.Generator().manual_seed(0)
    p = task.initial_pretrain_params() + 0.3 * torch.randn(task.n_pretrain_params, generator=gen, dtype=torch.float64)
    hvp = pretrain_curvature(task, p, "ggn", chunk_size=chunk)
    expected = dense_ggn(task.pretrain_outputs, task.pretrain_loss, p, task.pretrain_x, task.pretrain_y, task.m)
    expected += task.pretrain_l2 * torch.eye(len(p), dtype=p.dtype)
    got = dense_hessian(hvp, len(p), p.dtype, p.device)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    assert torch.linalg.eigvalsh(got).min() >= task.pretrain_l2 * (1 - 1e-9)    # PSD + L2


def test_finetune_ggn_adds_alpha_on_theta_and_l2_on_head(task):
    q = torch.cat([task.initial_pretrain_params()[: task.n_theta], task.initial_u()])
    anchor = q[: task.n_theta] + 0.1
    got = dense_hessian(finetune_curvature(task, q, anchor, 0.7, "ggn"), len(q), q.dtype, q.device)
    expected = dense_ggn(task.finetune_outputs, task.finetune_loss, q, task.finetune_x, task.finetune_y,
                         len(task.finetune_x))
    expected += torch.diag(torch.cat([torch.full((task.n_theta,), 0.7, dtype=q.dtype),
                                      torch.full((task.u_layout.size,), task.finetune_l2, dtype=q.dtype)]))
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_hessian_curvature_is_the_true_hessian(task):
    p = task.initial_pretrain_params()
    got = dense_hessian(pretrain_curvature(task, p, "hessian"), len(p), p.dtype, p.device)
    torch.testing.assert_close(got, hessian(task.pretrain_objective)(p), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_arnoldi_on_a_clustered_spectrum_is_float32_safe(dtype):
    """60 eigenvalues at the L2 floor exhaust the Krylov space early; float32 Lanczos used to
    report a spurious negative eigenvalue there (and arnoldi refused to solve)."""
    from precompute.config import SolverConfig
    from precompute.solver_registry import LinearSystem, build_solver

    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(85, 85, generator=gen, dtype=torch.float64))
    evals = torch.cat([torch.full((60,), 0.01, dtype=torch.float64), torch.linspace(0.02, 0.59, 25, dtype=torch.float64)])
    h = ((q * evals) @ q.T).to(dtype)
    solver = build_solver(LinearSystem(lambda v: h @ v, 85, dtype, torch.device("cpu")),
                          SolverConfig("arnoldi", rank=128, oversample=16))
    _, diag = solver.solve(torch.randn(85, 3, generator=gen, dtype=torch.float64).to(dtype))
    assert abs(diag.eig_min - 0.01) < 1e-5 and abs(diag.eig_max - 0.59) < 1e-5


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_large_in_memory_sets_use_chunked_products(task, monkeypatch, curvature):
    import precompute.curvature as cv

    p = task.initial_pretrain_params()
    v = torch.randn(len(p), 3, dtype=p.dtype)
    whole = pretrain_curvature(task, p, curvature)(v)
    monkeypatch.setattr(cv, "IN_MEMORY_GRAPH_MAX", 10)
    monkeypatch.setattr(cv, "GGN_CHUNK", 7)
    monkeypatch.setattr("precompute.streaming.DEFAULT_CHUNK", 7)
    torch.testing.assert_close(pretrain_curvature(task, p, curvature)(v), whole, rtol=1e-10, atol=1e-13)


def test_hessian_free_newton_polish_converges_where_lbfgs_stops_early(task):
    """Models above newton_max_params get Newton-CG: from 40 L-BFGS iterations to ‖∇‖ ≤ 1e-10."""
    from precompute.config import TrainConfig
    from precompute.training import pretrain

    plain = pretrain(task, TrainConfig(max_iter=40, newton_polish=0), desc=None)
    polished = pretrain(task, TrainConfig(max_iter=40, newton_max_params=0, grad_tol=1e-10), desc=None)
    assert not plain.converged and plain.grad_norm > 1e-6
    assert polished.converged and polished.grad_norm <= 1e-10


def test_lissa_refuses_up_front_with_the_iterations_it_needs_and_converges_when_given_them():
    from precompute.config import SolverConfig
    from precompute.solver_registry import LinearSystem, build_solver
    from precompute.solvers import SolverError

    h = torch.diag(torch.logspace(-2, 0, 40, dtype=torch.float64))            # condition number 100
    b = torch.ones(40, 2, dtype=torch.float64)
    with pytest.raises(SolverError, match="would need about"):
        build_solver(LinearSystem(lambda v: h @ v, 40, torch.float64, torch.device("cpu")),
                     SolverConfig("lissa", max_iter=100, tol=1e-8)).solve(b)
    system = LinearSystem(lambda v: h @ v, 40, torch.float64, torch.device("cpu"))
    x, diag = build_solver(system, SolverConfig("lissa", max_iter=5000, tol=1e-8)).solve(b)
    torch.testing.assert_close(x, torch.linalg.solve(h, b), rtol=1e-6, atol=0)
    assert diag.relative_residual < 1e-7


def test_influence_and_retraining_share_one_pretraining_hessian(tiny, monkeypatch):
    """The exact solve and the retraining preconditioner at p* use one dense Hessian build (keyed by
    task and point), and that Hessian equals the retraining objective's own, built without the key."""
    from precompute import retraining
    from precompute.config import SolverConfig
    from precompute.curvature import HessianStore
    from precompute.influence import pretrain_solver

    task, trained = tiny
    trained = replace(trained, hessians=HessianStore())              # nothing kept from training
    solver = pretrain_solver(task, trained.p, SolverConfig("exact"), hessians=trained.hessians)
    solver.eigh()
    products = []

    def counting(objective, x, **kw):
        hvp = batched_hvp(objective, x, **kw)
        return lambda v: (products.append((x.numel(), v.shape[1])), hvp(v))[1]

    monkeypatch.setattr(retraining, "batched_hvp", counting)
    retraining.Retrainer(task, trained)
    assert not [p for p in products if p[0] == task.n_pretrain_params]         # pretraining: reused
    assert solver.shared.key in trained.hessians.keys()                        # kept for the baselines
    assert sum(k for d, k in products if d == task.n_finetune_params) == task.n_finetune_params   # updated: built
    ones = torch.ones(task.m, dtype=task.dtype)
    own = dense_hessian(batched_hvp(lambda p: task.pretrain_objective(p, ones), trained.p),
                        task.n_pretrain_params, task.dtype, "cpu")
    torch.testing.assert_close(solver.hessian(), own, rtol=1e-9, atol=1e-12)


def test_a_run_shares_each_stage_hessian_once_and_releases_them(tmp_path, monkeypatch):
    """The training certificate, influence, retraining and the baselines share one keyed build per stage
    (pretraining, updated finetuning); the run drops them when done."""
    from precompute import certificate, curvature, retraining, solvers
    from precompute.cli import main

    builds, stores = [], set()
    keyed = curvature.dense_hessian

    def spy(hvp, dim, dtype, device, block=256, shared=None, on_columns=None):
        if shared is not None:
            stores.add(shared.store)
            if shared.store.lookup(shared.key) is None:
                builds.append(shared.key)
        return keyed(hvp, dim, dtype, device, block, shared, on_columns)

    for module in (solvers, certificate, retraining):
        monkeypatch.setattr(module, "dense_hessian", spy)
    assert main(["--preset", "digits", "--quick", "--out", str(tmp_path / "r")]) == 0
    # one build per point: the certificate's build at the trained point serves every later user (a
    # training that escaped a saddle certified an earlier point too, under another key)
    assert {key[0] for key in builds} == {"pretrain", "updated"} and len(set(builds)) == len(builds)
    assert len(stores) == 1 and next(iter(stores)).keys() == []          # one chain's store, cleared


def _tiny_conv_net(gen: torch.Generator):
    """12 random 8x8 images, 3 labels, and outputs(x, images) of a conv(4, 3x3) -> tanh -> linear(3) net whose
    parameters are the flat float64 vector x; returns (images, labels, outputs, number of parameters)."""
    images = torch.randn(12, 1, 8, 8, dtype=torch.float64, generator=gen)
    labels = torch.randint(0, 3, (12,), generator=gen)
    shapes = [(4, 1, 3, 3), (4,), (3, 4 * 6 * 6), (3,)]
    sizes = [int(torch.tensor(s).prod()) for s in shapes]

    def outputs(x, inputs):
        w1, b1, w2, b2 = (part.reshape(shape) for part, shape in zip(torch.split(x, sizes), shapes))
        return torch.tanh(torch.nn.functional.conv2d(inputs, w1, b1)).flatten(1) @ w2.T + b2

    return images, labels, outputs, sum(sizes)


def test_forward_over_reverse_products_are_the_hessian_of_a_conv_net():
    """The quick fashion CNN's dense Hessians are built forward-over-reverse: on a small conv net (float64) its
    columns equal central differences of the gradient and the double backward's, and a dense build from them is
    symmetric; an unknown method is refused in one line."""
    from precompute.curvature import forward_over_reverse_hvp, hessian_products
    from precompute.errors import ConfigError

    gen = torch.Generator().manual_seed(0)
    images, labels, outputs, size = _tiny_conv_net(gen)

    def objective(x):
        return torch.nn.functional.cross_entropy(outputs(x, images), labels) + 5e-3 * (x * x).sum()

    x = 0.3 * torch.randn(size, dtype=torch.float64, generator=gen)
    columns = torch.eye(x.numel(), dtype=torch.float64)[:, ::7]
    products = forward_over_reverse_hvp(objective, x, chunk=4)(columns)
    grad = torch.func.grad(objective)
    step = 1e-5
    central = torch.stack([(grad(x + step * v) - grad(x - step * v)) / (2 * step) for v in columns.T], dim=1)
    torch.testing.assert_close(products, central, rtol=0, atol=1e-8)
    torch.testing.assert_close(products, batched_hvp(objective, x)(columns), rtol=0, atol=1e-14)
    full = dense_hessian(hessian_products(objective, x, "forward-over-reverse"), x.numel(), x.dtype, x.device)
    torch.testing.assert_close(full, full.T, rtol=0, atol=0)
    torch.testing.assert_close(full[:, ::7], products, rtol=0, atol=1e-14)
    with pytest.raises(ConfigError, match="use one of double-backward, forward-over-reverse"):
        hessian_products(objective, x, "finite-differences")


@pytest.mark.parametrize("chunk", [0, 5, 12])
def test_streamed_gauss_newton_products_of_a_conv_net_equal_brute_force(chunk):
    """fashion-all's Gauss-Newton products stream forward mode chunk by chunk (``GGN_CHUNK``): on a small conv
    net (float64, 12 images, a chunk that does not divide them) they equal (1/n) Σ Jᵢᵀ Hᵢ Jᵢ from full Jacobians,
    as the kept graph (chunk 0) does, for several columns at once and in blocks of 2."""
    from precompute.curvature import ggn_hvp

    gen = torch.Generator().manual_seed(1)
    images, labels, outputs, size = _tiny_conv_net(gen)

    def loss(z, y):
        return torch.nn.functional.cross_entropy(z, y, reduction="none")

    x = 0.3 * torch.randn(size, dtype=torch.float64, generator=gen)
    diagonal = torch.full_like(x, 1e-2)
    expected = dense_ggn(outputs, loss, x, images, labels, 12) + 1e-2 * torch.eye(len(x), dtype=x.dtype)
    columns = torch.randn(len(x), 5, dtype=torch.float64, generator=gen)
    got = ggn_hvp(outputs, loss, x, images, labels, 12, diagonal, chunk_size=chunk, rhs_block=2)(columns)
    torch.testing.assert_close(got, expected @ columns, rtol=1e-10, atol=1e-12)
