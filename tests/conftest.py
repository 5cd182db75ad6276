import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded_and_single_threaded_enough():
    torch.manual_seed(0)
    yield
