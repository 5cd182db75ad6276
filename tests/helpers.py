"""Shared test helpers: seeded non-trivial BatchNorm statistics and the channel-zeroing reference."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
from torch import nn

from models import build_model


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm a random scale/shift and running stats, so pruning errors cannot hide."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator))
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    return model


def zeroed_reference(
    model: nn.Module, kept: dict[str, list[int]], units: dict[str, int], norm_after: dict[str, str], x: torch.Tensor
) -> torch.Tensor:
    """The original model with pruned channels zeroed right after their BatchNorm (or the layer itself)."""
    modules = dict(model.named_modules())
    hooks = []
    for layer, keep in kept.items():
        mask = torch.zeros(units[layer])
        mask[keep] = 1.0

        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor, mask: torch.Tensor = mask) -> torch.Tensor:
            return output * mask.view((1, -1) + (1,) * (output.ndim - 2))

        hooks.append(modules[norm_after.get(layer, layer)].register_forward_hook(hook))
    return _run_hooked(model, hooks, x)


def _run_hooked(model: nn.Module, hooks: list, x: torch.Tensor) -> torch.Tensor:
    """One no-grad forward with the given hooks installed, then the hooks removed whatever happens."""
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for handle in hooks:
            handle.remove()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


@functools.cache
def zoo(name: str) -> nn.Module:
    """A seeded 3x32x32 / 10-class zoo model with random BatchNorm statistics, built once per test session."""
    torch.manual_seed(0)
    return randomize_norms(build_model(name, (3, 32, 32), 10)).eval()


def _group_units(graph: object, layer: str, rows: list[int]) -> torch.Tensor:
    """A pruned layer's kept units of its group: its kept rows, or, of an attention qkv, the heads (head dims) held."""
    layout = graph.producer_layout.get(layer)
    if layout is None:
        return torch.as_tensor(rows)
    unit = torch.cat([torch.arange(s.size).repeat_interleave(s.repeat) for s in layout])
    return torch.unique(unit[torch.as_tensor(rows)])


def consumer_zeroed_reference(
    model: nn.Module, kept: dict[str, list[int]], x: torch.Tensor, attention: str = "heads"
) -> torch.Tensor:
    """The original model with the pruned channels zeroed in the input of every layer that mixes channels (conv,
    Linear).

    This is what a physically pruned model computes: a removed channel takes with it everything that would have flowed
    from it (its BatchNorm offset, an activation's f(0), a depthwise conv's bias), not only its own values. A LayerNorm
    over pruned channels normalises over the kept channels only (what its pruned copy does); the others come out as
    zeros. An attention block's removed heads (head dims) have their q, k and v zeroed: they add nothing to the output,
    and a removed head dim adds nothing to q.k.
    """
    from algorithms.graph import analyze
    from algorithms.surgery import layout_index

    graph = analyze(model, x, attention)
    kept_by_group = {graph.group_of_producer[layer]: _group_units(graph, layer, units) for layer, units in kept.items()}
    modules = dict(model.named_modules())
    hooks, renormalised = [], {}
    for layer, units in kept.items():
        if layer in graph.producer_layout:  # an attention qkv: the q, k and v of removed heads (or head dims) are zeros
            mask = torch.zeros(modules[layer].out_features)
            mask[units] = 1.0
            hooks.append(modules[layer].register_forward_hook(lambda _m, _i, out, mask=mask: out * mask))
    for consumer in graph.consumers:
        index = (
            layout_index(consumer.layout, graph, kept_by_group)
            if consumer.kind in ("conv", "linear", "grouped", "layernorm", "groupnorm")
            else None
        )
        if index is None:
            continue
        module = modules[consumer.module]
        if consumer.kind in ("layernorm", "groupnorm"):
            renormalised[id(module.weight)] = index
            continue
        width = module.in_channels if isinstance(module, nn.Conv2d) else module.weight.shape[1]
        mask = torch.zeros(width)
        mask[index] = 1.0
        axis = -1 if consumer.kind == "linear" else 1  # a Linear reads its last axis: (N, C) or (N, tokens, C)

        def zero_inputs(
            _module: nn.Module, inputs: tuple[torch.Tensor, ...], mask: torch.Tensor = mask, axis: int = axis
        ) -> tuple[torch.Tensor, ...]:
            return (inputs[0] * mask.view([-1 if d == axis % inputs[0].ndim else 1 for d in range(inputs[0].ndim)]),)

        hooks.append(module.register_forward_pre_hook(zero_inputs))
    with _kept_channel_norms(renormalised):
        return _run_hooked(model, hooks, x)


@contextlib.contextmanager
def _kept_channel_norms(kept_by_weight: dict[int, torch.Tensor]) -> Iterator[None]:
    """F.layer_norm and F.group_norm with one of these weights normalise the kept channels alone (a LayerNorm's on its
    last axis, a GroupNorm's on dim 1 in as many groups), zeros elsewhere: every LayerNorm / GroupNorm, subclass
    (LayerNorm2d, timm's GroupNorm1) or direct call goes through them, whatever axis its module is handed."""
    functional = nn.functional
    originals = functional.layer_norm, functional.group_norm

    def on_kept(original: Callable, axis: int, second: Callable[[object, torch.Tensor], object]) -> Callable:
        def norm(
            x: torch.Tensor,
            arg: object,
            weight: torch.Tensor | None = None,
            bias: torch.Tensor | None = None,
            eps: float = 1e-5,
        ) -> torch.Tensor:
            index = kept_by_weight.get(id(weight))
            if index is None:
                return original(x, arg, weight, bias, eps)
            where = (Ellipsis, index) if axis == -1 else (slice(None), index)
            out = torch.zeros_like(x)
            out[where] = original(
                x[where], second(arg, index), weight[index], None if bias is None else bias[index], eps
            )
            return out

        return norm

    functional.layer_norm = on_kept(originals[0], -1, lambda _shape, index: (len(index),))
    functional.group_norm = on_kept(originals[1], 1, lambda groups, _index: groups)
    try:
        yield
    finally:
        functional.layer_norm, functional.group_norm = originals


def quick_run(limit_batches: int) -> list[str]:
    """run.py flags for a run of seconds: one epoch of `limit_batches` batches of 16, one test batch of 64."""
    return [
        "--num_epochs",
        "1",
        "--limit_batches",
        str(limit_batches),
        "--limit_val_batches",
        "1",
        "--batch_size_per_device",
        "16",
        "--val_batch_size_per_device",
        "64",
    ]
