"""One cell of the matrix: prune the shared base, fine-tune, measure; one flat row of figures.

Every cell goes through the same Job as run.py (steps 2 and 3 from a cached step-1 base), so the
harness and the CLI cannot drift apart.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from algorithms.errors import first_line
from algorithms.surgery import shrink
from backends import get_backend
from backends.budget import TOLERANCE, allocate, check_reachable, measured_cost, parse_target, plan_budget, shortfall
from pipeline.atomic import temporary_directory, write_json
from pipeline.budgeting import latency_timer
from pipeline.config import STAGES
from pipeline.data.images import ImageDataset
from pipeline.deploy.latency import Measurement, Measurements, device_name, latency_by_layout
from pipeline.deploy.metrics import DEPLOYED_LAYOUT, LATENCY_BATCHES, LAYOUT_NAMES, LAYOUT_SUFFIXES, deployable
from pipeline.job import Job
from pipeline.snapshots import load_model
from pipeline.train.loop import EvalResult, evaluate, train
from pipeline.train.runtime import Runtime, float32_name

from .matrix import THIN, Cell, MatrixSpec, base_key, job_config

LATENCY_FORM = (
    "eval mode, BatchNorm folded into the conv before it (torch.fx fuse), float32 (int8 columns: int8 kernels on the "
    "CPU)"
)


def ensure_base(
    spec: MatrixSpec, model: str, seed: int, data: ImageDataset, base_root: Path
) -> tuple[Path, dict[str, Any]]:
    """The base checkpoint for (model, seed): trained once, then reused by every cell and every later run with the same
    key.

    A lock file per key lets shards that share `base_root` (a Slurm array on a shared file system) wait for
    the one that trains it instead of training it twice or replacing it under each other.
    """
    key = base_key(spec, model, seed, data.input_shape, len(data.train_labels), data.identity)
    root = base_root / key
    figures_path = root / "base_figures.json"
    with (base_root / f".{key}.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:  # a file system without flock (some Lustre mounts): go on unlocked, as a single process would
            pass
        figures = read_figures(figures_path) if (root / STAGES["1"]).is_dir() else None
        if figures is not None:
            return root, figures
        job = Job(
            job_config(
                spec, model, seed, save_dir=str(root), log_dir=str(root / "log"), result_dir=str(root / "results")
            ),
            data,
            spec.runtime(),
        )
        figures = job.step_train()
        write_json(figures_path, figures)  # written last: its presence marks a complete base
    return root, figures


def read_figures(path: Path) -> dict[str, Any] | None:
    """A cached base's figures, or None when they are missing or unreadable (the base is then trained again)."""
    try:
        figures = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return figures if isinstance(figures, dict) else None


def reinitialised(model: nn.Module, seed: int) -> nn.Module:
    """The same (pruned) architecture with fresh weights: the "train it from scratch" control (Liu et al. 2019)."""
    fresh = copy.deepcopy(model)
    torch.manual_seed(seed)
    for module in fresh.modules():
        if hasattr(module, "reset_parameters") and module is not fresh:
            module.reset_parameters()
    return fresh


def environment(spec: MatrixSpec) -> dict[str, Any]:
    return {
        **spec.versions,
        "python": platform.python_version(),
        "cpu": device_name("cpu"),
        "device": spec.device,
        "device_name": device_name(spec.device),
        "dtype": float32_name(torch.device(spec.device)),
        "memory_format": LAYOUT_NAMES[DEPLOYED_LAYOUT],
        "other_memory_formats": {LAYOUT_SUFFIXES[layout]: LAYOUT_NAMES[layout] for layout in spec.layouts[1:]},
        "latency_form": LATENCY_FORM,
        "latency_threads": spec.threads,
        "train_threads": torch.get_num_threads(),
    }


def column(name: str, layout: str) -> str:
    """A latency column: the deployed layout's keeps the plain name; another layout's carries its suffix
    (speedup_b64_nchw)."""
    return name if layout == DEPLOYED_LAYOUT else f"{name}_{LAYOUT_SUFFIXES[layout]}"


def timed_pair(
    spec: MatrixSpec,
    reference: nn.Module,
    candidate: nn.Module,
    example: torch.Tensor,
    candidate_name: str,
    measurements: Measurements,
) -> tuple[dict[str, Any], list[str]]:
    """Reference and candidate (deployable copies: timing converts their layout) at each latency batch size and timed
    layout, by the stability protocol (DESIGN.md section 7): their columns, and the figures among them that did not
    settle.

    The reference's time is its own measurement, taken once per architecture in a results directory (every cell of a
    model reports the same dense time); the speedup and its 95% interval come from the two timed together in
    interleaved blocks, and the candidate's time is reference time / speedup, so the three columns agree. Identical
    architectures read the same measurements; the row keeps their keys (`latency_keys`), so a merge of shards can
    give every row the one measurement the merged directory keeps. The pruned model's reference is
    `latency_b{batch}_before_ms`; int8's is `latency_b{batch}_int8_reference_ms`, the dense base on the CPU, where int8
    runs."""
    options = {
        "example_input": example,
        "threads": spec.threads,
        "layouts": spec.layouts,
        "protocol": spec.protocol,
        "measurements": measurements,
    }
    keys: dict[str, str] = {}
    for batch in LATENCY_BATCHES:
        alone = latency_by_layout(reference, batch=batch, **options)
        paired = latency_by_layout(reference, candidate, batch=batch, **options)
        for layout in spec.layouts:
            keys[f"{candidate_name}|{batch}|{layout}|alone"] = alone[layout].key
            keys[f"{candidate_name}|{batch}|{layout}|paired"] = paired[layout].key
    return latency_columns(keys, measurements.known)


def latency_columns(keys: dict[str, str], known: dict[str, Measurement]) -> tuple[dict[str, Any], list[str]]:
    """A row's latency columns from the measurements its `latency_keys` name (a cell's own, or a merge's), and the
    columns whose figure did not settle: a reference time whose own interval stayed wide is flagged as such, apart
    from the speedup, which stands on its paired interval."""
    out: dict[str, Any] = {"latency_keys": keys}
    unstable: list[str] = []
    for name, key in keys.items():
        candidate_name, batch, layout, kind = name.split("|")
        if kind != "paired":
            continue
        reference_name = "before" if candidate_name == "after" else f"{candidate_name}_reference"
        speedup_name = f"speedup_b{batch}" if candidate_name == "after" else f"speedup_{candidate_name}_b{batch}"
        before = known[keys[f"{candidate_name}|{batch}|{layout}|alone"]].timings[0]
        paired = known[key]
        speedup = paired.speedups[0]
        before_name = column(f"latency_b{batch}_{reference_name}_ms", layout)
        out[before_name] = round(before.median * 1e3, 4)
        out[f"{before_name}_low"], out[f"{before_name}_high"] = round(before.low * 1e3, 4), round(before.high * 1e3, 4)
        out[f"{before_name}_runs"] = before.runs
        out[column(f"latency_b{batch}_{candidate_name}_ms", layout)] = round(before.median / speedup.value * 1e3, 4)
        out[column(speedup_name, layout)] = round(speedup.value, 4)
        out[column(f"{speedup_name}_low", layout)] = round(speedup.low, 4)
        out[column(f"{speedup_name}_high", layout)] = round(speedup.high, 4)
        out[column(f"{speedup_name}_runs", layout)] = paired.timings[1].runs
        figures = ((before_name, before.stable), (column(speedup_name, layout), speedup.stable))
        unstable += [figure for figure, stable in figures if not stable]
        if candidate_name == "after" and batch == "64" and layout == DEPLOYED_LAYOUT:
            out["latency_pinned_core"] = paired.pinned  # the headline figure's core (None on a GPU)
    return out, unstable


def with_measurements(row: dict[str, Any], known: dict[str, Measurement]) -> dict[str, Any]:
    """`row` with its latency columns read again from `known` (a merge's measurements): shards that timed one
    architecture each their own way then report the one figure the merged directory keeps."""
    if not row.get("latency_keys") or not all(key in known for key in row["latency_keys"].values()):
        return row
    columns, unstable = latency_columns(row["latency_keys"], known)
    row = row | columns | {"unstable": ",".join(unstable)}
    if "speedup_b64" in row and row.get("mac_ratio"):
        row["speedup_per_mac"] = round(row["speedup_b64"] / row["mac_ratio"], 4)
    return row


def latency_figures(
    spec: MatrixSpec, dense: nn.Module, pruned: nn.Module, example: torch.Tensor, measurements: Measurements
) -> tuple[dict[str, Any], list[str]]:
    """Dense and pruned, both in their deployable form on the example's device, in the deployed layout and (suffixed
    columns) the other."""
    device = example.device
    return timed_pair(spec, deployable(dense).to(device), deployable(pruned).to(device), example, "after", measurements)


def int8_figures(
    spec: MatrixSpec,
    dense: nn.Module,
    int8: nn.Module,
    example: torch.Tensor,
    figures: dict[str, Any],
    base_mb: float,
    measurements: Measurements,
) -> tuple[dict[str, Any], list[str]]:
    """The int8 stage of a cell: its accuracy, size and latency against the dense fp32 base (deployable form, on the
    CPU)."""
    out: dict[str, Any] = {
        "int8_top1": figures["accuracy"],
        "int8_topk": figures["top_k_accuracy"],
        "size_mb_int8": figures["modelSize"],
        "size_ratio_int8": round(base_mb / figures["modelSize"], 4),
    }
    timed, unstable = timed_pair(spec, deployable(dense).cpu(), deployable(int8), example.cpu(), "int8", measurements)
    return out | timed, unstable


def run_cell(
    spec: MatrixSpec,
    cell: Cell,
    data: ImageDataset,
    base_root: Path,
    cell_dir: Path,
    keep_snapshots: bool = False,
    measurements: Measurements | None = None,
) -> dict[str, Any]:
    """Prune -> fine-tune -> measure one cell. Raises on failure; the caller records the error and goes on.
    `measurements`: the run's latency figures by architecture (its results directory's), shared by every cell."""
    measurements = measurements if measurements is not None else Measurements()
    started = time.perf_counter()
    base_dir, base_figures = ensure_base(spec, cell.model, cell.seed, data, base_root)
    if cell.backend == THIN[0]:
        return thin_row(spec, cell, data, base_dir, base_figures, measurements) | {
            "cell_seconds": round(time.perf_counter() - started, 3),
            "env": environment(spec),
        }
    where = (
        contextlib.nullcontext(cell_dir / "snapshots")
        if keep_snapshots
        # the pruned and refined models, then gone
        else temporary_directory(cell_dir.parent, f"{cell_dir.name}.snapshots")
    )
    with where as snapshots:
        config = job_config(
            spec,
            cell.model,
            cell.seed,
            backend=cell.backend,
            method=cell.method,
            percent=cell.percent,
            load_dir=str(base_dir),
            save_dir=str(snapshots),
            log_dir=str(cell_dir / "log"),
            result_dir=str(cell_dir / "results"),
            distill=cell.distill,
            quantize=cell.quantize if cell.quantize != "none" else "ptq",
            target=cell.budget or None,
            allocation=cell.allocation or "uniform",
        )
        job = Job(config, data, spec.runtime())
        job.base_figures = base_figures
        pruned = job.step_prune()
        refined = job.step_refine()
        quantized = job.step_quantize() if cell.quantize != "none" else None
    base_model, final_model = job.models["1"], job.models["3"]
    base = pruned["base"]
    row: dict[str, Any] = {
        "cell": cell.key,
        "model": cell.model,
        "backend": cell.backend,
        "method": pruned["method"],
        "percent": cell.percent,
        "seed": cell.seed,
        "distill": cell.distill,
        "quantize": cell.quantize,
        "scope": pruned["scope"],
        "physical": pruned["physical"],
        "status": "ok",
        "error": "",
        "top_k": base["top_k"],
        "base_top1": base["accuracy"],
        "base_topk": base["top_k_accuracy"],
        "masked_top1": pruned["masked_accuracy"],
        "masked_topk": pruned["masked_top_k_accuracy"],
        "pruned_top1": pruned["accuracy"],
        "pruned_topk": pruned["top_k_accuracy"],
        "finetuned_top1": refined["accuracy"],
        "finetuned_topk": refined["top_k_accuracy"],
        "params_before": base["params"],
        "params_after": refined["params"],
        "params_ratio": round(base["params"] / refined["params"], 4),
        "macs_before": base["macs"],
        "macs_after": refined["macs"],
        "mac_ratio": round(base["macs"] / refined["macs"], 4),
        "size_mb_before": base["modelSize"],
        "size_mb_after": refined["modelSize"],
        "size_ratio": round(base["modelSize"] / refined["modelSize"], 4),
        "prune_seconds": pruned["prune_seconds"],
        "prune_train_steps": pruned["prune_train_steps"],
        **layer_widths(base_model, final_layers(pruned["layers"], job.metas["3"].get("kept", {}))),
        **budget_columns(cell, spec, pruned.get("budget"), refined.get("budget")),
    }
    example = job.example_on(final_model)
    unstable: list[str] = []
    if pruned["physical"]:
        timed, unstable = latency_figures(spec, base_model, final_model, example, measurements)
        row |= timed | {"speedup_per_mac": round(timed["speedup_b64"] / row["mac_ratio"], 4)}
    if quantized is not None and quantized.get("simulated"):  # NNI's fake quantization: no int8 kernel to time or size
        row |= {"int8_top1": quantized["accuracy"], "int8_topk": quantized["top_k_accuracy"]}
    elif quantized is not None:
        timed, unstable_int8 = int8_figures(
            spec, base_model, job.models["4"], example, quantized, base["modelSize"], measurements
        )
        keys = row.get("latency_keys", {}) | timed["latency_keys"]
        row, unstable = row | timed | {"latency_keys": keys}, unstable + unstable_int8
    row["unstable"] = ",".join(unstable)  # latency figures whose 95% interval stayed wider than the tolerance
    if spec.scratch_control and pruned["physical"]:
        control = reinitialised(final_model, cell.seed)
        history = train_from_scratch(spec, control, data, cell.seed, "from scratch", spec.runtime())
        result = (
            history[-1]
            if history
            else evaluate(control, data, spec.val_batch_size, spec.limit_val_batches, spec.runtime())
        )
        row |= {"scratch_top1": round(result.top1, 6), "scratch_topk": round(result.top_k, 6)}
    row["cell_seconds"] = round(time.perf_counter() - started, 3)
    row["env"] = environment(spec)
    return row


def final_layers(layers: list[dict[str, Any]], kept: dict[str, list[int]]) -> list[dict[str, Any]]:
    """The pruned layers' widths in the final model (after every round of iterative pruning, where there were more)."""
    return [layer | {"after": len(kept.get(layer["layer"], range(layer["after"])))} for layer in layers]


def train_from_scratch(
    spec: MatrixSpec, model: nn.Module, data: ImageDataset, seed: int, desc: str, runtime: Runtime
) -> list[EvalResult]:
    """A control trained from fresh weights for the base's and the fine-tuning's epochs together: the training a pruned
    model had in all."""
    return train(
        model,
        data,
        epochs=spec.base_epoch_count + spec.finetune_epochs,
        batch_size=spec.batch_size,
        val_batch_size=spec.val_batch_size,
        lr=spec.learning_rate,
        optimizer_name=spec.optimizer,
        seed=seed,
        limit_batches=spec.limit_batches,
        limit_val_batches=spec.limit_val_batches,
        desc=desc,
        runtime=runtime,
    )


def budget_columns(
    cell: Cell, spec: MatrixSpec, pruned: dict[str, Any] | None, refined: dict[str, Any] | None
) -> dict[str, Any]:
    """A budget cell's target, allocation and what it reached (the refined model's, after iterative rounds)."""
    if not cell.budget or pruned is None:
        return {}
    last = refined["rounds"][-1] if refined else pruned
    achieved = refined["achieved_ratio"] if refined else pruned["achieved_ratio"]
    return {
        "budget": cell.budget,
        "allocation": cell.allocation,
        "iterations": spec.iterations,
        "budget_cost": pruned["cost"],
        "achieved_ratio": achieved,
        "budget_met": last["achieved"] <= last["goal"] * (1 + 1e-9),
        "budget_note": last["reason"] or "",
        "layer_ratios": refined["ratios"] if refined else pruned["ratios"],  # of the base's widths
    }


def thin_row(
    spec: MatrixSpec,
    cell: Cell,
    data: ImageDataset,
    base_dir: Path,
    base_figures: dict[str, Any],
    measurements: Measurements,
) -> dict[str, Any]:
    """The thin control (`--thin_control`): the zoo model with every prunable width scaled by one ratio to the budget,
    initialised afresh and trained for the base's and the fine-tuning's epochs together: the strongest simple baseline a
    pruning method has to beat at that cost (ThinResNet, arXiv 2309.12854)."""
    base = load_model(base_dir / STAGES["1"], cell.model, data.name)[0].eval()
    example = data.example_input(1)
    target = parse_target(cell.budget)
    runtime = spec.runtime()
    latency_of = latency_timer(target, example, measurements, runtime.device)
    budget = plan_budget(get_backend("scratch"), base, "conv_all", example, latency_of=latency_of)
    _, goal = check_reachable(budget, target, "the thin control")
    plan = allocate(budget, target, goal, "uniform").plan
    kept = {g: torch.arange(k) for g, k in plan.items() if k < budget.groups.sizes[g]}
    thin = reinitialised(shrink(base, budget.graph, kept), cell.seed)
    history = train_from_scratch(spec, thin, data, cell.seed, "thin control", runtime)
    # counted and timed where the pruned cells are: on the spec's device
    thin, base, example = thin.eval().to(runtime.device), base.to(runtime.device), example.to(runtime.device)
    result = history[-1] if history else evaluate(thin, data, spec.val_batch_size, spec.limit_val_batches)
    achieved = measured_cost(thin, example, target.cost, latency_of)
    macs, params = measured_cost(thin, example, "macs"), measured_cost(thin, example, "params")
    row = {
        "cell": cell.key,
        "model": cell.model,
        "backend": cell.backend,
        "method": cell.method,
        "percent": 0.0,
        "seed": cell.seed,
        "distill": False,
        "quantize": "none",
        "scope": "uniform",
        "physical": True,
        "status": "ok",
        "error": "",
        "top_k": base_figures["top_k"],
        "base_top1": base_figures["accuracy"],
        "base_topk": base_figures["top_k_accuracy"],
        "finetuned_top1": round(result.top1, 6),
        "finetuned_topk": round(result.top_k, 6),
        "params_before": base_figures["params"],
        "params_after": int(params),
        "params_ratio": round(base_figures["params"] / params, 4),
        "macs_before": base_figures["macs"],
        "macs_after": int(macs),
        "mac_ratio": round(base_figures["macs"] / macs, 4),
        "prune_seconds": 0.0,
        "prune_train_steps": 0,
        "budget": cell.budget,
        "allocation": "uniform",
        "iterations": 1,
        "budget_cost": target.cost,
        "achieved_ratio": round(budget.cost(target)({}) / achieved, 4),
        "budget_met": achieved <= goal * (1 + 1e-9),
        "budget_note": shortfall(achieved, goal, TOLERANCE, "uniform", budget) or "",
    }
    timed, unstable = latency_figures(spec, base, thin, example, measurements)
    return (
        row
        | timed
        | {"speedup_per_mac": round(timed["speedup_b64"] / row["mac_ratio"], 4), "unstable": ",".join(unstable)}
    )


def layer_widths(model: nn.Module, layers: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per pruned layer: channels kept, channels before, and its position in the network (backends list layers in their
    own order)."""
    rank = {name: index for index, (name, _) in enumerate(model.named_modules())}
    ordered = sorted(layers, key=lambda layer: rank.get(layer["layer"], len(rank)))
    return {
        "kept": {layer["layer"]: layer["after"] for layer in ordered},
        "units": {layer["layer"]: layer["before"] for layer in ordered},
        "layer_rank": {layer["layer"]: rank.get(layer["layer"], len(rank)) for layer in ordered},
    }


def failed_row(cell: Cell, error: BaseException, spec: MatrixSpec) -> dict[str, Any]:
    message = first_line(error)
    return {
        "cell": cell.key,
        "model": cell.model,
        "backend": cell.backend,
        "method": cell.method,
        "percent": cell.percent,
        "seed": cell.seed,
        "distill": cell.distill,
        "quantize": cell.quantize,
        "status": "error",
        "error": f"{type(error).__name__}: {message}"[:500],
        "env": environment(spec),
    }
