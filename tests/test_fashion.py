"""The fashion preset: Fashion-MNIST loading and its errors, the CNN embedding, retraining at CNN size
(the low-rank preconditioner path) against a brute-force reference, and a quick pipeline run."""

from __future__ import annotations

from dataclasses import replace

import gzip
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from precompute import retraining
from precompute.cli import main
from precompute.config import ValidationConfig
from precompute.data import DataError, select_classes, subsample_per_class
from precompute.data.fashion import FASHION_DIR, FASHION_INSTALL, fashion_available, load_fashion_mnist
from precompute.fd_check import TIGHT
from precompute.models import distinct_units, fashion_cnn
from precompute.retraining import retrain
from precompute.task import TwoStageTask
from precompute.training import finetune_fixed, finetune_updated, pretrain, train_stages

needs_fashion = pytest.mark.skipif(not fashion_available(), reason=f"Fashion-MNIST not installed ({FASHION_INSTALL})")


# ---- data ----------------------------------------------------------------------------------------

def test_missing_data_names_the_apt_line_and_data_dir(tmp_path, capsys):
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist.*--data-dir"):
        load_fashion_mnist(tmp_path)
    code = main(["--preset", "fashion", "--quick", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert FASHION_INSTALL in err and "--data-dir" in err and not (tmp_path / "run").exists()


@needs_fashion
def test_data_dir_with_extracted_idx_files(tmp_path):
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        with gzip.open(FASHION_DIR / f"{name}.gz") as src, open(tmp_path / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    ex = load_fashion_mnist(tmp_path)
    assert ex.images.shape == (60000, 28, 28) and ex.images.dtype == np.uint8
    assert ex.class_names[0] == "T-shirt/top" and ex.class_names[9] == "Ankle boot"
    assert ex.sources[5] == "fashion-train#5"


def test_corrupt_labels_file_is_one_line(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 12)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"garbage")
    with pytest.raises(DataError, match="bad magic number") as err:
        load_fashion_mnist(tmp_path)
    assert "\n" not in str(err.value)


# ---- model ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("hidden,channels", [(32, (8, 16)), (8, (4, 8)), (3, (2, 5))])
def test_cnn_parameter_formula_matches_the_module(hidden, channels):
    from precompute.models import fashion_cnn_params

    built = sum(p.numel() for p in fashion_cnn(hidden, channels).parameters()) + (hidden + 1) * 5
    assert fashion_cnn_params(hidden, channels) == built


def test_oversized_cnn_is_refused_before_any_data_is_read(tmp_path, capsys):
    """--channels sets the CNN's size: the parameter guard sees it (one line, nothing written)."""
    code = main(["--preset", "fashion", "--channels", "1000,1000", "--data-dir", str(tmp_path),
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and not (tmp_path / "run").exists()
    assert "25,155,053 parameters" in err and "--channels" in err and "--max-params" in err


def test_cnn_size_and_distinct_units():
    emb = fashion_cnn()
    n_theta = sum(p.numel() for p in emb.parameters())
    assert sum(isinstance(m, nn.Conv2d) for m in emb) == 2
    assert n_theta + 32 * 5 + 5 == 11813 and emb(torch.zeros(3, 1, 28, 28)).shape == (3, 32)
    f = torch.randn(200, 4, dtype=torch.float64)
    feats = torch.cat([f, -f[:, :1], torch.zeros(200, 1)], 1)      # a sign copy and a dead unit
    assert distinct_units(feats) == {"units": 6, "distinct": 4, "dead": 1, "duplicates": 1}


# ---- retraining at CNN size ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_cnn():
    """A tiny CNN on real garments (float64), trained to a tight minimum (Newton polish)."""
    if not fashion_available():
        pytest.skip(f"Fashion-MNIST not installed ({FASHION_INSTALL})")
    ex = load_fashion_mnist()
    pre = subsample_per_class(select_classes(ex, ["T-shirt/top", "Trouser", "Bag"], where="t"), 16, 0)
    fine = subsample_per_class(select_classes(ex, ["Sandal", "Sneaker"], where="t"), 12, 0)
    x = lambda e: torch.from_numpy(e.images[:, None].astype(np.float64) / 255)
    y = lambda e: torch.from_numpy(e.labels)
    torch.manual_seed(0)
    task = TwoStageTask(fashion_cnn(hidden=6, channels=(2, 3)), nn.Linear(6, 3), nn.Linear(6, 2),
                        x(pre), y(pre), x(fine)[::2], y(fine)[::2], x(fine)[1::2], y(fine)[1::2],
                        pretrain_l2=1e-2, finetune_l2=1e-2).to("cpu", torch.float64)
    trained = train_stages(task, replace(TIGHT, alpha=0.5), progress=False)
    assert trained.pretrain.converged
    return task, trained


def test_low_rank_retraining_matches_brute_force(tiny_cnn, monkeypatch):
    """With the dense limit below P the retraining uses the shared low-rank (Lanczos) preconditioner
    for every stage and step; it must land where a tight per-removal L-BFGS + Newton solve lands."""
    task, trained = tiny_cnn
    monkeypatch.setattr(retraining, "MAX_DENSE_PARAMS", 20)       # P = 337, the fixed head has 14
    weights = torch.ones(3, task.m, dtype=task.dtype)
    weights[1, 5] = 0.0
    weights[2, [17, 30]] = 0.0
    out = retrain(task, trained, weights, ValidationConfig(retrain_tol=1e-9, retrain_max_iter=400), progress=False)
    assert out.refreshed == {"pretrain": 0, "fixed": 0, "updated": 0}
    assert out.converged["pretrain"].all() and out.chain_converged("updated").all()
    for b in range(3):
        p = pretrain(task, TIGHT, weights=weights[b], p0=trained.p, desc=None).params
        fixed = finetune_fixed(task, p, TIGHT, u0=trained.q("fixed")[task.n_theta:], desc=None).params
        updated = finetune_updated(task, p, trained.alpha, TIGHT, q0=trained.q("updated"), desc=None).params
        torch.testing.assert_close(out.p[b], p, rtol=0, atol=1e-7)
        torch.testing.assert_close(out.q["fixed"][b], fixed, rtol=0, atol=1e-7)
        torch.testing.assert_close(out.q["updated"][b], updated, rtol=0, atol=1e-7)


def test_lanczos_pcg_matches_exact(tiny_cnn):
    from precompute.config import SolverConfig
    from precompute.influence import pretrain_solver

    task, trained = tiny_cnn
    b = torch.randn(task.n_pretrain_params, 3, dtype=task.dtype, generator=torch.Generator().manual_seed(0))
    exact, _ = pretrain_solver(task, trained.p, SolverConfig("exact", damping=1e-3)).solve(b)
    x, diag = pretrain_solver(task, trained.p, SolverConfig("lanczos-pcg", damping=1e-3, tol=1e-10)).solve(b)
    assert diag.solver == "lanczos-pcg" and diag.relative_residual < 1e-9
    torch.testing.assert_close(x, exact, rtol=1e-7, atol=1e-7)


# ---- the pipeline, quick size --------------------------------------------------------------------

@needs_fashion
def test_label_noise_flips_garments():
    from precompute.config import DataConfig, RunConfig
    from precompute.presets import PRESET_MODELS, load_task_data, quick_config

    config = quick_config(RunConfig(out="", data=DataConfig(preset="fashion", label_noise=0.1)))
    data = load_task_data(config.data, PRESET_MODELS["fashion"])
    assert data.pretrain.images.shape == (300, 28, 28) and data.flipped.sum() == 30
    assert (data.pretrain.labels[data.flipped] != data.original_pretrain_labels[data.flipped]).all()
    assert data.pretrain.class_names == ("T-shirt/top", "Coat", "Shirt", "Sandal", "Ankle boot")
    assert data.finetune_train.class_names == ("Trouser", "Pullover", "Dress", "Sneaker", "Bag")


@pytest.mark.fashion
@pytest.mark.slow
@needs_fashion
def test_quick_fashion_run(tmp_path):
    """The preset end to end at quick size (its smaller CNN, P = 1,989: exact solver, dense
    retraining preconditioner), with a reduced retraining check (1 test point, 2 removals per kind,
    5% groups) so that it fits CI."""
    from precompute.runstore import open_run

    assert main(["--preset", "fashion", "--quick", "--val-points", "1", "--k", "2",
                 "--group-percents", "5", "--n-test", "2", "--retrain-iters", "60",
                 "--out", str(tmp_path / "f")]) == 0
    run = open_run(tmp_path, "f")
    m = run.manifest
    assert m["preset"] == "fashion" and m["image_shape"] == [28, 28] and m["n_pretrain_params"] == 1989
    # a collapsed embedding shows as 1-2 distinct units; at quick fashion's L2 of 5e-2 seeds 0-4 gave 3-6 of 8
    assert m["embedding_units"]["units"] == 8 and m["embedding_units"]["distinct"] >= 3
    pairs = run.pairs()
    for s in ("fixed", "updated"):
        rows = pairs[pairs.scenario == s]
        assert len(rows) == 6 and np.isfinite(rows.grad_norm).all() and np.isfinite(rows.actual).all()
        # every pair is either counted (converged retraining) or flagged, never silently dropped
        assert m["validation"][s]["n_pairs"] + m["validation"][s]["n_not_converged"] == 6
        assert m["diagnostics"][s]["pretrain_solve"]["solver"] == "exact"
        assert m["diagnostics"][s]["pretrain_solve"]["relative_residual"] < 1e-8


def test_garments_are_upscaled_large_enough():
    from explorer import render

    img = np.arange(28 * 28, dtype=np.uint16).reshape(28, 28).astype(np.uint8)
    big = render.upscale(img, 96)
    assert big.shape == (112, 112) and np.array_equal(big[::4, ::4], img)
    assert render.upscale(img, 48).shape == (56, 56)


def test_full_preset_on_a_cpu_says_what_it_costs_first():
    """The full preset takes most of an hour on a CPU: the run says so in one line before it starts, and names
    --quick and --device cuda; quick runs, GPU runs and other presets get no note."""
    from precompute.config import DataConfig, RunConfig
    from precompute.presets import cost_note, quick_config

    full = RunConfig(out="", data=DataConfig(preset="fashion"))
    note = cost_note(full, "cpu")
    assert note is not None and "\n" not in note and "--quick" in note and "--device cuda" in note
    assert cost_note(full, "cuda") is None
    assert cost_note(quick_config(full), "cpu") is None
    assert cost_note(RunConfig(out="", data=DataConfig(preset="digits")), "cpu") is None
    # fashion-all: ekfac is quick, its pcg check is not; the note names the flag that skips it
    from precompute.presets import full_config

    every = full_config(RunConfig(out="", data=DataConfig(preset="fashion-all")))
    note = cost_note(every, "cpu")
    assert note is not None and "\n" not in note and "--agreement-solver ''" in note and "pcg" in note
    assert cost_note(replace(every, influence=replace(every.influence, agreement_solver="")), "cpu") is None


@needs_fashion
@pytest.mark.slow
def test_fashion_all_quick_scores_every_garment_with_ekfac_and_records_its_agreement_with_pcg(tmp_path):
    """--preset fashion-all --quick through the CLI: 2,000 real garments, the 54,693-parameter CNN in
    float32, minibatch pretraining reported as a damped stationary point (never certified), both finetunes
    certified, every garment scored by ekfac, and pcg's agreement recorded per scenario; no retraining."""
    import json
    import math

    out = tmp_path / "fa"
    assert main(["--preset", "fashion-all", "--quick", "--agreement-points", "2", "--out", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["n_pretrain"] == 2000 and m["n_pretrain_params"] == 54_693 and m["dtype"] == "float32"
    assert m["validation"] == {} and m["config"]["influence"]["pretrain_solver"]["name"] == "ekfac"
    for s in ("fixed", "updated"):
        training = m["diagnostics"][s]["training"]
        pre, fine = training["pretrain"], training["finetune"]
        assert pre["method"] == "minibatch" and pre["certified"] is False and pre["eig_min"] is None
        assert 0 < pre["grad_norm"] < 1 and math.isfinite(pre["objective"])
        assert fine["certified"] is True and fine["eig_min"] > 0
        a = m["solver_agreement"][s]
        assert (a["solver"], a["reference"]) == ("ekfac", "pcg") and a["test_points"] == m["test_points"][:2]
        assert 0 < a["pearson"] <= 1 and 0 <= a["top_helpful_overlap"] <= 1 and 0 <= a["top_harmful_overlap"] <= 1
        assert a["reference_relative_residual"] <= m["config"]["influence"]["pretrain_solver"]["tol"]
        scores = np.load(out / "scores" / f"{s}.npy")
        assert scores.shape == (len(m["test_points"]), 2000) and np.isfinite(scores).all()
