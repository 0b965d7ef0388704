"""What a run directory promises its readers: the score's meaning and the tables' columns.

Plain constants, no imports: the math layer (which states the score it computes), the run store
(which validates runs against them) and the explorer (which reads them) all use this module
without pulling in each other, torch or pandas. docs/design.md §5 describes the whole contract;
``precompute.run_schema`` enforces it.
"""

from __future__ import annotations

SCORE_DEFINITION = (
    "score(z, x_t) = predicted change of the test loss of x_t if pretraining example z is removed "
    "(and both stages retrained). score > 0: z is HELPFUL (removing it raises the loss); "
    "score < 0: HARMFUL."
)

# Columns every run's tables hold (``precompute.run_schema`` refuses a run that lacks one).
PRETRAIN_COLUMNS = ("id", "label", "label_name", "source", "pretrain_loss", "predicted_label")
TEST_COLUMNS = ("id", "label", "label_name", "source")      # + pred_<s>, loss_<s>, correct_<s> per scenario
NOISE_COLUMNS = ("original_label", "flipped")               # pretrain.parquet of runs with label noise
PAIRS_COLUMNS = ("scenario", "test_id", "pretrain_id", "kind", "predicted", "actual", "grad_norm", "converged")
PAIRS_CERTIFICATE_COLUMNS = ("eig_min", "reason")
"""pairs.parquet since the certificates: the retrained chain's smallest Hessian eigenvalue estimate (sign-faithful,
NaN where not checked) and why a pair does not count ("" when it does; runs written earlier lack both)."""
GROUP_COLUMNS = ("scenario", "test_id", "kind", "percent", "n_removed", "predicted", "actual", "accuracy_change",
                 "converged")
NON_SIGNAL_COLUMNS = ("id", "suggested_label", "flipped")  # cleaning/signals.parquet: every other float column is a signal
