"""A latency lookup table (in the manner of HALP, Shen et al. 2022): the model's time at any kept-channel plan,
predicted from measurements of its layers, so a budget search can weigh milliseconds without timing every candidate.

Each Conv2d and Linear is timed alone, at the batch and memory layout the budget is for, on its real input size, at a
grid of kept fractions of its input and output channels (its output fraction only for a layer whose outputs follow
its inputs, such as a depthwise conv); between grid points the time is interpolated bilinearly. What the layers do
not account for (activations, pooling, the glue between layers) is the measured whole-model time minus their times at
full width, scaled with the share of activation channels the plan keeps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .cost import CostModel, Plan
from .modules import eval_mode, is_depthwise

GRID = (0.25, 0.5, 0.75, 1.0)
TimeOp = Callable[[nn.Module, torch.Tensor], float]  # seconds per call of a module on an input


@dataclass
class LatencyTable:
    grid: tuple[float, ...]
    layers: dict[str, list[list[float]]]  # module -> seconds at [input fraction][output fraction]
    activations: dict[str, int]  # module -> elements of its output per sample (the rest's weights)
    rest: float  # the whole model's time minus its layers' at full width
    dense: float  # the whole model's time, measured

    @classmethod
    def build(
        cls,
        model: nn.Module,
        example_input: torch.Tensor,
        costs: CostModel,
        batch: int,
        memory_format: torch.memory_format,
        time_op: TimeOp,
        grid: tuple[float, ...] = GRID,
    ) -> LatencyTable:
        """Time each Conv2d / Linear of `model` (deployable: BatchNorm folded) alone at the grid, and the model."""
        shapes = _input_shapes(model, example_input)
        layers, activations = {}, {}
        for name, module in model.named_modules():
            if name not in shapes or not isinstance(module, (nn.Conv2d, nn.Linear)):
                continue
            rows = []
            follows = isinstance(module, nn.Conv2d) and is_depthwise(module)
            for fin in grid if name in costs.inputs else (1.0,):
                row = []
                for fout in (fin,) if follows else grid:
                    layer, x = _shrunk(module, shapes[name], fin, fout, batch, memory_format)
                    device = example_input.device  # each layer timed where the model runs
                    row.append(time_op(layer.to(device), x.to(device)))
                rows.append(row)
            layers[name] = rows
            activations[name] = shapes[name][1]
        x = example_input[:1].expand(batch, *example_input.shape[1:])
        dense = time_op(model, x.contiguous(memory_format=memory_format) if x.ndim == 4 else x.contiguous())
        full = sum(rows[-1][-1] for rows in layers.values())
        return cls(tuple(grid), layers, activations, dense - full, dense)

    def predict(self, plan: Plan, costs: CostModel) -> float:
        """Predicted seconds per batch with `plan`'s channel counts."""
        total, kept, whole = 0.0, 0.0, 0.0
        for name, rows in self.layers.items():
            fin, fout = costs.in_fraction(name, plan), costs.out_fraction(name, plan)
            if len(rows) == 1:
                total += _interpolate(self.grid, rows[0], fout)
            elif len(rows[0]) == 1:  # outputs follow inputs
                total += _interpolate(self.grid, [row[0] for row in rows], fin)
            else:
                total += _bilinear(self.grid, rows, fin, fout)
            share = fin if name in costs.depthwise else fout
            kept += self.activations[name] * share
            whole += self.activations[name]
        return total + self.rest * (kept / whole if whole else 1.0)

    def as_json(self) -> dict[str, object]:
        return {
            "grid": list(self.grid),
            "layers": self.layers,
            "activations": self.activations,
            "rest": self.rest,
            "dense": self.dense,
        }

    @classmethod
    def from_json(cls, data: dict) -> LatencyTable:
        return cls(tuple(data["grid"]), data["layers"], data["activations"], data["rest"], data["dense"])


def _input_shapes(model: nn.Module, example_input: torch.Tensor) -> dict[str, tuple[tuple[int, ...], int]]:
    """module -> (its input's shape per sample, its output's elements per sample), from one forward."""
    shapes: dict[str, tuple[tuple[int, ...], int]] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            shapes.setdefault(name, (tuple(args[0].shape[1:]), out[0].numel()))

        return hook

    hooks = [
        module.register_forward_hook(record(name))
        for name, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear))
    ]
    try:
        with eval_mode(model), torch.no_grad():
            model(example_input[:1])
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def _keep(count: int, fraction: float, multiple: int = 1) -> int:
    return max(multiple, round(count * fraction / multiple) * multiple)


def _shrunk(
    module: nn.Module,
    shape: tuple[tuple[int, ...], int],
    fin: float,
    fout: float,
    batch: int,
    memory_format: torch.memory_format,
) -> tuple[nn.Module, torch.Tensor]:
    """A fresh layer like `module` with the fractions of its channels kept, and an input batch of its real size."""
    (input_shape, _), generator = shape, torch.Generator().manual_seed(0)
    if isinstance(module, nn.Linear):
        layer = nn.Linear(_keep(module.in_features, fin), _keep(module.out_features, fout), module.bias is not None)
        x = torch.randn(batch, *input_shape[:-1], layer.in_features, generator=generator)
        return layer.eval(), x
    groups = module.groups
    if is_depthwise(module):
        channels = _keep(module.in_channels, fin)
        ins, outs, groups = channels, channels, channels
    else:
        ins, outs = _keep(module.in_channels, fin, groups), _keep(module.out_channels, fout, groups)
    layer = nn.Conv2d(
        ins,
        outs,
        module.kernel_size,
        module.stride,
        module.padding,
        module.dilation,
        groups,
        module.bias is not None,
        module.padding_mode,
    )
    x = torch.randn(batch, ins, *input_shape[1:], generator=generator).contiguous(memory_format=memory_format)
    return layer.eval().to(memory_format=memory_format), x


def _interpolate(grid: tuple[float, ...], values: list[float], at: float) -> float:
    """Linear between grid points; below the first, along the first segment (towards zero width), never below zero."""
    points = list(zip(grid, values, strict=True))
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if at <= x1 or x1 == points[-1][0]:
            return max(0.0, y0 + (y1 - y0) * (at - x0) / (x1 - x0))
    return values[-1]


def _bilinear(grid: tuple[float, ...], rows: list[list[float]], fin: float, fout: float) -> float:
    return _interpolate(grid, [_interpolate(grid, row, fout) for row in rows], fin)
