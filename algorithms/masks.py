"""NNI-shaped masks ({layer: {"weight": mask, "bias": mask}}) and the masked model NNI evaluates."""

from __future__ import annotations

import torch
from torch import nn

from .graph import ChannelGraph
from .modules import clone_tree
from .surgery import output_index

Masks = dict[str, dict[str, torch.Tensor]]


def unit_masks(module: nn.Module, kept: torch.Tensor | list[int]) -> dict[str, torch.Tensor]:
    """One layer's masks over its output units: 1 = kept, 0 = pruned."""
    unit = torch.zeros(module.weight.shape[0])
    unit[kept] = 1.0
    shape = (-1,) + (1,) * (module.weight.ndim - 1)
    masks = {"weight": unit.view(shape).expand_as(module.weight)}  # a broadcast view: no weight-sized copy
    if module.bias is not None:
        masks["bias"] = unit.clone()
    return masks


def build_masks(model: nn.Module, graph: ChannelGraph, kept: dict[int, torch.Tensor]) -> Masks:
    """Masks over the output units of every pruned producer."""
    modules = dict(model.named_modules())
    return {
        producer: unit_masks(modules[producer], output_index(graph, producer, kept))
        for producer, group in graph.group_of_producer.items()
        if group in kept
    }


def mask_in_place(model: nn.Module, masks: Masks) -> nn.Module:
    """weights x mask on `model` itself, on its device; BatchNorm is left as it is (what NNI measures)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, layer_masks in masks.items():
            for key, mask in layer_masks.items():
                tensor = getattr(modules[name], key)
                tensor.mul_(mask.to(tensor.device))
    return model


def apply_masks(model: nn.Module, masks: Masks) -> nn.Module:
    """A masked copy of `model`; the input model is left untouched."""
    return mask_in_place(clone_tree(model, {}), masks)
