"""torch.fx tracing and shape propagation, with errors that name the user's offending line."""

from __future__ import annotations

import os
import traceback

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import PruningError
from .modules import eval_mode

_TORCH_DIR = os.path.dirname(torch.__file__)


def _offending_frame(error: BaseException) -> str:
    """The innermost traceback frame outside torch itself: the user's call that fx could not trace."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if not f.filename.startswith(_TORCH_DIR)]
    if not frames:
        return ""
    frame = frames[-1]
    return f" at {os.path.basename(frame.filename)}:{frame.lineno} `{(frame.line or '').strip()}`"


def trace(model: nn.Module) -> torch.fx.GraphModule:
    try:
        return torch.fx.symbolic_trace(model)
    except Exception as error:  # fx raises TraceError, TypeError, AttributeError, ... depending on the construct
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PruningError(
            f"torch.fx cannot trace {type(model).__name__}{_offending_frame(error)}: {first_line}; make forward free "
            "of data-dependent Python control flow, or wrap that call with torch.fx.wrap"
        ) from None


def propagate_shapes(graph_module: torch.fx.GraphModule, example_input: torch.Tensor) -> None:
    """Fill node.meta['tensor_meta'] by running the graph once in eval mode (BN stats untouched)."""
    try:
        with eval_mode(graph_module), torch.no_grad():
            # a model may change its input in place: never the caller's
            ShapeProp(graph_module).propagate(example_input.clone())
    except Exception as error:
        raise PruningError(
            f"the model failed on the example input of shape {tuple(example_input.shape)}: {str(error).splitlines()[0]}"
        ) from None
