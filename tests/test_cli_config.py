"""The command line reads its defaults and help from ``precompute.config`` (one place for knobs).

Every flag that sets a config field shows that field's default in its help, parsing no flags gives
exactly the dataclasses' defaults (plus the preset's model), quick mode is one transform that
explicit flags still override, and the L2 default is one constant.
"""

from __future__ import annotations

import argparse

import pytest

from precompute.cli import DEMO_FALLBACK, DEMO_LEAD, _default_text, demo_runs, _get, _paths, build_parser, config_from_args
from precompute.config import DEFAULT_L2, DataConfig, ModelConfig, RunConfig, SolverConfig, TrainConfig
from precompute.presets import PRESET_MODELS, quick_config
from precompute.task import TwoStageTask


def config_actions() -> list[argparse.Action]:
    return [a for a in build_parser()._actions if a.option_strings and a.dest not in ("help", "preset", "out", "threads")]


def test_every_flag_shows_its_fields_default():
    defaults = RunConfig(out="")
    actions = config_actions()
    assert len(actions) >= 30
    for action in actions:
        default = _get(defaults, _paths(action.dest)[0])
        assert action.default is None, action.dest          # unset flags leave the dataclass default alone
        if isinstance(default, bool):
            continue
        assert f"(default {_default_text(default)}" in action.help.replace("%%", "%"), (action.dest, action.help)


def test_no_flags_give_the_dataclass_defaults():
    for preset in ("digits", "news"):
        config = config_from_args(build_parser().parse_args([]), preset, "runs/x")
        assert config == RunConfig(out="runs/x", data=DataConfig(preset=preset), model=PRESET_MODELS[preset])


def test_quick_is_one_transform_and_explicit_flags_win():
    args = build_parser().parse_args(["--quick", "--val-points", "5", "--damping", "1e-3", "--seed", "4"])
    config = config_from_args(args, "digits", "runs/x")
    base = quick_config(RunConfig(out="runs/x", data=DataConfig(preset="digits"), model=PRESET_MODELS["digits"]))
    assert config.quick and config.n_test_points == base.n_test_points == 6
    assert config.validation.n_test_points == 5 and config.validation.k == base.validation.k == 3
    assert config.influence.pretrain_solver == config.influence.finetune_solver == SolverConfig(damping=1e-3)
    assert config.data.seed == config.validation.seed == config.cleaning.seed == 4
    assert (config.data.max_pretrain, config.data.max_finetune) == (60, 40)


def test_demo_overrides_name_real_flags():
    dests = {a.dest for a in config_actions()}
    for _, preset, extra in (DEMO_LEAD, DEMO_FALLBACK) + demo_runs()[1:]:
        assert set(extra) <= dests
        config = config_from_args(argparse.Namespace(**{**vars(build_parser().parse_args([])), **extra}), preset, "r")
        assert config.quick == bool(extra.get("quick"))


@pytest.mark.parametrize("flag, path", [("--no-validate", "validate"), ("--rank-zero-solve", "influence.distributed_solve")])
def test_negated_flags(flag, path):
    assert _get(config_from_args(build_parser().parse_args([flag]), "digits", "r"), path) is False
    assert _get(config_from_args(build_parser().parse_args([]), "digits", "r"), path) is True


def test_one_l2_default():
    assert ModelConfig().pretrain_l2 == ModelConfig().finetune_l2 == DEFAULT_L2
    fields = TwoStageTask.__dataclass_fields__
    assert fields["pretrain_l2"].default == fields["finetune_l2"].default == DEFAULT_L2
    assert all(m.pretrain_l2 == m.finetune_l2 == DEFAULT_L2 for m in PRESET_MODELS.values())


def test_demo_out_is_the_runs_root_not_a_run():
    """`--preset demo --out ROOT` writes ROOT/<name> for every demo run (a bug once sent them all to ROOT)."""
    args = build_parser().parse_args(["--preset", "demo", "--out", "somewhere"])
    for name, preset, _ in demo_runs():
        assert config_from_args(args, preset, f"somewhere/{name}").out == f"somewhere/{name}"


def test_demo_leads_with_fashion_only_where_its_files_are(tmp_path):
    """The lead run follows the data: Debian's files or --data-dir, else digits (the one-line note)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    assert demo_runs(str(empty))[0] == DEMO_FALLBACK
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (tmp_path / name).write_bytes(b"")
    assert demo_runs(str(tmp_path))[0] == DEMO_LEAD
    assert [name for name, _, _ in demo_runs(str(empty))[1:]] == [name for name, _, _ in demo_runs(str(tmp_path))[1:]]
    lead = config_from_args(argparse.Namespace(**{**vars(build_parser().parse_args([])), **DEMO_LEAD[2]}), "fashion", "r")
    assert lead.quick and lead.data.preset == "fashion"


def test_demo_without_fashion_says_so_in_one_line(tmp_path, capsys):
    """Runs already present are kept, so this exercises only the demo's choice of runs and its note."""
    from precompute.cli import main

    empty = tmp_path / "no-fashion"
    empty.mkdir()
    for name, _, _ in demo_runs(str(empty)):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "manifest.json").write_text("{}")
    assert main(["--preset", "demo", "--data-dir", str(empty), "--out", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if line.startswith("note: Fashion-MNIST")]
    assert len(notes) == 1 and "apt-get install -y dataset-fashion-mnist" in notes[0] and "--data-dir" in notes[0]
    assert out.count("exists: kept") == 3 and "/digits exists" in out


def test_threads_default_per_preset_and_explicit_flag_wins(monkeypatch):
    """The fashion CNN gets 2 threads (its Hessian blocks run 1.75x faster), the MLPs 1, never more than
    the machine has; --threads overrides it."""
    import os

    from precompute.presets import preset_threads

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert preset_threads("fashion") == 2 and preset_threads("digits") == preset_threads("news") == 1
    assert preset_threads("fashion", ranks=2) == 1                 # torchrun: the cores are shared
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert preset_threads("fashion") == 1
    assert build_parser().parse_args([]).threads is None
    assert build_parser().parse_args(["--threads", "3"]).threads == 3


def test_full_fashion_is_the_dense_cnn_at_5000_with_a_subsample_polish_and_flags_win():
    from precompute.models import fashion_cnn_params
    from precompute.presets import FULL_CAPS, full_config

    config = config_from_args(build_parser().parse_args([]), "fashion", "runs/x")
    assert fashion_cnn_params(config.model.hidden, config.model.channels) == 1989     # within the exact solver
    assert FULL_CAPS["fashion"][0] * 5 == 5000 and config.train.newton_subsample == 1000
    assert not config.validation.per_model_hessians and config.validation.group_percents == (1.0,)
    assert config == full_config(config)                       # one transform, applied once
    flags = ["--val-points", "8", "--k", "8", "--group-percents", "1,2,5"]
    mine = config_from_args(build_parser().parse_args(flags), "fashion", "runs/x")
    assert (mine.validation.n_test_points, mine.validation.k, mine.validation.group_percents) == (8, 8, (1.0, 2.0, 5.0))
    # quick and the other presets are untouched by it
    assert config_from_args(build_parser().parse_args(["--quick"]), "fashion", "r").train.newton_subsample == 0
    assert full_config(RunConfig(out="r")) == RunConfig(out="r")


def test_quick_fashion_has_its_l2_hessian_free_polish_and_no_groups_and_flags_win():
    quick = config_from_args(build_parser().parse_args(["--quick"]), "fashion", "r")
    assert quick.model.pretrain_l2 == 5e-2 and quick.model.finetune_l2 == 1e-2
    assert quick.train.dense_polish_max_params == 0 and quick.train.newton_max_params >= 1989   # dense certificate
    assert quick.validation.group_percents == ()
    full = config_from_args(build_parser().parse_args([]), "fashion", "r")
    assert full.model.pretrain_l2 == 1e-2 and full.train.dense_polish_max_params >= 1989
    digits = config_from_args(build_parser().parse_args(["--quick"]), "digits", "r")
    assert digits.model.pretrain_l2 == 1e-2 and digits.validation.group_percents == (5.0, 10.0)
    mine = config_from_args(build_parser().parse_args(["--quick", "--pretrain-l2", "0.01", "--group-percents", "5"]),
                            "fashion", "r")
    assert mine.model.pretrain_l2 == 0.01 and mine.validation.group_percents == (5.0,)


def test_label_noise_raises_the_digits_pretraining_l2_and_flags_win():
    """Flipped labels make the digits minimum shallow: such a run (the demo's digits-noisy, the explorer's suggested
    command) pretrains with NOISY_PRETRAIN_L2, full and quick; --pretrain-l2 wins; other presets and clean runs keep
    1e-2; the finetuning L2 never changes."""
    from precompute.cli import DEMO_REST
    from precompute.presets import NOISY_PRETRAIN_L2

    def l2s(argv, preset="digits"):
        config = config_from_args(build_parser().parse_args(argv), preset, "r")
        return config.model.pretrain_l2, config.model.finetune_l2

    noisy = NOISY_PRETRAIN_L2["digits"]
    assert noisy > DEFAULT_L2
    assert l2s(["--label-noise", "0.1"]) == l2s(["--quick", "--label-noise", "0.1"]) == (noisy, DEFAULT_L2)
    assert l2s(["--label-noise", "0.1", "--pretrain-l2", "0.01"]) == (0.01, DEFAULT_L2)
    assert l2s([]) == l2s(["--label-noise", "0"]) == (DEFAULT_L2, DEFAULT_L2)
    assert l2s(["--label-noise", "0.1"], "news") == (DEFAULT_L2, DEFAULT_L2)
    name, preset, extra = next(job for job in DEMO_REST if job[0] == "digits-noisy")
    demo = config_from_args(argparse.Namespace(**{**vars(build_parser().parse_args([])), **extra}), preset, "r")
    assert demo.data.label_noise > 0 and demo.model.pretrain_l2 == noisy


def test_fashion_all_is_every_garment_in_float32_by_minibatches_scored_by_ekfac_checked_by_pcg():
    from precompute.models import fashion_cnn_params
    from precompute.presets import FULL_CAPS, QUICK_CAPS

    config = config_from_args(build_parser().parse_args(["--preset", "fashion-all"]), "fashion-all", "runs/x")
    assert fashion_cnn_params(config.model.hidden, config.model.channels) >= 50_000
    assert FULL_CAPS["fashion-all"][0] == 0 and QUICK_CAPS["fashion-all"][0] * 5 == 2000   # 0: every garment
    assert config.dtype == "float32" and config.train.grad_tol == 1e-4 and config.train.minibatch_epochs > 0
    solver = config.influence.pretrain_solver
    assert (solver.name, solver.curvature) == ("ekfac", "ggn") and solver.damping > 0
    assert config.influence.finetune_solver.damping == solver.damping and config.influence.finetune_solver.curvature == "ggn"
    assert config.influence.agreement_solver == "pcg" and config.influence.agreement_points >= 1
    assert not config.validate and config.n_test_points >= 16
    quick = config_from_args(build_parser().parse_args(["--preset", "fashion-all", "--quick"]), "fashion-all", "r")
    assert quick.quick and quick.influence.agreement_solver == "pcg" and quick.train.minibatch_epochs > 0
    flags = ["--preset", "fashion-all", "--dtype", "float64", "--minibatch-epochs", "3", "--agreement-points", "2",
             "--damping", "0.01", "--agreement-solver", ""]
    mine = config_from_args(build_parser().parse_args(flags), "fashion-all", "r")
    assert mine.dtype == "float64" and mine.train.minibatch_epochs == 3 and mine.influence.agreement_points == 2
    assert mine.influence.pretrain_solver.damping == 0.01 and mine.influence.agreement_solver == ""
    assert mine.train.grad_tol == TrainConfig().grad_tol          # float64 keeps the float64 tolerances


def test_fashion_all_cleans_with_one_removal_size_full_and_quick():
    """Each clean-and-retrain row of fashion-all trains the chain again, so it keeps one size (2%)."""
    from precompute.presets import FASHION_ALL_CLEAN_PERCENTS

    for quick in ([], ["--quick"]):
        config = config_from_args(build_parser().parse_args(["--preset", "fashion-all", "--label-noise", "0.05",
                                                             *quick]), "fashion-all", "r")
        assert config.cleaning.percents == FASHION_ALL_CLEAN_PERCENTS == (2.0,)
    digits = config_from_args(build_parser().parse_args(["--preset", "digits", "--quick"]), "digits", "r")
    assert digits.cleaning.percents == (5.0, 10.0)
