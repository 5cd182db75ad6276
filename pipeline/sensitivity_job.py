"""analyze.py sensitivity: a trained snapshot, its test split as val_func, the CSV(s), a plot and a JSON of settings.

Everything is validated before the first evaluation and written only at the end, each file
atomically: an interrupted or refused run leaves the output directory as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from algorithms.errors import PruningError
from algorithms.sensitivity import MODES, SensitivityAnalysis, check_early_stop, check_sparsities, export_sensitivity, get_ratios_by_loss

from .analysis_inputs import AnalysisModel, dataset_for
from .atomic import write_json
from .sensitivity_plot import plot_sensitivity
from .training import evaluate


@dataclass(frozen=True)
class SensitivityRequest:
    prune_method: str = "conv_all"
    sparsities: tuple[float, ...] | None = None
    specified_layers: tuple[str, ...] | None = None
    early_stop_mode: str | None = None
    early_stop_value: float | None = None
    mode: str = "pruned"  # "pruned", "masked" or "both"
    max_loss: float | None = None  # also write per-layer ratios for this allowed drop
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
    if request.max_loss is not None and request.max_loss < 0:
        raise PruningError(f"--max_loss must be non-negative, got {request.max_loss}")
    return list(MODES) if request.mode == "both" else [request.mode]


def run_sensitivity(loaded: AnalysisModel, request: SensitivityRequest, outdir: str | Path) -> SensitivityOutcome:
    modes = check_request(request)
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
            progress=request.progress,
        )  # fmt: skip
        for mode in modes
    }
    specified = list(request.specified_layers) if request.specified_layers else None
    results = {mode: analysis.analysis(val_args=[loaded.model], specified_layers=specified) for mode, analysis in analyses.items()}
    first = analyses[modes[0]]
    baseline = float(first.ori_metric)
    ratios = get_ratios_by_loss(first, request.max_loss) if request.max_loss is not None else None

    outdir = Path(outdir)
    outcome = SensitivityOutcome(baseline, results, dict(first.skipped), ratios)
    for mode, sensitivity in results.items():
        outcome.written.append(export_sensitivity(sensitivity, outdir / ("sensitivity.csv" if mode == "pruned" else "sensitivity_masked.csv")))
    title = f"{loaded.meta['model']} on {loaded.meta['data_type']} ({loaded.label}): {request.prune_method}"
    outcome.written.append(plot_sensitivity(results, baseline, outdir / "sensitivity.png", title))
    settings = {"snapshot": loaded.label, "model": loaded.meta["model"], "data_type": loaded.meta["data_type"], "prune_method": request.prune_method,
                "modes": modes, "sparsities": first.sparsities, "early_stop_mode": request.early_stop_mode, "early_stop_value": request.early_stop_value,
                "metric": "top-1 accuracy on the test split", "baseline": baseline, "skipped": outcome.skipped,
                "max_loss": request.max_loss, "ratios": ratios}  # fmt: skip
    outcome.written.append(write_json(outdir / "sensitivity.json", settings))
    return outcome
