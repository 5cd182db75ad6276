"""A data-driven importance: how large a unit's output is on real inputs, rather than how large its weights are.

A channel scores the mean |value| it carries into the next layers (after its BatchNorm where one follows it, as NNI's
ActivationMeanRankPruner ranks activations, but without the ReLU it assumes); an attention head (or head dim) scores the
mean L2 norm of what it adds to its block's output projection, the quantity removing it takes away.
"""

from __future__ import annotations

import torch
from torch import nn

from .graph import ChannelGraph, unit_order
from .modules import eval_mode
from .tracing import attributes_kept, buffers_kept


def _per_unit_mean(output: torch.Tensor, axis: int) -> torch.Tensor:
    values = output.detach().abs().double().movedim(axis, -1)
    return values.reshape(-1, values.shape[-1]).mean(0)


def _head_contributions(inputs: torch.Tensor, weight: torch.Tensor, units: int, order: torch.Tensor) -> torch.Tensor:
    """inputs (..., heads x head_dim) and proj's weight, columns taken in unit order: the norm of each unit's share of
    proj's output, averaged over tokens and samples (one unit at a time: all at once is tokens x units x outputs)."""
    columns = inputs.detach().reshape(-1, inputs.shape[-1])[:, order.to(inputs.device)]
    weights = weight.detach()[:, order.to(weight.device)]
    width = len(order) // units
    return torch.stack(
        [
            (columns[:, u * width : (u + 1) * width] @ weights[:, u * width : (u + 1) * width].t()).norm(dim=-1).mean()
            for u in range(units)
        ]
    ).double()


def activation_scores(
    model: nn.Module, graph: ChannelGraph, groups: list[int], example_input: torch.Tensor
) -> dict[int, torch.Tensor]:
    """Per-unit scores of `groups` from one forward pass on `example_input` (use a batch of real samples: the scores
    are only as good as the data)."""
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    handles = []

    def keep(name: str, tensor: torch.Tensor) -> None:
        seen.setdefault(name, tensor.detach())

    watched: dict[int, list[str]] = {}
    for index in groups:
        block = graph.groups[index].heads
        if block is not None:
            watched[index] = [block.proj]
            handles.append(
                modules[block.proj].register_forward_pre_hook(lambda _m, args, name=block.proj: keep(name, args[0]))
            )
            continue
        watched[index] = [graph.norm_after.get(member, member) for member in graph.groups[index].members]
        for name in watched[index]:
            handles.append(modules[name].register_forward_hook(lambda _m, _a, out, name=name: keep(name, out)))
    try:  # the caller's model: what its forward caches (LeViT's attention biases) is dropped again
        with attributes_kept(model), buffers_kept(model), eval_mode(model), torch.no_grad():
            model(example_input.clone())
    finally:
        for handle in handles:
            handle.remove()
    scores = {}
    for index, names in watched.items():
        block = graph.groups[index].heads
        if block is not None:
            order = unit_order(graph.reads(block.proj))
            scores[index] = _head_contributions(seen[block.proj], modules[block.proj].weight, block.units, order)
        else:
            axis = [-1 if isinstance(modules[name], nn.Linear) else 1 for name in names]
            scores[index] = torch.stack([_per_unit_mean(seen[n], a) for n, a in zip(names, axis, strict=True)]).mean(0)
    return {index: score.cpu() for index, score in scores.items()}  # selection runs on the CPU
