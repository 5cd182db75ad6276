"""int8 quantization (step 4) with real int8 kernels on CPU: PyTorch's FX graph mode, x86 engine, per-channel weights.

Why FX graph mode rather than torchao's PT2E flow: it ships with torch (no extra package to pin), it fuses Conv +
BatchNorm + ReLU itself, and its converted model is a plain nn.Module whose state_dict holds int8 weights, so a snapshot
reloads the way every other stage does: rebuild the float model, repeat prepare + convert, load the state_dict.
DESIGN.md section 6 has the speedups measured with it here. PT2E is the newer route; switching is local to this module.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from algorithms.errors import first_line
from algorithms.modules import clone_tree, eval_mode, resize_to_state_dict
from pipeline.errors import UsageError

MODES = ("ptq", "qat")
ENGINE = "x86"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """FX quantization warns that it is in maintenance mode on every call: one note in the README is enough."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _use_engine() -> None:
    if ENGINE not in torch.backends.quantized.supported_engines:
        raise UsageError(
            f"this torch build has no {ENGINE} int8 engine (it has "
            f"{', '.join(torch.backends.quantized.supported_engines)})"
        )
    torch.backends.quantized.engine = ENGINE


def prepare(model: nn.Module, mode: str, example: torch.Tensor) -> torch.fx.GraphModule:
    """A copy of `model` with observers (ptq) or fake-quantisation (qat) inserted; `model` itself is left as it is."""
    from torch.ao.quantization import get_default_qat_qconfig_mapping, get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx, prepare_qat_fx

    _use_engine()
    copy = clone_tree(model, {})
    try:
        with _quiet():
            if mode == "ptq":
                return prepare_fx(copy.eval(), get_default_qconfig_mapping(ENGINE), example_inputs=(example,))
            return prepare_qat_fx(copy.train(), get_default_qat_qconfig_mapping(ENGINE), example_inputs=(example,))
    except Exception as error:  # fx cannot trace it, or a pattern the quantizer does not know
        raise UsageError(
            f"the int8 quantizer cannot prepare {type(model).__name__}: {type(error).__name__}: "
            f"{first_line(error)[:200]}"
        ) from None


def _converted(prepared: torch.fx.GraphModule) -> nn.Module:
    from torch.ao.quantization.quantize_fx import convert_fx

    with _quiet():
        return convert_fx(prepared.eval())


def convert(prepared: torch.fx.GraphModule, example: torch.Tensor) -> nn.Module:
    """The int8 model, checked to run: an op without an int8 kernel shows here, named."""
    try:
        quantized = _converted(prepared)
        with torch.inference_mode():
            quantized(example)
    except Exception as error:
        raise UsageError(
            f"the int8 model does not run: {type(error).__name__}: {first_line(error)[:200]}; that op has no int8 CPU "
            "kernel"
        ) from None
    return quantized


def calibrate(prepared: torch.fx.GraphModule, batches: Iterable[torch.Tensor]) -> int:
    """Feed calibration batches through the observers; returns how many."""
    count = 0
    with eval_mode(prepared), torch.inference_mode():
        for images in batches:
            prepared(images)
            count += 1
    if count == 0:
        raise UsageError("no calibration batch: the training split is empty or --calib_batches is 0")
    return count


def post_training(model: nn.Module, batches: Iterable[torch.Tensor], example: torch.Tensor) -> nn.Module:
    prepared = prepare(model, "ptq", example)
    calibrate(prepared, batches)
    return convert(prepared, example)


def float_shapes(model: nn.Module) -> dict[str, list[int]]:
    """The float model's tensor shapes: what a pruned int8 model is rebuilt from (its packed weights hide some of
    them)."""
    return {key: list(value.shape) for key, value in model.state_dict().items()}


def rebuild(
    float_model: nn.Module, shapes: dict[str, list[int]], state_dict: dict[str, Any], mode: str, example: torch.Tensor
) -> nn.Module:
    """A freshly built float model, shrunk to the saved shapes, prepared and converted the same way, then the int8
    state loaded."""
    resize_to_state_dict(float_model, {key: torch.empty(shape) for key, shape in shapes.items()})
    quantized = _converted(prepare(float_model, mode, example))
    try:
        quantized.load_state_dict(state_dict)
    except RuntimeError as error:
        raise UsageError(f"the int8 snapshot does not fit its model: {first_line(error)[:200]}") from None
    return quantized
