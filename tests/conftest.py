"""Shared test setup."""

import torch

# The models here are tiny: one thread avoids intra-op spin-waiting, which on a busy 2-core
# machine made a forward+backward 60x slower.
torch.set_num_threads(1)
