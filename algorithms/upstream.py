"""Re-run only what a change affects: split an fx graph at the first layers a pruning step modifies.

Scanning one layer's sparsities changes that layer and its consumers; every value
computed before them (the *frontier* they read) is the same for every sparsity.
`UpstreamCache` computes the frontier once per evaluation batch and gives later
models only the downstream part to run: the same ops on the same tensors, so the
same numbers to the last bit. It steps aside (runs the plain forward) whenever
reuse could differ: a module in training mode, keyword arguments, other inputs.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn

IN_PLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.ipow, operator.iand, operator.ior}


VIEW_METHODS = {"view", "view_as", "reshape", "flatten", "transpose", "permute", "t", "expand", "expand_as", "squeeze", "unsqueeze", "narrow",
                "select", "chunk", "split", "unbind", "contiguous", "detach", "as_strided", "unflatten", "movedim", "__getitem__"}  # fmt: skip
VIEW_FUNCTIONS = {torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze, torch.narrow, torch.select, torch.chunk,
                  torch.split, torch.unbind, torch.movedim, operator.getitem}  # fmt: skip


def _mutates_first_argument(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if not node.args or not isinstance(node.args[0], torch.fx.Node):
        return False
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).startswith("__")
    if node.op == "call_function":
        return node.target in IN_PLACE_FUNCTIONS or bool(node.kwargs.get("inplace"))
    if node.op == "call_module":
        return bool(getattr(modules.get(str(node.target)), "inplace", False))
    return False


def _storage_roots(nodes: list[torch.fx.Node], modules: dict[str, nn.Module]) -> dict[torch.fx.Node, torch.fx.Node]:
    """For each node, the earliest node whose storage its value may share (through views and in-place ops)."""
    roots: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in nodes:
        viewing = node.op == "call_method" and node.target in VIEW_METHODS or node.op == "call_function" and node.target in VIEW_FUNCTIONS
        aliasing = (viewing or _mutates_first_argument(node, modules)) and node.args and isinstance(node.args[0], torch.fx.Node)
        roots[node] = roots[node.args[0]] if aliasing else node
    return roots


def _reuse_safety(
    nodes: list[torch.fx.Node], downstream: set[torch.fx.Node], frontier: list[torch.fx.Node], modules: dict[str, nn.Module]
) -> tuple[bool, set[int]]:
    """Whether cached frontier values equal what the plain forward reads, and which to copy before the downstream part runs."""
    order = {node: index for index, node in enumerate(nodes)}
    roots = _storage_roots(nodes, modules)
    writers = [n for n in nodes if _mutates_first_argument(n, modules)]
    copy: set[int] = set()
    for index, value in enumerate(frontier):
        first_read = min((order[u] for u in value.users if u in downstream), default=len(nodes))
        mine = [w for w in writers if roots[w.args[0]] is roots[value]]
        if any(w not in downstream and order[w] > first_read for w in mine):
            return False, set()  # the plain forward reads it before a later in-place op changes it
        if any(w in downstream for w in mine):
            if sum(roots[other] is roots[value] for other in frontier) > 1:
                return False, set()  # copying one of two aliased values would separate them
            copy.add(index)
    return True, copy


@dataclass
class GraphSplit:
    """`upstream` maps the model's inputs to the frontier values; `downstream` maps those to the model's output.

    `reusable` is False when an in-place op could make a cached frontier value differ from what the plain forward reads.
    """

    upstream: torch.fx.Graph
    downstream: torch.fx.Graph
    frontier: list[str]
    copy_before_use: set[int] = field(default_factory=set)  # frontier positions an in-place op downstream would overwrite
    reusable: bool = True


def split_graph(graph_module: torch.fx.GraphModule, changed_modules: Iterable[str]) -> GraphSplit:
    """Split at the calls of `changed_modules`: everything they feed, directly or not, is downstream."""
    changed = set(changed_modules)
    modules = dict(graph_module.named_modules())
    downstream: set[torch.fx.Node] = set()
    for node in graph_module.graph.nodes:
        if node.op == "output":
            continue
        if node.op == "call_module" and str(node.target) in changed or any(arg in downstream for arg in node.all_input_nodes):
            downstream.add(node)
    frontier = [
        node
        for node in graph_module.graph.nodes
        if node not in downstream and node.op not in ("output", "get_attr") and any(u in downstream for u in node.users)
    ]
    output = next(node for node in graph_module.graph.nodes if node.op == "output")
    frontier += [n for n in output.all_input_nodes if n not in downstream and n not in frontier and n.op != "get_attr"]

    upstream_graph, up_values = torch.fx.Graph(), {}
    for node in graph_module.graph.nodes:
        if node not in downstream and node.op != "output":
            up_values[node] = upstream_graph.node_copy(node, lambda n: up_values[n])
    upstream_graph.output(tuple(up_values[n] for n in frontier))

    downstream_graph, down_values = torch.fx.Graph(), {}
    for node in frontier:
        down_values[node] = downstream_graph.placeholder(node.name)
    for node in graph_module.graph.nodes:
        if node.op == "get_attr" and any(u in downstream or u is output for u in node.users):
            down_values[node] = downstream_graph.node_copy(node, lambda n: down_values[n])
        elif node in downstream or node.op == "output":
            down_values[node] = downstream_graph.node_copy(node, lambda n: down_values[n])
    reusable, copy = _reuse_safety(list(graph_module.graph.nodes), downstream, frontier, modules)
    return GraphSplit(upstream_graph, downstream_graph, [n.name for n in frontier], copy, reusable)


def _graph_module(root: nn.Module, graph: torch.fx.Graph) -> torch.fx.GraphModule:
    fresh = torch.fx.Graph()
    fresh.output(fresh.graph_copy(graph, {}))
    return torch.fx.GraphModule(root, fresh)


@dataclass
class _Entry:
    inputs: tuple[torch.Tensor, ...]
    frontier: tuple[torch.Tensor, ...]


def _same_tensors(a: tuple[torch.Tensor, ...], b: tuple[object, ...]) -> bool:
    return len(a) == len(b) and all(
        isinstance(y, torch.Tensor) and x.shape == y.shape and x.dtype == y.dtype and x.device == y.device and torch.equal(x, y)
        for x, y in zip(a, b, strict=True)
    )


class UpstreamCache:
    """Frontier values by forward call (the k-th call of one evaluation run), shared by every model of one split.

    Call `new_run()` before each evaluation; `install(model)` routes `model`'s forward through the cache.
    Memory is bounded by `limit_bytes`: calls past it are computed in full, which is slower, never different.
    """

    def __init__(self, split: GraphSplit, limit_bytes: int = 2 << 30) -> None:
        self.split, self.limit_bytes = split, limit_bytes
        self.entries: list[_Entry] = []
        self.position = 0
        self.stored_bytes = 0
        self.hits = self.misses = 0

    def new_run(self) -> None:
        self.position = 0

    def install(self, model: nn.Module) -> nn.Module:
        """Give `model` (a pruned or masked copy that matches the split) a forward that reuses the frontier."""
        plain = type(model).forward.__get__(model)
        parts: dict[str, torch.fx.GraphModule] = {}

        def part(name: str) -> torch.fx.GraphModule:
            if name not in parts:
                parts[name] = _graph_module(model, getattr(self.split, name))
            return parts[name]

        def forward(*args: object, **kwargs: object) -> object:
            if not self.split.reusable or kwargs or any(m.training for m in model.modules()) or not all(isinstance(a, torch.Tensor) for a in args):
                return plain(*args, **kwargs)
            frontier = self._frontier(args, lambda: part("upstream")(*args))
            frontier = tuple(v.clone() if i in self.split.copy_before_use else v for i, v in enumerate(frontier))
            return part("downstream")(*frontier)

        model.__dict__["forward"] = forward  # an instance attribute: nn.Module.__call__ finds it before the class method
        return model

    def _frontier(self, args: tuple[torch.Tensor, ...], compute: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        position, self.position = self.position, self.position + 1
        if position < len(self.entries) and _same_tensors(self.entries[position].inputs, args):
            self.hits += 1
            return self.entries[position].frontier
        self.misses += 1
        with torch.inference_mode(False), torch.no_grad():
            frontier = tuple(v.detach() if isinstance(v, torch.Tensor) else v for v in compute())
        size = sum(t.numel() * t.element_size() for t in (*args, *frontier) if isinstance(t, torch.Tensor))
        entry = _Entry(tuple(a.detach().clone() for a in args), frontier)
        if position < len(self.entries):
            self.stored_bytes -= sum(
                t.numel() * t.element_size() for t in (*self.entries[position].inputs, *self.entries[position].frontier) if isinstance(t, torch.Tensor)
            )
            self.entries[position] = entry
            self.stored_bytes += size
        elif position == len(self.entries) and self.stored_bytes + size <= self.limit_bytes:
            self.entries.append(entry)
            self.stored_bytes += size
        return frontier
