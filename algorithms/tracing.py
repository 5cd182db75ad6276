"""torch.fx tracing and shape propagation, with errors that name the user's offending line."""

from __future__ import annotations

import contextlib
import io
import os
import traceback
from collections.abc import Callable, Iterator

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import PruningError, first_line
from .modules import eval_mode

_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(os.path.abspath(__file__))


def _offending_frame(error: BaseException) -> str:
    """The innermost traceback frame outside torch and this package: the user's call that fx could not trace."""
    frames = [
        f
        for f in traceback.extract_tb(error.__traceback__)
        if not f.filename.startswith((_TORCH_DIR, _OWN_DIR + os.sep))
    ]
    if not frames:
        return ""
    frame = frames[-1]
    return f" at {os.path.basename(frame.filename)}:{frame.lineno} `{(frame.line or '').strip()}`"


@contextlib.contextmanager
def attributes_kept(model: nn.Module) -> Iterator[None]:
    """Every module's plain attributes as they were, afterwards: a forward traced with proxies may store them (timm's
    LeViT and EfficientFormer cache attention biases in a dict when not training), which would leave the caller's model
    holding proxies, and its next trace failing."""
    saved = [
        (
            module,
            dict(vars(module)),
            # what each container held (None: empty; most are, and copying them all cost a third of a trace)
            {key: value.copy() or None for key, value in vars(module).items() if isinstance(value, (dict, list, set))},
        )
        for module in model.modules()
    ]
    try:
        yield
    finally:
        for module, attributes, contents in saved:
            for key in set(vars(module)) - set(attributes):
                del module.__dict__[key]
            module.__dict__.update(attributes)
            for key, content in contents.items():  # the same container, with what it held
                container = attributes[key]
                if content is None:
                    if container:
                        container.clear()
                elif isinstance(container, list):
                    container[:] = content
                else:
                    container.clear()
                    container.update(content)


@contextlib.contextmanager
def buffers_kept(model: nn.Module) -> Iterator[None]:
    """Every buffer's values as they were, afterwards: a forward run to see shapes or values may update one in place
    (a step counter, `self.seen += 1`)."""
    saved = [(buffer, buffer.clone()) for buffer in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


class _Tracer(torch.fx.Tracer):
    """fx's tracer, finding a parameter or buffer by identity in one dict: fx searches the whole model's parameters at
    every tensor attribute read inside a traced-through module (timm's BatchNormAct2d reads four), and all of its
    buffers for every tensor handed to an op: quadratic in the model's size (two thirds of a timm RepVGG's prune)."""

    def __init__(self, leaf: Callable[[nn.Module], bool] | None = None) -> None:
        super().__init__()
        self.leaf = leaf

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return super().is_leaf_module(module, qualified_name) or self.leaf is not None and self.leaf(module)

    def trace(self, root: nn.Module, concrete_args: dict | None = None) -> torch.fx.Graph:
        self.names: dict[int, str] = {}
        for name, tensor in (*root.named_parameters(), *root.named_buffers()):
            self.names.setdefault(id(tensor), name)
        return super().trace(root, concrete_args)

    def create_arg(self, a: object) -> object:
        name = self.names.get(id(a)) if isinstance(a, torch.Tensor) else None  # fx: a search of every buffer
        return self.create_node("get_attr", name, (), {}) if name is not None else super().create_arg(a)

    def getattr(self, attr: str, attr_val: object, parameter_proxy_cache: dict[str, torch.fx.Proxy]) -> object:
        name = self.names.get(id(attr_val)) if isinstance(attr_val, torch.Tensor) else None
        if name is None or not isinstance(attr_val, nn.Parameter) and not self.proxy_buffer_attributes:
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]


def traced_by(
    model: nn.Module,
    leaf: Callable[[nn.Module], bool] | None,
    tracer: Callable[[Callable[[nn.Module], bool]], _Tracer] = _Tracer,
) -> torch.fx.GraphModule:
    """The graph `tracer` (given which modules to call, not trace through) makes of `model`; the model is left as it
    was: its plain attributes (see attributes_kept) and buffers (fx hands them to the forward as they are)."""
    with attributes_kept(model), buffers_kept(model):
        # decided before tracing: `leaf` may trace a module itself, which inside fx's trace would record there
        leaves = {id(module) for module in model.modules() if leaf(module)} if leaf is not None else set()
        made = tracer(lambda module: id(module) in leaves)
        graph = made.trace(model)
        return torch.fx.GraphModule(made.root, graph, type(model).__name__)


def trace(model: nn.Module, leaf: Callable[[nn.Module], bool] | None = None) -> torch.fx.GraphModule:
    """The model's fx graph (as torch.fx.symbolic_trace makes it, with the modules `leaf` names called, not traced
    through, as well)."""
    try:
        return traced_by(model, leaf)
    except Exception as error:  # fx raises TraceError, TypeError, AttributeError, ... depending on the construct
        raise PruningError(
            f"torch.fx cannot trace {type(model).__name__}{_offending_frame(error)}: "
            f"{first_line(error) or type(error).__name__}; make forward free of data-dependent Python control flow, "
            "or wrap that call with torch.fx.wrap"
        ) from None


def op_name(node: torch.fx.Node) -> str:
    """A call's name as written in forward: `reshape` for x.reshape(...) and torch.reshape(...) alike."""
    return str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))


def node_shape(node: object) -> tuple[int, ...] | None:
    """The shape shape propagation recorded for a node's tensor; None for anything else (a number, a tuple)."""
    meta = getattr(node, "meta", {}).get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def propagate_shapes(graph_module: torch.fx.GraphModule, example_input: torch.Tensor) -> None:
    """Fill node.meta['tensor_meta'] by running the graph once in eval mode (BN stats untouched)."""
    try:
        with eval_mode(graph_module), torch.no_grad(), buffers_kept(graph_module):
            # a model may change its input in place: never the caller's; ShapeProp prints a traceback before raising
            with contextlib.redirect_stderr(io.StringIO()):
                ShapeProp(graph_module).propagate(example_input.clone())
    except Exception as error:
        raise PruningError(
            f"the model failed on the example input of shape {tuple(example_input.shape)}: {str(error).splitlines()[0]}"
        ) from None
