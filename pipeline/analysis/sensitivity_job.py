"""analyze.py sensitivity: a trained snapshot, its test split as val_func, the CSV(s), a plot and a JSON of settings.

Everything is validated before the first evaluation and written only at the end, each file
atomically: an interrupted or refused run leaves the output directory as it was.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from algorithms.criteria import DEFAULT_THRESHOLD
from algorithms.errors import PruningError
from algorithms.sensitivity import (
    MODES,
    SensitivityAnalysis,
    check_early_stop,
    check_sparsities,
    export_sensitivity,
    get_ratios_by_loss,
    load_sensitivity,
)
from pipeline.analysis.inputs import AnalysisModel, dataset_for
from pipeline.analysis.sensitivity_plot import plot_sensitivity
from pipeline.atomic import staged_files, write_json
from pipeline.train.loop import evaluate


@dataclass(frozen=True)
class SensitivityRequest:
    prune_method: str = "conv_all"
    sparsities: tuple[float, ...] | None = None
    specified_layers: tuple[str, ...] | None = None
    early_stop_mode: str | None = None
    early_stop_value: float | None = None
    mode: str = "pruned"  # "pruned", "masked" or "both"
    max_loss: float | None = None  # also write per-layer ratios for this allowed drop
    threshold: float = DEFAULT_THRESHOLD  # the weight magnitude conv_threshold counts above
    batch_size: int = 256
    limit_val_batches: int | None = None
    data_dir: str = "data"
    progress: bool | None = None


@dataclass
class SensitivityOutcome:
    baseline: float
    results: dict[str, dict[str, dict[float, float]]]  # mode -> unit -> sparsity -> metric
    skipped: dict[str, str]
    ratios: dict[str, float] | None
    written: list[Path] = field(default_factory=list)


def check_request(request: SensitivityRequest) -> list[str]:
    """The modes to run; raises on a bad request before any data is loaded."""
    if request.mode not in (*MODES, "both"):
        raise PruningError(f"unknown --mode {request.mode!r}; choose pruned, masked or both")
    if request.sparsities is not None:
        check_sparsities(request.sparsities)
    check_early_stop(request.early_stop_mode, request.early_stop_value)
    if not (math.isfinite(request.threshold) and request.threshold >= 0):
        raise PruningError(f"--threshold must be a non-negative number (a weight magnitude), got {request.threshold}")
    if request.max_loss is not None and not (math.isfinite(request.max_loss) and request.max_loss >= 0):
        raise PruningError(f"--max_loss must be a finite, non-negative number, got {request.max_loss}")
    return list(MODES) if request.mode == "both" else [request.mode]


def check_outdir(outdir: str | Path) -> Path:
    """Refuse an output directory that cannot be written before any evaluation is spent on it."""
    outdir = Path(outdir)
    existing = next(p for p in (outdir, *outdir.parents) if p.exists())
    if not existing.is_dir():
        raise PruningError(f"--outdir {outdir}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PruningError(f"--outdir {outdir}: {existing} is not writable")
    return outdir


def publish(writers: dict[str, Callable[[Path], object]], outdir: Path) -> list[Path]:
    """Each writer fills a temporary file in `outdir`; only once all have are they renamed into place, so a failure
    leaves no new file."""
    with staged_files(outdir, writers) as temps:
        for name, write in writers.items():
            write(temps[name])
    return [outdir / name for name in writers]


def run_sensitivity(loaded: AnalysisModel, request: SensitivityRequest, outdir: str | Path) -> SensitivityOutcome:
    modes = check_request(request)
    check_outdir(outdir)
    data = dataset_for(loaded, request.data_dir)

    def top1(model: Any) -> float:
        return evaluate(model, data, request.batch_size, request.limit_val_batches).top1

    analyses = {
        mode: SensitivityAnalysis(
            loaded.model,
            top1,
            request.sparsities,
            request.prune_method,
            request.early_stop_mode,
            request.early_stop_value,
            mode=mode,
            example_input=data.example_input(1),
            threshold=request.threshold,
            progress=request.progress,
        )
        for mode in modes
    }
    specified = list(request.specified_layers) if request.specified_layers else None
    results = {
        mode: analysis.analysis(val_args=[loaded.model], specified_layers=specified)
        for mode, analysis in analyses.items()
    }
    first = analyses[modes[0]]
    baseline = float(first.ori_metric)
    ratios = get_ratios_by_loss(first, request.max_loss) if request.max_loss is not None else None

    outcome = SensitivityOutcome(baseline, results, dict(first.skipped), ratios)
    title = f"{loaded.meta['model']} on {loaded.meta['data_type']} ({loaded.label}): {request.prune_method}"
    settings = {
        "snapshot": loaded.label,
        "model": loaded.meta["model"],
        "data_type": loaded.meta["data_type"],
        "prune_method": request.prune_method,
        "modes": modes,
        "sparsities": first.sparsities,
        "early_stop_mode": request.early_stop_mode,
        "early_stop_value": request.early_stop_value,
        "metric": "top-1 accuracy on the test split",
        "baseline": baseline,
        "skipped": outcome.skipped,
        "max_loss": request.max_loss,
        "ratios": ratios,
    }
    writers: dict[str, Callable[[Path], object]] = {
        "sensitivity.csv" if mode == "pruned" else "sensitivity_masked.csv": lambda path, rows=sensitivity: (
            export_sensitivity(rows, path, first.sparsities)
        )
        for mode, sensitivity in results.items()
    }
    writers["sensitivity.png"] = lambda path: plot_sensitivity(results, baseline, path, title)
    writers["sensitivity.json"] = lambda path: write_json(path, settings)
    outcome.written = publish(writers, Path(outdir))
    return outcome


def ratios_from_csv(
    csv_path: str | Path, max_loss: float, baseline: float | None, outdir: str | Path | None
) -> tuple[dict[str, float], float, Path]:
    """Per-layer ratios from an existing sensitivity CSV; the baseline comes from the flag or the sensitivity.json
    written beside it."""
    csv_path = Path(csv_path)
    sensitivity = load_sensitivity(csv_path)
    if baseline is not None and not math.isfinite(baseline):
        raise PruningError(f"--baseline must be a finite number, got {baseline}")
    if baseline is None:
        sidecar = csv_path.with_name("sensitivity.json")
        try:
            baseline = float(json.loads(sidecar.read_text())["baseline"])
        except (OSError, ValueError, KeyError, TypeError):
            raise PruningError(
                f"no baseline for {csv_path}: pass --baseline (the unpruned metric), or keep the sensitivity.json "
                "analyze.py wrote beside it"
            ) from None
    ratios = get_ratios_by_loss(sensitivity, max_loss, baseline=baseline)
    target = check_outdir(Path(outdir) if outdir is not None else csv_path.parent)
    payload = {"from": str(csv_path), "baseline": baseline, "max_loss": max_loss, "ratios": ratios}
    return ratios, baseline, write_json(target / "ratios.json", payload)
