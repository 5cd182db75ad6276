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

from algorithms.errors import first_line
from algorithms.modules import resize_to_state_dict
from models import build_model
from pipeline import lineage
from pipeline.atomic import recover, staged_directory
from pipeline.errors import UsageError

WEIGHTS_FILE = "weights.pt"
META_FILE = "meta.json"


def save_snapshot(directory: str | Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    with staged_directory(directory) as staging:
        state = model.state_dict()
        # int8 Linears: packed tuples
        saved = OrderedDict((k, v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in state.items())
        saved._metadata = getattr(state, "_metadata", None)  # module versions: int8 modules read their state by version
        torch.save(saved, staging / WEIGHTS_FILE)
        (staging / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return Path(directory)


def load_snapshot(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state_dict and meta of a snapshot, or one UsageError naming the file at fault: a truncated, corrupt or
    foreign file is never a traceback (nor PyTorch's advice to unpickle it unsafely, which this project never takes)."""
    directory = Path(directory)
    recover(directory)  # a save killed between its two renames left the previous snapshot retired beside it
    weights, meta_path = directory / WEIGHTS_FILE, directory / META_FILE
    if not weights.is_file() or not meta_path.is_file():
        raise UsageError(
            f"no snapshot in {directory} (needs {WEIGHTS_FILE} and {META_FILE}); run the step that writes it first"
        )
    redo = "delete the snapshot and rerun the step that writes it"
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, OSError) as error:
        raise UsageError(
            f"{meta_path} is unreadable ({type(error).__name__}: not the JSON run.py writes); {redo}"
        ) from None
    problem = meta_problem(meta)
    if problem:
        raise UsageError(f"{meta_path} {problem}; it was not written by run.py, or was edited: {redo}")
    try:
        state_dict = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError, RuntimeError (zip), EOFError: all mean "not a state_dict we wrote"
        raise UsageError(
            f"{weights} is unreadable ({type(error).__name__}: truncated, corrupt or not a state_dict); {redo}"
        ) from None
    if not isinstance(state_dict, dict) or not all(isinstance(key, str) for key in state_dict):
        raise UsageError(f"{weights} holds a {type(state_dict).__name__}, not the state_dict run.py saves; {redo}")
    return state_dict, meta


def meta_problem(meta: object) -> str | None:
    """What is wrong with a snapshot's meta.json, in words, or None: the keys that rebuild the model must be there."""
    if not isinstance(meta, dict):
        return f"holds a JSON {type(meta).__name__}, not an object"
    for key in ("model", "data_type"):
        if not isinstance(meta.get(key), str):
            return f"has no {key!r} name"
    shape = meta.get("input_shape")
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    ):
        return f"has no valid 'input_shape' (positive whole numbers, e.g. [1, 32, 32]), got {shape!r}"
    classes = meta.get("num_classes")
    if not isinstance(classes, int) or isinstance(classes, bool) or classes < 1:
        return f"has no valid 'num_classes', got {classes!r}"
    return lineage.shape_problem(meta)


def rebuild_model(state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> nn.Module:
    """Build the zoo model named in `meta` and shrink it to the saved (possibly pruned) shapes; an int8 snapshot is then
    prepared and converted as step 4 did, and its int8 state loaded."""
    try:
        model = build_model(meta["model"], tuple(meta["input_shape"]), int(meta["num_classes"]))
    except (ValueError, RuntimeError, IndexError, TypeError) as error:  # an unknown model, or a shape it cannot take
        raise UsageError(f"snapshot of {meta['model']!r} cannot be rebuilt: {first_line(error)}") from None
    try:
        # NNI's simulated int8 saved float weights (and its calibration in meta)
        if meta.get("quantize") and not meta.get("simulated"):
            from pipeline.deploy.quantize import rebuild

            return rebuild(
                model, meta["float_shapes"], state_dict, meta["quantize"], torch.zeros(1, *meta["input_shape"])
            )
        resize_to_state_dict(model, state_dict)
        model.load_state_dict(state_dict)
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
        raise UsageError(f"snapshot does not fit model {meta['model']!r}: {first_line(error)}") from None
    return model


def load_model(directory: str | Path, expect_model: str, expect_data: str) -> tuple[nn.Module, dict[str, Any]]:
    """Load a snapshot and check it belongs to the model and dataset the user asked for."""
    state_dict, meta = load_snapshot(directory)
    if meta.get("model") != expect_model:
        raise UsageError(
            f"snapshot in {directory} is of model {meta.get('model')!r}, not {expect_model!r}; pass the matching "
            "--model or --model_load_dir"
        )
    if meta.get("data_type") != expect_data:
        raise UsageError(
            f"snapshot in {directory} was trained on {meta.get('data_type')!r}, not {expect_data!r}; pass the matching "
            "--data_type or --model_load_dir"
        )
    return rebuild_model(state_dict, meta), meta
