"""Model builders for the presets beyond the one-layer MLP embedding of ``presets.build_task``.

``fashion_cnn``: the Fashion-MNIST embedding, two stride-2 5x5 convolutions without padding
(1→c1→c2 channels, 28→12→4 pixels), tanh after each, then Linear(c2·16, hidden) + tanh. With the
defaults (8, 16, 32) θ has 11,648 parameters and P = 11,813 with a 5-class head; quick mode's
(4, 8, 8) has P = 1,989. Stride instead of
pooling keeps a full-batch pass cheap (measured in docs/cli.md, Presets: float32 vs float64, m = 5,000).

``distinct_units``: how many embedding units carry distinct information (a collapsed embedding
has units that are constant or equal up to sign to another unit).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["distinct_units", "embedding_units", "fashion_cnn", "fashion_cnn_params"]


def fashion_cnn(hidden: int = 32, channels: tuple[int, int] = (8, 16), image_size: int = 28) -> nn.Sequential:
    """[N, 1, 28, 28] -> [N, hidden] tanh features."""
    c1, c2 = channels
    side = ((image_size - 5) // 2 + 1 - 5) // 2 + 1
    return nn.Sequential(nn.Conv2d(1, c1, 5, stride=2), nn.Tanh(), nn.Conv2d(c1, c2, 5, stride=2), nn.Tanh(),
                         nn.Flatten(), nn.Linear(c2 * side * side, hidden), nn.Tanh())


def fashion_cnn_params(hidden: int, channels: tuple[int, int], classes: int = 5, image_size: int = 28) -> int:
    """Parameters of ``fashion_cnn`` plus a ``classes``-way linear head, without building it (the
    resource guard checks it before any memory is spent)."""
    c1, c2 = channels
    side = ((image_size - 5) // 2 + 1 - 5) // 2 + 1
    return 26 * c1 + (25 * c1 + 1) * c2 + (c2 * side * side + 1) * hidden + (hidden + 1) * classes


def distinct_units(features: Tensor | np.ndarray, corr: float = 0.99, min_std: float = 1e-3) -> dict:
    """Units of a feature matrix [N, H] that are neither dead (std < min_std) nor a copy of an earlier
    unit up to sign (|Pearson| > corr). Returns {"units", "distinct", "dead", "duplicates"}."""
    f = torch.as_tensor(features).detach().to(torch.float64).reshape(len(features), -1)
    std = f.std(0)
    alive = (std >= min_std).nonzero()[:, 0].tolist()
    z = (f[:, alive] - f[:, alive].mean(0)) / std[alive]
    c = (z.T @ z / max(1, len(f) - 1)).abs()
    kept: list[int] = []
    for j in range(len(alive)):
        if all(float(c[j, k]) <= corr for k in kept):
            kept.append(j)
    return {"units": int(f.shape[1]), "distinct": len(kept), "dead": int(f.shape[1] - len(alive)),
            "duplicates": len(alive) - len(kept)}


def embedding_units(task, trained, chunk: int = 1024) -> dict:
    """``distinct_units`` of the pretrained embedding on the pretraining set, plus the distinct count of
    each finetuned scenario's embedding ("distinct_<scenario>"), for the manifest."""
    def feats(theta: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.cat([task.features(theta, task.pretrain_x[i: i + chunk]).flatten(1)
                              for i in range(0, task.m, chunk)])
    out = distinct_units(feats(task.theta_of(trained.p).detach()))
    for s in trained.finetune:
        out[f"distinct_{s}"] = distinct_units(feats(task.theta_of(trained.q(s)).detach()))["distinct"]
    return out
