"""Re-run only what a change affects: split an fx graph at the first layers a pruning step modifies.

Scanning one layer's sparsities changes that layer and its consumers; every value
computed before them (the *frontier* they read) is the same for every sparsity.
`UpstreamCache` computes the frontier once per evaluation batch and gives later
models only the downstream part to run: the same ops on the same tensors, so the
same numbers to the last bit. `FrontierRecorder` collects every unit's frontier
while the unpruned model is evaluated, so no unit runs its upstream part at all.

Exactness is guarded three ways. Structurally: values that may share storage are
grouped conservatively (anything not known to return a fresh tensor may alias its
inputs) and a split whose kept values an in-place op could change is not reused.
At run time: reuse steps aside (plain forward) for a module in training mode, with
gradients on, with hooks on a submodule, after a weight changed in place, for
keyword or non-tensor inputs. By measurement: the first batch each cache or
recorder serves is also run plainly and must match bit for bit, or reuse is off.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .errors import PruningError

FRESH_MODULES = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Linear,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
FRESH_ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
)
FRESH_FUNCTIONS = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.cat,
    torch.conv2d,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    torch.matmul,
    F.conv2d,
    F.linear,
    F.relu,
    F.gelu,
    F.silu,
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.batch_norm,
}
FRESH_METHODS = {
    "add",
    "sub",
    "mul",
    "div",
    "relu",
    "sigmoid",
    "tanh",
    "mean",
    "sum",
    "amax",
    "clone",
    "matmul",
    "size",
    "dim",
}
IN_PLACE_OPERATORS = {
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    operator.ifloordiv,
    operator.imod,
    operator.ipow,
    operator.ilshift,
    operator.irshift,
    operator.iand,
    operator.ior,
    operator.ixor,
    operator.imatmul,
}


def _writes_inputs(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """May this node change one of its input tensors in place?"""
    if node.kwargs.get("inplace") or "out" in node.kwargs:
        return True
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).startswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.target in IN_PLACE_OPERATORS or (name.endswith("_") and not name.startswith("__"))
    if node.op == "call_module":
        return bool(getattr(modules.get(str(node.target)), "inplace", False))
    return False


def _fresh_output(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Is this node known to return a new tensor (never a view or one of its inputs)?"""
    if _writes_inputs(node, modules):
        return False
    if node.op == "call_module":
        module = modules.get(str(node.target))
        return (
            isinstance(module, FRESH_MODULES)
            or isinstance(module, FRESH_ACTIVATIONS)
            and not getattr(module, "inplace", False)
        )
    if node.op == "call_function":
        return node.target in FRESH_FUNCTIONS
    if node.op == "call_method":
        return node.target in FRESH_METHODS
    return node.op in ("placeholder", "get_attr")


class _AliasClasses:
    """Union-find over nodes whose values may share storage."""

    def __init__(self, nodes: list[torch.fx.Node], modules: dict[str, nn.Module]) -> None:
        self.parent = {node: node for node in nodes}
        for node in nodes:
            if node.op != "output" and not _fresh_output(node, modules):
                for source in node.all_input_nodes:
                    self.parent[self.find(source)] = self.find(node)

    def find(self, node: torch.fx.Node) -> torch.fx.Node:
        while self.parent[node] is not node:
            self.parent[node] = self.parent[self.parent[node]]
            node = self.parent[node]
        return node


@dataclass
class GraphSplit:
    """`upstream` maps the model's inputs to the frontier values; `downstream` maps those to the model's output.

    `reusable`: cached frontier values equal what the plain forward reads. `shareable`: so do copies taken the
    moment the full forward produces them (what `FrontierRecorder` keeps).
    """

    upstream: torch.fx.Graph
    downstream: torch.fx.Graph
    frontier: list[str]
    # positions a downstream in-place op or the caller could change
    copy_before_use: set[int] = field(default_factory=set)
    reusable: bool = True
    shareable: bool = True
    skips_work: bool = True  # False when the split sits on the model's inputs: nothing upstream to reuse


def _safety(
    nodes: list[torch.fx.Node],
    downstream: set[torch.fx.Node],
    frontier: list[torch.fx.Node],
    modules: dict[str, nn.Module],
) -> tuple[bool, bool, set[int]]:
    order = {node: index for index, node in enumerate(nodes)}
    alias = _AliasClasses(nodes, modules)
    writes = [(node, {alias.find(n) for n in node.all_input_nodes}) for node in nodes if _writes_inputs(node, modules)]
    inputs = {alias.find(n) for n in nodes if n.op == "placeholder"}
    if any(written & inputs for _, written in writes):
        # the model changes its own input: a cached key would not be the batch the caller passed
        return (False, False, set())
    output = next(n for n in nodes if n.op == "output")
    returned = {alias.find(n) for n in output.all_input_nodes}
    copy: set[int] = set()
    shareable = True
    for index, value in enumerate(frontier):
        group = alias.find(value)
        reads = [order[u] for u in value.users if u in downstream] or [len(nodes)]
        for writer, written in writes:
            if group not in written:
                continue
            if writer not in downstream and order[writer] > min(reads):
                return False, False, set()  # the plain forward reads the value before a later in-place op changes it
            if writer in downstream:
                later_upstream_reads = [
                    n
                    for n in nodes
                    if n not in downstream
                    and order[n] > order[writer]
                    and group in {alias.find(a) for a in n.all_input_nodes}
                ]
                if later_upstream_reads or sum(alias.find(other) is group for other in frontier) > 1:
                    # the upstream part would not see the write, or a copy would separate two aliases
                    return (False, False, set())
                copy.add(index)
            shareable = shareable and not order[value] < order[writer] <= max(reads)
        if group in returned:
            copy.add(index)  # handed to the caller: a change there must not reach the cache
    return True, shareable, copy


def split_graph(graph_module: torch.fx.GraphModule, changed_modules: Iterable[str]) -> GraphSplit:
    """Split at the calls of `changed_modules` (and reads of their tensors, or of changed tensors named directly):
    everything they feed is downstream."""
    changed = set(changed_modules)
    modules = dict(graph_module.named_modules())
    nodes = list(graph_module.graph.nodes)
    downstream: set[torch.fx.Node] = set()
    for node in nodes:
        target = str(node.target)
        changes = (
            node.op == "call_module"
            and target in changed
            or node.op == "get_attr"
            and (target in changed or target.rpartition(".")[0] in changed)
        )
        if node.op != "output" and (changes or any(arg in downstream for arg in node.all_input_nodes)):
            downstream.add(node)
    output = nodes[-1]
    frontier = [
        n
        for n in nodes
        if n not in downstream
        and n.op not in ("output", "get_attr")
        and any(u in downstream or u is output for u in n.users)
    ]

    upstream_graph, up_values = torch.fx.Graph(), {}
    for node in nodes:
        if node not in downstream and node.op != "output":
            up_values[node] = upstream_graph.node_copy(node, lambda n: up_values[n])
    upstream_graph.output(tuple(up_values[n] for n in frontier))

    downstream_graph, down_values = torch.fx.Graph(), {}
    for node in frontier:
        down_values[node] = downstream_graph.placeholder(node.name)
    for node in nodes:
        if (
            node.op == "get_attr"
            and any(u in downstream or u is output for u in node.users)
            or node in downstream
            or node.op == "output"
        ):
            down_values[node] = downstream_graph.node_copy(node, lambda n: down_values[n])
            _normalized_shape_from_weight(downstream_graph, down_values[node])
    reusable, shareable, copy = _safety(nodes, downstream, frontier, modules)
    skips_work = any(node.op != "placeholder" for node in frontier)
    return GraphSplit(
        upstream_graph, downstream_graph, [n.name for n in frontier], copy, reusable, shareable, skips_work
    )


def _normalized_shape_from_weight(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """fx bakes `self.normalized_shape` of a traced-through LayerNorm (torchvision's LayerNorm2d) into the graph as a
    literal; a pruned copy has fewer channels, so the downstream part reads the shape off the weight it is given."""
    if node.op != "call_function" or node.target is not F.layer_norm:
        return
    weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
    if isinstance(weight, torch.fx.Node) and len(node.args) > 1:
        with graph.inserting_before(node):
            shape = graph.call_function(getattr, (weight, "shape"))
        node.args = (node.args[0], shape, *node.args[2:])


def _graph_module(root: nn.Module, graph: torch.fx.Graph) -> torch.fx.GraphModule:
    fresh = torch.fx.Graph()
    fresh.output(fresh.graph_copy(graph, {}))
    return torch.fx.GraphModule(root, fresh)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes: -0.0 and 0.0 differ, NaNs with equal payloads match."""
    return tensor.detach().contiguous().view(torch.uint8)


def identical(a: object, b: object) -> bool:
    """Bit-for-bit equality of (nested) outputs."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and a.device == b.device
            and torch.equal(_bits(a), _bits(b))
        )
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
    return bool(a == b)


def _same_key(stored: tuple[torch.Tensor, ...], args: tuple[object, ...]) -> bool:
    return len(stored) == len(args) and all(
        isinstance(y, torch.Tensor) and x.stride() == y.stride() and identical(x, y)
        for x, y in zip(stored, args, strict=True)
    )


def _nbytes(values: Iterable[object]) -> int:
    return sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))


def _copy(value: object) -> object:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def _reuse_allowed(
    model: nn.Module, args: tuple[object, ...], kwargs: dict[str, object], versions: list[tuple[torch.Tensor, int]]
) -> bool:
    """Conditions under which the cached values are exactly what the plain forward would compute now."""
    if kwargs or not args or not all(isinstance(a, torch.Tensor) for a in args) or torch.is_grad_enabled():
        return False
    for name, module in model.named_modules():
        if module.training or name and (module._forward_hooks or module._forward_pre_hooks):
            return False
    return all(tensor._version == version for tensor, version in versions)


class _RoutedForward:
    """The forward installed on a model while it is evaluated; refuses to be copied with it (the copy would run this
    model)."""

    def __init__(self, call: Any) -> None:
        self.call = call

    def __call__(self, *args: object, **kwargs: object) -> object:
        return self.call(*args, **kwargs)

    def __deepcopy__(self, memo: object) -> None:
        raise PruningError(
            "val_func copied the model it was given while upstream reuse was on; pass reuse_upstream=False to "
            "SensitivityAnalysis"
        )

    def __reduce__(self) -> None:
        raise PruningError(
            "val_func pickled the model it was given while upstream reuse was on; pass reuse_upstream=False to "
            "SensitivityAnalysis"
        )


def _install(model: nn.Module, forward: Any) -> nn.Module:
    # an instance attribute: nn.Module.__call__ finds it before the class method
    model.__dict__["forward"] = _RoutedForward(forward)
    return model


def uninstall(model: nn.Module) -> nn.Module:
    model.__dict__.pop("forward", None)
    return model


def _versions(model: nn.Module) -> list[tuple[torch.Tensor, int]]:
    return [(t, t._version) for t in (*model.parameters(), *model.buffers())]


@dataclass
class _Entry:
    inputs: tuple[torch.Tensor, ...]
    frontier: tuple[object, ...]
    owned_bytes: int  # 0 for values the recorder owns


class UpstreamCache:
    """Frontier values by forward call (the k-th call of one evaluation run), shared by every model of one split.

    `new_run()` before each evaluation; `install(model)` routes a variant's forward through the cache, `uninstall`
    undoes it. Entries this cache computes are capped at `limit_bytes`; calls past it run in full (slower, never
    different).
    """

    def __init__(self, split: GraphSplit, limit_bytes: int = 2 << 30) -> None:
        self.split, self.limit_bytes = split, limit_bytes
        self.entries: list[_Entry] = []
        self.position = self.stored_bytes = self.hits = 0
        self.verified = False
        self.enabled = split.reusable

    def new_run(self) -> None:
        self.position = 0

    def seed(self, recorder: FrontierRecorder) -> None:
        """Start from the values the recorder kept while the unpruned model was evaluated."""
        if self.enabled and self.split.shareable:
            for inputs, values in recorder.entries:
                if not all(name in values for name in self.split.frontier):
                    break
                self.entries.append(_Entry(inputs, tuple(values[name] for name in self.split.frontier), 0))

    def install(self, model: nn.Module) -> nn.Module:
        plain = type(model).forward.__get__(model)
        versions = _versions(model)
        parts: dict[str, torch.fx.GraphModule] = {}

        def part(name: str) -> torch.fx.GraphModule:
            if name not in parts:
                parts[name] = _graph_module(model, getattr(self.split, name))
            return parts[name]

        def forward(*args: object, **kwargs: object) -> object:
            if not self.enabled or not _reuse_allowed(model, args, kwargs, versions):
                return plain(*args, **kwargs)
            frontier, cached = self._frontier(args, part)
            frontier = tuple(_copy(v) if i in self.split.copy_before_use else v for i, v in enumerate(frontier))
            if not self.verified:
                self.verified = True
                reference = plain(*args)
                try:
                    output = part("downstream")(*frontier)
                except Exception:  # e.g. a size fx baked into the graph that the pruned model no longer has
                    output = None
                if output is None or not identical(output, reference):
                    self.enabled = False  # the split does not reproduce this model: plain forwards from now on
                    return reference
                self.hits += cached
                return output
            try:
                output = part("downstream")(*frontier)
            # a later variant the first one did not represent (it pruned nothing, say): the plain forward from now on
            except Exception:
                self.enabled = False
                return plain(*args, **kwargs)
            self.hits += cached
            return output

        return _install(model, forward)

    def _frontier(self, args: tuple[torch.Tensor, ...], part: Any) -> tuple[tuple[object, ...], bool]:
        """The frontier values for this call, and whether they came from the cache (rather than the upstream part run
        now)."""
        position, self.position = self.position, self.position + 1
        if position < len(self.entries) and _same_key(self.entries[position].inputs, args):
            return self.entries[position].frontier, True
        key, private = tuple(_copy(a) for a in args), tuple(_copy(a) for a in args)  # neither is the caller's tensor
        with torch.inference_mode(False), torch.no_grad():
            frontier = tuple(part("upstream")(*private))
        size = _nbytes((*key, *private, *frontier))
        if position < len(self.entries):
            self.stored_bytes -= self.entries[position].owned_bytes
            self.entries[position] = _Entry(key, frontier, size)
            self.stored_bytes += size
        elif position == len(self.entries) and self.stored_bytes + size <= self.limit_bytes:
            self.entries.append(_Entry(key, frontier, size))
            self.stored_bytes += size
        return frontier, False


class FrontierRecorder:
    """Evaluates the unpruned model through a graph that also copies every value some split needs, when it is produced.

    One full forward per batch then serves every unit's first sparsity. Capped at `limit_bytes`; batches past it are not
    kept.
    """

    def __init__(self, graph_module: torch.fx.GraphModule, names: Iterable[str], limit_bytes: int = 2 << 30) -> None:
        wanted = set(names)
        self.names = [node.name for node in graph_module.graph.nodes if node.name in wanted]
        self.graph_module, self.limit_bytes = graph_module, limit_bytes
        self.entries: list[tuple[tuple[torch.Tensor, ...], dict[str, object]]] = []
        self.stored_bytes = 0
        self.enabled, self.verified = True, False

    def _recording_graph(self) -> torch.fx.Graph:
        graph, values, kept = torch.fx.Graph(), {}, {}
        for node in self.graph_module.graph.nodes:
            if node.op == "output":
                graph.output(
                    (torch.fx.node.map_arg(node.args[0], lambda n: values[n]), tuple(kept[name] for name in self.names))
                )
                continue
            values[node] = graph.node_copy(node, lambda n: values[n])
            if node.name in self.names:
                # a copy taken the moment the value is produced
                kept[node.name] = graph.call_function(_copy, (values[node],))
        return graph

    def install(self, model: nn.Module) -> nn.Module:
        """Route `model`'s forward (a copy of the unpruned model) through the recording graph."""
        plain = type(model).forward.__get__(model)
        versions = _versions(model)
        recording = torch.fx.GraphModule(model, self._recording_graph())

        def forward(*args: object, **kwargs: object) -> object:
            if not self.enabled or not _reuse_allowed(model, args, kwargs, versions):
                return plain(*args, **kwargs)
            key = tuple(_copy(a) for a in args)
            with torch.inference_mode(False), torch.no_grad():
                output, kept = recording(*args)
            if not self.verified:
                self.verified = True
                reference = plain(*key)
                if not identical(output, reference):
                    self.enabled, self.entries = False, []
                    return reference
            size = _nbytes((*key, *kept))
            if self.stored_bytes + size <= self.limit_bytes:
                self.entries.append((key, dict(zip(self.names, kept, strict=True))))
                self.stored_bytes += size
            return output

        return _install(model, forward)
