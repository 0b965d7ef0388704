"""The README's Python API example runs as written, on real digits, and its scores mean what it says."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_python_block() -> str:
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "MultiStageInfluence" in b]
    return block


def digits_inputs() -> dict[str, torch.Tensor]:
    """xp, yp (digits 0-4), xf, yf and xt, yt (digits 5-9, relabelled 0-4): the names the example uses."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float64)
    y = torch.tensor(y)
    pre, fine = (y < 5).nonzero()[:, 0][:120], (y >= 5).nonzero()[:, 0]
    train, test = fine[:100], fine[100:140]
    return {"xp": x[pre], "yp": y[pre], "xf": x[train], "yf": y[train] - 5, "xt": x[test], "yt": y[test] - 5}


def test_the_readme_python_example_runs_and_scores_every_pretraining_example():
    namespace = digits_inputs()
    exec(compile(readme_python_block(), str(README), "exec"), namespace)       # noqa: S102 (our own README)
    scores, self_inf, trained = namespace["scores"], namespace["self_inf"], namespace["trained"]
    assert trained.alpha == 0.1 and trained.pretrain.certified
    assert set(scores) == {"fixed", "updated"}
    for matrix in scores.values():
        assert matrix.shape == (3, 120) and matrix.dtype == np.float32 and np.isfinite(matrix).all()
        assert np.abs(matrix).max() > 0
    assert namespace["more"]["fixed"].shape == (1, 120)
    assert self_inf.shape == (120,) and (self_inf >= 0).all()
