"""results.jsonl -> results.csv and report.md: means +- std over seeds, never one picked seed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from tabulate import tabulate

from backends.budget import parse_target
from pipeline.atomic import write_text
from pipeline.deploy.latency import t_interval

CONFIG = ["model", "backend", "method", "scope", "percent", "budget", "allocation", "distill", "quantize"]
MAC_BUDGETS = (1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)


def frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per cell and seed; per-layer widths as JSON text, the environment as a few flat columns."""
    flat = []
    for row in rows:
        out = {k: v for k, v in row.items() if k not in ("kept", "units", "layer_rank", "env")}
        if "kept" in row:
            out["kept_channels"] = json.dumps(row["kept"])
            out["units_json"] = json.dumps(row["units"])
            out["layer_rank_json"] = json.dumps(row.get("layer_rank", {}))
        out.setdefault("distill", False)  # rows from before the compression axes
        out.setdefault("quantize", "none")
        out.setdefault("budget", "")  # a percent cell, or one from before budgets
        out.setdefault("allocation", "")
        out["unstable"] = row.get("unstable", "")  # rows from before the stability protocol: not assessed, not marked
        for name in filter(None, out["unstable"].split(",")):
            out[f"{name}_unstable"] = True
        env = row.get("env", {})
        out |= {
            "torch": env.get("torch"),
            "nni": env.get("nni"),
            "torch_pruning": env.get("torch-pruning"),
            "cpu": env.get("cpu"),
            "device": env.get("device", "cpu"),
            "device_name": env.get("device_name", env.get("cpu")),
            "memory_format": env.get("memory_format", "contiguous (NCHW)"),
            "latency_threads": env.get("latency_threads"),
        }
        flat.append(out)
    return pd.DataFrame(flat)


def summary(ok: pd.DataFrame) -> pd.DataFrame:
    """Per configuration (model, backend, method, scope, percent): mean and std over seeds of every figure."""
    numeric = [
        c
        for c in ok.columns
        if c not in CONFIG and c != "seed" and pd.api.types.is_numeric_dtype(ok[c]) and ok[c].dtype != bool
    ]
    grouped = ok.groupby(CONFIG, sort=True)[numeric]
    table = grouped.mean().join(grouped.std(ddof=1).add_suffix("_std")).join(grouped.size().rename("seeds"))
    flags = [c for c in ok.columns if c.endswith("_unstable")]
    if flags:  # a figure is unstable where any seed's is: a mean over one unsettled figure is not a clean figure
        table = table.join(ok[[*CONFIG, *flags]].fillna(False).astype({c: bool for c in flags}).groupby(CONFIG).any())
    return table.reset_index()


def mean_std(mean: float, std: float, seeds: int) -> str:
    if pd.isna(mean):
        return "-"
    return f"{mean:.4f} ± {std:.4f}" if seeds > 1 and not pd.isna(std) else f"{mean:.4f}"


def ratio(value: float, unstable: object = False) -> str:
    """4.00x; with a `~` where the figure's 95% interval stayed wider than the tolerance (see the report's note)."""
    return "-" if pd.isna(value) else f"{value:.2f}x" + (" ~" if unstable is True else "")


def speedup(s: pd.Series, name: str) -> str:
    return ratio(s.get(name), s.get(f"{name}_unstable", False))


def model_table(stats: pd.DataFrame, has_scratch_control: bool) -> str:
    rows = []
    for _, s in stats.iterrows():
        row = {
            "backend": s.backend,
            "method": s.method,
            "scope": s.scope,
            **({"budget": s.budget, "allocation": s.allocation} if s.budget else {"percent": f"{s.percent:g}"}),
            "refine": "KD" if s.distill else "plain",
            "int8": s.quantize,
            "seeds": int(s.seeds),
            "top-1 fine-tuned": mean_std(s.finetuned_top1, s.get("finetuned_top1_std"), s.seeds),
            "Δ vs base": f"{s.finetuned_top1 - s.base_top1:+.4f}",
            "masked top-1": mean_std(s.masked_top1, s.get("masked_top1_std"), s.seeds),
            "pruned top-1": mean_std(s.pruned_top1, s.get("pruned_top1_std"), s.seeds),
        }
        if has_scratch_control:
            row["from scratch top-1"] = mean_std(s.get("scratch_top1"), s.get("scratch_top1_std"), s.seeds)
        row |= {
            "params ÷": ratio(s.params_ratio),
            "MACs ÷": ratio(s.mac_ratio),
            "speedup b64": speedup(s, "speedup_b64"),
        }
        if "speedup_b64_nchw" in stats.columns:  # runs from before channels_last timing have one layout only
            row["speedup b64 NCHW"] = speedup(s, "speedup_b64_nchw")
        row |= {"speedup b1": speedup(s, "speedup_b1"), "prune s": f"{s.prune_seconds:.3f}"}
        if s.quantize != "none":
            row |= {
                "int8 top-1": mean_std(s.get("int8_top1"), s.get("int8_top1_std"), s.seeds),
                "int8 size ÷": ratio(s.get("size_ratio_int8")),
                "int8 speedup b64": speedup(s, "speedup_int8_b64"),
            }
        rows.append(row)
    return tabulate(rows, headers="keys", tablefmt="github", disable_numparse=True)


MATCHED_NOTE = (
    "Each cell: fine-tuned top-1, mean ± 95% interval over seeds (Student's t; one seed: no interval), then the cost "
    "reached (base / pruned) and the paired difference to the random control at the same budget and allocation "
    "(Δ random, per seed). `missed` marks a budget the pruned model's real cost went over. Where two intervals "
    "overlap, the runs do not separate those two methods."
)


def interval(values: pd.Series) -> str:
    """mean ± 95% half-width (t), or the mean alone for one value."""
    values = values.dropna()
    if values.empty:
        return "-"
    if len(values) == 1:
        return f"{values.iloc[0]:.4f}"
    mean, half = t_interval(values.tolist())
    return f"{mean:.4f} ± {half:.4f}"


def budget_order(text: str) -> tuple[str, bool, float]:
    """Columns from the loosest budget to the tightest: ratios rising, then ceilings falling."""
    target = parse_target(text)
    return target.cost, not target.relative, target.value if target.relative else -target.value


def matched_table(rows: pd.DataFrame) -> str:
    """One model's budget cells: rows backend:method x allocation, columns the budgets."""
    cells = rows[rows.budget != ""]
    budgets = sorted(cells.budget.unique(), key=budget_order)
    random = cells[(cells.backend == "scratch") & (cells.method == "random")]
    table = []
    axes = ["backend", "method", "allocation", "distill", "quantize"]  # one row per configuration: seeds only pool
    for (backend, method, allocation, distill, quantize), group in cells.groupby(axes, sort=True):
        extras = (" +KD" if distill else "") + (f" int8-{quantize}" if quantize != "none" else "")
        line = {"method": f"{backend}:{method}{extras}", "allocation": allocation}
        for budget in budgets:
            at = group[group.budget == budget]
            if at.empty:
                line[budget] = "-"
                continue
            text = f"{interval(at.finetuned_top1)} ({at.achieved_ratio.mean():.2f}x"
            same = (random.budget == budget) & (random.allocation == allocation) & (random.distill == distill)
            control = random[same & (random.quantize == quantize)].set_index("seed")
            if not control.empty and not (backend == "scratch" and method == "random"):
                paired = at.set_index("seed").finetuned_top1 - control.finetuned_top1
                text += f"; Δ random {interval(paired).replace(' ± ', ' ±')}" if paired.notna().any() else ""
            missed = "budget_met" in at and not at.budget_met.fillna(True).astype(bool).all()
            line[budget] = text + (", missed)" if missed else ")")
        table.append(line)
    return tabulate(table, headers="keys", tablefmt="github", disable_numparse=True)


def budget_table(stats: pd.DataFrame) -> str:
    """For each MAC budget, each backend's best fine-tuned accuracy among configurations at least that much cheaper.

    The random control gets its own column: a method earns its place only where it beats random at the same budget.
    """
    column = stats.backend.where(stats.method != "random", "random (control)")
    columns = [
        *sorted(set(column) - {"random (control)"}),
        *(["random (control)"] if "random (control)" in set(column) else []),
    ]
    rows = []
    for model in sorted(stats.model.unique()):
        for budget in MAC_BUDGETS:
            within = (stats.model == model) & (stats.mac_ratio >= budget)
            if not within.any():
                continue
            row: dict[str, str] = {"model": model, "MACs ÷ at least": f"{budget:g}x"}
            for name in columns:
                candidates = stats[within & (column == name)]
                if candidates.empty:
                    row[name] = "-"
                    continue
                best = candidates.loc[candidates.finetuned_top1.idxmax()]
                accuracy = mean_std(best.finetuned_top1, best.get("finetuned_top1_std"), best.seeds)
                extras = (" +KD" if best.distill else "") + (
                    f" int8-{best.quantize}" if best.quantize != "none" else ""
                )
                row[name] = f"{accuracy} ({best.method}{extras} {best.percent:g}, {best.mac_ratio:.1f}x)"
            rows.append(row)
    return (
        tabulate(rows, headers="keys", tablefmt="github", disable_numparse=True)
        if rows
        else "(no configuration reaches 1.5x fewer MACs)"
    )


def latency_where(manifest: dict[str, Any]) -> str:
    """Device and layout latency was timed in; runs from before the layout was recorded were timed NCHW on the CPU."""
    env = manifest.get("env", {})
    others = env.get("other_memory_formats")
    if "other_memory_formats" not in env:
        return f"{env.get('device', 'cpu')}, {env.get('memory_format', 'contiguous (NCHW)')}"
    if not others:  # --deployed_layout_only
        return f"{env.get('device')} ({env.get('device_name')}), {env.get('memory_format')} as deployed"
    beside = ", ".join(f"{name} in the `_{suffix}` columns" for suffix, name in others.items())
    return f"{env.get('device')} ({env.get('device_name')}), {env.get('memory_format')} as deployed ({beside})"


def timing_words(spec: dict[str, Any]) -> str:
    """How the speedups were timed: by the stability protocol, or (runs from before it) a fixed number of runs."""
    if "latency_tolerance" not in spec:
        return (
            f"median of {spec.get('latency_runs')} runs after warm-up, dense and pruned interleaved; speedup = "
            "dense / pruned "
            "time."
        )
    return (
        f"dense and pruned timed together in interleaved blocks until the 95% interval of the speedup (paired per "
        f"block) is within ±{spec['latency_tolerance']:.1%}, at most {spec.get('latency_cap_s'):g} s per measurement; "
        "each architecture is timed once and every cell that has it reads the same figures; the dense time is its own "
        "measurement and the pruned time is dense / speedup."
    )


UNSTABLE_NOTE = (
    "`~` unstable: that speedup's 95% interval stayed wider than the tolerance within the time cap (other work on the "
    "machine, most likely): read it as rough. Running the same command again, on a quieter machine, runs those cells "
    "again and takes their figures afresh."
)


def settings_lines(manifest: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    spec = manifest.get("spec", {})
    cpus = sorted({r.get("env", {}).get("cpu", "?") for r in rows})
    devices = sorted(
        {r.get("env", {}).get("device_name", "?") for r in rows if r.get("env", {}).get("device", "cpu") != "cpu"}
    )
    versions = ", ".join(f"{k} {v}" for k, v in spec.get("versions", {}).items())
    return [
        f"Data `{spec.get('data_type')}`; base model trained "
        f"{spec.get('base_epochs_resolved', spec.get('base_epochs'))} epochs, each pruned model fine-tuned "
        f"{spec.get('finetune_epochs')} epochs ({spec.get('optimizer')}, lr {spec.get('learning_rate')}, batch "
        f"{spec.get('batch_size')}); every cell starts from the same base per model and seed; seeds "
        f"{', '.join(str(x) for x in spec.get('seeds', []))}.",
        f"Latency: {latency_where(manifest)}, float32, BatchNorm folded into the preceding conv (as inference "
        f"runtimes run it), {spec.get('threads')} thread(s); {timing_words(spec)} int8 kernels run on the CPU. "
        "MACs = Conv + Linear multiply-accumulates per sample (torch FlopCounterMode).",
        f"Environment: {versions}; CPU {', '.join(cpus)}" + (f"; GPU {', '.join(devices)}." if devices else "."),
        f"NNI's data-driven methods (slim, taylor, agp, linear) train {spec.get('prune_steps')} steps on the training "
        "data while pruning, on top of the fine-tuning every cell gets (`prune_train_steps` in results.csv); their "
        "masked figure uses those trained weights.",
        "Accuracy columns: mean ± std over seeds (std shown when more than one seed). `masked` = base weights x mask "
        "with BatchNorm untouched (what NNI reports); `pruned` = the physically smaller model before fine-tuning; "
        "`fine-tuned` = after fine-tuning.",
        "int8 columns (cells with step 4): `ptq` / `qat` run real int8 kernels (PyTorch FX, x86), sized and timed "
        "against the dense fp32 base; `nni-ptq` / `nni-qat` / `nni-lsq` are NNI's simulated int8 (fake quantization "
        "in float): accuracy only, no size or speedup.",
    ]


def render(directory: Path, manifest: dict[str, Any], rows: list[dict[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write results.csv and report.md for `rows`; returns the per-configuration summary and the finished rows (for the
    plots)."""
    table = frame(rows)
    write_text(directory / "results.csv", table.to_csv(index=False))
    ok = table[table.status == "ok"] if not table.empty else table
    lines = ["# prunebench comparison", "", *settings_lines(manifest, rows), ""]
    stats = summary(ok) if not ok.empty else pd.DataFrame()
    for model, per_model in stats.groupby("model", sort=True) if not stats.empty else []:
        base = ok[ok.model == model].drop_duplicates("seed").base_top1
        spread = f" ± {base.std(ddof=1):.4f}" if len(base) > 1 else ""
        lines += [f"## {model}", "", f"Base model top-1: {base.mean():.4f}{spread} over {len(base)} seed(s).", ""]
        if (per_model.budget != "").any():
            lines += ["### Top-1 at matched budgets", "", matched_table(ok[ok.model == model]), "", MATCHED_NOTE, ""]
        lines += [model_table(per_model, "scratch_top1" in per_model), ""]
        flags = [c for c in per_model.columns if c.endswith("_unstable")]
        if flags and per_model[flags].fillna(False).astype(bool).to_numpy().any():
            lines += [UNSTABLE_NOTE, ""]
    if not stats.empty:
        lines += ["## Best fine-tuned accuracy per MAC budget", "", budget_table(stats), ""]
    failed = table[table.status != "ok"] if not table.empty else table
    if not failed.empty:
        lines += [
            "## Failed cells",
            "",
            tabulate(failed[["cell", "error"]].values.tolist(), headers=["cell", "error"], tablefmt="github"),
            "",
        ]
    if table.empty:
        lines += ["No finished cells yet.", ""]
    write_text(directory / "report.md", "\n".join(lines))
    return stats, ok
