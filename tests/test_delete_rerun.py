"""A user's check of the scores: delete one pretraining example, rerun from scratch, compare the test
loss change with the score (benchmarks/bench_delete_rerun.py), on the full digits preset."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_delete_rerun import delete_and_rerun, parse  # noqa: E402


@pytest.mark.slow
def test_deleting_a_pretraining_example_and_rerunning_matches_the_scores():
    """2 helpful, 2 harmful (per scenario) and 2 random deletions, 2 test points, both stages trained
    from scratch each time (denominator m − 1).

    fixed: Pearson ≥ 0.95 and Spearman ≥ 0.8 (0.999 / 0.997 measured on 1 and 2 threads alike: its
    stages pass no saddle). updated: its finetune from scratch passes 2-8 saddles, and which minimum
    each escape leads to depends on rounding, so the same 8 deletions measured Pearson 0.97 / Spearman
    0.94 on 2 threads, 0.95 / 0.79 on one, and Pearson 0.91 on an AMD EPYC: a rerun from scratch can
    land in another minimum, which no local score predicts (the warm-started check follows the trained
    one and is what the pipeline reports). Its bar is Pearson ≥ 0.8, below that spread with margin.
    """
    out = delete_and_rerun(parse(["--per-class", "0", "--k", "2", "--tests", "0,1"]))
    assert out["m"] == 901 and out["deletions"] >= 6
    assert out["fixed"]["pearson"] >= 0.95 and out["fixed"]["spearman"] >= 0.8, out["fixed"]
    assert out["updated"]["pearson"] >= 0.8, out["updated"]
