from __future__ import annotations

import pytest
import torch

from .inputs import all_models


@pytest.fixture(scope="session")
def models() -> dict[str, torch.nn.Module]:
    return all_models()
