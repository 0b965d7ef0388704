"""``Manifest``: the typed form of a run's ``manifest.json`` (written by ``run_writer.RunWriter.commit``).

Every key a precompute run writes is a field here, with its meaning; ``run_schema`` checks the JSON
form (``REQUIRED_MANIFEST_KEYS``, ``MANIFEST_SCHEMA``) on both sides of the contract. The writer
adds ``format_version``, ``name``, ``created`` and ``score_definition`` itself. Torch-free.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Manifest:
    """What a run holds and how it was made; per-scenario dicts are keyed by "fixed"/"updated"."""

    preset: str                                   # digits, news, fashion, custom, ...
    modality: str                                 # "image" or "text"
    n_pretrain: int                               # m, pretraining examples scored
    n_finetune_test: int                          # finetune test examples
    test_points: list[int]                        # finetune test ids scored (rows of scores/<scenario>.npy)
    validation_test_points: list[int]             # the first of them, checked by retraining
    scenarios: list[str]
    pretrain_class_names: list[str]
    finetune_class_names: list[str]
    pretrain_accuracy: float | None               # on the pretraining set, after pretraining
    finetune_accuracy: dict[str, float | None]    # on the finetune test set, per scenario
    validation: dict[str, dict]                   # per scenario: Pearson, Spearman, slope vs retraining, ...
    baselines: dict[str, dict[str, dict]]         # per method and scenario: the same statistics
    group_removal: dict[str, dict]                # per scenario: group-removal summary
    validation_protocol: str                      # the retraining protocol, in words
    timings_s: dict[str, float]                   # wall seconds per step
    diagnostics: dict[str, dict]                  # per scenario: solver diagnostics, training certificates
    config: dict[str, Any]                        # the RunConfig, as a dict
    label_noise: dict | None = None               # {"rate", "seed", "n_flipped"} when labels were flipped
    mislabel_detection: dict | None = None        # per signal: recall curves (cleaning runs)
    image_shape: list[int] | None = None          # [H, W] or [H, W, 3] (image runs)
    lds: dict | None = None                       # linear datamodeling score (with --lds)
    cleaning: dict | None = None                  # clean-and-retrain summary (cleaning runs)
    device: str = "cpu"
    dtype: str = "float64"
    world_size: int = 1
    n_pretrain_params: int = 0                    # P = |θ| + |W|
    n_finetune_params: int = 0                    # Q = |θ| + |U|
    embedding_units: dict[str, Any] = field(default_factory=dict)    # how the explorer names embedding units
    solver_agreement: dict[str, dict] | None = None   # per scenario: the run's solver vs a reference (pcg)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


__all__ = ["Manifest"]
