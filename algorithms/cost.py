"""MACs and parameters of a model at any kept-channel plan, without doing the surgery: what a budget search evaluates
a dozen times. Each module's figure in the full model is scaled by the fraction of its output and input channels the
plan keeps (from the channel graph: a producer's group, a consumer's input layout), which is exact for Conv2d, Linear,
depthwise and grouped convolutions, norms and layer scales; anything else is counted as it is."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .graph import ChannelGraph, Layout
from .modules import eval_mode

Plan = dict[int, int]  # prunable group -> channels it keeps (a group left out keeps all of them)


@dataclass
class CostModel:
    graph: ChannelGraph
    macs: dict[str, int]  # module -> multiply-accumulates per sample in the full model
    params: list[tuple[str, int, str]]  # (module, elements, how it scales: "out", "in", "both" or "fixed")
    inputs: dict[str, Layout]  # consumer module -> the layout of the channels it reads
    depthwise: set[str]  # convs whose outputs follow their inputs (no group of their own)
    other_macs: int = 0  # MACs no leaf module accounts for (a functional call in a container's forward): counted as is
    # an attention block's own MACs (q.k and weights.v, outside its Linears), by its group of heads: they scale with
    # the heads (or head dims) kept
    attention_macs: dict[int, int] = field(default_factory=dict)

    @classmethod
    def of(cls, model: nn.Module, example_input: torch.Tensor, graph: ChannelGraph) -> CostModel:
        """Count the full model once: MACs per module (torch's FlopCounterMode, FLOPs / 2) and every parameter."""
        with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(example_input[:1])
        prefix = type(model).__name__ + "."
        macs = {
            key.removeprefix(prefix): int(sum(ops.values())) // 2
            for key, ops in counter.get_flop_counts().items()
            if key.startswith(prefix)
        }
        modules = dict(model.named_modules())
        leaves = {name for name, module in modules.items() if name and not list(module.children())}
        inputs = {c.module: c.layout for c in graph.consumers if c.kind != "scale"}
        depthwise = {c.module for c in graph.consumers if c.kind == "depthwise"}
        scaled = {c.module: c.layout for c in graph.consumers if c.kind == "scale"}
        params = []
        for name, parameter in model.named_parameters():
            owner, _, attr = name.rpartition(".")
            if name in scaled:  # a layer-scale vector, sliced with the channels it multiplies
                params.append((name, parameter.numel(), "scale"))
            elif owner in graph.group_of_producer and owner not in depthwise:
                params.append((owner, parameter.numel(), "both" if attr == "weight" else "out"))
            elif owner in inputs:
                params.append((owner, parameter.numel(), "in"))
            else:
                params.append((owner, parameter.numel(), "fixed"))
        inputs |= scaled
        by_leaf = {k: v for k, v in macs.items() if k in leaves}
        attention = {
            index: macs.get(group.heads.module, 0)
            - sum(count for name, count in by_leaf.items() if name.startswith(group.heads.module + "."))
            for index, group in enumerate(graph.groups)
            if group.heads is not None
        }
        other = counter.get_total_flops() // 2 - sum(by_leaf.values()) - sum(attention.values())
        return cls(graph, by_leaf, params, inputs, depthwise, other, attention)

    def out_fraction(self, module: str, plan: Plan) -> float:
        group = self.graph.group_of_producer.get(module)
        if group is None or group not in plan or module in self.depthwise:
            return 1.0
        return plan[group] / self.graph.groups[group].size

    def in_fraction(self, module: str, plan: Plan) -> float:
        layout = self.inputs.get(module)
        if not layout:
            return 1.0
        total = sum(s.size * s.repeat for s in layout)
        kept = 0
        for segment in layout:
            group = self.graph.group_of_space.get(segment.space)
            kept += (plan[group] if group in plan else segment.size) * segment.repeat
        return kept / total

    def costs(self, plan: Plan) -> dict[str, float]:
        """{"macs": ..., "params": ...} of the model with `plan`'s channel counts."""
        macs = (
            self.other_macs
            + sum(count * self.out_fraction(m, plan) * self.in_fraction(m, plan) for m, count in self.macs.items())
            + sum(
                count * plan.get(g, self.graph.groups[g].size) / self.graph.groups[g].size
                for g, count in self.attention_macs.items()
            )
        )
        rules = {
            "out": lambda m: self.out_fraction(m, plan),
            "in": lambda m: self.in_fraction(m, plan),
            "both": lambda m: self.out_fraction(m, plan) * self.in_fraction(m, plan),
            "scale": lambda m: self.in_fraction(m, plan),
            "fixed": lambda m: 1.0,
        }
        params = sum(count * rules[rule](m) for m, count, rule in self.params)
        return {"macs": macs, "params": params}
