"""A graph for models torch.fx cannot trace symbolically: trace them again with every op also run on the example input,
so that what their forward asks of a tensor's shape in Python (`math.ceil(H / patch)`, a branch on `if new_h != H`,
its length) has the example's answer. The graph is then the one inputs of the example's shape take (MobileViT's
shape-dependent `if`): the channel analysis only needs that one, and the pruned model still runs its own forward.
A branch on a tensor's values (`if x.sum() > 0`) is still refused: the graph would be this example's data's alone.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn

from .errors import PruningError, first_line
from .tracing import _offending_frame, _Tracer, op_name, trace, traced_by

_VALUE_ATTRIBUTES = {"shape", "ndim", "dtype", "device", "is_cuda", "layout", "requires_grad"}
# what fx's tracer replaces while it traces (a module call becomes a node, a parameter read a proxy): the real ones run
# the example input through a module, or read a parameter, meanwhile
_MODULE_CALL, _MODULE_GETATTR = nn.Module.__call__, nn.Module.__getattr__


@contextlib.contextmanager
def _untraced() -> Iterator[None]:
    traced = nn.Module.__call__, nn.Module.__getattr__
    nn.Module.__call__, nn.Module.__getattr__ = _MODULE_CALL, _MODULE_GETATTR
    try:
        yield
    finally:
        nn.Module.__call__, nn.Module.__getattr__ = traced


class _ValuedProxy(torch.fx.Proxy):
    """A proxy that knows its op's value on the example input, and answers Python's questions with it."""

    def _value(self) -> Any:
        return self.tracer.values[self.node]

    def __getattr__(self, name: str) -> Any:
        if name in _VALUE_ATTRIBUTES:
            return getattr(self._value(), name)
        return _ValuedAttribute(self, name)

    def size(self, dim: int | None = None) -> Any:
        return self._value().size() if dim is None else self._value().size(dim)

    def dim(self) -> int:
        return self._value().dim()

    def numel(self) -> int:
        return self._value().numel()

    def _number(self) -> Any:
        """A Python number the forward computes from a tensor's shape; never from its values, which would give a graph
        of this example's data alone."""
        value = self._value()
        if isinstance(value, torch.Tensor):
            raise torch.fx.proxy.TraceError(
                "a branch or a number taken from a tensor's values: the graph would hold for this example's data alone"
            )
        return value

    def __bool__(self) -> bool:
        return bool(self._number())

    def __int__(self) -> int:
        return int(self._number())

    def __index__(self) -> int:
        return int(self._number())

    def __float__(self) -> float:
        return float(self._number())

    def __len__(self) -> int:
        return len(self._value())

    def __iter__(self) -> Any:
        return iter([self[i] for i in range(len(self._value()))])


class _ValuedAttribute(_ValuedProxy, torch.fx.proxy.Attribute):
    """`x.T`, `x.mT` and methods about to be called: valued from the tensor they are read off, without a node yet."""

    def _value(self) -> Any:
        return getattr(self.root._value(), self.attr)


class _ValuedTracer(_Tracer):
    def __init__(self, leaf: Callable[[nn.Module], bool], example_input: torch.Tensor) -> None:
        super().__init__(leaf)
        self.values: dict[torch.fx.Node, Any] = {}
        self.inputs = [example_input]

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return _ValuedProxy(node, self)

    def create_proxy(
        self,
        kind: str,
        target: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        name: str | None = None,
        type_expr: Any | None = None,
        proxy_factory_fn: Callable[[torch.fx.Node], torch.fx.Proxy] | None = None,
    ) -> torch.fx.Proxy:
        value = self._run(kind, target, args, kwargs)
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        self.values[proxy.node] = value
        return proxy

    def _run(self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The op on the values of its arguments: what the model computes there on the example input. A Python value
        read off a tensor's data (`.item()`, `.tolist()`, `torch.equal`) is refused: a branch on it would be this
        example's alone."""
        value = self._computed(kind, target, args, kwargs)
        if kind in ("call_function", "call_method") and not _tensors_or_none(value):
            raise torch.fx.proxy.TraceError(
                "a branch or a number taken from a tensor's values: the graph would hold for this example's data alone"
            )
        return value

    def _computed(self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        def real(value: Any) -> Any:
            return torch.fx.node.map_aggregate(value, lambda v: v._value() if isinstance(v, _ValuedProxy) else v)

        args, kwargs = real(args), real(kwargs)
        if kind == "placeholder":  # the example input; then any other argument's default
            return self.inputs.pop(0) if self.inputs else (args[0] if args else None)
        with _untraced():
            if kind == "get_attr":
                return operator.attrgetter(target)(self.root)
            if kind == "call_function":
                return target(*args, **kwargs)
            if kind == "call_method":
                return getattr(args[0], target)(*args[1:], **kwargs)
            if kind == "call_module":
                return self.root.get_submodule(target)(*args, **kwargs)
        return None  # the output


def _tensors_or_none(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_tensors_or_none(v) for v in value)
    return value is None or isinstance(value, torch.Tensor)


# ops whose literal arguments may hold a channel count read from a shape, legitimately different once pruned (the
# channel analysis checked what they do to channels): anywhere else a changed number is a width used as a number
_SHAPED = {"reshape", "view", "flatten", "expand", "split", "chunk", "getitem", "reshape_as", "view_as", "new_zeros"}


def _literals(node: torch.fx.Node) -> list[Any]:
    """The numbers (and other constants) an op is handed, in order: what a width asked in Python would end up in."""
    found: list[Any] = []
    torch.fx.node.map_aggregate(
        (node.args, node.kwargs), lambda v: None if isinstance(v, torch.fx.Node) else found.append(v)
    )
    return found


@dataclass(frozen=True)
class Step:
    """One op of the path an input takes through a forward, with the numbers it is handed where they would betray a
    channel count used as a number (None: an op whose numbers may hold one legitimately, or no call)."""

    name: str
    op: str
    target: Any
    call: str  # as written in forward
    numbers: tuple[Any, ...] | None


def path_of(graph_module: torch.fx.GraphModule) -> list[Step]:
    steps = []
    for node in graph_module.graph.nodes:
        called = node.op in ("call_function", "call_method") and op_name(node) not in _SHAPED
        numbers = tuple(_literals(node)) if called else None
        steps.append(Step(node.name, node.op, node.target, op_name(node), numbers))
    return steps


def path_change(before: list[Step], after: list[Step]) -> str | None:
    """How the path a pruned model takes on the example differs from its original's, in words; None if it is the
    same. A forward that asks a channel count in Python (`if x.shape[1] != y.shape[1]`) may take another branch, or
    compute another number, once pruned: the analysis saw the original's only."""
    for old, new in zip(before, after, strict=False):
        if (old.op, old.target) != (new.op, new.target):
            return f"it runs {new.name} where the original ran {old.name}"
        if old.numbers != new.numbers:
            return f"{old.name} ({old.call}) is handed other numbers"
    if len(before) != len(after):
        return f"it runs {len(after)} ops where the original ran {len(before)}"
    return None


def capture(
    model: nn.Module, example_input: torch.Tensor, leaf: Callable[[nn.Module], bool] | None = None
) -> torch.fx.GraphModule:
    """The graph `example_input` takes through `model`'s forward (see the module docstring); the model is left as it
    was."""
    with torch.no_grad():
        return traced_by(model, leaf, lambda is_leaf: _ValuedTracer(is_leaf, example_input.clone()))


def graph_of(
    model: nn.Module, example_input: torch.Tensor, leaf: Callable[[nn.Module], bool] | None = None
) -> tuple[torch.fx.GraphModule, str | None]:
    """The model's symbolic fx graph, or, where fx cannot trace it, the graph captured on the example input, with why
    (None when traced symbolically)."""
    try:
        return trace(model, leaf), None
    except PruningError as untraceable:
        why = str(untraceable).split(";")[0]
    try:
        return capture(model, example_input, leaf), f"{why}; the graph was captured on the example input instead"
    except Exception as error:  # whatever stops the capture too: named with the user's line it stopped at
        raise PruningError(
            f"torch.fx cannot trace or capture {type(model).__name__}{_offending_frame(error)}: "
            f"{first_line(error) or type(error).__name__}; make that line work on tensors alone, or wrap the call with "
            "torch.fx.wrap"
        ) from None
