"""Channel dependency analysis on a torch.fx graph.

Every Conv2d (but a depthwise one) and Linear opens a *channel space*: its output units.
Walking the graph in order, each tensor carries a *layout*: the spaces along
its channel axis, each with a `repeat` (consecutive columns per channel after an
NCHW flatten or a channel shuffle), and which axis that is (dim 1 for NCHW maps,
the last one after a permute to channels-last or for a Linear on (N, tokens, features)).
Elementwise ops unite spaces (residual adds couple layers), `cat` concatenates
layouts (channel offsets), permutes move the channel axis, and every module or
parameter that reads channels (next conv, BatchNorm, LayerNorm, depthwise conv,
Linear, a layer-scale parameter) is recorded with the layout it reads. Anything
the analysis does not understand blocks the spaces it touches, so pruning is
never wrong, only more cautious. Spaces reaching the graph output are blocked:
the classifier is never pruned.
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .attention import ATTENTION_MODES, HeadBlock, HeadRegion, find_regions
from .capture import Step, graph_of, path_of
from .errors import PruningError
from .layer_subclasses import reads_like_its_layer
from .modules import NORM_TYPES, eval_mode, is_depthwise, output_units
from .op_tables import (
    ELEMENTWISE,
    ELEMENTWISE_METHODS,
    FUNCTIONAL_MODULE_CALLS,
    NON_TENSOR_METHODS,
    NORMS,
    PASSTHROUGH_FUNCTIONS,
    PASSTHROUGH_METHODS,
    PASSTHROUGH_MODULES,
    PERMUTE_METHODS,
    PERMUTES,
    REDUCTION_METHODS,
    REDUCTIONS,
    RESHAPE_METHODS,
    RESHAPES,
    SPATIAL_FUNCTIONS,
    SPATIAL_MODULES,
    SPLIT_AWARE,
    SPLIT_METHODS,
    SPLITS,
    functional_arguments,
    functional_tensors,
    hands_own_tensors,
)
from .tracing import node_shape as _shape
from .tracing import propagate_shapes


@dataclass(frozen=True)
class Segment:
    space: int
    size: int
    repeat: int = 1  # columns per channel: H*W after flattening an NCHW map


Layout = tuple[Segment, ...]


def unit_order(layout: Layout) -> torch.Tensor:
    """A layout's columns sorted by the unit of its space they belong to, so that a weight indexed with it reshapes to
    (units, -1): one row per head (or head dim) of an attention qkv or proj."""
    owner = torch.cat([torch.arange(s.size).repeat_interleave(s.repeat) for s in layout])
    return torch.argsort(owner, stable=True)


@dataclass
class Consumer:
    """A module whose input channels follow `layout` and must be sliced with it."""

    module: str  # for kind "scale": the parameter's qualified name (a layer-scale vector), sliced along `dim`
    kind: str  # "conv" | "linear" | "norm" | "layernorm" | "groupnorm" | "depthwise" | "grouped" | "scale"
    layout: Layout
    dim: int = 0


@dataclass
class ChannelGroup:
    """Producers whose output channels are coupled: pruned together with one decision."""

    members: list[str]
    size: int
    blocked_by: list[str] = field(default_factory=list)
    # grouped convs read or write these channels in this many equal blocks: each block keeps the same count
    divisor: int = 1
    # LayerNorms over these channels: pruning changes their statistics
    layer_norms: list[str] = field(default_factory=list)
    # permuted, shuffled, chunked, renormalised or scaled on the way: only this analysis follows them
    rearranged: bool = False
    # the heads (or head dims) of one attention block: a unit is a head, not one output channel
    heads: HeadBlock | None = None

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
    # layers whose outputs reach the model output through no other layer: the classifier
    output_producers: list[str] = field(default_factory=list)
    # producers whose output units are not their group's units one to one (an attention qkv: rows per head)
    producer_layout: dict[str, Layout] = field(default_factory=dict)
    # why the graph was captured on the example input (capture.py) rather than traced symbolically, and the path it
    # took, which a pruned model must take too; None if it was traced
    captured: str | None = None
    captured_path: list[Step] | None = None

    def group(self, producer: str) -> ChannelGroup:
        return self.groups[self.group_of_producer[producer]]

    def reads(self, module: str) -> Layout:
        """The layout of the channels a layer that mixes them (conv, Linear) reads."""
        return next(c.layout for c in self.consumers if c.module == module and c.kind in ("conv", "linear", "grouped"))

    def why_unprunable(self) -> dict[str, str]:
        """Layer groups (named `a+b`) left whole because some op is not understood, with the first reason; the
        classifier is not listed."""
        return {
            "+".join(g.members): g.blocked_by[0]
            for g in self.groups
            if not g.prunable and g.blocked_by[0] != OUTPUT_REASON
        }


# the classifier: never pruned, by design rather than for want of understanding
OUTPUT_REASON = "it reaches the model output"


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


def _channels(shape: tuple[int, ...] | None, axis: int = 1) -> int | None:
    return shape[axis] if shape is not None and len(shape) > axis else None


def _ndim(node: object) -> int:
    return len(_shape(node) or ())


@dataclass
class _Split:
    """A channel axis viewed as (groups, channels per group), as channel shuffles do: both axes tracked until merged
    back."""

    group_axis: int
    channel_axis: int
    groups: int
    layout: Layout  # of one group; every group's spaces are united with it, so any interleaving keeps them aligned


def _cut(layout: Layout, sizes: list[int]) -> list[Layout] | None:
    """The layout split into consecutive pieces of `sizes` columns; None when a cut falls inside a segment."""
    pieces: list[Layout] = []
    segments = list(layout)
    for size in sizes:
        piece: list[Segment] = []
        while size > 0 and segments and segments[0].size * segments[0].repeat <= size:
            size -= segments[0].size * segments[0].repeat
            piece.append(segments.pop(0))
        if size != 0:
            return None
        pieces.append(tuple(piece))
    return pieces if not segments else None


def _flat_nodes(args: object) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg(args, lambda n: found.append(n) or n)
    return found


class _Walker:
    def __init__(self, graph_module: torch.fx.GraphModule, model: nn.Module, attention: str = "heads") -> None:
        self.gm = graph_module
        # the user's classes: the graph module keeps traced-through ones as bare Modules
        self.modules = dict(model.named_modules())
        # attention blocks: their qkv opens a space of heads, the ops up to their proj are not walked
        self.regions, self.refused_heads = find_regions(graph_module, self.modules, attention)
        self.inner = {node for region in self.regions.values() for node in region.inner}
        self.producer_layout: dict[str, Layout] = {}
        self.head_spaces: dict[int, HeadBlock] = {}
        self.spaces = _Spaces()
        self.layouts: dict[torch.fx.Node, Layout] = {}
        self.axes: dict[torch.fx.Node, int] = {}  # channel axis of a tensor with a layout; 1 when absent
        self.splits: dict[torch.fx.Node, _Split] = {}
        self.pieces: dict[torch.fx.Node, list[tuple[Layout, int]]] = {}  # chunk / split results, read by getitem
        self.consumers: list[Consumer] = []
        self.producer_space: dict[str, int] = {}
        self.divisors: dict[int, int] = {}  # space -> equal blocks a grouped conv imposes
        self.calls: dict[str, int] = {}
        # a parameter reshaped or expanded to broadcast -> (its get_attr, True when it is 1-d and its one axis is the
        # channels', False when its dims line up with the view's from the right: an expanded class token)
        self.parameter_views: dict[torch.fx.Node, tuple[torch.fx.Node, bool]] = {}
        self.module_nodes: dict[torch.fx.Node, str] = {}  # the nodes that run a module, by call or as its functional op
        # outputs of ops not understood, with the reason: their axis is a guess
        self.unrelated: dict[torch.fx.Node, str] = {}
        # spaces permuted, shuffled, split, renormalised or scaled somewhere (see ChannelGroup)
        self.rearranged: set[int] = set()
        # per-sample statistics over the channels (x.mean(1, keepdim=True) and what is computed from it alone): no
        # channels of their own, they broadcast back over them; by the module that takes them
        self.statistics: dict[torch.fx.Node, tuple[str, Layout]] = {}  # -> (module, the channels it is taken over)
        self.statistic_of: dict[int, list[str]] = {}  # space -> modules whose statistics read it
        nodes = graph_module.graph.nodes
        self.attr_uses = Counter(str(n.target) for n in nodes if n.op == "get_attr")
        self.called = {str(n.target) for n in nodes if n.op == "call_module"}

    # -- helpers --------------------------------------------------------------------------
    def layout(self, node: object) -> Layout | None:
        return self.layouts.get(node) if isinstance(node, torch.fx.Node) else None

    def axis(self, node: object) -> int:
        return self.axes.get(node, 1) if isinstance(node, torch.fx.Node) else 1

    def set(self, node: torch.fx.Node, layout: Layout, axis: int = 1) -> None:
        self.layouts[node] = layout
        self.axes[node] = axis

    def carry(self, node: torch.fx.Node, source: torch.fx.Node) -> None:
        self.set(node, self.layouts[source], self.axis(source))

    def fresh(self, node: torch.fx.Node, reason: str) -> None:
        """An output whose channels we cannot relate to anything: a new, blocked space, on its input's channel axis
        where ranks agree (so what it meets downstream reports this op, not a mismatch of axes)."""
        shape = _shape(node)
        inputs = [
            arg for arg in node.all_input_nodes if self.layout(arg) is not None and _ndim(arg) == len(shape or ())
        ]
        axis = self.axis(inputs[0]) if inputs else 1
        channels = _channels(shape, axis)
        if channels is not None:
            self.set(node, (Segment(self.spaces.new(channels, reason), channels),), axis)
            self.unrelated[node] = reason

    def reseat(self, node: torch.fx.Node, axis: int) -> None:
        """Put an unrelated (blocked) output's channels on `axis` after all, keeping its reason: the op that made it
        gets the blame."""
        channels = _channels(_shape(node), axis)
        if node in self.unrelated and channels is not None and axis != self.axis(node):
            self.set(node, (Segment(self.spaces.new(channels, self.unrelated[node]), channels),), axis)

    def block_inputs(self, node: torch.fx.Node, reason: str) -> None:
        for arg in _flat_nodes((node.args, node.kwargs)):
            self.spaces.block(self.layout(arg), reason)
            for layout, _ in self.pieces.get(arg, ()):
                self.spaces.block(layout, reason)

    def unknown(self, node: torch.fx.Node, what: str) -> None:
        reason = f"{what} ({node.name}) is not understood by the channel analysis"
        self.block_inputs(node, reason)
        self.fresh(node, reason)

    def unite(self, node: torch.fx.Node, layouts: list[Layout], axis: int = 1) -> bool:
        """Elementwise op: all operands' channels line up one to one."""
        first = layouts[0]
        for other in layouts[1:]:
            if [(s.size, s.repeat) for s in other] != [(s.size, s.repeat) for s in first]:
                self.unknown(node, "an elementwise op over differently split channels")
                return False
            for a, b in zip(first, other, strict=True):
                self.spaces.union(a.space, b.space)
        self.set(node, first, axis)
        return True

    def first_call(self, name: str, node: torch.fx.Node, source: Layout | None) -> bool:
        """False (and everything it touches blocked) when a stateful module runs a second time: it cannot be sliced for
        both inputs."""
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.calls[name] == 1:
            return True
        reason = f"{name} is called more than once"
        self.spaces.block(source, reason)
        for consumer in self.consumers:  # the first call's input too: the module cannot be sliced for either
            if consumer.module == name:
                self.spaces.block(consumer.layout, reason)
        if name in self.producer_space:
            self.spaces.block((Segment(self.producer_space[name], 1),), reason)
        self.fresh(node, reason)
        return False

    def own_parameter(self, node: torch.fx.Node) -> bool:
        """A parameter or buffer read once, by this op only, and owned by no module that runs: safe to slice for this
        op."""
        if node.op != "get_attr" or self.attr_uses[str(node.target)] != 1 or len(node.users) != 1:
            return False
        owner, _, attr = str(node.target).rpartition(".")
        module = self.modules.get(owner)
        return (
            module is not None and owner not in self.called and (attr in module._parameters or attr in module._buffers)
        )

    def read_directly(self, name: str) -> bool:
        """Does the forward also read this module's tensors itself (`x * self.conv.bias`)? Then slicing them would
        change that read too."""
        return any(target.rpartition(".")[0] == name for target in self.attr_uses)

    def mark(self, *layouts: Layout | None) -> None:
        for layout in layouts:
            for segment in layout or ():
                self.rearranged.add(segment.space)

    # -- node kinds ------------------------------------------------------------------------
    def visit(self, node: torch.fx.Node) -> None:
        if node in self.inner:
            return  # inside an attention block, between its qkv and its proj: see attention_qkv
        statistics = [arg for arg in node.all_input_nodes if arg in self.statistics]
        if statistics and not (
            node.op == "call_function"
            and node.target in ELEMENTWISE | PASSTHROUGH_FUNCTIONS
            or node.op == "call_method"
            and node.target in ELEMENTWISE_METHODS | PASSTHROUGH_METHODS
        ):
            for arg in statistics:  # a normalisation divides or shifts its channels by it; anything else is not one
                owner, source = self.statistics[arg]
                self.spaces.block(source, f"a mean over channels ({owner}) feeds {node.name}: not a normalisation")
        if any(arg in self.splits for arg in node.all_input_nodes) and not (
            node.target in SPLIT_AWARE and node.op in ("call_function", "call_method")
        ):
            self.unknown(node, "an op on channels viewed as groups")
            return
        getattr(self, node.op)(node)

    def placeholder(self, node: torch.fx.Node) -> None:
        self.fresh(node, "the model input")

    def call_module(self, node: torch.fx.Node) -> None:
        name = str(node.target)
        self.module_call(node, name, self.modules[name], node.args[0] if node.args else None)
        if node in self.regions:
            self.attention_qkv(node, self.regions[node])
        elif node in self.refused_heads and name in self.producer_space:
            self.spaces.block((Segment(self.producer_space[name], 1),), self.refused_heads[node])

    def attention_qkv(self, node: torch.fx.Node, region: HeadRegion) -> None:
        """qkv's rows, as (3, heads, head_dim), become units of heads (or of head dims), which proj reads as (heads,
        head_dim) and a per-head parameter along its head axis. qkv's own space of rows is dropped."""
        block, name = region.block, str(node.target)
        space = self.producer_space.get(name)
        into_proj = region.proj.args[0]
        if space is None or self.spaces.reasons(space):  # called twice, or its tensors read directly: whole
            reason = self.spaces.reasons(space)[0] if space is not None else f"{name} is not understood"
            width = block.heads * block.value_dim
            self.set(into_proj, (Segment(self.spaces.new(width, reason), width),), _ndim(into_proj) - 1)
            return
        units = self.spaces.new(block.units)
        self.producer_space[name] = units
        self.head_spaces[units] = block
        if block.mode == "heads":
            per_head = (Segment(units, block.heads, block.value_dim),)
            rows = (Segment(units, block.heads, block.head_rows),) if block.heads_first else per_head * 3
            self.producer_layout[name] = rows
            for parameter, dim in region.per_head:
                self.consumers.append(Consumer(str(parameter.target), "scale", (Segment(units, block.heads),), dim))
        else:
            per_head = (Segment(units, block.head_dim),) * block.heads
            self.producer_layout[name] = per_head * 3
        self.set(into_proj, per_head, _ndim(into_proj) - 1)
        self.mark(per_head)

    def module_call(
        self, node: torch.fx.Node, name: str, module: nn.Module, source_node: object, own_reads: bool = False
    ) -> None:
        """`module` run on `source_node`, as a call_module node or (`own_reads`) as the functional op of its own forward
        on its own tensors, which are then read there alone."""
        self.module_nodes[node] = name
        source, axis, ndim = self.layout(source_node), self.axis(source_node), _ndim(source_node)
        known = isinstance(
            module,
            (
                nn.Conv2d,
                nn.Linear,
                nn.LayerNorm,
                nn.GroupNorm,
                nn.Flatten,
                *NORM_TYPES,
                *PASSTHROUGH_MODULES,
                *SPATIAL_MODULES,
            ),
        )
        if not known or isinstance(module, nn.PReLU) and module.num_parameters > 1:
            self.unknown(node, f"module {name} ({type(module).__name__})")
            return
        stateful = isinstance(module, (nn.Conv2d, nn.Linear, nn.LayerNorm, nn.GroupNorm, *NORM_TYPES))
        if stateful and not self.first_call(name, node, source):
            return
        if stateful and not own_reads and self.read_directly(name):
            reason = f"{name}'s tensors are also read directly by the forward, so it cannot be sliced"
            self.block_inputs(node, reason)
            if isinstance(module, (nn.Conv2d, nn.Linear)):  # still a layer of the model: listed with the reason
                self.producer_space[name] = self.spaces.new(output_units(module), reason)
                self.set(
                    node,
                    (Segment(self.producer_space[name], output_units(module)),),
                    _ndim(node) - 1 if isinstance(module, nn.Linear) else 1,
                )
            else:
                self.fresh(node, reason)
        elif source is None:
            self.unknown(node, f"module {name} ({type(module).__name__}) on an input without tracked channels")
        elif isinstance(module, nn.Linear):
            if ndim < 2:
                self.unknown(node, f"{name} on an input without a feature axis")
                return
            # its features are not channels we track: they stay whole, its own outputs can still be pruned
            if axis != ndim - 1:
                reason = f"{name} reads a last axis that carries no tracked channels"
                self.spaces.block(source, reason)
                source = (Segment(self.spaces.new(module.in_features, reason), module.in_features),)
            self.consumers.append(Consumer(name, "linear", source))
            self.producer_space[name] = self.spaces.new(module.out_features)
            self.set(node, (Segment(self.producer_space[name], module.out_features),), ndim - 1)
            if ndim > 2:
                self.mark(source, self.layouts[node])
        elif isinstance(module, nn.LayerNorm):
            self.layer_norm(node, name, module, source_node)
        elif isinstance(module, PASSTHROUGH_MODULES):
            self.carry(node, source_node)
        elif axis != 1:
            self.unknown(node, f"module {name} ({type(module).__name__}) on channels that are not on dim 1")
        elif isinstance(module, nn.Flatten):
            self.reshape(node)
        elif isinstance(module, nn.GroupNorm):
            self.group_norm(node, name, module, source)
        # a 3-d input to a 2-d op is one unbatched image: dim 0 is channels
        elif ndim != (_ndim(node) if isinstance(module, NORM_TYPES) else 4):
            self.unknown(node, f"module {name} ({type(module).__name__}) on a {ndim}-d input")
        elif isinstance(module, nn.Conv2d):
            self.conv(node, name, module, source)
        elif isinstance(module, NORM_TYPES):
            self.consumers.append(Consumer(name, "norm", source))
            self.carry(node, source_node)
        else:
            self.carry(node, source_node)  # pooling, upsampling: per channel over H and W

    def conv(self, node: torch.fx.Node, name: str, module: nn.Conv2d, source: Layout) -> None:
        if module.groups == 1:
            self.consumers.append(Consumer(name, "conv", source))
        elif is_depthwise(module):
            self.consumers.append(Consumer(name, "depthwise", source))
            self.set(node, source)
            return
        # grouped: output block j reads input block j only; both sides stay prunable if every block keeps the same count
        else:
            self.consumers.append(Consumer(name, "grouped", source))
            if len(source) != 1 or source[0].repeat != 1:
                self.spaces.block(source, f"{name} is a grouped convolution over concatenated channels")
            else:
                self.divisors[source[0].space] = math.lcm(self.divisors.get(source[0].space, 1), module.groups)
        self.producer_space[name] = self.spaces.new(module.out_channels)
        if module.groups > 1:
            self.divisors[self.producer_space[name]] = module.groups
        self.set(node, (Segment(self.producer_space[name], module.out_channels),))

    def layer_norm(self, node: torch.fx.Node, name: str, module: nn.LayerNorm, source_node: torch.fx.Node) -> None:
        """A LayerNorm over the channel axis alone: slice its weight and bias; the kept channels are normalised among
        themselves."""
        source, ndim = self.layout(source_node), _ndim(source_node)
        if source is None or len(module.normalized_shape) != 1 or ndim < 2 or self.axis(source_node) != ndim - 1:
            self.unknown(node, f"LayerNorm {name} over more than, or other than, the channel axis")
        # its width lives in no tensor: a pruned snapshot could not be rebuilt from its state dict
        elif module.weight is None:
            self.unknown(node, f"LayerNorm {name} without elementwise weights")
        else:
            self.consumers.append(Consumer(name, "layernorm", source))
            self.carry(node, source_node)
            self.mark(source)

    def group_norm(self, node: torch.fx.Node, name: str, module: nn.GroupNorm, source: Layout) -> None:
        """A GroupNorm normalises each of its groups of channels (with their H, W): every group keeps as many channels,
        as a grouped conv's blocks do, and its statistics are over the kept ones, as a pruned LayerNorm's."""
        if module.weight is None:
            self.unknown(node, f"GroupNorm {name} without elementwise weights")
            return
        if module.num_groups > 1 and (len(source) != 1 or source[0].repeat != 1):
            self.unknown(node, f"GroupNorm {name} over concatenated channels")
            return
        if module.num_groups > 1:
            self.divisors[source[0].space] = math.lcm(self.divisors.get(source[0].space, 1), module.num_groups)
        self.consumers.append(Consumer(name, "groupnorm", source))
        self.set(node, source)
        self.mark(source)

    def functional_call(self, node: torch.fx.Node) -> None:
        """F.batch_norm / F.layer_norm / F.linear / F.conv2d in the forward of a module of that kind, on that module's
        own tensors (timm's BatchNormAct2d and Linear, torchvision's LayerNorm2d): analysed as a call of the module,
        whose tensors are sliced. Whatever its forward does after the op is traced as ops of their own."""
        kinds, _ = FUNCTIONAL_MODULE_CALLS[node.target]
        args, tensors = functional_arguments(node), functional_tensors(node)
        reads = {str(t.target) for t in tensors.values() if t.op == "get_attr"}
        owner = next(iter(reads)).rpartition(".")[0] if len(reads) == len(tensors) > 0 else None
        module = self.modules.get(owner) if owner is not None else None
        what = getattr(node.target, "__name__", node.target)
        others = {t for t in self.attr_uses if t.rpartition(".")[0] == owner} - reads
        if (
            not isinstance(module, kinds)
            or others  # the forward reads more of the module's tensors than the op's: slicing might not be all
            # in the owner's own forward, on each of its own tensors once
            or list(node.meta.get("nn_module_stack") or {})[-1:] != [owner]
            or not hands_own_tensors(node, module, f"{owner}.")
            or any(self.attr_uses[str(t.target)] != 1 or len(t.users) != 1 for t in tensors.values())
        ):
            self.unknown(node, f"{what} with tensors of no {_kind_names(kinds)} it runs in")
            return
        self.module_call(node, owner, module, args.get("input"), own_reads=True)

    def call_function(self, node: torch.fx.Node) -> None:
        target = node.target
        if target in ELEMENTWISE:
            self.elementwise(node)
        elif target in PASSTHROUGH_FUNCTIONS:
            self.passthrough(node)
        elif target in SPATIAL_FUNCTIONS:
            self.passthrough(node, spatial=True)
        elif target in RESHAPES:
            self.reshape(node)
        elif target in PERMUTES:
            self.permute(node)
        elif target in SPLITS:
            self.split(node)
        elif target is operator.getitem:
            self.getitem(node)
        elif target in FUNCTIONAL_MODULE_CALLS:
            self.functional_call(node)
        elif target is torch.cat:
            self.cat(node)
        elif target is F.pad:
            self.pad(node)
        elif target is torch.roll:
            self.roll(node)
        elif target in REDUCTIONS:
            self.reduction(node)
        elif target is getattr and not _flat_nodes(node.args[1:]):
            if _shape(node) is not None:  # x.shape etc. are not tensors with channels
                self.unknown(node, "getattr")
        else:
            self.unknown(node, f"call {getattr(target, '__name__', target)}")

    def call_method(self, node: torch.fx.Node) -> None:
        method = str(node.target)
        if method == "expand":
            self.expand(node)
            return
        if method in ELEMENTWISE_METHODS:
            self.elementwise(node)
        elif method in PASSTHROUGH_METHODS:
            self.passthrough(node)
        elif method in RESHAPE_METHODS:
            self.reshape(node)
        elif method in PERMUTE_METHODS:
            self.permute(node)
        elif method in SPLIT_METHODS:
            self.split(node)
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
    def passthrough(self, node: torch.fx.Node, spatial: bool = False) -> None:
        source_node = node.args[0] if node.args else None
        if source_node in self.statistics:
            owner, channels = self.statistics[source_node]
            if spatial or any(_shape(o) is not None for o in _flat_nodes((node.args[1:], node.kwargs))):
                self.spaces.block(channels, f"a mean over channels ({owner}) meets another tensor in {node.name}")
                self.unknown(node, f"{getattr(node.target, '__name__', node.target)}")
            else:
                self.statistics[node] = self.statistics[source_node]
            return
        source, axis = self.layout(source_node), self.axis(source_node)
        same = _ndim(node) == _ndim(source_node) and _channels(_shape(node), axis) == _channels(
            _shape(source_node), axis
        )
        # 3-d: one unbatched image
        if source is not None and same and not (spatial and (axis != 1 or _ndim(source_node) != 4)):
            if source_node in self.splits:  # .contiguous() / .clone() inside a channel shuffle
                self.splits[node] = self.splits[source_node]
                self.carry(node, source_node)
                return
            others = _flat_nodes((node.args[1:], node.kwargs))
            # e.g. clamp(x, min=tensor)
            per_channel = any(
                _shape(o) is not None and _broadcast_size(_shape(o), _shape(node), axis) > 1 for o in others
            )
            if not any(self.layout(o) for o in others) and not per_channel:
                self.carry(node, source_node)
                return
        self.unknown(node, f"{getattr(node.target, '__name__', node.target)}")

    def elementwise(self, node: torch.fx.Node) -> None:
        out_shape = _shape(node)
        # skip Python numbers computed in the graph
        operands = [arg for arg in _flat_nodes((node.args, node.kwargs)) if _shape(arg) is not None]
        with_layout = [arg for arg in operands if self.layout(arg) is not None]
        statistics = [arg for arg in operands if arg in self.statistics]
        if not with_layout and statistics:
            self.statistics[node] = self.statistics[statistics[0]]  # var + eps, its square root, ...
            return
        if not with_layout or out_shape is None or len(out_shape) < 2:
            self.unknown(node, "an elementwise op")
            return
        related = [arg for arg in with_layout if arg not in self.unrelated]
        axis = self.axis((related or with_layout)[0])
        for arg in with_layout:
            self.reseat(arg, axis)
        if any(_ndim(arg) != len(out_shape) or self.axis(arg) != axis for arg in with_layout):
            self.unknown(node, "an elementwise op over tensors whose channels sit on different axes")
            return
        scales = []
        for arg in operands:
            size = 1 if arg in with_layout else _broadcast_size(_shape(arg), out_shape, axis)
            if size > 1 and size == out_shape[axis] and (self.own_parameter(arg) or arg in self.parameter_views):
                scales.append(arg)  # layer scale, a per-channel bias: sliced with the channels it multiplies
            elif size > 1:
                self.unknown(node, "an elementwise op with a per-channel constant")
                return
        if self.unite(node, [self.layout(arg) for arg in with_layout], axis):
            for arg in scales:
                self.scale_consumer(arg, self.layouts[node], axis, len(out_shape))

    def parameter_dim(self, arg: torch.fx.Node, axis: int, ndim: int) -> tuple[torch.fx.Node, int]:
        """The parameter behind `arg` (itself, or what it views) and its dim that meets axis `axis` of an `ndim`-d
        result: a 1-d parameter's one axis, else dims lined up from the right."""
        parameter, flat = self.parameter_views.get(arg, (arg, False))
        return parameter, 0 if flat else axis - (ndim - _ndim(parameter))

    def scale_consumer(self, arg: torch.fx.Node, layout: Layout, axis: int, ndim: int) -> None:
        """A parameter (or a view of one) that meets `layout`'s channels on `axis` of an `ndim`-d result: sliced with
        them."""
        parameter, dim = self.parameter_dim(arg, axis, ndim)
        self.consumers.append(Consumer(str(parameter.target), "scale", layout, dim))
        self.mark(layout)

    def view_spans(self, view: torch.fx.Node, axis: int, ndim: int, channels: int | None) -> bool:
        """Does the parameter behind `view` hold `channels` entries along the axis that meets them?"""
        parameter, dim = self.parameter_dim(view, axis, ndim)
        shape = _shape(parameter) or ()
        return 0 <= dim < len(shape) and shape[dim] == channels

    def reshape(self, node: torch.fx.Node) -> None:
        source_node = node.args[0] if node.args else None
        source, in_shape, out_shape = self.layout(source_node), _shape(source_node), _shape(node)
        if source_node in self.splits:
            self.merge_groups(node)
            return
        if (
            isinstance(source_node, torch.fx.Node)
            and self.own_parameter(source_node)
            and in_shape is not None
            and len(in_shape) == 1
            and out_shape is not None
            and sorted(out_shape)[:-1] == [1] * (len(out_shape) - 1)
            and _requested_sizes(node).count(-1) == 1  # the channel count left to the tensor: it holds once pruned
            and len(node.users) == 1
        ):
            # self.gamma.reshape(1, -1, 1, 1) (timm's ConvNeXt layer scale): sliced where it meets the channels
            self.parameter_views[node] = (source_node, True)
            return
        if source is None or in_shape is None or out_shape is None or len(out_shape) < 2:
            self.unknown(node, "a reshape")
            return
        axis = self.axis(source_node)
        if axis == len(in_shape) - 1 and out_shape[-1] == in_shape[-1] and out_shape[0] != in_shape[0]:
            # channels last, the leading dims regrouped: LeViT's x.flatten(0, 1) for a BatchNorm1d, reshape_as(x) back
            self.set(node, source, len(out_shape) - 1)
            self.mark(source)
            return
        if out_shape[0] != in_shape[0]:
            self.unknown(node, "a reshape")
            return
        in_rest, out_rest = math.prod(in_shape[2:]), math.prod(out_shape[2:])
        moved = _axis_after_unit_dims(in_shape, out_shape, axis)
        if moved is not None:
            self.set(node, source, moved)  # only dims of size 1 come or go: (N, C) -> (N, 1, C), (N, C, 1, 1) -> (N, C)
            if moved != axis:
                self.mark(source)
        elif axis == 1 and out_shape[1] == in_shape[1] and in_rest == out_rest:
            self.set(node, source)  # (N, C) <-> (N, C, 1, 1), (N, C, H, W) -> (N, C, H*W) and the like
        elif axis == 1 and len(out_shape) == 2 and out_shape[1] == in_shape[1] * in_rest:
            self.set(node, tuple(Segment(s.space, s.size, s.repeat * in_rest) for s in source))  # NCHW flatten
        elif (
            axis == 1
            and len(out_shape) == len(in_shape) + 1
            and out_shape[1] * out_shape[2] == in_shape[1]
            and out_shape[3:] == in_shape[2:]
        ):
            self.view_as_groups(node, source, out_shape[1])
        elif axis == len(in_shape) - 1 and out_shape[-1] == in_shape[-1]:
            self.set(node, source, len(out_shape) - 1)  # channels-last: (N, H, W, C) -> (N, H*W, C)
            self.mark(source)
        elif (
            axis == len(in_shape) - 1
            and len(out_shape) < len(in_shape)
            and out_shape[:-1] == in_shape[: len(out_shape) - 1]
            and out_shape[-1] == math.prod(in_shape[len(out_shape) - 1 :])
        ):
            # channels last, the axes before them merged in: (..., 2, 2, C) -> (..., 4C), Swin's patch merging. Each
            # position of the merged axes holds all C channels: C channels tiled 4 times
            self.set(node, source * (out_shape[-1] // in_shape[-1]), len(out_shape) - 1)
            self.mark(source)
        else:
            self.unknown(node, "a reshape that mixes channels")

    def view_as_groups(self, node: torch.fx.Node, source: Layout, groups: int) -> None:
        """(N, C, ...) -> (N, g, C/g, ...): the first half of a channel shuffle. The g groups are united so that they
        keep the same channels."""
        pieces = _cut(source, [sum(s.size * s.repeat for s in source) // groups] * groups)
        if pieces is None or any(
            [(s.size, s.repeat) for s in piece] != [(s.size, s.repeat) for s in pieces[0]] for piece in pieces
        ):
            self.unknown(node, "a view of channels as groups that cuts through a layer's channels")
            return
        for piece in pieces[1:]:
            for a, b in zip(pieces[0], piece, strict=True):
                self.spaces.union(a.space, b.space)
        self.splits[node] = _Split(1, 2, groups, pieces[0])
        self.mark(source)
        self.set(node, source)  # what an op that does not know about groups blocks

    def merge_groups(self, node: torch.fx.Node) -> None:
        """(N, g, C/g, ...) or, transposed, (N, C/g, g, ...) back to (N, C, ...): concatenated or interleaved groups."""
        split, in_shape, out_shape = self.splits[node.args[0]], _shape(node.args[0]), _shape(node)
        first = min(split.group_axis, split.channel_axis)
        adjacent = abs(split.group_axis - split.channel_axis) == 1
        merged = (
            in_shape is not None
            and out_shape == in_shape[:first] + (in_shape[first] * in_shape[first + 1],) + in_shape[first + 2 :]
        )
        if not (adjacent and merged):
            self.unknown(node, "a reshape of channels viewed as groups")
            return
        if split.group_axis < split.channel_axis:
            self.set(node, split.layout * split.groups, first)
        else:  # channel shuffle: each channel of the group layout now spans `groups` consecutive columns
            self.set(node, tuple(Segment(s.space, s.size, s.repeat * split.groups) for s in split.layout), first)

    def permute(self, node: torch.fx.Node) -> None:
        source_node, ndim = node.args[0] if node.args else None, _ndim(node)
        order = _permutation(node, ndim)
        if self.layout(source_node) is None or order is None:
            self.unknown(node, "a permute")
            return
        if source_node in self.splits:
            split = self.splits[source_node]
            self.splits[node] = _Split(
                order.index(split.group_axis), order.index(split.channel_axis), split.groups, split.layout
            )
        self.set(node, self.layouts[source_node], order.index(self.axis(source_node)))
        self.mark(self.layouts[source_node])

    def split(self, node: torch.fx.Node) -> None:
        """chunk / split: along the channel axis each piece keeps the segments it holds whole; along another axis all of
        them."""
        source_node = node.args[0] if node.args else None
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        meta = node.meta.get("tensor_meta")
        shapes = (
            [tuple(m.shape) for m in meta]
            if isinstance(meta, (list, tuple)) and all(hasattr(m, "shape") for m in meta)
            else None
        )
        source, axis = self.layout(source_node), self.axis(source_node)
        if source is None or shapes is None or not isinstance(dim, int):
            self.unknown(node, "a split")
            return
        if dim % _ndim(source_node) != axis:
            self.pieces[node] = [(source, axis)] * len(shapes)
            return
        if getattr(node.target, "__name__", node.target) != "chunk":
            self.unknown(node, "a split along channels into sizes fixed in forward")
            return
        pieces = _cut(source, [shape[axis] for shape in shapes])
        if pieces is None or any(
            [(s.size, s.repeat) for s in piece] != [(s.size, s.repeat) for s in pieces[0]] for piece in pieces
        ):
            self.unknown(node, "a split that cuts through a layer's channels")
            return
        for piece in pieces[1:]:  # a pruned chunk() splits at its own size / n: every piece must keep as many channels
            for a, b in zip(pieces[0], piece, strict=True):
                self.spaces.union(a.space, b.space)
        self.pieces[node] = [(piece, axis) for piece in pieces]
        self.mark(source)

    def getitem(self, node: torch.fx.Node) -> None:
        source_node, index = node.args
        if source_node in self.pieces and isinstance(index, int):
            self.set(node, *self.pieces[source_node][index])
            return
        if (
            isinstance(index, tuple)
            and index[:1] == (slice(None),)
            and len(index) > 1
            and all(i is None for i in index[1:])
            and self.own_parameter(source_node)
            and len(_shape(source_node) or ()) == 1
            and len(node.users) == 1
        ):
            # self.weight[:, None, None] (ConvNeXt's channels-first LayerNorm): its one axis, as a reshape to broadcast
            self.parameter_views[node] = (source_node, True)
            return
        source, axis, shape = self.layout(source_node), self.axis(source_node), _shape(source_node)
        index = index if isinstance(index, tuple) else (index,)
        # a slice of another axis may end where forward computes (Swin's x[:, :H, :W, :] after padding to windows)
        simple = all(isinstance(i, (int, slice)) for i in index) and len(index) <= _ndim(source_node)
        if (
            source is not None
            and shape is not None
            and simple
            # every channel kept, also once pruned: GhostNet's torch.cat([x1, x2], 1)[:, :self.out_chs] at a full width
            and (axis >= len(index) or _whole(index[axis], shape[axis]))
            and index[:1] == (slice(None),)
        ):
            # x[:, 0] on (N, tokens, C): the class token; x[:, 1:] the patch tokens
            self.set(node, source, axis - sum(isinstance(i, int) for i in index[:axis]))
            return
        self.unknown(node, "indexing")

    def cat(self, node: torch.fx.Node) -> None:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        ndim = _ndim(node)
        operands = list(tensors) if isinstance(tensors, (list, tuple)) else []
        layouts = [self.layout(t) for t in operands]
        axes = {self.axis(t) for t in operands}
        # a parameter expanded to the batch and concatenated along tokens (ViT's class token): sliced with the channels
        views = [t for t, layout in zip(operands, layouts, strict=True) if layout is None and t in self.parameter_views]
        if views and isinstance(dim, int) and len(views) < len(operands):
            with_layout = [t for t in operands if t not in views]
            stream_axes = {self.axis(t) for t in with_layout}
            channel_axis = min(stream_axes)
            # each view has the channels' count along their axis: sliced with them, not broadcast over them
            spans = all(self.view_spans(v, channel_axis, ndim, _channels(_shape(node), channel_axis)) for v in views)
            if (
                spans
                and all(self.layout(t) for t in with_layout)
                and len(stream_axes) == 1
                and dim % ndim != channel_axis
            ):
                if self.unite(node, [self.layout(t) for t in with_layout], channel_axis):
                    for view in views:
                        self.scale_consumer(view, self.layouts[node], channel_axis, ndim)
                return
        if ndim < 2 or not operands or not all(layouts) or len(axes) != 1 or not isinstance(dim, int):
            self.unknown(node, "a concatenation")
        elif dim % ndim == axes.copy().pop():
            self.set(node, tuple(s for layout in layouts for s in layout), axes.pop())
        else:
            self.unite(node, layouts, axes.pop())

    def pad(self, node: torch.fx.Node) -> None:
        """F.pad of other dims than the channels' and the batch's (MobileViT pads an NCHW map to whole patches, Swin an
        NHWC one to whole windows): channel-wise. Its widths pair up from the last dim backwards."""
        source_node = node.args[0] if node.args else node.kwargs.get("input")
        widths = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
        ndim = _ndim(source_node)
        # a width computed in forward (Swin's pad to whole windows) may pad any dim but these
        padded = (
            {ndim - 1 - i // 2 for i, w in enumerate(widths) if not isinstance(w, int) or w != 0}
            if isinstance(widths, (list, tuple))
            else None
        )
        self.along_other_dims(node, source_node, padded, "a pad of the channel axis")

    def expand(self, node: torch.fx.Node) -> None:
        """A parameter expanded over the batch (ViT's `cls_token.expand(B, -1, -1)`) is a view of it, sliced where it
        meets channels; a tensor with channels expanded along other, single-entry axes keeps them."""
        source_node = node.args[0]
        in_shape, out_shape = _shape(source_node), _shape(node)
        broadcast = (
            in_shape is not None
            and out_shape is not None
            and len(in_shape) == len(out_shape)
            and all(a in (b, 1) for a, b in zip(in_shape, out_shape, strict=True))
        )
        if broadcast and self.own_parameter(source_node) and len(node.users) == 1:
            self.parameter_views[node] = (source_node, False)
        elif broadcast and self.layout(source_node) is not None:
            axis = self.axis(source_node)
            if in_shape[axis] == out_shape[axis]:
                self.carry(node, source_node)
            else:
                self.unknown(node, "an expand of channels")
        else:
            self.unknown(node, "an expand")

    def roll(self, node: torch.fx.Node) -> None:
        """torch.roll along other dims than the channels' and the batch's (Swin's shifted windows): channel-wise."""
        source_node = node.args[0] if node.args else node.kwargs.get("input")
        dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dims")
        dims = [dims] if isinstance(dims, int) else dims
        literal = isinstance(dims, (list, tuple)) and all(isinstance(d, int) for d in dims)
        rolled = {d % _ndim(source_node) for d in dims} if literal else None
        self.along_other_dims(node, source_node, rolled, "a roll over channels")

    def along_other_dims(self, node: torch.fx.Node, source_node: object, dims: set[int] | None, what: str) -> None:
        """An op that moves values along `dims` alone (None: dims not known): channel-wise unless they include the
        channels' or the batch's."""
        if self.layout(source_node) is not None and dims is not None and not dims & {0, self.axis(source_node)}:
            self.carry(node, source_node)
        else:
            self.unknown(node, what)

    def reduction(self, node: torch.fx.Node) -> None:
        dims, keepdim = _reduced_dims(node)
        source_node = node.args[0]
        in_shape, out_shape, axis = _shape(source_node), _shape(node), self.axis(source_node)
        if (
            dims is None
            or in_shape is None
            or out_shape is None
            or len(out_shape) < 2
            or self.layout(source_node) is None
        ):
            self.unknown(node, "a reduction over channels")
            return
        dims = [dims] if isinstance(dims, int) else list(dims) if isinstance(dims, (list, tuple)) else [None]
        if not all(isinstance(d, int) for d in dims):
            self.unknown(node, "a reduction over dims computed in forward")
            return
        dims = [d % len(in_shape) for d in dims]
        if dims == [axis] and keepdim is True and node.target in (torch.mean, "mean"):
            self.statistic(node, self.layouts[source_node])
            return
        if any(d in (0, axis) for d in dims):
            self.unknown(node, "a reduction over channels")
            return
        new_axis = axis if len(out_shape) == len(in_shape) else axis - sum(d < axis for d in dims)
        if _channels(out_shape, new_axis) != in_shape[axis]:
            self.unknown(node, "a reduction")
            return
        self.set(node, self.layouts[source_node], new_axis)

    def statistic(self, node: torch.fx.Node, source: Layout) -> None:
        """A mean over the channel axis, kept as an axis of 1 (LayerNorm written out, ConvNeXt-V2's GlobalResponseNorm):
        once pruned it is the mean of the kept channels, as a pruned LayerNorm's is; the group lists it with its
        LayerNorms."""
        owner = (list(node.meta.get("nn_module_stack") or {}) or [f"the model's {node.name}"])[-1]
        self.statistics[node] = (owner, source)
        for segment in source:
            self.statistic_of.setdefault(segment.space, []).append(owner)
        self.mark(source)


def _reduced_dims(node: torch.fx.Node) -> tuple[object, object]:
    """A reduction's dims and keepdim, as called: a norm's order comes before its dims."""
    first = 2 if node.target in NORMS else 1
    dims = node.args[first] if len(node.args) > first else node.kwargs.get("dim")
    keepdim = node.args[first + 1] if len(node.args) > first + 1 else node.kwargs.get("keepdim", False)
    return dims, keepdim


def _permutation(node: torch.fx.Node, ndim: int) -> list[int] | None:
    """The dim order a permute / transpose / swapaxes produces (output dim i is input dim order[i]); None when not
    literal ints."""
    if not ndim:
        return None
    name = getattr(node.target, "__name__", node.target)
    if name == "permute":
        dims = list(node.args[1:]) or [node.kwargs.get("dims")]
        dims = list(dims[0]) if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else dims
        if (
            len(dims) != ndim
            or not all(isinstance(d, int) for d in dims)
            or sorted(d % ndim for d in dims) != list(range(ndim))
        ):
            return None
        return [d % ndim for d in dims]
    pair = list(node.args[1:]) + [node.kwargs[key] for key in ("dim0", "dim1", "axis0", "axis1") if key in node.kwargs]
    if len(pair) != 2 or not all(isinstance(d, int) for d in pair):
        return None
    order = list(range(ndim))
    a, b = (d % ndim for d in pair)
    order[a], order[b] = order[b], order[a]
    return order


def _axis_after_unit_dims(in_shape: tuple[int, ...], out_shape: tuple[int, ...], axis: int) -> int | None:
    """Where the channel axis lands when a reshape only adds or drops dims of size 1 (beside the batch dim); None
    otherwise."""
    if in_shape[axis] == 1:
        return None
    kept_in = [i for i, size in enumerate(in_shape) if size != 1 or i == 0]
    kept_out = [i for i, size in enumerate(out_shape) if size != 1 or i == 0]
    if [in_shape[i] for i in kept_in] != [out_shape[i] for i in kept_out] or axis not in kept_in:
        return None
    return kept_out[kept_in.index(axis)]


def _requested_sizes(node: torch.fx.Node) -> list[object]:
    """The sizes a view / reshape call asks for: `x.view(1, -1, 1)`, `x.view((1, -1, 1))`, `torch.reshape(x, shape)`."""
    sizes = list(node.args[1:]) or [node.kwargs.get("shape", node.kwargs.get("size"))]
    return list(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)) else sizes


def _literal_slice(index: object) -> bool:
    bounds = (index.start, index.stop, index.step) if isinstance(index, slice) else ()
    return isinstance(index, slice) and all(v is None or isinstance(v, int) for v in bounds)


def _whole(index: object, size: int) -> bool:
    """Does this slice keep a whole axis of `size`, and so any narrower one (its bounds are constants of forward)?"""
    return (
        _literal_slice(index)
        and index.start in (None, 0)
        and index.step in (None, 1)
        and (index.stop is None or index.stop >= size)
    )


def _kind_names(kinds: type | tuple[type, ...]) -> str:
    return " / ".join(kind.__name__ for kind in (kinds if isinstance(kinds, tuple) else (kinds,)))


def _broadcast_size(shape: tuple[int, ...], out_shape: tuple[int, ...] | None, axis: int = 1) -> int:
    """Size of `shape` along the output's channel axis after broadcasting (1 if absent)."""
    if out_shape is None or len(out_shape) < 2:
        return 1
    local = axis - (len(out_shape) - len(shape))
    return shape[local] if 0 <= local < len(shape) else 1


def analyze(model: nn.Module, example_input: torch.Tensor, attention: str = "heads") -> ChannelGraph:
    """Trace `model` and find its channel groups and channel consumers.

    `attention`: what a multi-head attention block (see attention.py) prunes: whole "heads", "head_dim" (the same dims
    of every head), or "none".
    """
    if attention not in ATTENTION_MODES:
        raise PruningError(f"unknown attention mode {attention!r}; choose one of: {', '.join(ATTENTION_MODES)}")
    # in eval mode: a BatchNorm traced through in training mode bakes in an update of the caller's running statistics
    with eval_mode(model):
        graph_module, captured = graph_of(model, example_input, leaf=reads_like_its_layer)
    propagate_shapes(graph_module, example_input)
    walker = _Walker(graph_module, model, attention)
    for node in graph_module.graph.nodes:
        walker.visit(node)
    graph = _collect(walker, graph_module)
    graph.captured = captured
    graph.captured_path = path_of(graph_module) if captured else None
    return graph


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
    group_of_space = {
        space: roots[spaces.find(space)] for space in range(len(spaces.parent)) if spaces.find(space) in roots
    }
    for space, divisor in walker.divisors.items():
        if space in group_of_space:
            group = groups[group_of_space[space]]
            group.divisor = math.lcm(group.divisor, divisor)
    for space in walker.rearranged:
        if space in group_of_space:
            groups[group_of_space[space]].rearranged = True
    for space, block in walker.head_spaces.items():
        groups[group_of_space[space]].heads = block
    for consumer in walker.consumers:
        if consumer.kind in ("layernorm", "groupnorm"):
            for index in {group_of_space.get(s.space) for s in consumer.layout} - {None}:
                groups[index].layer_norms.append(consumer.module)
    for space, owners in walker.statistic_of.items():
        if space in group_of_space:
            norms = groups[group_of_space[space]].layer_norms
            norms += [owner for owner in dict.fromkeys(owners) if owner not in norms]
    for group in groups:
        if group.divisor > 1 and group.size // group.divisor <= 1 and not group.blocked_by:
            group.blocked_by.append(
                f"grouped convolutions split its {group.size} channels into {group.divisor} groups: one per group, "
                "none to prune"
            )
    # the input-space blocks may sit on roots that hold no producer; spaces of blocked roots are already marked
    norm_after: dict[str, str] = {}
    for node, name in walker.module_nodes.items():
        readers = _value_users(node)
        if name in walker.producer_space and len(readers) == 1 and readers[0] in walker.module_nodes:
            norm = walker.module_nodes[readers[0]]
            if isinstance(walker.modules[norm], NORM_TYPES):
                norm_after[name] = norm
    return ChannelGraph(
        groups,
        group_of_producer,
        group_of_space,
        walker.consumers,
        norm_after,
        dict(walker.producer_space),
        _output_producers(graph_module, walker),
        dict(walker.producer_layout),
    )


def _value_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The users that read the tensor's values, not only its shape (`x.ndim` in timm's `_assert(x.ndim == 4)`)."""
    return [
        user
        for user in node.users
        if not (user.op == "call_function" and user.target is getattr and _shape(user) is None)
        and not (user.op == "call_method" and user.target in NON_TENSOR_METHODS)
    ]


def _output_producers(graph_module: torch.fx.GraphModule, walker: _Walker) -> list[str]:
    """Walk back from the output through every op that is not a producing layer (softmax, squeeze, BatchNorm, ...): the
    layers met."""
    found: list[str] = []
    seen: set[torch.fx.Node] = set()
    stack = [node for node in graph_module.graph.nodes if node.op == "output"]
    while stack:
        node = stack.pop()
        for arg in node.all_input_nodes:
            if arg in seen:
                continue
            seen.add(arg)
            if walker.module_nodes.get(arg) in walker.producer_space:
                found.append(walker.module_nodes[arg])
            else:
                stack.append(arg)
    return sorted(found)
