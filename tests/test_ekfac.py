"""EK-FAC against dense Gauss-Newton matrices (torch.func Jacobians), and the ekfac/pcg solvers
against the exact solver on the tiny task."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from precompute.config import InfluenceConfig, SolverConfig
from precompute import solver_registry
from precompute.ekfac import fit_ekfac
from precompute.fd_check import TIGHT, build_check_task
from precompute.influence import multi_stage_scores, pretrain_config
from precompute.task import ParamLayout, TwoStageTask, cross_entropy_per_example
from precompute.training import train_stages


def module_problem(module: nn.Module, x: torch.Tensor, classes: int, seed: int = 0):
    """(outputs(flat, x), flat point, labels, roots) for a single module as the whole model."""
    layout = ParamLayout(module)
    point = layout.from_module(module)

    def outputs(flat, xb):
        return functional_call(module, layout.unflatten(flat), (xb,)).reshape(len(xb), -1)

    y = torch.randint(0, classes, (len(x),), generator=torch.Generator().manual_seed(seed))
    return outputs, point, y, [("net", module, layout)]


def dense_ggn(outputs, point, x, y):
    """(1/n) Σ_i J_iᵀ ∇²_z ℓ_i J_i, brute force."""
    z = outputs(point, x).detach()
    jac = jacrev(lambda pp: outputs(pp, x))(point)
    g = torch.zeros(len(point), len(point), dtype=point.dtype)
    for i in range(len(x)):
        h = hessian(lambda zi: cross_entropy_per_example(zi[None], y[i:i + 1])[0])(z[i])
        g += jac[i].T @ h @ jac[i]
    return g / len(x)


def as_matrix(factors, dtype, shift=0.0):
    eye = torch.eye(factors.dim, dtype=dtype)
    return factors.matvec(eye, torch.full((factors.dim,), shift, dtype=dtype))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_one_linear_layer_one_example_is_exact(dtype, tol):
    """One example: the layer's GGN is (a aᵀ) ⊗ (Σ_c l_c l_cᵀ) (a the bias-augmented input), a
    Kronecker product, so K-FAC's factors are exact and the corrected eigenvalues are its diagonal."""
    torch.manual_seed(0)
    layer = nn.Linear(5, 4).to(dtype)
    x = torch.randn(1, 5, dtype=dtype)
    outputs, point, y, roots = module_problem(layer, x, 4)
    factors = fit_ekfac(outputs, cross_entropy_per_example, point, x, y, 1, roots)
    expected = dense_ggn(outputs, point, x, y)
    torch.testing.assert_close(as_matrix(factors, dtype), expected, rtol=tol, atol=tol)
    assert factors.report()["fallback"] == []


def test_conv_one_position_one_example_is_exact():
    """A conv whose kernel covers the whole input has one output position: the same Kronecker case."""
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, kernel_size=3).double()
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    outputs, point, y, roots = module_problem(conv, x, 3)
    factors = fit_ekfac(outputs, cross_entropy_per_example, point, x, y, 1, roots)
    torch.testing.assert_close(as_matrix(factors, torch.float64), dense_ggn(outputs, point, x, y))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_corrected_eigenvalues_are_the_ggn_diagonal_in_the_kronecker_basis(kind):
    """With many examples (and conv positions) K-FAC is not exact, but EK-FAC's eigenvalues are by
    construction diag((Q_S ⊗ Q_A)ᵀ G (Q_S ⊗ Q_A)) of the exact layer GGN G: checked against brute force,
    which also checks the unfold / weight-layout bookkeeping of the conv path."""
    torch.manual_seed(2)
    if kind == "linear":
        module, x = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3)).double(), torch.randn(9, 4)
    else:
        module = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(),
                               nn.Linear(3 * 3 * 3, 4)).double()
        x = torch.randn(7, 2, 5, 5)
    x = x.double()
    outputs, point, y, roots = module_problem(module, x, 4 if kind == "conv" else 3)
    factors = fit_ekfac(outputs, cross_entropy_per_example, point, x, y, len(x), roots, chunk_size=4)
    g = dense_ggn(outputs, point, x, y)
    for b, qa, qs, lam in zip(factors.blocks, factors.qa, factors.qs, factors.lam):
        # basis vectors of the block in the flat layout: weight rows [out, d_w] then bias column
        idx = torch.arange(b.weight.start, b.weight.stop).reshape(b.out_features, b.d_w)
        if b.bias is not None:
            idx = torch.cat([idx, torch.arange(b.bias.start, b.bias.stop)[:, None]], dim=1)
        block = g[idx.reshape(-1)][:, idx.reshape(-1)]                                  # [(o,i), (o',i')]
        basis = torch.kron(qs, qa)                                                      # row-major (o, i)
        torch.testing.assert_close(torch.diagonal(basis.T @ block @ basis).reshape(lam.shape), lam)
    assert len(factors.blocks) == 2


def test_fallback_is_the_ggn_diagonal_and_inverse_inverts():
    torch.manual_seed(3)
    module = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 3)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    outputs, point, y, roots = module_problem(module, x, 3)
    factors = fit_ekfac(outputs, cross_entropy_per_example, point, x, y, len(x), roots)
    report = factors.report()
    assert report["fallback"] == ["net:1.weight", "net:1.bias"] and len(report["ekfac_layers"]) == 2
    g = dense_ggn(outputs, point, x, y)
    fi = factors.fallback_index
    torch.testing.assert_close(factors.diag, torch.diagonal(g)[fi])
    v = torch.randn(factors.dim, 3, dtype=torch.float64)
    shift = torch.full((factors.dim,), 0.05, dtype=torch.float64)
    torch.testing.assert_close(factors.inverse(factors.matvec(v, shift), shift), v)


@pytest.fixture(scope="module")
def tiny():
    task = build_check_task(seed=1)
    return task, train_stages(task, replace(TIGHT, alpha=1.0), progress=False)


def scores(task, trained, solver: SolverConfig, ids=(0, 1, 2, 3)):
    config = InfluenceConfig(pretrain_solver=solver, finetune_solver=solver)
    return multi_stage_scores(task, trained, list(ids), config, progress=False)


def test_auto_is_pcg_above_the_exact_limit_on_linear_layers_and_the_run_records_it(tiny, monkeypatch):
    """Above AUTO_EXACT_MAX_DIM (lowered here), "auto" solves both EK-FAC-able systems by pcg (exact
    answers) and the diagnostics name pcg; the fixed scenario's head, at the limit, stays exact."""
    task, trained = tiny
    monkeypatch.setattr(solver_registry, "AUTO_EXACT_MAX_DIM", task.u_layout.size)
    assert task.u_layout.size < min(task.n_pretrain_params, task.n_finetune_params)
    reference, _ = scores(task, trained, SolverConfig("exact"))
    got, diag = scores(task, trained, SolverConfig("auto", tol=1e-10))
    for s in ("fixed", "updated"):
        np.testing.assert_allclose(got[s], reference[s], rtol=1e-6, atol=1e-7 * np.abs(reference[s]).max())
        assert diag[s]["pretrain_solve"]["solver"] == "pcg"
    assert diag["updated"]["finetune_solve"]["solver"] == "pcg"
    assert diag["fixed"]["finetune_solve"]["solver"] == "exact"


def test_auto_is_cg_above_the_limit_without_full_ekfac_cover_or_positive_shift(tiny, monkeypatch):
    """A LayerNorm in the embedding (EK-FAC's diagonal fallback) or L2 = damping = 0 (no damped
    EK-FAC inverse): cg; at or below the limit: exact; an explicit name is kept."""
    task, _ = tiny
    auto = SolverConfig("auto")
    assert pretrain_config(task, auto).name == "exact"
    monkeypatch.setattr(solver_registry, "AUTO_EXACT_MAX_DIM", 10)
    assert pretrain_config(task, auto).name == "pcg"
    assert pretrain_config(task, SolverConfig("cg")).name == "cg"
    data = (task.pretrain_x, task.pretrain_y, task.finetune_x, task.finetune_y, task.test_x, task.test_y)
    normed = TwoStageTask(nn.Sequential(nn.Linear(16, 5), nn.LayerNorm(5), nn.Tanh()), nn.Linear(5, 3),
                          nn.Linear(5, 2), *data)
    assert pretrain_config(normed, auto).name == "cg"
    unregularised = TwoStageTask(task.embedding, task.pretrain_head, task.finetune_head, *data, pretrain_l2=0.0)
    assert pretrain_config(unregularised, auto).name == "cg"
    assert pretrain_config(unregularised, SolverConfig("auto", damping=1e-3)).name == "pcg"


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_pcg_equals_exact_on_the_tiny_task(tiny, curvature):
    task, trained = tiny
    reference, _ = scores(task, trained, SolverConfig("exact", curvature=curvature))
    got, diag = scores(task, trained, SolverConfig("pcg", tol=1e-10, curvature=curvature))
    plain, plain_diag = scores(task, trained, SolverConfig("cg", tol=1e-10, curvature=curvature))
    for s in ("fixed", "updated"):
        np.testing.assert_allclose(got[s], reference[s], rtol=1e-6, atol=1e-7 * np.abs(reference[s]).max())
        d = diag[s]["pretrain_solve"]
        assert d["solver"] == "pcg" and d["relative_residual"] < 1e-8 and d["curvature_model"]["fallback"] == []
        assert d["iterations"] < plain_diag[s]["pretrain_solve"]["iterations"]
    assert diag["updated"]["finetune_solve"]["solver"] == "pcg"
    assert diag["fixed"]["finetune_solve"]["solver"] == "exact"      # the head: exact


def test_ekfac_scores_rank_like_exact_and_cached_factors_reload(tiny, tmp_path):
    task, trained = tiny
    reference, _ = scores(task, trained, SolverConfig("exact", curvature="ggn"))
    config = SolverConfig("ekfac", factors_dir=str(tmp_path))
    first, diag = scores(task, trained, config)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["ekfac_finetune_updated.safetensors", "ekfac_pretrain.safetensors"]
    stamp = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    again, _ = scores(task, trained, config)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamp     # loaded, not refitted
    for s in ("fixed", "updated"):
        np.testing.assert_array_equal(again[s], first[s])
        # a smoke bound only: on this 5-unit task the block-diagonal EK-FAC drops the θ-W coupling
        # (measured 0.87 fixed, 0.65 updated vs the exact GGN); benchmarks/bench_curvature.py measures
        # the presets
        r = np.corrcoef(first[s].ravel(), reference[s].ravel())[0, 1]
        assert r > {"fixed": 0.8, "updated": 0.5}[s], (s, r)
        assert diag[s]["pretrain_solve"]["solver"] == "ekfac"
        assert diag[s]["pretrain_solve"]["curvature_model"]["ekfac_layers"] == [
            "theta:0 (linear, 5x17)", "pretrain_head (linear, 3x6)"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_factors_and_inverse_on_cuda_match_cpu():
    torch.manual_seed(4)
    module = nn.Sequential(nn.Conv2d(1, 3, 3, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)).double()
    x = torch.randn(9, 1, 6, 6, dtype=torch.float64)
    outputs, point, y, roots = module_problem(module, x, 3)
    cpu = fit_ekfac(outputs, cross_entropy_per_example, point, x, y, len(x), roots)
    module.cuda()
    outputs, point_cuda, _, roots = module_problem(module, x.cuda(), 3)
    gpu = fit_ekfac(outputs, cross_entropy_per_example, point_cuda, x.cuda(), y.cuda(), len(x), roots)
    v = torch.randn(cpu.dim, 2, dtype=torch.float64)
    shift = torch.full((cpu.dim,), 0.1, dtype=torch.float64)
    torch.testing.assert_close(gpu.inverse(v.cuda(), shift.cuda()).cpu(), cpu.inverse(v, shift), rtol=1e-8, atol=1e-10)


def test_a_layer_used_twice_falls_back_and_its_factors_reload(tmp_path):
    """A Linear applied twice per forward has a gradient summed over two calls: not a Kronecker
    product of one input and one output gradient, so it takes the diagonal fallback."""
    from precompute.ekfac import EKFACFactors

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.out = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.out(torch.tanh(self.inner(torch.tanh(self.inner(x)))))

    torch.manual_seed(5)
    module = Twice().double()
    x = torch.randn(5, 3, dtype=torch.float64)
    outputs, point, y, roots = module_problem(module, x, 2)
    factors = fit_ekfac(outputs, cross_entropy_per_example, point, x, y, len(x), roots)
    assert factors.report()["fallback"] == ["net:inner.weight", "net:inner.bias"]
    torch.testing.assert_close(factors.diag, torch.diagonal(dense_ggn(outputs, point, x, y))[factors.fallback_index])
    factors.save(tmp_path / "f.safetensors")
    again = EKFACFactors.load(tmp_path / "f.safetensors", roots, "cpu", torch.float64)
    v = torch.randn(factors.dim, 2, dtype=torch.float64)
    shift = torch.full((factors.dim,), 0.1, dtype=torch.float64)
    torch.testing.assert_close(again.inverse(v, shift), factors.inverse(v, shift), rtol=0, atol=0)


@pytest.mark.parametrize("preset", ["digits", "news"])
@pytest.mark.parametrize("solver", ["ekfac", "pcg"])
def test_cli_accepts_the_scalable_solvers_for_every_mlp_preset(tmp_path, preset, solver):
    """`--solver ekfac|pcg` end to end through the CLI (the fashion CNN's run is checked by hand and in
    bench_curvature.py: its quick training alone takes minutes); the manifest records the solver used."""
    import json

    from precompute.cli import main

    out = tmp_path / preset
    assert main(["--preset", preset, "--quick", "--no-validate", "--solver", solver,
                 "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    for scenario in ("fixed", "updated"):
        assert manifest["diagnostics"][scenario]["pretrain_solve"]["solver"] == solver
