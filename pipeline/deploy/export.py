"""Export a model as ONNX, TorchScript or NNI-shaped masks, and prove the file computes what PyTorch computes.

Each file is written under a temporary name, checked (onnx.checker + onnxruntime, or
torch.jit.load), compared with the PyTorch output on a real batch, and only then renamed
into place: a file at the target path has passed its check.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from algorithms.mask_conflict import unit_mask
from algorithms.masks import Masks, unit_masks
from algorithms.modules import eval_mode
from pipeline.atomic import staged_files
from pipeline.errors import UsageError

FORMATS = ("onnx", "torchscript", "masks")
TOLERANCE = 1e-4


class ExportMismatch(RuntimeError):
    """The export failed or does not reproduce PyTorch's output; nothing is left at the target path."""


@dataclass
class ExportCheck:
    path: Path
    format: str
    max_abs_error: float  # against PyTorch on the check batch (0 for masks: checked for identity)
    batch: int
    detail: str


@contextlib.contextmanager
def _staged_file(target: Path, what: str) -> Iterator[Path]:
    """A temporary file beside `target`, renamed onto it once checked; on failure no file or folder is left, and the
    error is one line."""
    try:
        with staged_files(target.parent, [target.name]) as temps:
            yield temps[target.name]
    except ExportMismatch:
        raise
    except Exception as error:  # exporters raise many types (unsupported op, checker, runtime): one line names it
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ExportMismatch(f"{what} failed: {first[:200]}; the file was not written") from None


def _compare(reference: torch.Tensor, produced: torch.Tensor, what: str) -> float:
    error = float((reference - produced).abs().max())
    if not torch.allclose(reference, produced, rtol=TOLERANCE, atol=TOLERANCE):
        raise ExportMismatch(
            f"{what} differs from PyTorch by up to {error:.3g} (tolerance {TOLERANCE:g}); the file was not written"
        )
    return error


def export_onnx(model: nn.Module, batch: torch.Tensor, target: Path) -> ExportCheck:
    import onnx
    import onnxruntime

    with eval_mode(model), torch.no_grad():
        reference = model(batch)
    with _staged_file(target, "ONNX export") as temp, eval_mode(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter announces its deprecation on every call
        torch.onnx.export(
            model,
            (batch,),
            str(temp),
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
        onnx.checker.check_model(onnx.load(str(temp)))
        session = onnxruntime.InferenceSession(str(temp), providers=["CPUExecutionProvider"])
        produced = torch.from_numpy(session.run(None, {"input": batch.numpy()})[0])
        error = _compare(reference, produced, "onnxruntime's output")
    return ExportCheck(
        target, "onnx", error, len(batch), f"onnx.checker passed; onnxruntime {onnxruntime.__version__} on CPU"
    )


def export_torchscript(model: nn.Module, batch: torch.Tensor, target: Path) -> ExportCheck:
    with eval_mode(model), torch.no_grad():
        reference = model(batch)
        with _staged_file(target, "TorchScript export") as temp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(torch.jit.trace(model, batch[:1]), str(temp))
            produced = torch.jit.load(str(temp))(batch)
            error = _compare(reference, produced, "the reloaded TorchScript module's output")
    return ExportCheck(target, "torchscript", error, len(batch), "torch.jit.trace, saved, reloaded with torch.jit.load")


def masks_from_kept(original: nn.Module, kept: dict[str, list[int]]) -> Masks:
    """Masks over the unpruned architecture that select exactly the kept units of a pruned snapshot."""
    modules = dict(original.named_modules())
    missing = [name for name in kept if name not in modules]
    if missing:
        raise UsageError(
            f"the snapshot's kept channels name {missing[0]!r}, which the model does not have; the snapshot is not of "
            "this model"
        )
    # broadcast views: the file holds one value per unit
    return {name: unit_masks(modules[name], units) for name, units in kept.items()}


def export_masks(original: nn.Module, kept: dict[str, list[int]] | None, target: Path) -> ExportCheck:
    if not kept:
        raise UsageError(
            "this snapshot holds no pruning (no kept channels in its meta.json); export masks from a model_prune or "
            "model_refine snapshot"
        )
    masks = masks_from_kept(original, kept)
    modules = dict(original.named_modules())
    with _staged_file(target, "masks export") as temp:
        torch.save(masks, temp)
        reloaded = torch.load(temp, weights_only=True)
        for name, units in kept.items():
            if unit_mask(name, modules[name], reloaded[name]).nonzero().flatten().tolist() != sorted(units):
                raise ExportMismatch(
                    f"the reloaded mask of {name} does not select the snapshot's kept channels; the file was not "
                    "written"
                )
    return ExportCheck(
        target,
        "masks",
        0.0,
        0,
        f"{len(masks)} layers; reloaded with torch.load(weights_only=True), kept channels identical",
    )


def export(
    model: nn.Module,
    fmt: str,
    target: str | Path,
    batch: torch.Tensor | None = None,
    original: nn.Module | None = None,
    kept: dict[str, list[int]] | None = None,
) -> ExportCheck:
    """Write `model` in `fmt` to `target` after checking it; masks are over `original` (the unpruned architecture)."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    target = Path(target)
    if target.is_dir():
        raise UsageError(f"--out {target} is a directory; give a file path")
    if fmt == "masks":
        if original is None:
            raise UsageError("exporting masks needs the unpruned architecture")
        return export_masks(original, kept, target)
    if batch is None:
        raise UsageError(f"exporting {fmt} needs a batch to check the outputs on")
    return export_onnx(model, batch, target) if fmt == "onnx" else export_torchscript(model, batch, target)
