"""Physical surgery: slice every producer and consumer, return a smaller model of the same class."""

from __future__ import annotations

import torch
from torch import nn

from .attention import keep_softmax_scale, set_head_attributes
from .graph import ChannelGraph, Layout
from .modules import clone_tree, drop_tensor_caches, sliced_module, sliced_tensor


def layout_index(layout: Layout, graph: ChannelGraph, kept: dict[int, torch.Tensor]) -> torch.Tensor | None:
    """Input columns a consumer keeps; None when none of its input spaces is pruned."""
    if not any(graph.group_of_space.get(s.space) in kept for s in layout):
        return None
    pieces, offset = [], 0
    for segment in layout:
        group = graph.group_of_space.get(segment.space)
        channels = kept[group] if group in kept else torch.arange(segment.size)
        repeat = torch.arange(segment.repeat)
        pieces.append((channels[:, None] * segment.repeat + repeat[None, :]).flatten() + offset)
        offset += segment.size * segment.repeat
    return torch.cat(pieces)


def output_index(graph: ChannelGraph, producer: str, kept: dict[int, torch.Tensor]) -> torch.Tensor:
    """The output units a pruned producer keeps: its group's kept units, or, for an attention qkv, their rows."""
    layout = graph.producer_layout.get(producer)
    if layout is None:
        return kept[graph.group_of_producer[producer]]
    return layout_index(layout, graph, kept)


def shrink(model: nn.Module, graph: ChannelGraph, kept: dict[int, torch.Tensor]) -> nn.Module:
    """A new model with the kept channels of every pruned group; `model` is not modified."""
    modules = dict(model.named_modules())
    in_index = {c.module: layout_index(c.layout, graph, kept) for c in graph.consumers if c.kind != "scale"}
    out_index = {p: output_index(graph, p, kept) for p, g in graph.group_of_producer.items() if g in kept}
    replacements = {}
    for name in set(in_index) | set(out_index):
        if in_index.get(name) is None and name not in out_index:
            continue
        replacements[name] = sliced_module(modules[name], out_index.get(name), in_index.get(name))
    pruned = clone_tree(model, replacements)
    for consumer in graph.consumers:
        index = layout_index(consumer.layout, graph, kept) if consumer.kind == "scale" else None
        # a layer-scale parameter of a module that is not itself sliced: the clone gets the kept entries
        if index is not None:
            owner, _, attr = consumer.module.rpartition(".")
            sliced_tensor(pruned.get_submodule(owner), attr, index, consumer.dim)
            drop_tensor_caches(pruned.get_submodule(owner))
    for group, units in kept.items():
        block = graph.groups[group].heads
        if block is not None:
            attention = pruned.get_submodule(block.module)
            set_head_attributes(attention, block, len(units))
            drop_tensor_caches(attention)
            if block.mode == "head_dim":
                keep_softmax_scale(attention, block, len(units))
    return pruned
