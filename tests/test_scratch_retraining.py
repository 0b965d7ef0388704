"""Retraining a minibatch-pretrained chain by repeating its training (precompute/scratch_retraining.py), and
the mislabel checks built on it (``run_cleaning`` on such a chain), on real noisy digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from precompute.cleaning import CleaningConfig, finetune_test_metrics, retrained_from_scratch, run_cleaning
from precompute.config import InfluenceConfig, SolverConfig, TrainConfig
from precompute.errors import ConfigError
from precompute.scratch_retraining import out_of_fold_probabilities, pretrain_again, retrain_chain
from precompute.training import train_stages
from test_cleaning import noisy_digits_task

# Minibatch pretraining as fashion-all does it, sized for 150 digits: 8 steps of 32 per epoch.
MINIBATCH = TrainConfig(max_iter=300, alpha=1.0, minibatch_epochs=15, minibatch_size=32, minibatch_lr=3e-2)
DAMPED = SolverConfig("exact", damping=1e-3, curvature="ggn")      # as fashion-all: PSD at any point
CONFIG = InfluenceConfig(pretrain_solver=DAMPED, finetune_solver=DAMPED)


@pytest.fixture(scope="module")
def minibatch_chain():
    task, flipped, original = noisy_digits_task()
    trained = train_stages(task, MINIBATCH, progress=False)
    assert retrained_from_scratch(trained) and trained.pretrain.method == "minibatch"
    return task, trained, flipped, original


def test_repeating_the_training_with_nothing_removed_gives_the_trained_model(minibatch_chain):
    task, trained, _, _ = minibatch_chain
    assert torch.equal(pretrain_again(task, MINIBATCH, None), trained.p)
    ones = torch.ones(task.m, dtype=task.dtype)
    assert torch.equal(pretrain_again(task, MINIBATCH, ones), trained.p)      # weight 1 multiplies exactly
    chain = retrain_chain(task, MINIBATCH, trained, ones, ("fixed", "updated"))
    assert all(chain.certified.values())
    for s in ("fixed", "updated"):                  # the finetunes start at their minimum and stay there
        assert torch.allclose(chain.q[s], trained.q(s), rtol=0, atol=1e-6), s


def test_a_removed_example_has_no_say_in_the_retrained_model(minibatch_chain):
    """Weight 0 means removed: giving the removed examples other labels must not move the retrained model by
    one bit, while removing them moves it (so the comparison can fail)."""
    task, trained, _, _ = minibatch_chain
    removed = torch.tensor([3, 40, 77])
    weights = torch.ones(task.m, dtype=task.dtype)
    weights[removed] = 0.0
    p = pretrain_again(task, MINIBATCH, weights)
    assert (p - trained.p).norm() > 1e-3 * trained.p.norm()
    saved = task.pretrain_y.clone()
    try:
        task.pretrain_y[removed] = (task.pretrain_y[removed] + 1) % 3
        assert torch.equal(pretrain_again(task, MINIBATCH, weights), p)
        assert not torch.equal(pretrain_again(task, MINIBATCH, None), trained.p)   # labels do matter when kept
    finally:
        task.pretrain_y.copy_(saved)


def test_out_of_fold_probabilities_never_saw_their_labels(minibatch_chain):
    task, _, _, _ = minibatch_chain
    fold = np.arange(task.m) % 3
    probs = out_of_fold_probabilities(task, MINIBATCH, fold)
    assert probs.shape == (task.m, 3) and np.allclose(probs.sum(1), 1.0)
    saved = task.pretrain_y.clone()
    try:
        held = torch.as_tensor(np.flatnonzero(fold == 0))
        task.pretrain_y[held] = (task.pretrain_y[held] + 1) % 3      # every fold-0 label changed
        again = out_of_fold_probabilities(task, MINIBATCH, fold)
    finally:
        task.pretrain_y.copy_(saved)
    assert np.array_equal(again[fold == 0], probs[fold == 0])       # fold 0's model never fitted them
    assert not np.array_equal(again[fold == 1], probs[fold == 1])   # the other folds' models did


def test_the_mislabel_checks_on_a_minibatch_chain(minibatch_chain):
    task, trained, flipped, _ = minibatch_chain
    cleaning = CleaningConfig(folds=3, percents=(10.0,))
    with pytest.raises(ConfigError, match="TrainConfig") as caught:
        run_cleaning(task, trained, flipped, CONFIG, cleaning)
    assert "\n" not in str(caught.value)
    result = run_cleaning(task, trained, flipped, CONFIG, cleaning, train=MINIBATCH)
    assert "trained again" in result.protocol
    # The loss-type signals find flipped labels far above chance (20% flipped) on these digits.
    assert result.detection["pretrain_loss"]["auc"] > 0.8 and result.detection["cleanlab"]["auc"] > 0.8
    table = result.retrain
    assert set(table["scenario"]) == {"fixed", "updated"} and table["converged"].all()
    for s in ("fixed", "updated"):
        none = table[(table.signal == "none") & (table.scenario == s)].iloc[0]
        assert none.test_accuracy == pytest.approx(finetune_test_metrics(task, trained.q(s))[0], abs=1e-12)
        oracle = table[(table.signal == "oracle") & (table.scenario == s)].iloc[0]
        assert oracle.n_removed == int(flipped.sum())


def test_a_minibatch_run_with_label_noise_through_the_cli(tmp_path, capsys):
    """The pipeline end to end, as fashion-all runs it but on quick digits (seconds): minibatch pretraining, a
    damped Gauss-Newton solve, flipped labels; the run holds the mislabel checks made by repeating training."""
    import json

    import pandas as pd

    from precompute.cli import main
    from precompute.runstore import open_run

    out = tmp_path / "digits-minibatch"
    assert main(["--preset", "digits", "--quick", "--no-validate", "--minibatch-epochs", "20", "--minibatch-lr",
                 "1e-2", "--damping", "1e-3", "--curvature", "ggn", "--label-noise", "0.1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "flipped labels found in the top 2% / 5%" in printed and "cleaning 5%" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["diagnostics"]["fixed"]["training"]["pretrain"]["method"] == "minibatch"
    assert "trained again" in manifest["cleaning"]["protocol"]
    assert all("recall_top_2" in v for k, v in manifest["mislabel_detection"].items() if "auc" in v)
    retrain = pd.read_parquet(out / "cleaning" / "retrain.parquet")
    none = retrain[retrain.signal == "none"].set_index("scenario").test_accuracy
    assert none.to_dict() == pytest.approx(manifest["finetune_accuracy"], abs=1e-12)   # nothing removed: same model
    open_run(tmp_path, out.name)                                  # the explorer's reader accepts the run
