"""What analyze.py works on: a snapshot (base or pruned) or a fresh zoo model, with the dataset it belongs to."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models import MODEL_NAMES, build_model
from pipeline.data.datasets import load_dataset
from pipeline.data.images import ImageDataset
from pipeline.errors import UsageError
from pipeline.snapshots import load_snapshot, rebuild_model


@dataclass
class AnalysisModel:
    model: nn.Module
    meta: dict[str, Any]  # snapshot metadata; for a fresh model: model, data_type, input_shape, num_classes
    label: str  # what the tables call it: the snapshot directory or "fresh <model>"
    input_shape: tuple[int, int, int]

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """A seeded random batch of the model's input shape: enough to trace, not to evaluate."""
        return torch.randn((batch, *self.input_shape), generator=torch.Generator().manual_seed(0))

    @property
    def kept(self) -> dict[str, list[int]] | None:
        return self.meta.get("kept")


INT8_READY = "export --format torchscript or --format masks"  # what analyze.py does with an int8 snapshot


def open_snapshot(directory: str | Path, expect_model: str | None = None, command: str | None = None) -> AnalysisModel:
    """A snapshot to analyse; `command` names what will be done with it, and an int8 snapshot is refused unless it is
    None (the caller handles int8): int8 modules have no float weights to rank, count or trace."""
    state_dict, meta = load_snapshot(directory)
    if command is not None and meta.get("quantize") and not meta.get("simulated"):
        raise UsageError(
            f"{directory} holds an int8 model (step 4, --quantize {meta['quantize']}), which analyze.py {command} "
            "cannot read; point --snapshot at model_refine or model_prune beside it (int8 snapshots take "
            f"{INT8_READY})"
        )
    if expect_model is not None and meta["model"] != expect_model:
        raise UsageError(
            f"snapshot in {directory} is of model {meta['model']!r}, not {expect_model!r}; pass the matching --model "
            "or drop it"
        )
    model = rebuild_model(state_dict, meta).eval()
    # type: ignore[arg-type]
    return AnalysisModel(model, meta, str(directory), tuple(int(d) for d in meta["input_shape"]))


def fresh_model(name: str, data: ImageDataset, seed: int = 0) -> AnalysisModel:
    if name not in MODEL_NAMES:
        raise UsageError(f"unknown --model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    torch.manual_seed(seed)
    try:
        model = build_model(name, data.input_shape, data.num_classes).eval()
    except ValueError as error:
        raise UsageError(f"{error} (dataset {data.name} has {data.input_shape} images)") from None
    meta = {
        "model": name,
        "data_type": data.name,
        "input_shape": list(data.input_shape),
        "num_classes": data.num_classes,
    }
    return AnalysisModel(model, meta, f"fresh {name}", data.input_shape)


def open_model(
    snapshot: str | None,
    model: str | None,
    data_type: str,
    command: str,
    data_dir: str = "data",
    download: bool = False,
) -> AnalysisModel:
    """The snapshot when one is given (its meta names model and data), else a freshly initialised zoo model for
    `data_type`."""
    if snapshot is not None:
        return open_snapshot(snapshot, model, command)
    if model is None:
        raise UsageError("pass --snapshot <dir> or --model <name> (a freshly initialised zoo model)")
    return fresh_model(model, load_dataset(data_type, data_dir, download))


def dataset_for(loaded: AnalysisModel, data_dir: str = "data", download: bool = False) -> ImageDataset:
    """The dataset a snapshot was trained on, normalised as it was in training."""
    data = load_dataset(loaded.meta["data_type"], data_dir, download)
    if tuple(data.input_shape) != loaded.input_shape:
        raise UsageError(
            f"dataset {data.name} has {data.input_shape} images but {loaded.label} expects {loaded.input_shape}"
        )
    if "mean" in loaded.meta and "std" in loaded.meta:
        data.mean, data.std = tuple(loaded.meta["mean"]), tuple(loaded.meta["std"])
    return data
