"""NNI-shaped masks ({layer: {"weight": mask, "bias": mask}}) and the masked model NNI evaluates."""

from __future__ import annotations

import torch
from torch import nn

from .graph import ChannelGraph
from .modules import clone_tree

Masks = dict[str, dict[str, torch.Tensor]]


def build_masks(model: nn.Module, graph: ChannelGraph, kept: dict[int, torch.Tensor]) -> Masks:
    """Masks over the output units of every pruned producer: 1 = kept, 0 = pruned."""
    modules = dict(model.named_modules())
    masks: Masks = {}
    for producer, group in graph.group_of_producer.items():
        if group not in kept:
            continue
        module = modules[producer]
        unit = torch.zeros(module.weight.shape[0])
        unit[kept[group]] = 1.0
        shape = (-1,) + (1,) * (module.weight.ndim - 1)
        masks[producer] = {"weight": unit.view(shape).expand_as(module.weight)}  # a broadcast view: no weight-sized copy
        if module.bias is not None:
            masks[producer]["bias"] = unit.clone()
    return masks


def apply_masks(model: nn.Module, masks: Masks) -> nn.Module:
    """A copy of `model` with weights x mask; BatchNorm is left as it is (what NNI measures)."""
    masked = clone_tree(model, {})
    modules = dict(masked.named_modules())
    with torch.no_grad():
        for name, layer_masks in masks.items():
            for key, mask in layer_masks.items():
                getattr(modules[name], key).mul_(mask)
    return masked
