"""Size and cost figures, one implementation for every backend (DESIGN.md section 7)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_size_mb(model: nn.Module) -> float:
    """Bytes of the state_dict (parameters and buffers) in MiB: what a snapshot weighs."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20


def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """Multiply-accumulates of one sample (Conv/Linear matmuls; FLOPs / 2) via torch's counter."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(example_input[:1])
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
