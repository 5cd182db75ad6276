"""Layer subclasses that can be traced as one call of their layer: timm's BatchNormAct2d, Linear and Conv2dSame.

Such a subclass runs its layer's functional op on its own tensors (after a spatial pad, for a conv) and then only
channel-wise ops (its activation, a dropout). Called as a leaf, the channel analysis sees what it would see tracing
through it, at a fraction of the cost: timm's CNNs have one BatchNormAct2d per conv, and tracing into each of them
was most of a prune. Each kind of subclass is checked once, on its own fx graph; anything else in its forward (a
second op, an op that mixes channels, a tensor of another module) and it is traced through as before.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .op_tables import (
    PASSTHROUGH_FUNCTIONS,
    PASSTHROUGH_METHODS,
    PASSTHROUGH_MODULES,
    functional_arguments,
    functional_tensors,
    hands_own_tensors,
)

LAYER_OPS = {nn.Conv2d: F.conv2d, nn.Linear: F.linear, nn.BatchNorm2d: F.batch_norm, nn.BatchNorm1d: F.batch_norm}
# checks of the input's rank or shape, as timm's _assert(x.ndim == 4): no tensor flows through them
SHAPE_CHECKS = {getattr, operator.eq, operator.ne, torch._assert}
# attributes that size a layer without shaping its forward: left out of the key each kind of subclass is checked under
WIDTHS = {"in_channels", "out_channels", "in_features", "out_features", "num_features"}
_checked: dict[tuple, bool] = {}


def reads_like_its_layer(module: nn.Module) -> bool:
    """Is `module` a subclass of a Conv2d / Linear / BatchNorm whose forward is the layer's functional op on its own
    tensors followed by channel-wise ops only?"""
    layer = next((kind for kind in LAYER_OPS if isinstance(module, kind)), None)
    if layer is None or type(module).__module__.startswith("torch.") or "forward" in vars(module):
        return False
    try:
        key = _kind(module)
        if key not in _checked:
            _checked[key] = _forward_is_op_then_channelwise(module, LAYER_OPS[layer])
    except TypeError:  # an attribute that cannot be hashed: checked each time
        return _forward_is_op_then_channelwise(module, LAYER_OPS[layer])
    return _checked[key]


def _kind(module: nn.Module) -> tuple:
    """What a forward may branch on: the class and plain attributes of the module and of every child (a PReLU's
    `num_parameters` decides whether it is channel-wise), widths left out."""
    return tuple(
        (
            name,
            type(child),
            tuple(
                (key, value)
                for key, value in sorted(vars(child).items())
                if key not in WIDTHS and isinstance(value, (bool, int, float, str, tuple, type(None)))
            ),
        )
        for name, child in module.named_modules()
    )


def _forward_is_op_then_channelwise(module: nn.Module, op: object) -> bool:
    try:
        graph = torch.fx.Tracer().trace(module)
    except Exception:  # a forward fx cannot trace alone: traced through, where the whole model's trace decides
        return False
    nodes = list(graph.nodes)
    inputs = [node for node in nodes if node.op == "placeholder"]
    cores = [node for node in nodes if node.op == "call_function" and node.target is op]
    if len(inputs) != 1 or len(cores) != 1:
        return False
    core = cores[0]
    if not hands_own_tensors(core, module, ""):
        return False
    args = functional_arguments(core)
    seen = {core, *inputs, *functional_tensors(core).values()}
    source = args.get("input")
    while isinstance(module, nn.Conv2d) and isinstance(source, torch.fx.Node) and source.target is F.pad:
        if not _spatial_pad(source):
            return False
        seen.add(source)  # Conv2dSame: padding of H and W only
        source = source.args[0]
    if source is not inputs[0]:
        return False
    current = core
    while True:
        readers = [user for user in current.users if user.target not in SHAPE_CHECKS]
        if len(readers) != 1:
            return False
        reader = readers[0]
        seen.add(reader)
        if reader.op == "output":
            break
        if not _channelwise(module, reader, current):
            return False
        current = reader
    # nothing else in forward but checks of the input's shape
    return all(node in seen or node.op == "call_function" and node.target in SHAPE_CHECKS for node in nodes)


def _spatial_pad(node: torch.fx.Node) -> bool:
    pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    return isinstance(pad, (list, tuple)) and len(pad) <= 4 and all(isinstance(p, int) for p in pad)


def _channelwise(module: nn.Module, node: torch.fx.Node, source: torch.fx.Node) -> bool:
    """Does `node` map channel c of `source` to channel c, with no other tensor?"""
    others = [arg for arg in node.all_input_nodes if arg is not source]
    if node.op == "call_module":
        child = module.get_submodule(str(node.target))
        single_slope = not isinstance(child, nn.PReLU) or child.num_parameters == 1
        return isinstance(child, PASSTHROUGH_MODULES) and single_slope and not others and node.args[0] is source
    if node.op == "call_function":
        return node.target in PASSTHROUGH_FUNCTIONS and not others and node.args[0] is source
    if node.op == "call_method":
        return node.target in PASSTHROUGH_METHODS and not others and node.args[0] is source
    return False
