"""Shared test set-up."""

import pytest
import torch

# pytest-xdist runs two workers on a 2-core machine; two OpenMP threads per worker then
# spin against each other and make every matmul ~10x slower (measured here). One each.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def trained_tiny():
    """The tiny preset after a short training run: (model, report).

    Session-scoped and shared by every test marked ``xdist_group("trained_tiny")``, so
    the ~1-2 minute training runs once per pytest worker that needs it.
    """
    from m3vit.sw.model.config import get_preset
    from m3vit.sw.model.train import TrainConfig, train

    short = TrainConfig(steps=250, batch_size=32, n_train=2000, n_test=300, seed=0)
    return train(get_preset("tiny"), short, progress=False)
