"""Size and cost figures, one implementation for every backend (DESIGN.md section 7)."""

from __future__ import annotations

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse
from torch.utils.flop_counter import FlopCounterMode

from algorithms.modules import eval_mode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_size_mb(model: nn.Module) -> float:
    """Bytes of the state_dict's tensors (parameters and buffers; an int8 model's packed weights too) in MiB: what a
    snapshot weighs."""
    return sum(t.numel() * t.element_size() for t in _tensors(list(model.state_dict().values()))) / 2**20


def _tensors(values: list[object]) -> list[torch.Tensor]:
    """Tensors among state_dict values, looking inside the tuples an int8 Linear packs its weight and bias into."""
    found: list[torch.Tensor] = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (tuple, list)):
            found.extend(_tensors(list(value)))
    return found


def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """Multiply-accumulates of one sample (Conv/Linear matmuls; FLOPs / 2) via torch's counter."""
    with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example_input[:1])
    return counter.get_total_flops() // 2


def deployable(model: nn.Module) -> nn.Module:
    """The model as an inference runtime runs it: a new copy in eval mode, each BatchNorm folded into the conv / Linear
    before it.

    ONNX Runtime, TensorRT and torch.compile all fold BatchNorm; timing it as a separate eager op would
    charge the pruned model for a cost (linear in channels) that deployment does not pay.
    """
    with eval_mode(model):
        return fuse(model).eval()


LAYOUTS: dict[str, torch.memory_format] = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
LAYOUT_NAMES = {"channels_last": "channels_last (NHWC)", "contiguous": "contiguous (NCHW)"}
LAYOUT_SUFFIXES = {"channels_last": "nhwc", "contiguous": "nchw"}
DEPLOYED_LAYOUT = "channels_last"  # what oneDNN, fbgemm's int8 kernels, cuDNN and TensorRT run convolutions in
# the headline layout first; the last one leaves models in PyTorch's default
TIMED_LAYOUTS = (DEPLOYED_LAYOUT, "contiguous")
# the batch sizes run.py's table and the harness report latency at: one request, and throughput
LATENCY_BATCHES = (1, 64)


def in_layout(model: nn.Module, layout: str) -> nn.Module:
    """The model's 4-D weights in `layout`, in place (as nn.Module.to is): convert a copy you own."""
    return model.to(memory_format=LAYOUTS[layout])
