"""What a budget (backends.budget) needs from a job: a way to time a model, a sensitivity scan and a latency table.

The scan and the table are made once per base model and kept beside its snapshot (`budget_cache/` in the folder that
holds model_base): every budget, backend and method pruned from that base reads them. The scan evaluates on a slice of
the training split, never the test images the results report: choosing widths on the test split would leak it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from algorithms.cost import CostModel
from algorithms.graph import analyze
from algorithms.latency_table import LatencyTable
from algorithms.sensitivity import SensitivityAnalysis
from backends.budget import Target
from pipeline.atomic import write_json
from pipeline.data.images import ImageDataset
from pipeline.deploy.latency import (
    Measurements,
    Protocol,
    architecture_signature,
    device_name,
    measure,
    measure_models,
    model_dtype,
)
from pipeline.deploy.metrics import DEPLOYED_LAYOUT, LAYOUTS, deployable
from pipeline.errors import UsageError
from pipeline.train.loop import evaluate

CACHE = "budget_cache"
VALIDATION_IMAGES = 512  # the training images the sensitivity scan evaluates on
SCAN_METHOD = "conv_all"  # what the scan ranks channels by: L1, the criterion every backend shares
TABLE_PROTOCOL = Protocol(tolerance=0.05, min_blocks=3, cap_s=5.0, pin=False)  # hundreds of small op timings


TIMEABLE = ("cpu", "cuda")  # devices whose queued work a timer can wait for (pipeline.train.runtime.synchronize)


def check_timeable(target: Target, device: torch.device, world_size: int = 1, allocation: str = "uniform") -> None:
    """A latency budget (or the latency allocation, which times a lookup table) needs times that mean something: on a
    device the timer can synchronise, in one process (the processes of a distributed job would time each other's load
    on shared cores, and could choose different widths)."""
    if target.batch is None and allocation != "latency":
        return
    timed = f"target {target}" if target.batch is not None else "--allocation latency"
    instead = "a macs / params target" if target.batch is not None else "another allocation"
    if device.type not in TIMEABLE:
        raise UsageError(
            f"{timed} needs a device whose latency can be timed ({' or '.join(TIMEABLE)}), not {device.type}; "
            f"use --device cpu or cuda, or {instead}"
        )
    if world_size > 1:
        raise UsageError(
            f"{timed} is timed on this machine, and {world_size} processes would time each other's load: run it in "
            f"one process (without torchrun), or use {instead}"
        )


def latency_timer(
    target: Target, example_input: torch.Tensor, measurements: Measurements, device: torch.device | None = None
) -> Callable[[nn.Module], float] | None:
    """Seconds per batch of a model as deployed on `device` (the example's by default), at the target's batch, by the
    stability protocol; identical widths read one measurement. None for a target that is counted, not timed."""
    if target.batch is None:
        return None
    example_input = example_input if device is None else example_input.to(device)
    threads = 1 if example_input.device.type == "cpu" else None

    def seconds(model: nn.Module) -> float:
        return measure(
            model, example_input=example_input, batch=target.batch or 64, threads=threads, measurements=measurements
        ).median

    return seconds


def validation_view(data: ImageDataset, count: int = VALIDATION_IMAGES) -> ImageDataset:
    """The dataset with its first `count` training images as the split evaluate() reads."""
    return ImageDataset(
        data.name,
        data.train_images,
        data.train_labels,
        data.train_images[:count],
        data.train_labels[:count],
        data.num_classes,
        data.mean,
        data.std,
        data.identity,
    )


def sensitivity_scan(
    model: nn.Module, data: ImageDataset, cache: Path, identity: str, batch_size: int = 256
) -> tuple[dict[str, dict[float, float]], float]:
    """{unit: {sparsity: top-1}} and the unpruned top-1, on the validation slice, for the physically pruned model; read
    from the cache when this base was scanned before."""
    path = cache / f"sensitivity_{identity}_{SCAN_METHOD}_{VALIDATION_IMAGES}.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        return {unit: {float(s): m for s, m in values.items()} for unit, values in saved["scan"].items()}, saved[
            "baseline"
        ]
    held_out = validation_view(data)

    def top1(candidate: nn.Module) -> float:
        return evaluate(candidate, held_out, batch_size).top1

    analysis = SensitivityAnalysis(model, top1, prune_type=SCAN_METHOD, example_input=data.example_input(1))
    scan = analysis.analysis(val_args=[model])
    baseline = float(analysis.ori_metric)
    write_json(path, {"baseline": baseline, "scan": {u: {str(s): m for s, m in v.items()} for u, v in scan.items()}})
    return scan, baseline


def latency_table(model: nn.Module, example_input: torch.Tensor, batch: int, cache: Path) -> LatencyTable:
    """The model's latency lookup table at `batch`, in the deployed layout, on the example's device; read from the
    cache when this architecture was measured here before (the key: architecture, device, dtype, layout, batch)."""
    runnable = deployable(model).to(example_input.device)
    dtype = model_dtype(runnable, example_input.device)
    conditions = (
        "|".join(
            [architecture_signature(runnable), device_name(example_input.device), dtype, DEPLOYED_LAYOUT, str(batch)]
        )
        + f"|torch {torch.__version__}"
    )
    path = cache / f"latency_table_{hashlib.sha256(conditions.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        return LatencyTable.from_json(json.loads(path.read_text()))
    memory_format = LAYOUTS[DEPLOYED_LAYOUT]
    runnable = runnable.to(memory_format=memory_format)
    threads = 1 if example_input.device.type == "cpu" else None

    def time_op(layer: nn.Module, x: torch.Tensor) -> float:
        layer = layer.to(x.device)
        measured = measure_models(
            [layer],
            example_input=x[:1],
            batch=x.shape[0],
            layout_format=memory_format,
            threads=threads,
            protocol=TABLE_PROTOCOL,
        )
        return measured.timings[0].median

    graph = analyze(model, example_input)
    table = LatencyTable.build(
        runnable, example_input, CostModel.of(model, example_input, graph), batch, memory_format, time_op
    )
    write_json(path, {"conditions": conditions, **table.as_json()})
    return table


def budget_inputs(
    allocation: str,
    target: Target,
    base: nn.Module,
    model: nn.Module,
    data: ImageDataset,
    cache: Path,
    identity: str,
    measurements: Measurements,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """prune_to_budget's keyword inputs for pruning `model` (the base, or in a later round of iterative pruning a model
    already smaller) with this allocation and target: the scan is the base's, the latency table `model`'s own; latency
    is timed on `device` (the job's; the model's by default)."""
    example = data.example_input(1).to(device or next(model.parameters()).device)
    inputs: dict[str, Any] = {}
    if target.batch is not None:
        inputs["latency_of"] = latency_timer(target, example, measurements)
    if allocation == "sensitivity":
        inputs["sensitivity"] = sensitivity_scan(base, data, cache, identity)
    if allocation == "latency" or (allocation == "sensitivity" and target.batch is not None):  # the greedy's guide
        inputs["latency_table"] = latency_table(model, example, target.batch or 64, cache)
    return inputs
