"""Training to a true minimum: the dense Newton polish (what the retraining check relies on)."""

from __future__ import annotations

import math

import torch

from precompute.training import newton_polish


def _saddle_objective(x: torch.Tensor) -> torch.Tensor:
    """f(a, b) = a² − b² + b⁴/4: a saddle at the origin, minima at (0, ±√2) with f = −1."""
    return x[0] ** 2 - x[1] ** 2 + x[1] ** 4 / 4


def test_newton_polish_reaches_a_strict_minimum_to_machine_precision():
    target = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    scales = torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)

    def objective(x):                       # strictly convex, ill-conditioned, not quadratic
        d = x - target
        return (scales * d ** 2).sum() + (d ** 4).sum()

    x, at_minimum = newton_polish(objective, torch.zeros(3, dtype=torch.float64), steps=30, grad_tol=1e-12)
    assert at_minimum
    torch.testing.assert_close(x, target, rtol=0, atol=1e-12)


def test_newton_polish_steps_off_a_saddle_to_a_minimum():
    start = torch.zeros(2, dtype=torch.float64)          # gradient exactly 0, Hessian diag(2, −2)
    x, at_minimum = newton_polish(_saddle_objective, start, steps=30, grad_tol=1e-12)
    assert at_minimum
    assert abs(float(x[0])) < 1e-12 and abs(abs(float(x[1])) - math.sqrt(2)) < 1e-12
    assert float(_saddle_objective(x)) < float(_saddle_objective(start))


def test_newton_polish_says_when_it_has_left_a_saddle():
    """Stepping off a saddle raises ‖∇‖ before it falls: the progress note says why."""
    notes: list[str] = []
    x, at_minimum = newton_polish(_saddle_objective, torch.zeros(2, dtype=torch.float64), steps=30,
                                  grad_tol=1e-12, on_note=notes.append)
    assert at_minimum and "saddle" not in notes[0]
    assert any(", 1 saddle left behind at ‖∇‖" in note for note in notes[1:])


def test_newton_polish_at_a_saddle_with_no_steps_does_not_claim_a_minimum():
    x, at_minimum = newton_polish(_saddle_objective, torch.zeros(2, dtype=torch.float64), steps=0, grad_tol=1e-12)
    assert not at_minimum and torch.equal(x, torch.zeros(2, dtype=torch.float64))


def test_newton_polish_reuses_a_dense_hessian_near_a_minimum(monkeypatch):
    """Near a minimum a factorisation serves several chord steps (each still cutting ‖∇‖ fourfold), so
    the polish reaches the tolerance with fewer dense Hessians (P products each) than steps."""
    from precompute import training

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(40, 12, dtype=torch.float64, generator=gen)
    b = torch.randn(40, dtype=torch.float64, generator=gen)

    def objective(x):                       # smooth, strictly convex, not quadratic
        return torch.log(torch.cosh(a @ x - b)).mean() + 0.05 * (x ** 2).sum()

    rough = torch.zeros(12, dtype=torch.float64)
    for _ in range(5):                      # a few gradient steps: near, not at, the minimum
        rough = rough - 0.5 * torch.func.grad(objective)(rough)
    assert 1e-6 < float(torch.func.grad(objective)(rough).norm()) < 1e-1
    builds, steps = [], []
    real, real_step = training.dense_hessian, training._halving_step
    monkeypatch.setattr(training, "dense_hessian", lambda *args, **kw: (builds.append(1), real(*args, **kw))[1])
    monkeypatch.setattr(training, "_halving_step", lambda *args, **kw: (steps.append(1), real_step(*args, **kw))[1])
    x, at_minimum = newton_polish(objective, rough, steps=10, grad_tol=1e-9)
    assert at_minimum and float(torch.func.grad(objective)(x).norm()) <= 1e-9
    # Chord steps converge linearly at rate ~‖H₀⁻¹(H(x) − H₀)‖, Newton quadratically: how many of each a
    # machine's rounding takes varies, but reuse always means fewer factorisations than steps.
    assert 1 <= len(builds) < len(steps)


def test_newton_polish_reports_each_hessian_build():
    """A dense Hessian costs P products (minutes on a CNN): the polish says which column it is at."""
    target = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)

    def objective(x):
        return ((x - target) ** 2).sum() + 0.1 * (x ** 4).sum()

    notes: list[str] = []
    x, at_minimum = newton_polish(objective, torch.zeros(3, dtype=torch.float64), steps=30, grad_tol=1e-12,
                                  on_note=notes.append)
    assert at_minimum and notes
    assert notes[0].startswith("Newton polish 1 at ‖∇‖ ") and notes[0].endswith(": Hessian columns 1-3 of 3")
    assert all(note.endswith("of 3") for note in notes)


def test_polish_steps_off_negative_curvature_before_the_gradient_vanishes():
    """Beside a saddle with ‖∇‖ just above the target (what another CPU's L-BFGS met): saddle-free Newton
    would creep away at ‖∇‖/|λ| per step; the polish steps along the negative eigenvector instead."""
    start = torch.tensor([0.0, 1e-9], dtype=torch.float64)            # ‖∇‖ 2e-9, Hessian diag(2, −2)
    escapes = []
    x, at_minimum = newton_polish(_saddle_objective, start, steps=1, grad_tol=1e-12, on_escape=lambda: escapes.append(1))
    assert escapes == [1] and not at_minimum
    assert float(_saddle_objective(x)) < float(_saddle_objective(start)) - 0.1


def test_minimize_certifies_a_minimum_from_a_saddle():
    """L-BFGS cannot leave an exact saddle (‖∇‖ = 0); minimize escapes it and certifies the minimum."""
    from precompute.config import TrainConfig
    from precompute.training import minimize

    for start in ([0.0, 0.0], [0.0, 1e-9], [1e-3, -1e-10]):
        result = minimize(_saddle_objective, torch.tensor(start, dtype=torch.float64), TrainConfig(grad_tol=1e-12))
        assert result.certified and result.saddles_escaped >= 1, start
        assert abs(result.eig_min - 2.0) < 1e-6                          # Hessian diag(2, 2) at (0, ±√2)
        assert abs(abs(float(result.params[1])) - math.sqrt(2)) < 1e-10


def test_minimize_without_polish_escapes_through_the_certificate():
    """With the Newton polish off, the certificate's eigenvector is the way off the saddle."""
    from precompute.config import TrainConfig
    from precompute.training import minimize

    result = minimize(_saddle_objective, torch.zeros(2, dtype=torch.float64),
                      TrainConfig(grad_tol=1e-8, newton_polish=0))
    assert result.certified and result.saddles_escaped >= 1
    assert result.summary()["certified"] and result.summary()["eig_min"] > 0


def test_an_uncertified_stage_stops_influence_with_one_line():
    from precompute.certificate import Certificate, CertificateError
    from precompute.training import TrainedStages, TrainResult

    good = Certificate(1e-12, 1e-3, 1e-9, "dense")
    saddle = Certificate(1e-12, -2e-3, 1e-9, "dense")
    x = torch.zeros(2, dtype=torch.float64)
    trained = TrainedStages(TrainResult(x, 0.0, 1e-12, 1, True, good),
                            {"fixed": TrainResult(x, 0.0, 1e-12, 1, True, good),
                             "updated": TrainResult(x, 0.0, 1e-12, 1, True, saddle)}, alpha=0.1)
    trained.require_certified(("fixed",))
    trained.require_certified(("fixed", "updated"), damping=1e-2)          # damped: its own question
    try:
        trained.require_certified(("fixed", "updated"))
    except CertificateError as err:
        message = str(err)
    else:
        raise AssertionError("an uncertified stage passed")
    assert "\n" not in message and message.startswith("finetuning (updated) is not at a certified minimum")
    assert "-2.00e-03" in message and "--train-iters" in message


def test_a_subsample_hessian_preconditions_the_polish_to_the_exact_minimum():
    """newton_subsample: the polish factorises the Hessian of a subsample (here 60 of 300 real digits,
    far from the full Hessian) and takes Newton steps by CG on exact products; it reaches the minimum the
    exact polish reaches, and the certificate (full Hessian) certifies it."""
    from precompute.config import DataConfig, ModelConfig, TrainConfig
    from precompute.presets import build_task, load_task_data
    from precompute.training import pretrain, subsample_objective

    model = ModelConfig(hidden=8)
    task = build_task(load_task_data(DataConfig(preset="digits", max_pretrain=60, max_finetune=40), model),
                      model).to("cpu", torch.float64)
    loose = dict(lbfgs_tol=1e-3, grad_tol=1e-10)           # leave the polish real work to do
    exact = pretrain(task, TrainConfig(**loose), desc=None)
    sampled = pretrain(task, TrainConfig(newton_subsample=60, **loose), desc=None)
    assert exact.certified and sampled.certified
    # both are strict minima with ‖∇‖ ≤ 1e-10; the same one when ‖Δp‖ ≤ (‖∇₁‖ + ‖∇₂‖)/λ_min, far below
    # the distance between distinct minima
    bound = 2 * (exact.grad_norm + sampled.grad_norm) / min(exact.eig_min, sampled.eig_min)
    assert float((exact.params - sampled.params).norm()) <= max(bound, 1e-8)
    # the preconditioner's objective really is a subsample: its Hessian differs from the full one
    approx = subsample_objective(task, None, 60, task.pretrain_objective)
    assert approx is not None and subsample_objective(task, None, task.m, task.pretrain_objective) is None
    full_value, sub_value = float(task.pretrain_objective(exact.params)), float(approx(exact.params))
    assert abs(full_value - sub_value) > 1e-6


def _digits_task(max_pretrain: int = 60):
    from precompute.config import DataConfig, ModelConfig
    from precompute.presets import build_task, load_task_data

    model = ModelConfig(hidden=8)
    return build_task(load_task_data(DataConfig(preset="digits", max_pretrain=max_pretrain, max_finetune=40), model),
                      model).to("cpu", torch.float64)


def test_minibatch_pretraining_reports_its_true_gradient_and_is_never_certified():
    """minibatch_epochs: Adam over shuffled minibatches lowers L_P from the initial weights; the reported
    ‖∇‖ is the full-batch gradient at the result (recomputed here by autograd on the whole set), the
    stage carries no certificate, and a repeat with the same seed gives the same weights."""
    from precompute.config import TrainConfig
    from precompute.training import pretrain

    task = _digits_task()
    config = TrainConfig(minibatch_epochs=20, minibatch_size=32, minibatch_lr=1e-2)
    start = task.initial_pretrain_params()
    result = pretrain(task, config, desc=None)
    again = pretrain(task, config, desc=None)
    p = result.params.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(task.pretrain_objective(p), p)
    assert result.method == "minibatch" and result.certificate is None and not result.certified
    assert math.isclose(result.grad_norm, float(grad.norm()), rel_tol=1e-9)
    assert result.objective < 0.5 * float(task.pretrain_objective(start))
    assert result.iterations == 20 * math.ceil(task.m / 32)
    assert torch.equal(result.params, again.params)
    assert result.summary()["method"] == "minibatch" and result.summary()["eig_min"] is None


def test_a_minibatch_stage_needs_a_damped_solve():
    """A damped stationary point is no minimum: undamped influence refuses it in one line naming the fix;
    a damped solve (its own, proximal question) accepts it."""
    from precompute.certificate import CertificateError
    from precompute.training import TrainedStages, TrainResult

    x = torch.zeros(2, dtype=torch.float64)
    stage = TrainResult(x, 0.0, 3e-2, 100, False, None, 0, "minibatch")
    trained = TrainedStages(stage, {"fixed": TrainResult(x, 0.0, 0.0, 1, True)}, alpha=0.1)
    trained.require_certified(("fixed",), damping=1e-3)
    try:
        trained.require_certified(("fixed",))
    except CertificateError as err:
        message = str(err)
    else:
        raise AssertionError("a minibatch stage passed an undamped solve")
    assert "\n" not in message and "minibatch" in message and "3.0e-02" in message and "--damping" in message


def test_a_hessian_free_polish_leaves_the_one_dense_hessian_to_the_certificate(monkeypatch):
    """dense_polish_max_params = 0 (quick fashion): Newton-CG polishes, no dense polish runs, and the stage is
    still certified by a dense eigvalsh; a stage L-BFGS already brought to the target skips the polish."""
    from precompute import training
    from precompute.config import TrainConfig
    from precompute.fd_check import build_check_task

    calls = {"dense": 0, "cg": 0}
    real_dense, real_cg = training.newton_polish, training.newton_cg_polish
    monkeypatch.setattr(training, "newton_polish",
                        lambda *a, **k: (calls.__setitem__("dense", calls["dense"] + 1), real_dense(*a, **k))[1])
    monkeypatch.setattr(training, "newton_cg_polish",
                        lambda *a, **k: (calls.__setitem__("cg", calls["cg"] + 1), real_cg(*a, **k))[1])
    task = build_check_task(seed=1)
    result = training.pretrain(task, TrainConfig(dense_polish_max_params=0), desc=None)
    assert result.certified and result.certificate.method == "dense" and result.grad_norm <= 1e-9
    assert calls["dense"] == 0 and calls["cg"] >= 1

    calls.update(dense=0, cg=0)
    quadratic = lambda x: 0.5 * (torch.arange(1.0, 6.0, dtype=x.dtype) * x * x).sum()   # noqa: E731
    done = training.minimize(quadratic, torch.ones(5, dtype=torch.float64), TrainConfig(lbfgs_tol=1e-8, grad_tol=1e-8))
    assert done.certified and done.grad_norm <= 1e-8 and calls == {"dense": 0, "cg": 0}


def test_lbfgs_stops_where_rounding_stops_its_progress():
    """Asked for a gradient below what rounding allows (a least-squares fit whose floor is ~1e-9), L-BFGS
    stops when a step no longer moves x instead of counting the whole budget of unmoving iterations."""
    from precompute.config import TrainConfig
    from precompute.training import _lbfgs

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(8, 5, dtype=torch.float64, generator=gen)
    b = torch.randn(8, dtype=torch.float64, generator=gen)
    objective = lambda x: 0.5 * ((a @ x - b) ** 2).sum()                                 # noqa: E731
    x, used = _lbfgs(objective, torch.zeros(5, dtype=torch.float64), TrainConfig(lbfgs_tol=1e-30), 3000, None)
    best = torch.linalg.lstsq(a, b).solution
    assert used < 100                         # 5 parameters: a handful of steps, then no step moves x
    torch.testing.assert_close(x, best, rtol=0, atol=1e-8)
    assert float(objective(x)) <= float(objective(best)) + 1e-12


def test_a_flat_minimum_is_polished_with_the_certificates_factorisation(monkeypatch):
    """Curvature from 1e-6 to 1 (a flat minimum, like quick fashion's seed 3): Hessian-free Newton-CG stalls
    above the target, and the certificate's dense Hessian, positive definite but at a point with ‖∇‖ too large,
    then preconditions Newton on exact products. Two dense Hessians certify the stage; spending one per round
    (the old way) ran out of rounds at ‖∇‖ 1.6e-7 after six."""
    from precompute import certificate, training
    from precompute.config import TrainConfig

    gen = torch.Generator().manual_seed(0)
    dim = 300
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64, generator=gen))
    curvature = torch.logspace(-6, 0, dim, dtype=torch.float64)
    target = torch.randn(dim, dtype=torch.float64, generator=gen)

    def objective(x):                       # not quadratic, so Newton has work to do at every step
        y = basis.T @ (x - target)
        return 0.5 * (curvature * y * y).sum() + 2.5e-4 * (y ** 4).sum()

    builds = []
    real = training.dense_hessian
    counting = lambda *a, **k: (builds.append(1), real(*a, **k))[1]                     # noqa: E731
    monkeypatch.setattr(training, "dense_hessian", counting)
    monkeypatch.setattr(certificate, "dense_hessian", counting)
    result = training.minimize(objective, torch.zeros(dim, dtype=torch.float64),
                               TrainConfig(dense_polish_max_params=0, grad_tol=1e-10))
    assert result.certified and result.grad_norm <= 1e-10
    assert abs(result.eig_min - 1e-6) < 1e-9                  # at the minimum y = 0: the smallest curvature
    torch.testing.assert_close(result.params, target, rtol=0, atol=1e-3)
    assert len(builds) == 2
