"""NNI 3.0's quantizers (PtqQuantizer, QATQuantizer, LsqQuantizer) for comparison with step 4's real int8 kernels.

NNI's quantizers simulate int8 ("fake quantization"): each Conv2d / Linear is wrapped so that its weights and inputs are
rounded to an int8 grid in float arithmetic. No int8 kernel runs, so the model is neither smaller nor faster; a row from
here reports accuracy only. For deployment NNI hands over its calibration (scales, zero points), which an inference
engine such as TensorRT consumes; the job keeps it next to the float weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn

from algorithms.errors import PruningError, first_line
from algorithms.modules import clone_tree

from .nni_backend import import_nni, quiet_nni, torch_evaluator

QUANTIZERS = {"nni-ptq": "PtqQuantizer", "nni-qat": "QATQuantizer", "nni-lsq": "LsqQuantizer"}
RETRAINS = ("nni-qat", "nni-lsq")  # these fine-tune the weights while they learn the grid; nni-ptq only observes
# int8 as step 4 uses it: weights per output channel, each layer's input per tensor; symmetric, because LSQ supports
# only that
CONFIG_LIST = [
    {
        "op_types": ["Conv2d", "Linear"],
        "target_names": ["weight"],
        "quant_dtype": "int8",
        "quant_scheme": "symmetric",
        "granularity": "out_channel",
    },
    {
        "op_types": ["Conv2d", "Linear"],
        "target_names": ["_input_"],
        "quant_dtype": "int8",
        "quant_scheme": "symmetric",
        "granularity": "default",
    },
]

Batches = Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]
# (params, nni.trace) -> optimizer
MakeOptimizer = Callable[[list[nn.Parameter], Callable[[type], type]], torch.optim.Optimizer]
Measured = TypeVar("Measured")


def check_available() -> None:
    """Refuse up front, in one line, when NNI is missing: before any training is spent on the steps that lead here."""
    import_nni()


def fake_quantize(
    model: nn.Module,
    mode: str,
    batches: Batches,
    *,
    epochs: int,
    make_optimizer: MakeOptimizer,
    measure: Callable[[nn.Module], Measured],
    verbose: bool = False,
) -> tuple[nn.Module, dict[str, Any], Measured]:
    """Run NNI's quantizer on a copy of `model`; `measure` sees the simulated-int8 model.

    Returns the copy unwrapped (float weights; nni-qat and nni-lsq trained them), NNI's calibration made JSON-ready, and
    what `measure` returned. nni-ptq feeds `batches` once through the model in eval mode without gradients; the others
    train for `epochs` passes over `batches`.
    """
    if mode not in QUANTIZERS:
        raise PruningError(f"unknown NNI quantizer {mode!r}; choose one of: {', '.join(QUANTIZERS)}")
    nni = import_nni()
    from nni.compression import quantization

    working = clone_tree(model, {})
    optimizer = make_optimizer(list(working.parameters()), nni.trace)
    evaluator = torch_evaluator(batches, optimizer, observe_only=mode not in RETRAINS)
    with quiet_nni(verbose):
        try:
            quantizer = getattr(quantization, QUANTIZERS[mode])(working, CONFIG_LIST, evaluator)
            _, calibration = quantizer.compress(None, 1 if mode not in RETRAINS else epochs)
        except Exception as error:  # NNI's own failures, without its traceback
            raise PruningError(
                f"NNI {QUANTIZERS[mode]} failed: {type(error).__name__}: {first_line(error)[:200]}"
            ) from None
        working.eval()
        measured = measure(working)
        quantizer.unwrap_model()
    return working, _json_ready(calibration), measured


def _json_ready(calibration: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Scales and zero points as lists (the snapshot's meta is JSON); NNI's observer ranges are left out."""
    kept = ("scale", "zero_point", "quant_dtype", "quant_scheme", "quant_bits")

    def plain(value: Any) -> Any:
        return value.detach().cpu().flatten().tolist() if isinstance(value, torch.Tensor) else value

    return {
        module: {target: {key: plain(entry[key]) for key in kept if key in entry} for target, entry in targets.items()}
        for module, targets in calibration.items()
    }
