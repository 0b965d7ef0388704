"""Multi-stage influence functions: which pretraining examples helped or hurt a finetuned prediction.

``from precompute import MultiStageInfluence`` (see ``precompute.multistage``) is the entry point
for Python users; ``python -m precompute`` is the command line. The names are resolved on first
use, so ``import precompute.runstore`` (the explorer) does not load torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"MultiStageInfluence": "multistage", "TwoStageTask": "task", "TrainedStages": "training",
            "train_stages": "training", "InfluenceConfig": "config", "SolverConfig": "config",
            "TrainConfig": "config", "PrecomputeError": "errors"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
