"""Shared inputs of the benchmark suites: seeded models and the pruning call each backend is timed with."""

from __future__ import annotations

import torch
import torchvision

from backends import get_backend
from backends.nni_backend import TRAINS_WHILE_PRUNING
from backends.tp_backend import METHODS as TP_METHODS
from models import build_model

X = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
# L1 filter norms (Torch-Pruning's over the whole dependency group)
L1 = {"scratch": "conv_all", "nni": "l1", "tp": "l1"}


def seeded_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "torchvision_resnet18":
        return torchvision.models.resnet18(num_classes=10).eval()
    return build_model(name, (3, 32, 32), 10).eval()


def train_batches():
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        yield torch.randn(16, 3, 32, 32, generator=generator), torch.randint(0, 10, (16,), generator=generator)


def prune(
    backend: str, model: torch.nn.Module, method: str, percent: float = 0.5, scope: str | None = "layer"
) -> torch.nn.Module:
    data_driven = (
        backend == "nni" and method in TRAINS_WHILE_PRUNING or backend == "tp" and TP_METHODS[method].data_driven
    )
    options = {"train_batches": train_batches, "training_steps": 4} if data_driven else {}
    return get_backend(backend).prune(model, method, percent, X, scope=scope, **options).model.eval()


def all_models() -> dict[str, torch.nn.Module]:
    return {name: seeded_model(name) for name in ("lenet", "vgg", "resnet", "torchvision_resnet18")}
