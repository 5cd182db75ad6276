"""Snapshots: a plain state_dict plus JSON metadata, written atomically, rebuilt from shapes.

Layout: <dir>/weights.pt (torch.save of the state_dict) and <dir>/meta.json.
The directory is written under a temporary name and renamed into place, so an
interrupted run never leaves a half-written snapshot for a later step to load.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from algorithms.modules import resize_to_state_dict
from models import build_model

from .atomic import staged_directory
from .errors import UsageError

WEIGHTS_FILE = "weights.pt"
META_FILE = "meta.json"


def save_snapshot(directory: str | Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    with staged_directory(directory) as staging:
        state = model.state_dict()
        saved = OrderedDict((k, v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in state.items())  # int8 Linears: packed tuples
        saved._metadata = getattr(state, "_metadata", None)  # module versions: int8 modules read their state by version
        torch.save(saved, staging / WEIGHTS_FILE)
        (staging / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return Path(directory)


def load_snapshot(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    directory = Path(directory)
    weights, meta_path = directory / WEIGHTS_FILE, directory / META_FILE
    if not weights.is_file() or not meta_path.is_file():
        raise UsageError(f"no snapshot in {directory} (needs {WEIGHTS_FILE} and {META_FILE}); run the step that writes it first")
    try:
        meta = json.loads(meta_path.read_text())
        state_dict = torch.load(weights, map_location="cpu", weights_only=True)
    except (json.JSONDecodeError, RuntimeError, OSError, EOFError) as error:
        raise UsageError(f"snapshot in {directory} is unreadable ({error}); delete it and rerun the step that writes it") from None
    return state_dict, meta


def rebuild_model(state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> nn.Module:
    """Build the zoo model named in `meta` and shrink it to the saved (possibly pruned) shapes; an int8 snapshot is then
    prepared and converted as step 4 did, and its int8 state loaded."""
    model = build_model(meta["model"], tuple(meta["input_shape"]), int(meta["num_classes"]))
    if meta.get("quantize") and not meta.get("simulated"):  # NNI's simulated int8 saved float weights (and its calibration in meta)
        from .quantize import rebuild

        return rebuild(model, meta["float_shapes"], state_dict, meta["quantize"], torch.zeros(1, *meta["input_shape"]))
    resize_to_state_dict(model, state_dict)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        raise UsageError(f"snapshot does not fit model {meta['model']!r}: {str(error).splitlines()[0]}") from None
    return model


def load_model(directory: str | Path, expect_model: str, expect_data: str) -> tuple[nn.Module, dict[str, Any]]:
    """Load a snapshot and check it belongs to the model and dataset the user asked for."""
    state_dict, meta = load_snapshot(directory)
    if meta.get("model") != expect_model:
        raise UsageError(f"snapshot in {directory} is of model {meta.get('model')!r}, not {expect_model!r}; pass the matching --model or --model_load_dir")
    if meta.get("data_type") != expect_data:
        raise UsageError(
            f"snapshot in {directory} was trained on {meta.get('data_type')!r}, not {expect_data!r}; pass the matching --data_type or --model_load_dir"
        )
    return rebuild_model(state_dict, meta), meta
