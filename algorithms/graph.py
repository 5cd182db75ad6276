"""Channel dependency analysis on a torch.fx graph.

Every Conv2d (but a depthwise one) and Linear opens a *channel space*: its output units.
Walking the graph in order, each tensor carries a *layout*: the spaces along
its channel axis (dim 1), each with a `repeat` (columns per channel after an
NCHW flatten). Elementwise ops unite spaces (residual adds couple layers),
`cat` concatenates layouts (channel offsets), and every module that reads
channels (next conv, BatchNorm, depthwise conv, Linear after flatten) is
recorded with the layout it reads. Anything the analysis does not understand
blocks the spaces it touches, so pruning is never wrong, only more cautious.
Spaces reaching the graph output are blocked: the classifier is never pruned.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth, stochastic_depth  # per-sample (N, 1, 1, 1) scaling: channel-wise

from .modules import NORM_TYPES, is_depthwise
from .tracing import propagate_shapes, trace


@dataclass(frozen=True)
class Segment:
    space: int
    size: int
    repeat: int = 1  # columns per channel: H*W after flattening an NCHW map


Layout = tuple[Segment, ...]


@dataclass
class Consumer:
    """A module whose input channels follow `layout` and must be sliced with it."""

    module: str
    kind: str  # "conv" | "linear" | "norm" | "depthwise" | "grouped"
    layout: Layout


@dataclass
class ChannelGroup:
    """Producers whose output channels are coupled: pruned together with one decision."""

    members: list[str]
    size: int
    blocked_by: list[str] = field(default_factory=list)
    divisor: int = 1  # grouped convs read or write these channels in this many equal blocks: each block keeps the same count

    @property
    def prunable(self) -> bool:
        return not self.blocked_by


@dataclass
class ChannelGraph:
    groups: list[ChannelGroup]
    group_of_producer: dict[str, int]
    group_of_space: dict[int, int]
    consumers: list[Consumer]
    norm_after: dict[str, str]  # producer -> BatchNorm that reads its output directly
    producer_space: dict[str, int]

    def group(self, producer: str) -> ChannelGroup:
        return self.groups[self.group_of_producer[producer]]

    def why_unprunable(self) -> dict[str, str]:
        """Layer groups (named `a+b`) left whole because some op is not understood, with the first reason; the classifier is not listed."""
        return {"+".join(g.members): g.blocked_by[0] for g in self.groups if not g.prunable and g.blocked_by[0] != OUTPUT_REASON}


# Every parameter-free activation of torch.nn / torch.nn.functional is channel-wise: channel c of the output depends on
# channel c of the input alone, so it carries the channel layout through unchanged (GLU, Softmax, LogSoftmax, Softmin mix
# or halve channels and are not here; PReLU is here only with one shared slope, see call_module).
ELEMENTWISE_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid,
    nn.Hardtanh, nn.Hardshrink, nn.Softshrink, nn.Tanhshrink, nn.Threshold, nn.Sigmoid, nn.LogSigmoid, nn.Tanh, nn.Softplus, nn.Softsign,
)  # fmt: skip
OUTPUT_REASON = "it reaches the model output"  # the classifier: never pruned, by design rather than for want of understanding
PASSTHROUGH_MODULES = (
    *ELEMENTWISE_ACTIVATIONS, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Identity,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample, StochasticDepth,
)  # fmt: skip
ELEMENTWISE_ACTIVATION_FUNCTIONS = {
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.leaky_relu_, F.rrelu, F.rrelu_, F.elu, F.elu_, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.hardtanh_, F.hardshrink, F.softshrink, F.tanhshrink, F.threshold, F.threshold_, F.sigmoid, F.logsigmoid, F.tanh,
    F.softplus, F.softsign, torch.relu, torch.relu_, torch.sigmoid, torch.sigmoid_, torch.tanh, torch.tanh_, torch.selu, torch.selu_, torch.celu,
    torch.celu_, torch.rrelu, torch.rrelu_, torch.clamp, torch.clamp_,
}  # fmt: skip
PASSTHROUGH_FUNCTIONS = {
    *ELEMENTWISE_ACTIVATION_FUNCTIONS, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.interpolate, torch.max_pool2d, stochastic_depth,
}  # fmt: skip
PASSTHROUGH_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "contiguous", "clone", "detach", "float", "to"}
ELEMENTWISE = {operator.add, operator.iadd, operator.mul, operator.imul, operator.sub, operator.truediv,
               torch.add, torch.mul, torch.sub, torch.div}  # fmt: skip
ELEMENTWISE_METHODS = {"add", "add_", "mul", "mul_", "sub", "sub_", "div", "div_"}
RESHAPES = {torch.flatten, torch.reshape}
RESHAPE_METHODS = {"view", "reshape", "flatten"}
REDUCTIONS = {torch.mean, torch.sum, torch.amax}
REDUCTION_METHODS = {"mean", "sum", "amax"}
NON_TENSOR_METHODS = {"size", "dim"}


class _Spaces:
    """Union-find over channel spaces, with the reasons a space may not be pruned."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.blocked: dict[int, list[str]] = {}

    def new(self, size: int, blocked_by: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        if blocked_by:
            self.blocked.setdefault(len(self.parent) - 1, []).append(blocked_by)
        return len(self.parent) - 1

    def find(self, space: int) -> int:
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

    def union(self, a: int, b: int) -> None:
        root_a, root_b = self.find(a), self.find(b)
        if root_a != root_b:
            self.parent[root_b] = root_a
            self.blocked.setdefault(root_a, []).extend(self.blocked.pop(root_b, []))

    def block(self, layout: Layout | None, reason: str) -> None:
        for segment in layout or ():
            reasons = self.blocked.setdefault(self.find(segment.space), [])
            if reason not in reasons:
                reasons.append(reason)

    def reasons(self, space: int) -> list[str]:
        return self.blocked.get(self.find(space), [])


def _shape(node: object) -> tuple[int, ...] | None:
    meta = getattr(node, "meta", {}).get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _channels(shape: tuple[int, ...] | None) -> int | None:
    return shape[1] if shape is not None and len(shape) >= 2 else None


def _flat_nodes(args: object) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg(args, lambda n: found.append(n) or n)
    return found


class _Walker:
    def __init__(self, graph_module: torch.fx.GraphModule) -> None:
        self.gm = graph_module
        self.modules = dict(graph_module.named_modules())
        self.spaces = _Spaces()
        self.layouts: dict[torch.fx.Node, Layout] = {}
        self.consumers: list[Consumer] = []
        self.producer_space: dict[str, int] = {}
        self.divisors: dict[int, int] = {}  # space -> equal blocks a grouped conv imposes
        self.calls: dict[str, int] = {}

    # -- helpers --------------------------------------------------------------------------
    def layout(self, node: object) -> Layout | None:
        return self.layouts.get(node) if isinstance(node, torch.fx.Node) else None

    def fresh(self, node: torch.fx.Node, reason: str) -> None:
        """An output whose channels we cannot relate to anything: a new, blocked space."""
        channels = _channels(_shape(node))
        if channels is not None:
            self.layouts[node] = (Segment(self.spaces.new(channels, reason), channels),)

    def block_inputs(self, node: torch.fx.Node, reason: str) -> None:
        for arg in _flat_nodes((node.args, node.kwargs)):
            self.spaces.block(self.layout(arg), reason)

    def unknown(self, node: torch.fx.Node, what: str) -> None:
        reason = f"{what} ({node.name}) is not understood by the channel analysis"
        self.block_inputs(node, reason)
        self.fresh(node, reason)

    def unite(self, node: torch.fx.Node, layouts: list[Layout]) -> None:
        """Elementwise op: all operands' channels line up one to one."""
        first = layouts[0]
        for other in layouts[1:]:
            if [(s.size, s.repeat) for s in other] != [(s.size, s.repeat) for s in first]:
                self.unknown(node, "an elementwise op over differently split channels")
                return
            for a, b in zip(first, other, strict=True):
                self.spaces.union(a.space, b.space)
        self.layouts[node] = first

    # -- node kinds ------------------------------------------------------------------------
    def placeholder(self, node: torch.fx.Node) -> None:
        self.fresh(node, "the model input")

    def call_module(self, node: torch.fx.Node) -> None:
        name, module = str(node.target), self.modules[str(node.target)]
        source = self.layout(node.args[0]) if node.args else None
        self.calls[name] = self.calls.get(name, 0) + 1
        stateful = isinstance(module, (nn.Conv2d, nn.Linear, *NORM_TYPES))
        if self.calls[name] > 1 and stateful:  # one module, two channel sets: cannot slice for both
            reason = f"{name} is called more than once"
            self.spaces.block(source, reason)
            for consumer in self.consumers:  # the first call's input too: the module cannot be sliced for either
                if consumer.module == name:
                    self.spaces.block(consumer.layout, reason)
            if name in self.producer_space:
                self.spaces.block((Segment(self.producer_space[name], 1),), reason)
            self.fresh(node, reason)
            return
        if isinstance(module, nn.Conv2d) and module.groups == 1 or isinstance(module, nn.Linear):
            if source is None or (isinstance(module, nn.Linear) and len(_shape(node.args[0]) or ()) != 2):
                self.unknown(node, f"{name} on an input of unexpected rank")
                return
            self.consumers.append(Consumer(name, "conv" if isinstance(module, nn.Conv2d) else "linear", source))
            size = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
            self.producer_space[name] = self.spaces.new(size)
            self.layouts[node] = (Segment(self.producer_space[name], size),)
        elif isinstance(module, nn.Conv2d) and not is_depthwise(module) and source is not None:
            # grouped: output block j reads input block j only; both sides stay prunable if every block keeps the same count
            self.consumers.append(Consumer(name, "grouped", source))
            if len(source) != 1 or source[0].repeat != 1:
                self.spaces.block(source, f"{name} is a grouped convolution over concatenated channels")
            else:
                self.divisors[source[0].space] = math.lcm(self.divisors.get(source[0].space, 1), module.groups)
            self.producer_space[name] = self.spaces.new(module.out_channels)
            self.divisors[self.producer_space[name]] = module.groups
            self.layouts[node] = (Segment(self.producer_space[name], module.out_channels),)
        elif isinstance(module, nn.Conv2d) and is_depthwise(module) and source is not None:
            self.consumers.append(Consumer(name, "depthwise", source))
            self.layouts[node] = source
        elif isinstance(module, NORM_TYPES) and source is not None:
            self.consumers.append(Consumer(name, "norm", source))
            self.layouts[node] = source
        elif isinstance(module, PASSTHROUGH_MODULES) and source is not None and not (isinstance(module, nn.PReLU) and module.num_parameters > 1):
            self.layouts[node] = source
        elif isinstance(module, nn.Flatten):
            self.reshape(node)
        else:
            self.unknown(node, f"module {name} ({type(module).__name__})")

    def call_function(self, node: torch.fx.Node) -> None:
        target = node.target
        if target in ELEMENTWISE:
            self.elementwise(node)
        elif target in PASSTHROUGH_FUNCTIONS:
            self.passthrough(node)
        elif target in RESHAPES:
            self.reshape(node)
        elif target is torch.cat:
            self.cat(node)
        elif target in REDUCTIONS:
            self.reduction(node)
        elif target is getattr and not _flat_nodes(node.args[1:]):
            if _shape(node) is not None:  # x.shape etc. are not tensors with channels
                self.unknown(node, "getattr")
        else:
            self.unknown(node, f"call {getattr(target, '__name__', target)}")

    def call_method(self, node: torch.fx.Node) -> None:
        method = str(node.target)
        if method in ELEMENTWISE_METHODS:
            self.elementwise(node)
        elif method in PASSTHROUGH_METHODS:
            self.passthrough(node)
        elif method in RESHAPE_METHODS:
            self.reshape(node)
        elif method in REDUCTION_METHODS:
            self.reduction(node)
        elif method in NON_TENSOR_METHODS:
            return
        else:
            self.unknown(node, f"method .{method}()")

    def get_attr(self, node: torch.fx.Node) -> None:
        return  # constants carry no channel space; ops mixing them with channels are checked there

    def output(self, node: torch.fx.Node) -> None:
        self.block_inputs(node, OUTPUT_REASON)

    # -- op families -----------------------------------------------------------------------
    def passthrough(self, node: torch.fx.Node) -> None:
        source = self.layout(node.args[0]) if node.args else None
        if source is not None and _channels(_shape(node)) == _channels(_shape(node.args[0])):
            others = _flat_nodes((node.args[1:], node.kwargs))
            per_channel = any(_shape(o) is not None and _broadcast_channels(_shape(o), _shape(node)) > 1 for o in others)  # e.g. clamp(x, min=tensor)
            if not any(self.layout(o) for o in others) and not per_channel:
                self.layouts[node] = source
                return
        self.unknown(node, f"{getattr(node.target, '__name__', node.target)}")

    def elementwise(self, node: torch.fx.Node) -> None:
        out_channels = _channels(_shape(node))
        layouts: list[Layout] = []
        out_shape = _shape(node)
        for arg in _flat_nodes((node.args, node.kwargs)):
            layout, shape = self.layout(arg), _shape(arg)
            if shape is None:
                continue  # a Python number computed in the graph
            if layout is not None and len(shape) == len(out_shape or ()):
                layouts.append(layout)
            elif layout is not None or _broadcast_channels(shape, out_shape) > 1:
                self.unknown(node, "an elementwise op with a per-channel constant or mismatched ranks")
                return
        if not layouts or out_channels is None:
            self.unknown(node, "an elementwise op")
            return
        self.unite(node, layouts)

    def reshape(self, node: torch.fx.Node) -> None:
        source, in_shape, out_shape = self.layout(node.args[0]), _shape(node.args[0]), _shape(node)
        if source is None or in_shape is None or out_shape is None or len(out_shape) < 2 or out_shape[0] != in_shape[0]:
            self.unknown(node, "a reshape")
            return
        in_rest, out_rest = math.prod(in_shape[2:]), math.prod(out_shape[2:])
        if out_shape[1] == in_shape[1] and in_rest == out_rest and len(in_shape) in (2, 4) and len(out_shape) in (2, 4):
            self.layouts[node] = source  # (N, C) <-> (N, C, 1, 1) and the like
        elif len(out_shape) == 2 and out_shape[1] == in_shape[1] * in_rest:
            self.layouts[node] = tuple(Segment(s.space, s.size, s.repeat * in_rest) for s in source)  # NCHW flatten
        else:
            self.unknown(node, "a reshape that mixes channels")

    def cat(self, node: torch.fx.Node) -> None:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        ndim = len(_shape(node) or ())
        layouts = [self.layout(t) for t in tensors] if isinstance(tensors, (list, tuple)) else [None]
        if ndim >= 2 and dim % ndim == 1 and all(layouts):
            self.layouts[node] = tuple(s for layout in layouts for s in layout)
        elif ndim >= 2 and dim % ndim != 1 and all(layouts):
            self.unite(node, layouts)
        else:
            self.unknown(node, "a concatenation")

    def reduction(self, node: torch.fx.Node) -> None:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        in_shape, out_shape = _shape(node.args[0]), _shape(node)
        if dims is None or in_shape is None or out_shape is None or len(out_shape) < 2:
            self.unknown(node, "a reduction over channels")
            return
        dims = [dims] if isinstance(dims, int) else list(dims)
        if any(d % len(in_shape) in (0, 1) for d in dims):
            self.unknown(node, "a reduction over channels")
            return
        self.passthrough(node)


def _broadcast_channels(shape: tuple[int, ...], out_shape: tuple[int, ...] | None) -> int:
    """Size of `shape` along the output's channel axis after broadcasting (1 if absent)."""
    if out_shape is None or len(out_shape) < 2:
        return 1
    offset = len(out_shape) - len(shape)
    axis = 1 - offset
    return shape[axis] if 0 <= axis < len(shape) else 1


def analyze(model: nn.Module, example_input: torch.Tensor) -> ChannelGraph:
    """Trace `model` and find its channel groups and channel consumers."""
    graph_module = trace(model)
    propagate_shapes(graph_module, example_input)
    walker = _Walker(graph_module)
    for node in graph_module.graph.nodes:
        getattr(walker, node.op)(node)
    return _collect(walker, graph_module)


def _collect(walker: _Walker, graph_module: torch.fx.GraphModule) -> ChannelGraph:
    spaces = walker.spaces
    roots: dict[int, int] = {}
    groups: list[ChannelGroup] = []
    group_of_producer: dict[str, int] = {}
    for producer, space in walker.producer_space.items():
        root = spaces.find(space)
        if root not in roots:
            roots[root] = len(groups)
            groups.append(ChannelGroup([], spaces.size[space], list(spaces.reasons(space))))
        groups[roots[root]].members.append(producer)
        group_of_producer[producer] = roots[root]
    group_of_space = {space: roots[spaces.find(space)] for space in range(len(spaces.parent)) if spaces.find(space) in roots}
    for space, divisor in walker.divisors.items():
        if space in group_of_space:
            group = groups[group_of_space[space]]
            group.divisor = math.lcm(group.divisor, divisor)
    for group in groups:
        if group.divisor > 1 and group.size // group.divisor <= 1 and not group.blocked_by:
            group.blocked_by.append(f"grouped convolutions split its {group.size} channels into {group.divisor} groups: one per group, none to prune")
    # the input-space blocks may sit on roots that hold no producer; spaces of blocked roots are already marked
    norm_after: dict[str, str] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module" and str(node.target) in walker.producer_space and len(node.users) == 1:
            user = next(iter(node.users))
            if user.op == "call_module" and isinstance(walker.modules[str(user.target)], NORM_TYPES):
                norm_after[str(node.target)] = str(user.target)
    return ChannelGraph(groups, group_of_producer, group_of_space, walker.consumers, norm_after, dict(walker.producer_space))
