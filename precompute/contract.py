"""What a run directory promises its readers: the score's meaning and the tables' columns.

Plain constants, no imports: the math layer (which states the score it computes), the run store
(which validates runs against them) and the explorer (which reads them) all use this module
without pulling in each other, torch or pandas. docs/design.md §5 describes the whole contract;
``precompute.runstore`` enforces it.
"""

from __future__ import annotations

SCORE_DEFINITION = (
    "score(z, x_t) = predicted change of the test loss of x_t if pretraining example z is removed "
    "(and both stages retrained). score > 0: z is HELPFUL (removing it raises the loss); "
    "score < 0: HARMFUL."
)
