"""Shared test set-up."""

import torch

# pytest-xdist runs two workers on a 2-core machine; two OpenMP threads per worker then
# spin against each other and make every matmul ~10x slower (measured here). One each.
torch.set_num_threads(1)
