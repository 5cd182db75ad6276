"""Per-layer parameters, shapes and MACs (torch's FlopCounterMode, the counter every other figure uses)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pandas as pd
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from algorithms.modules import eval_mode
from pipeline.deploy.metrics import count_macs, count_params, model_size_mb


@dataclass
class LayerStats:
    name: str
    type: str
    weight_shape: str
    input_size: str  # per sample, C x H x W (or features)
    output_size: str
    macs: int
    params: int


def _size(value: object) -> str:
    return "x".join(str(d) for d in value.shape[1:]) if isinstance(value, torch.Tensor) else ""


def layer_stats(model: nn.Module, example_input: torch.Tensor) -> list[LayerStats]:
    """One row per leaf module that holds parameters or does multiply-accumulates, in call order, for one sample."""
    leaves = {name: module for name, module in model.named_modules() if name and not list(module.children())}
    shapes: dict[str, tuple[str, str]] = {}

    def record(name: str) -> object:
        def hook(_module: nn.Module, inputs: tuple[object, ...], output: object) -> None:
            shapes.setdefault(name, (_size(inputs[0]) if inputs else "", _size(output)))

        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in leaves.items()]
    try:
        with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(example_input[:1])
    finally:
        for handle in handles:
            handle.remove()
    prefix = type(model).__name__ + "."
    flops = {key.removeprefix(prefix): sum(ops.values()) for key, ops in counter.get_flop_counts().items()}
    rows = []
    for name in shapes:
        module = leaves[name]
        params = sum(p.numel() for p in module.parameters(recurse=False))
        macs = int(flops.get(name, 0)) // 2
        if params or macs:
            weight = getattr(module, "weight", None)
            weight_shape = "x".join(str(d) for d in weight.shape) if isinstance(weight, torch.Tensor) else ""
            rows.append(LayerStats(name, type(module).__name__, weight_shape, *shapes[name], macs, params))
    return rows


def stats_frame(model: nn.Module, example_input: torch.Tensor) -> tuple[pd.DataFrame, dict[str, float]]:
    """The per-layer table and the model's totals (all parameters, MACs, size in MiB)."""
    frame = pd.DataFrame([asdict(row) for row in layer_stats(model, example_input)])
    totals = {
        "params": count_params(model),
        "macs": count_macs(model, example_input),
        "size_mb": round(model_size_mb(model), 4),
    }
    return frame, totals


def side_by_side(base: pd.DataFrame, pruned: pd.DataFrame) -> pd.DataFrame:
    """Base and pruned rows joined by layer name, with what fraction of params and MACs each layer keeps."""
    columns = ["name", "type", "weight_shape", "output_size", "macs", "params"]
    joined = base[columns].merge(
        pruned[["name", "weight_shape", "output_size", "macs", "params"]],
        on="name",
        how="outer",
        suffixes=(" base", " pruned"),
    )
    order = {name: index for index, name in enumerate(base["name"])}
    joined = joined.sort_values("name", key=lambda names: names.map(lambda n: order.get(n, len(order)))).reset_index(
        drop=True
    )
    joined["params kept"] = (joined["params pruned"] / joined["params base"]).round(4)
    joined["MACs kept"] = (joined["macs pruned"] / joined["macs base"].where(joined["macs base"] > 0)).round(4)
    return joined
