"""Scratch vs Torch-Pruning 1.6.1 on torchvision models nobody here wrote: does it prune as far, and exactly (#11).

Both prune every Conv2d / hidden Linear at layer ratio 0.5 by filter L1 norm (Torch-Pruning's MagnitudePruner with
MagnitudeImportance(p=1); scratch `conv_all`), the classifier left whole. Where Torch-Pruning succeeds the two keep the
same number of parameters; the scratch model must also compute what the channel-zeroed original computes (with LayerNorms
normalising over the kept channels, as their pruned copies do).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn

from backends import get_backend
from tests.helpers import consumer_zeroed_reference, randomize_norms, relative_error

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def torchvision_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    extra = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    return randomize_norms(getattr(torchvision.models, name)(num_classes=10, **extra)).eval()


def torch_pruning_params(model: nn.Module) -> int:
    tp = pytest.importorskip("torch_pruning")

    model = copy.deepcopy(model)
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tp.pruner.MagnitudePruner(model, X[:1], importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5, ignored_layers=[classifier],
                                  global_pruning=False).step()  # fmt: skip
    with torch.no_grad():
        model(X)  # a pruned model that no longer runs is a failure, not a parameter count
    return sum(p.numel() for p in model.parameters())


def scratch(model: nn.Module) -> tuple[nn.Module, dict[str, list[int]]]:
    result = get_backend("scratch").prune(model, "conv_all", 0.5, X, scope="layer")
    return result.model, result.kept


PARITY = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf", "googlenet", "mnasnet0_5", "densenet121",
          "resnext50_32x4d", "convnext_tiny"]  # fmt: skip


@pytest.mark.parametrize("name", PARITY)
def test_scratch_keeps_as_many_parameters_as_torch_pruning_and_is_exact(name):
    model = torchvision_model(name)
    pruned, kept = scratch(model)
    assert sum(p.numel() for p in pruned.parameters()) == torch_pruning_params(model)
    with torch.no_grad():
        assert relative_error(pruned(X), consumer_zeroed_reference(model, kept, X)) < 1e-5


def test_shufflenet_prunes_where_torch_pruning_fails():
    model = torchvision_model("shufflenet_v2_x1_0")
    with pytest.raises(ZeroDivisionError):  # Torch-Pruning 1.6.1's reshape index mapping (DESIGN.md section 6)
        torch_pruning_params(model)
    pruned, kept = scratch(model)
    assert sum(p.numel() for p in pruned.parameters()) < 0.6 * sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert relative_error(pruned(X), consumer_zeroed_reference(model, kept, X)) < 1e-5


def test_vit_prunes_its_mlp_hidden_units_where_torch_pruning_breaks_the_model():
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(image_size=64, num_classes=10).eval()  # 16 patches of 16x16: the real architecture, small input
    pruned, kept = scratch(model)
    assert sorted(kept) == sorted(f"encoder.layers.encoder_layer_{i}.mlp.0" for i in range(12)) and all(len(k) == 1536 for k in kept.values())
    with torch.no_grad():
        assert relative_error(pruned(X), consumer_zeroed_reference(model, kept, X)) < 1e-5
    with pytest.raises(RuntimeError, match="invalid for input"):  # Torch-Pruning 1.6.1 halves hidden_dim, but forward reshapes to self.hidden_dim
        torch_pruning_params(model)
