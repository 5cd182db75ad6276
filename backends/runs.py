"""The check every backend makes of the model it returns: it runs on the example input and answers in the same shape.

A library's pruned model can fail only later, in the user's hands (a width hard-coded in forward, NNI's speedup over
a reshape it did not follow); found here, it is one line naming the library and the method instead.
"""

from __future__ import annotations

import torch
from torch import nn

from algorithms.errors import PruningError, first_line
from algorithms.modules import eval_mode
from algorithms.tracing import attributes_kept


def output_shape(model: nn.Module, example_input: torch.Tensor) -> torch.Size | None:
    """The shape of the model's answer to the example (None when it answers in something other than a tensor); what the
    forward caches on the model (timm's attention biases) is dropped again."""
    with eval_mode(model), torch.no_grad(), attributes_kept(model):
        output = model(example_input.clone())
    return output.shape if isinstance(output, torch.Tensor) else None


def check_runs(model: nn.Module, example_input: torch.Tensor, who: str, expected_shape: torch.Size | None) -> None:
    """Refuse a pruned model that no longer runs, or answers in another shape (fewer classes, a different batch)."""
    try:
        shape = output_shape(model, example_input)
    except Exception as error:
        raise PruningError(
            f"the model {who} pruned no longer runs ({type(error).__name__}: {first_line(error)[:200]}); its forward "
            "probably hard-codes a width (e.g. x.view(-1, 400)): use torch.flatten(x, 1), or exclude that layer"
        ) from None
    if expected_shape is not None and shape is not None and shape != expected_shape:
        raise PruningError(
            f"{who} changed the model's output from {tuple(expected_shape)} to {tuple(shape)}; exclude the layer it "
            "pruned there"
        )
