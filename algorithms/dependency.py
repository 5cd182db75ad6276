"""Topology analysis in NNI's terms, read off our own channel graph instead of a torch.jit trace.

`ChannelDependency`: sets of layers whose output channels must be pruned together.
Elementwise ops (add, sub, mul, div, in place or not) couple channels; a channel
concatenation does not; a depthwise conv follows the layer that feeds it (NNI
puts it in that layer's set too). `GroupDependency`: how many equal groups each
conv's filters must stay divisible into, because it or a conv it feeds is grouped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .csv_files import write_rows
from .graph import ChannelGraph, analyze


@dataclass
class DependencySet:
    """Layers pruned with one decision: `channels` units each, prunable unless `blocked_by` says why not."""

    layers: list[str]
    channels: int
    blocked_by: list[str]

    @property
    def prunable(self) -> bool:
        return not self.blocked_by


def _followers(graph: ChannelGraph) -> dict[int, list[str]]:
    """Depthwise convs that read exactly one group's channels, by that group."""
    found: dict[int, list[str]] = {}
    for consumer in graph.consumers:
        if consumer.kind != "depthwise":
            continue
        groups = {graph.group_of_space.get(segment.space) for segment in consumer.layout}
        if len(groups) == 1 and None not in groups:
            found.setdefault(groups.pop(), []).append(consumer.module)
    return found


class ChannelDependency:
    """NNI's `ChannelDependency(model, dummy_input)`: `.dependency_sets` and `.export(csv)`, without torch.jit or
    tensorboard."""

    def __init__(self, model: nn.Module, dummy_input: torch.Tensor, graph: ChannelGraph | None = None) -> None:
        # NNI's channel sets: an attention block's heads are no channel set, its qkv stays whole as in NNI
        self.graph = analyze(model, dummy_input, attention="none") if graph is None else graph
        modules = dict(model.named_modules())
        followers = _followers(self.graph)
        self.sets: list[DependencySet] = [
            DependencySet([*group.members, *followers.get(index, [])], group.size, list(group.blocked_by))
            for index, group in enumerate(self.graph.groups)
        ]
        placed = {layer for dependency in self.sets for layer in dependency.layers}
        for (
            consumer
        ) in self.graph.consumers:  # depthwise convs on the model input or on several groups at once stand alone
            if consumer.kind == "depthwise" and consumer.module not in placed:
                self.sets.append(
                    DependencySet(
                        [consumer.module],
                        modules[consumer.module].out_channels,
                        ["it follows channels of several layers"],
                    )
                )
        self.dependency: dict[str, set[str]] = {layer: set(d.layers) for d in self.sets for layer in d.layers}

    @property
    def dependency_sets(self) -> list[set[str]]:
        return [set(d.layers) for d in self.sets]

    def set_of(self, layer: str) -> DependencySet:
        for dependency in self.sets:
            if layer in dependency.layers:
                return dependency
        raise KeyError(layer)

    def export(self, filepath: str | Path) -> Path:
        """NNI's CSV: `Dependency Set,Convolutional Layers`, then `Set 1,<layer>,<layer>,...` in network order."""
        return write_rows(
            filepath,
            [
                ["Dependency Set", "Convolutional Layers"],
                *([f"Set {n}", *d.layers] for n, d in enumerate(self.sets, start=1)),
            ],
        )


class GroupDependency:
    """NNI's `GroupDependency`: `.dependency[conv]` = the group count its filters must stay divisible into.

    A grouped conv (1 < groups < channels) constrains itself and every layer whose channels it reads; a depthwise conv
    adds no constraint (it follows its input channel one to one), as in NNI.
    """

    def __init__(self, model: nn.Module, dummy_input: torch.Tensor, graph: ChannelGraph | None = None) -> None:
        self.graph = analyze(model, dummy_input) if graph is None else graph
        modules = dict(model.named_modules())
        counts: dict[str, list[int]] = {}
        for name in self.graph.producer_space:
            if isinstance(modules[name], nn.Conv2d):
                for member in self.graph.group(name).members:  # layers coupled to a grouped conv share its constraint
                    counts.setdefault(member, []).append(modules[name].groups)
        for consumer in self.graph.consumers:
            if consumer.kind == "depthwise":
                counts.setdefault(consumer.module, []).append(1)
            if consumer.kind != "grouped":
                continue
            for segment in consumer.layout:
                group = self.graph.group_of_space.get(segment.space)
                for parent in self.graph.groups[group].members if group is not None else ():
                    counts.setdefault(parent, []).append(modules[consumer.module].groups)
        self.dependency: dict[str, int] = {name: math.lcm(*values) for name, values in counts.items()}

    @property
    def dependency_sets(self) -> dict[str, int]:
        return self.dependency

    def export(self, filepath: str | Path) -> Path:
        return write_rows(
            filepath, [["Conv Layer Name", "Group"], *([name, groups] for name, groups in self.dependency.items())]
        )
