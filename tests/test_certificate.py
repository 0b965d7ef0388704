"""Minimum certificates: λ_min by dense eigvalsh, by Lanczos, and the batched inertia check of retrainings,
each against a brute-force eigendecomposition."""

from __future__ import annotations

import torch

from precompute.certificate import Certificate, batched_inertia, certify, lanczos_extremes


def _symmetric(dim: int, lowest: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64, generator=gen))
    evals = torch.logspace(-2, 1, dim, dtype=torch.float64)
    evals[0] = lowest
    return (q * evals) @ q.T


def test_certify_dense_and_lanczos_find_the_smallest_eigenvalue_of_a_quadratic():
    for lowest in (3e-3, -5e-2):
        h = _symmetric(40, lowest, seed=1)
        objective = lambda x, h=h: 0.5 * x @ h @ x
        x = torch.zeros(40, dtype=torch.float64)
        dense, vector = certify(objective, x, grad_tol=1e-9, dense_max=100)
        assert dense.method == "dense" and abs(dense.eig_min - lowest) < 1e-12
        assert torch.allclose((h @ vector).abs(), (lowest * vector).abs(), atol=1e-10)
        assert dense.certified == (lowest > 0)
        lanczos, vector = certify(objective, x, grad_tol=1e-9, dense_max=10)
        assert lanczos.method == "lanczos"
        # a Ritz value is a Rayleigh quotient: never below λ_min, and 40 steps span the whole space
        assert lanczos.eig_min >= lowest - 1e-10 and abs(lanczos.eig_min - lowest) < 1e-8
        assert float(vector @ h @ vector) < 0 if lowest < 0 else True


def test_lanczos_proves_a_saddle_in_fewer_steps_than_dimensions():
    """Negative curvature is found by a Rayleigh quotient, so a negative Ritz value is proof, not estimate."""
    h = _symmetric(300, -0.5, seed=2)
    value, vector, largest = lanczos_extremes(lambda v: h @ v, torch.zeros(300, dtype=torch.float64), steps=40)
    assert value < 0 and abs(float(vector @ h @ vector) - value) < 1e-10
    evals = torch.linalg.eigvalsh(h)
    assert value >= float(evals[0]) - 1e-12
    assert largest <= float(evals.abs().max()) + 1e-9 and largest > 0.9 * float(evals.abs().max())


def test_certificate_needs_both_a_small_gradient_and_positive_curvature():
    assert Certificate(1e-10, 1e-4, 1e-9, "dense").certified
    assert not Certificate(2e-9, 1e-4, 1e-9, "dense").certified
    assert not Certificate(1e-10, -1e-4, 1e-9, "dense").certified
    assert not Certificate(1e-10, 0.0, 1e-9, "dense").certified
    assert not Certificate(1e-10, float("nan"), 1e-9, "dense").certified


def test_batched_inertia_has_the_sign_of_each_models_smallest_eigenvalue():
    """S H_b S with S = M^{-1/2}: same inertia as H_b (Sylvester); near I when H_b is near M."""
    dim, models = 30, 6
    base = _symmetric(dim, 1e-2, seed=3)
    evals, evecs = torch.linalg.eigh(base)
    inv_sqrt = lambda rows: ((rows @ evecs) * evals.rsqrt()) @ evecs.T
    gen = torch.Generator().manual_seed(4)
    hs = []
    for b in range(models):
        d = torch.randn(dim, dim, dtype=torch.float64, generator=gen)
        scale = [1e-4, 1e-3, 5e-3, 2e-2, 5e-2, 0.2][b]
        hs.append(base + scale * (d + d.T) / 2)
    hs = torch.stack(hs)
    estimate = batched_inertia(lambda rows: torch.einsum("bij,bj->bi", hs, rows), inv_sqrt, models, dim,
                               torch.float64, torch.device("cpu"), steps=dim)
    truth = torch.linalg.eigvalsh(hs)[:, 0]
    assert torch.equal(estimate > 0, truth > 0), (estimate, truth)
    assert (truth < 0).any() and (truth > 0).any()                       # both kinds were exercised
    preconditioned = torch.linalg.eigvalsh(inv_sqrt(inv_sqrt(hs).transpose(1, 2)))[:, 0]
    torch.testing.assert_close(estimate, preconditioned, rtol=1e-8, atol=1e-10)


def test_escape_saddles_steps_each_model_downhill_along_its_negative_curvature():
    from precompute.retraining import escape_saddles

    def objective(x, shift):                     # a saddle at (shift, 0), minima at (shift, ±√2)
        return (x[0] - shift) ** 2 - x[1] ** 2 + x[1] ** 4 / 4

    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.4142135623730951]], dtype=torch.float64)
    shifts = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    direction = torch.tensor([[0.0, 1.0], [0.0, -1.0], [0.0, 1.0]], dtype=torch.float64)
    out, moved = escape_saddles(objective, x, shifts, direction)
    assert moved.tolist() == [True, True, False]                     # the third sits at a minimum already
    values = torch.stack([objective(o, s) for o, s in zip(out, shifts)])
    assert (values[:2] < -0.5).all() and torch.equal(out[2], x[2])


def test_certify_stage_escapes_a_converged_saddle_and_leaves_a_capped_model_unchecked():
    """Retrained models that converged are checked (and stepped off a saddle, then retrained to the next
    minimum); one still descending at the iteration cap counts for nothing, so it is not checked (NaN)."""
    from precompute.retraining import Preconditioner, Retrainer, StageFit

    def objective(x, shift):                     # saddle at (shift, 0), minima at (shift, ±√2): λ_min +2 there
        return (x[0] - shift) ** 2 - x[1] ** 2 + x[1] ** 4 / 4

    retrainer = Retrainer.__new__(Retrainer)     # the stage machinery alone, without a two-stage task
    retrainer.objectives = {"pretrain": objective}
    retrainer.precond = {"pretrain": Preconditioner(torch.eye(2, dtype=torch.float64),
                                                    torch.full((2,), 0.5, dtype=torch.float64))}
    x = torch.tensor([[0.0, 0.0], [1.0, 2.0 ** 0.5], [0.3, 0.7]], dtype=torch.float64)
    shifts = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    grad_norm = torch.stack([torch.func.grad(objective)(a, s).norm() for a, s in zip(x, shifts)])
    fit = StageFit(x, grad_norm, grad_norm <= 1e-10, 100, torch.zeros(3, dtype=torch.bool))
    assert fit.converged.tolist() == [True, True, False]
    steps = []
    out, eig = retrainer.certify_stage("pretrain", fit, shifts, tol=1e-10, max_iter=50,
                                       on_certify=lambda j, n: steps.append((j, n)))
    assert out.converged[:2].all() and abs(abs(float(out.params[0, 1])) - 2.0 ** 0.5) < 1e-8
    assert (eig[:2] > 0).all()                                       # the saddle's model now at a minimum
    assert torch.isnan(eig[2]) and torch.equal(out.params[2], x[2]) and not bool(out.converged[2])
    assert steps and all(n == 2 for _, n in steps)                   # Lanczos progress: step j of 2 (D = 2)


def test_certify_reports_the_dense_hessians_columns_block_by_block():
    """The certificate's dense build (minutes on a CNN) reports its progress: every column once, in order."""
    dim = 300
    h = _symmetric(dim, 3e-3, seed=4)
    blocks = []
    cert, _ = certify(lambda x: 0.5 * x @ h @ x, torch.zeros(dim, dtype=torch.float64), 1e-9, dense_max=dim,
                      on_columns=lambda a, b, n: blocks.append((a, b, n)))
    assert blocks == [(1, 256, dim), (257, dim, dim)]
    assert cert.method == "dense" and abs(cert.eig_min - float(torch.linalg.eigvalsh(h)[0])) < 1e-12
